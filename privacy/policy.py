"""A hospital's own site privacy policy, and the check a node runs before every round.

The policy is the site's, not the coordinator's: the node loads it from its own file (passed to
the SuperNode through ``--node-config``) and refuses any round that asks for more than it allows.
``check_round`` fails closed: a value the round does not state, that the policy needs, is a
refusal, never a default.

Policy file (TOML, top-level keys, every key optional; a missing key takes the strict default)::

    max_epsilon_per_study = 3.0
    max_epsilon_total = 6.0
    max_delta = 1e-5
    min_noise_multiplier = 0.5
    max_grad_norm = 2.0
    min_cohort_size = 20
    evaluation = "dp"              # what evaluation releases: "dp" (noised statistics), "off", "exact" (warned)
    min_evaluation_cohort = 20     # fewest test patients an evaluation answers on
    max_evaluation_queries_per_study = 5
    evaluation_epsilon_per_query = 0.1
    count_epsilon = 0.1            # the training example count is released once per study, noised
    min_secure_cohort = 3          # fewest sites in a SecAgg+ sum (>= 2; below 3 warns)
    allowed_model_families = ["cnn", "linear", "logistic", "lstm"]
    require_dp = true
    require_secure_aggregation = true
    allowed_app_hashes = ["<sha256 of the Flower app .fab, 64 hex digits>"]   # the apps the node runs
    allow_unpinned_apps = false   # true: run apps nobody pinned (weakens privacy, warned)
    retry_rounds = 2               # rounds the noise plan sets aside for rounds redone after a failure
"""

from __future__ import annotations

import logging
import tomllib
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, StringConstraints, ValidationError, model_validator

from ..config_base import FiniteFrozenModel

__all__ = [
    "NO_SECURE_AGGREGATION_WARNING",
    "STRICT_DEFAULTS",
    "PolicyFileError",
    "PolicyViolation",
    "RoundRequest",
    "Rule",
    "SitePolicy",
    "check_round",
    "load_policy",
    "node_default_policy",
]

logger = logging.getLogger(__name__)

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
_Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]

#: The strict defaults used when a site gives no policy file (see ``docs/privacy.md``).
STRICT_DEFAULTS: dict[str, Any] = {
    "max_epsilon_per_study": 3.0,
    "max_epsilon_total": 6.0,
    "max_delta": 1e-5,
    "min_noise_multiplier": 0.5,
    "max_grad_norm": 2.0,
    "min_cohort_size": 20,
    "evaluation": "dp",
    "min_evaluation_cohort": 20,
    "max_evaluation_queries_per_study": 5,
    "evaluation_epsilon_per_query": 0.1,
    "count_epsilon": 0.1,
    "min_secure_cohort": 3,
    "allowed_model_families": ("cnn", "linear", "logistic", "lstm"),
    "require_dp": True,
    "require_secure_aggregation": True,
    "allowed_app_hashes": None,
    "allow_unpinned_apps": False,
    "retry_rounds": 2,
}


class Rule(StrEnum):
    """The policy rules; ``PolicyViolation.rule`` is one of these (compares equal to its string)."""

    MALFORMED_REQUEST = "malformed_request"
    DP_REQUIRED = "dp_required"
    MODEL_FAMILY = "model_family"
    APP_HASH = "app_hash"
    SECURE_AGGREGATION = "secure_aggregation"
    COHORT_SIZE = "cohort_size"
    EVALUATION = "evaluation"
    EVALUATION_COHORT = "evaluation_cohort"
    EVALUATION_QUERIES = "evaluation_queries"
    SECURE_COHORT = "secure_cohort"
    DELTA = "delta"
    NOISE_MULTIPLIER = "noise_multiplier"
    MAX_GRAD_NORM = "max_grad_norm"
    EPSILON_UNBOUNDED = "epsilon_unbounded"
    EPSILON_STUDY = "epsilon_study"
    EPSILON_TOTAL = "epsilon_total"


class PolicyViolation(Exception):
    """Raised when a round asks for more than the site policy allows; the node must refuse it.

    Attributes
    ----------
    rule : Rule
        The rule broken.
    asked, limit :
        The value the round asked for and the policy's limit (``None`` where not a number).
    """

    def __init__(self, rule: Rule, message: str, *, asked: Any = None, limit: Any = None) -> None:
        super().__init__(f"site policy refuses the round [{rule.value}]: {message}")
        self.rule = rule
        self.asked = asked
        self.limit = limit


class PolicyFileError(Exception):
    """Raised when a policy file is missing, not TOML, or holds unknown or invalid keys."""


class SitePolicy(FiniteFrozenModel):
    """What a site allows any round to ask of it (frozen; unknown keys refused).

    Attributes
    ----------
    max_epsilon_per_study : float
        Largest sample-level ε the site will spend on one study (all its rounds together).
    max_epsilon_total : float
        Largest ε the site will spend over all studies together (basic composition: ε adds up).
    max_delta : float
        Largest δ a round may use.
    min_noise_multiplier : float
        Smallest DP-SGD noise multiplier σ (noise std / clipping norm).
    max_grad_norm : float
        Largest per-example clipping norm C.
    min_cohort_size : int
        Fewest patients the site trains on in a round.
    evaluation : {"dp", "off", "exact"}
        What an evaluation request releases: ``dp`` (default) Laplace-noised sufficient statistics
        charged to the ledger (``privacy.release_mechanisms``); ``off`` nothing (refused);
        ``exact`` today's exact metrics, outside ε (weakens privacy, warned).
    min_evaluation_cohort : int
        Fewest test patients an evaluation (``dp`` or ``exact``) answers on.
    max_evaluation_queries_per_study : int
        Most evaluations the site answers in one study (each received model is one query).
    evaluation_epsilon_per_query : float
        ε of one ``dp`` evaluation (its own ledger entry, added to the study's ε).
    count_epsilon : float
        ε of the site's training example count, released once per study with Laplace noise.
        ``count_epsilon + max_evaluation_queries_per_study * evaluation_epsilon_per_query`` (``dp``)
        is set aside from the site's target ε: DP-SGD is calibrated to the rest.
    min_secure_cohort : int
        Fewest sites whose updates a SecAgg+ round may sum (checked by ``client.secure`` before
        any share leaves the site; also bounds the reconstruction threshold). 2 is allowed with a
        weakening warning: with two sites each reads the other's update from the sum.
    allowed_model_families : tuple of str
        Model families the site accepts; any other is refused.
    require_dp : bool
        Whether DP-SGD is required (``False`` weakens privacy and warns).
    require_secure_aggregation : bool
        Whether the round must use secure aggregation (SecAgg+).
    allowed_app_hashes : tuple of str or None
        SHA-256 (hex) of the Flower apps the site runs; ``None`` pins no app.
    allow_unpinned_apps : bool
        Whether the node may run apps that no pin names (``True`` weakens privacy and warns: an
        app that skips the policy, the ledger and DP would run). By default a node refuses
        every app that is not pinned, before its code is loaded.
    retry_rounds : int
        The retry reserve: DP-SGD noise is planned for the study's rounds plus this many, so that
        up to ``retry_rounds`` rounds redone after a failure (a round whose update had left the
        site is charged again) fit the budget; it also bounds how many rounds a study may void
        (``privacy.ledger``). The ε budget stays the hard stop.
    """

    max_epsilon_per_study: float = Field(default=STRICT_DEFAULTS["max_epsilon_per_study"], gt=0)
    max_epsilon_total: float = Field(default=STRICT_DEFAULTS["max_epsilon_total"], gt=0)
    max_delta: float = Field(default=STRICT_DEFAULTS["max_delta"], gt=0, lt=1)
    min_noise_multiplier: float = Field(default=STRICT_DEFAULTS["min_noise_multiplier"], ge=0)
    max_grad_norm: float = Field(default=STRICT_DEFAULTS["max_grad_norm"], gt=0)
    min_cohort_size: int = Field(default=STRICT_DEFAULTS["min_cohort_size"], ge=1)
    evaluation: Literal["dp", "off", "exact"] = STRICT_DEFAULTS["evaluation"]
    min_evaluation_cohort: int = Field(default=STRICT_DEFAULTS["min_evaluation_cohort"], ge=1)
    max_evaluation_queries_per_study: int = Field(default=STRICT_DEFAULTS["max_evaluation_queries_per_study"], ge=0)
    evaluation_epsilon_per_query: float = Field(default=STRICT_DEFAULTS["evaluation_epsilon_per_query"], gt=0)
    count_epsilon: float = Field(default=STRICT_DEFAULTS["count_epsilon"], gt=0)
    min_secure_cohort: int = Field(default=STRICT_DEFAULTS["min_secure_cohort"], ge=2)
    allowed_model_families: tuple[_Name, ...] = Field(
        default=STRICT_DEFAULTS["allowed_model_families"], min_length=1
    )
    require_dp: bool = STRICT_DEFAULTS["require_dp"]
    require_secure_aggregation: bool = STRICT_DEFAULTS["require_secure_aggregation"]
    allowed_app_hashes: tuple[Sha256Hex, ...] | None = Field(
        default=STRICT_DEFAULTS["allowed_app_hashes"], min_length=1
    )
    allow_unpinned_apps: bool = STRICT_DEFAULTS["allow_unpinned_apps"]
    retry_rounds: int = Field(default=STRICT_DEFAULTS["retry_rounds"], ge=0, le=100)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.max_epsilon_per_study > self.max_epsilon_total:
            raise ValueError(
                f"max_epsilon_per_study ({self.max_epsilon_per_study}) exceeds max_epsilon_total "
                f"({self.max_epsilon_total}); lower it or raise max_epsilon_total"
            )
        return self

    @classmethod
    def strict_default(cls) -> SitePolicy:
        """Return the strict policy (every rule at its strictest, SecAgg+ required).

        Notes
        -----
        This is also what a node applies without a policy file (:func:`node_default_policy`):
        such a node refuses plain rounds (rule ``secure_aggregation``) and trains only in SecAgg+
        rounds (``secure-aggregation = true`` in the study).
        """
        return cls()

    def weakening_settings(self) -> list[str]:
        """Return human-readable notes on settings that are weaker than the strict default."""
        notes = []
        if self.evaluation == "exact":
            notes.append('evaluation = "exact": the coordinator receives exact evaluation metrics of this '
                         "site's test patients, outside ε (a crafted model can read them back)")
        for key in ("max_evaluation_queries_per_study", "evaluation_epsilon_per_query", "count_epsilon"):
            if getattr(self, key) > STRICT_DEFAULTS[key]:
                notes.append(f"{key} = {getattr(self, key)} is above the strict default {STRICT_DEFAULTS[key]}")
        if self.min_evaluation_cohort < STRICT_DEFAULTS["min_evaluation_cohort"]:
            notes.append(f"min_evaluation_cohort = {self.min_evaluation_cohort} is below the strict default "
                         f"{STRICT_DEFAULTS['min_evaluation_cohort']}")
        if not self.require_dp:
            notes.append("require_dp = false: rounds without DP-SGD are accepted")
        if not self.require_secure_aggregation:
            notes.append("require_secure_aggregation = false: the server may see this site's update")
        if self.allow_unpinned_apps:
            notes.append("allow_unpinned_apps = true: the node runs apps nobody pinned, which may skip "
                         "this policy, the privacy ledger and DP")
        for key in ("max_epsilon_per_study", "max_epsilon_total", "max_delta", "max_grad_norm"):
            if getattr(self, key) > STRICT_DEFAULTS[key]:
                notes.append(f"{key} = {getattr(self, key)} is above the strict default {STRICT_DEFAULTS[key]}")
        for key in ("min_noise_multiplier", "min_cohort_size", "min_secure_cohort"):
            if getattr(self, key) < STRICT_DEFAULTS[key]:
                notes.append(f"{key} = {getattr(self, key)} is below the strict default {STRICT_DEFAULTS[key]}")
        return notes


class RoundRequest(FiniteFrozenModel):
    """What one round asks of the site, as the node states it before training (frozen).

    Attributes
    ----------
    study : str
        The study the round belongs to.
    model_family : str
        The model family the round trains.
    dp_enabled : bool
        Whether the round trains with DP-SGD.
    target_epsilon : float or None
        The study's target ε when DP is set by a target (the trainer stops there).
    noise_multiplier : float or None
        The noise multiplier σ the round uses (resolved from ``target_epsilon`` if needed).
    delta, max_grad_norm : float or None
        δ and the clipping norm the round uses.
    epsilon_after_round : float or None
        The node accountant's projection of the study's ε after this round, where available.
    secure_aggregation : bool
        Whether the round runs under secure aggregation.
    app_hash : str or None
        SHA-256 (hex) of the running Flower app.
    cohort_size : int
        Patients the site trains on in this round.
    epsilon_spent_study, epsilon_spent_total : float
        ε already spent in this study and over all studies (from the site's ledger).
    """

    study: _Name
    model_family: _Name
    dp_enabled: bool
    target_epsilon: float | None = Field(default=None, gt=0)
    noise_multiplier: float | None = Field(default=None, ge=0)
    delta: float | None = Field(default=None, gt=0, lt=1)
    max_grad_norm: float | None = Field(default=None, gt=0)
    epsilon_after_round: float | None = Field(default=None, ge=0)
    secure_aggregation: bool
    app_hash: str | None = None
    cohort_size: int = Field(ge=0)
    epsilon_spent_study: float = Field(ge=0)
    epsilon_spent_total: float = Field(ge=0)

    @model_validator(mode="after")
    def _spent_consistent(self) -> Self:
        if self.epsilon_spent_study > self.epsilon_spent_total * (1 + 1e-9) + 1e-12:
            raise ValueError(
                f"epsilon_spent_study ({self.epsilon_spent_study}) exceeds epsilon_spent_total "
                f"({self.epsilon_spent_total}); the ledger values are inconsistent"
            )
        return self

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> RoundRequest:
        """Build a request from raw values; invalid values raise ``PolicyViolation`` (malformed)."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(request)'}: {e['msg']}" for e in err.errors())
            raise PolicyViolation(
                Rule.MALFORMED_REQUEST,
                f"the round's request is invalid ({detail}); the coordinator must send valid values",
            ) from None


#: Logged and warned by a node every plain round (one without secure aggregation) that its policy
#: allowed (``require_secure_aggregation = false``): the coordinator sees that site's update.
NO_SECURE_AGGREGATION_WARNING: str = (
    "plain round without secure aggregation, allowed by the site's policy "
    "(require_secure_aggregation = false): the server sees this site's individual update"
)


def node_default_policy() -> SitePolicy:
    """Return the policy a node applies without a policy file: the strict default, SecAgg+ included.

    No policy file means the strictest policy, not an open one: ε ≤ 3 per study and ≤ 6 in total,
    δ ≤ 1e-5, σ ≥ 0.5, C ≤ 2, cohort ≥ 20, DP-SGD required and **secure aggregation required**.
    Such a node refuses every plain round (rule ``secure_aggregation``) and trains only in SecAgg+
    rounds (the study sets ``secure-aggregation = true``; a scenario ``[secure_aggregation]
    enabled = true``). A hospital that accepts plain rounds says so in its policy file with
    ``require_secure_aggregation = false`` (loaded with a warning; every plain round warns).

    Returns
    -------
    SitePolicy
        :meth:`SitePolicy.strict_default`.
    """
    return SitePolicy.strict_default()


def load_policy(path: Path | str | None) -> SitePolicy:
    """Load the site policy from a TOML file, or return the strict default when ``path`` is None."""
    if path is None:
        logger.info("no site policy file given: using the strict default policy")
        return SitePolicy.strict_default()
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyFileError(
            f"site policy file {path} not found; give the right path, or none for the strict default"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyFileError(f"cannot read site policy file {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise PolicyFileError(f"site policy file {path} is not valid TOML: {err}") from None
    try:
        policy = SitePolicy.model_validate(raw)
    except ValidationError as err:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg']}" for e in err.errors())
        raise PolicyFileError(
            f"site policy file {path} is invalid: {detail} (see docs/privacy.md for the keys)"
        ) from None
    for note in policy.weakening_settings():
        message = f"site policy {path}: {note}"
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return policy


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def check_round(policy: SitePolicy, request: RoundRequest) -> None:
    """Raise ``PolicyViolation`` naming the first rule the round breaks; return None if allowed."""
    if not isinstance(policy, SitePolicy) or not isinstance(request, RoundRequest):
        raise TypeError("check_round takes a SitePolicy and a RoundRequest")

    if request.model_family not in policy.allowed_model_families:
        raise PolicyViolation(
            Rule.MODEL_FAMILY,
            f"model family {request.model_family!r} is not allowed (allowed: "
            f"{', '.join(policy.allowed_model_families)}); the coordinator must use an allowed family",
            asked=request.model_family,
            limit=policy.allowed_model_families,
        )
    if policy.allowed_app_hashes is not None and request.app_hash not in policy.allowed_app_hashes:
        raise PolicyViolation(
            Rule.APP_HASH,
            f"app hash {request.app_hash!r} is not one the site pinned "
            f"({', '.join(h[:12] + '…' for h in policy.allowed_app_hashes)}); the coordinator must run "
            "the app the hospital approved, or the hospital must review and pin the new one",
            asked=request.app_hash,
            limit=policy.allowed_app_hashes,
        )
    if policy.require_secure_aggregation and not request.secure_aggregation:
        raise PolicyViolation(
            Rule.SECURE_AGGREGATION,
            "the round runs without secure aggregation but the site requires it; the coordinator "
            "must enable SecAgg+ (secure-aggregation = true in the study's [run] table; a scenario: "
            "[secure_aggregation] enabled = true), or the hospital must accept plain rounds in its "
            "policy file (require_secure_aggregation = false)",
            asked=False,
            limit=True,
        )
    if request.cohort_size < policy.min_cohort_size:
        raise PolicyViolation(
            Rule.COHORT_SIZE,
            f"cohort of {request.cohort_size} patients is below the minimum {policy.min_cohort_size}; "
            "the coordinator must select a larger cohort (or leave this site out)",
            asked=request.cohort_size,
            limit=policy.min_cohort_size,
        )
    if not request.dp_enabled:
        if policy.require_dp:
            raise PolicyViolation(
                Rule.DP_REQUIRED,
                "the round trains without differential privacy but the site requires DP-SGD; "
                "the coordinator must enable privacy",
                asked=False,
                limit=True,
            )
        message = f"site accepts a round of study {request.study!r} WITHOUT differential privacy"
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
        return

    _check_dp(policy, request)


def _check_dp(policy: SitePolicy, request: RoundRequest) -> None:
    if request.delta is None:
        raise PolicyViolation(
            Rule.DELTA, "the round does not state δ; the coordinator must send delta",
            limit=policy.max_delta,
        )  # fmt: skip
    if request.delta > policy.max_delta:
        raise PolicyViolation(
            Rule.DELTA,
            f"δ = {request.delta:.3g} exceeds the site's ceiling {policy.max_delta:.3g}; the "
            f"coordinator must set delta ≤ {policy.max_delta:.3g}",
            asked=request.delta,
            limit=policy.max_delta,
        )
    if request.noise_multiplier is None:
        raise PolicyViolation(
            Rule.NOISE_MULTIPLIER,
            "the round's noise multiplier is unknown; the node must resolve it (from target ε) "
            "before the check",
            limit=policy.min_noise_multiplier,
        )
    if request.noise_multiplier < policy.min_noise_multiplier:
        raise PolicyViolation(
            Rule.NOISE_MULTIPLIER,
            f"noise multiplier {_fmt(request.noise_multiplier)} is below the site's minimum "
            f"{_fmt(policy.min_noise_multiplier)}; the coordinator must raise noise_multiplier "
            "(or lower target ε / train fewer steps)",
            asked=request.noise_multiplier,
            limit=policy.min_noise_multiplier,
        )
    if request.max_grad_norm is None:
        raise PolicyViolation(
            Rule.MAX_GRAD_NORM, "the round does not state its clipping norm; the coordinator must "
            "send max_grad_norm", limit=policy.max_grad_norm,
        )  # fmt: skip
    if request.max_grad_norm > policy.max_grad_norm:
        raise PolicyViolation(
            Rule.MAX_GRAD_NORM,
            f"clipping norm {_fmt(request.max_grad_norm)} exceeds the site's maximum "
            f"{_fmt(policy.max_grad_norm)}; the coordinator must set max_grad_norm ≤ "
            f"{_fmt(policy.max_grad_norm)}",
            asked=request.max_grad_norm,
            limit=policy.max_grad_norm,
        )
    # The study's ε after this round: the accountant's projection if given, else the target the
    # trainer stops at. Neither means ε is unbounded: refuse.
    projected = request.epsilon_after_round
    if projected is None:
        projected = request.target_epsilon
    if projected is None:
        raise PolicyViolation(
            Rule.EPSILON_UNBOUNDED,
            "the round states neither a target ε nor the accountant's projected ε after the round, "
            "so its cost is unbounded; the coordinator must set target_epsilon (or the node must "
            "project ε)",
            limit=policy.max_epsilon_per_study,
        )
    projected = max(projected, request.epsilon_spent_study)
    if projected > policy.max_epsilon_per_study:
        remaining = max(policy.max_epsilon_per_study - request.epsilon_spent_study, 0.0)
        raise PolicyViolation(
            Rule.EPSILON_STUDY,
            f"study {request.study!r} would reach ε = {_fmt(projected)} (spent "
            f"{_fmt(request.epsilon_spent_study)}), above the site's per-study maximum "
            f"{_fmt(policy.max_epsilon_per_study)}; the coordinator must lower target_epsilon to "
            f"≤ {_fmt(policy.max_epsilon_per_study)} (this study has {_fmt(remaining)} left) or stop the study",
            asked=projected,
            limit=policy.max_epsilon_per_study,
        )
    total = request.epsilon_spent_total - request.epsilon_spent_study + projected
    if total > policy.max_epsilon_total:
        remaining = max(policy.max_epsilon_total - request.epsilon_spent_total, 0.0)
        raise PolicyViolation(
            Rule.EPSILON_TOTAL,
            f"the site's total ε over all studies would reach {_fmt(total)} (spent "
            f"{_fmt(request.epsilon_spent_total)}), above its maximum {_fmt(policy.max_epsilon_total)}; "
            f"the coordinator must lower target_epsilon (the site has {_fmt(remaining)} left in total)",
            asked=total,
            limit=policy.max_epsilon_total,
        )
