"""A site's differential-privacy settings for sample-level DP-SGD (Opacus).

Choices, so that nobody has to guess them:

- **ε or σ.** With DP enabled give exactly one of ``target_epsilon`` (the noise is calibrated so
  that ε after all the study's planned rounds equals the target, see ``privacy.engine``) or
  ``noise_multiplier`` (fixed σ; then ``epsilon_budget`` is required, since a budget that
  cannot be overrun needs a number). Giving neither key at all means the site default
  ``target_epsilon = DEFAULT_TARGET_EPSILON`` (3.0), so a node without a policy file still
  trains under DP; passing both, or an explicit ``None`` for both, is an error.
- **δ is a fixed number** (default 1e-5), not ``1/(10 n)``: the ledger binds a study to one δ
  and every ε of the study refers to it, while ``n`` may change when a site reloads its data.
  :meth:`PrivacySettings.warn_if_weak` warns when ``δ ≥ 1/n``.
- **Accountant** ``"rdp"`` (default: Rényi DP, an upper bound on ε, fast) or ``"prv"`` (privacy
  random variables, a tighter ε, slower). Names are checked against Opacus's accountant
  registry; ``"gdp"`` (Gaussian DP, a central-limit approximation rather than a bound) is
  refused.
- **Budget.** ``epsilon_budget`` is the site's total ε for the study, default ``target_epsilon``.
  A round whose projected ε exceeds it is refused before training (``BudgetExceededError``).
- **secure_mode is impossible here**: Opacus's ``secure_mode=True`` needs ``torchcsprng``,
  which the package index lacks, so noise and Poisson sampling use torch's (non-cryptographic)
  pseudo-random generators seeded from OS entropy (``privacy.randomness``). Opacus's "Secure
  RNG turned off" notice, printed every round, is filtered at its source (``fedcare.notices``);
  every privacy report states it instead.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from opacus.accountants.registry import _ACCOUNTANTS as _OPACUS_ACCOUNTANTS
from pydantic import Field, field_validator, model_validator

from ..config_base import FiniteFrozenModel
from .errors import PrivacyWarning, warn_privacy

__all__ = [
    "DEFAULT_TARGET_EPSILON",
    "SUPPORTED_ACCOUNTANTS",
    "WEAK_EPSILON",
    "GradSampleMode",
    "PrivacySettings",
    "PrivacyWarning",
    "known_accountants",
]

logger = logging.getLogger(__name__)

DEFAULT_TARGET_EPSILON = 3.0
"""ε a site trains to when its settings name neither ``target_epsilon`` nor ``noise_multiplier``."""

WEAK_EPSILON = 10.0
"""ε above which :meth:`PrivacySettings.warn_if_weak` warns."""

SUPPORTED_ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
"""Opacus accountants fedcare accepts: both give a sound upper bound for DP-SGD."""

GradSampleMode = Literal["auto", "fast", "ew", "hooks", "ghost", "functorch"]
"""Per-sample gradient paths; ``privacy.engine.resolve_grad_sample_mode`` says what ``auto`` picks."""


def known_accountants() -> list[str]:
    """Return the accountant names Opacus's registry (``create_accountant``) knows, sorted."""
    return sorted(_OPACUS_ACCOUNTANTS)


class PrivacySettings(FiniteFrozenModel):
    """A site's DP-SGD settings for one study (frozen; unknown fields refused).

    Attributes
    ----------
    enabled : bool
        Train with DP-SGD. ``False`` releases models without any guarantee (warned loudly).
    target_epsilon : float or None
        ε the study should reach after all its planned rounds; the noise is calibrated to it.
    noise_multiplier : float or None
        A fixed σ (noise std / clipping norm) instead of a target.
    delta : float
        δ of the (ε, δ) guarantee; fixed per study (see the module docstring).
    max_grad_norm : float
        Per-sample gradient clipping norm C.
    accountant : {"rdp", "prv"}
        Opacus accountant (see the module docstring).
    epsilon_budget : float or None
        The site's total ε for the study; default ``target_epsilon``.
    grad_sample_mode : {"auto", "fast", "ew", "hooks", "ghost", "functorch"}
        How per-sample gradients are computed: ``fast`` (fedcare's exact closed-form / fused
        path, ``privacy.fast_grad``: linear/logistic regression and ClinicalLSTM only), or
        Opacus's ``ew`` (torch ExpandedWeights), ``hooks`` (per-layer hooks), ``ghost`` (fast
        gradient / ghost clipping), ``functorch`` (``torch.func`` vmap). ``auto`` (default)
        picks the fastest measured valid path per model: ``fast`` for regression and the LSTM,
        ``ew`` for the CNN, ``hooks`` otherwise (``privacy.engine.resolve_grad_sample_mode``).
        Sampling, clipping bound, noise and accounting are the same in every mode.

    Notes
    -----
    ``secure_mode`` is not a setting: it needs ``torchcsprng``, which cannot be installed here.
    Build with the keyword-only helpers :meth:`with_target`, :meth:`with_noise`,
    :meth:`disabled`, or validate a policy dict with ``model_validate``.
    """

    enabled: bool = True
    target_epsilon: float | None = Field(default=None, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    epsilon_budget: float | None = Field(default=None, gt=0)
    grad_sample_mode: GradSampleMode = "auto"

    @model_validator(mode="before")
    @classmethod
    def _default_target(cls, data: Any) -> Any:
        """Fill the site default target ε when neither ε nor σ is named at all."""
        if isinstance(data, dict) and data.get("enabled", True) is not False:
            if "target_epsilon" not in data and "noise_multiplier" not in data:
                data = {**data, "target_epsilon": DEFAULT_TARGET_EPSILON}
        return data

    @field_validator("accountant", mode="before")
    @classmethod
    def _known_accountant(cls, value: Any) -> Any:
        """Check the accountant against Opacus's registry, listing the known names."""
        known = known_accountants()
        if value not in known:
            raise ValueError(
                f"unknown accountant {value!r}; Opacus knows: {', '.join(known)} "
                f"(fedcare accepts {', '.join(SUPPORTED_ACCOUNTANTS)})"
            )
        if value not in SUPPORTED_ACCOUNTANTS:
            raise ValueError(
                f"accountant {value!r} is an approximation, not an upper bound on ε for DP-SGD; "
                f"use one of {', '.join(SUPPORTED_ACCOUNTANTS)} (Opacus knows: {', '.join(known)})"
            )
        return value

    @model_validator(mode="after")
    def _one_of_epsilon_or_noise(self) -> PrivacySettings:
        """With DP enabled, require exactly one of target ε and σ, and a budget that fits."""
        if not self.enabled:
            return self
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "with DP enabled give exactly one of target_epsilon (noise calibrated to reach it "
                "after all planned rounds) or noise_multiplier (fixed noise, needs "
                f"epsilon_budget); got target_epsilon={self.target_epsilon}, "
                f"noise_multiplier={self.noise_multiplier}"
            )
        if self.noise_multiplier is not None and self.epsilon_budget is None:
            raise ValueError(
                "a fixed noise_multiplier needs epsilon_budget (the site's total ε for the study): "
                "without it nothing would stop the rounds"
            )
        if (
            self.target_epsilon is not None
            and self.epsilon_budget is not None
            and self.epsilon_budget < self.target_epsilon
        ):
            raise ValueError(
                f"epsilon_budget {self.epsilon_budget} is below target_epsilon "
                f"{self.target_epsilon}: the planned rounds could not finish; lower the target "
                "or raise the budget"
            )
        return self

    @property
    def budget(self) -> float:
        """Return the site's total ε for the study (``epsilon_budget``, else ``target_epsilon``)."""
        if not self.enabled:
            return math.inf
        if self.epsilon_budget is not None:
            return self.epsilon_budget
        assert self.target_epsilon is not None  # guaranteed by the validator
        return self.target_epsilon

    @classmethod
    def with_target(
        cls,
        *,
        epsilon: float,
        delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        accountant: Literal["rdp", "prv"] = "rdp",
        epsilon_budget: float | None = None,
        grad_sample_mode: GradSampleMode = "auto",
    ) -> PrivacySettings:
        """Return DP settings that calibrate the noise to reach ``epsilon`` after all planned rounds."""
        return cls(
            enabled=True,
            target_epsilon=epsilon,
            delta=delta,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
            epsilon_budget=epsilon_budget,
            grad_sample_mode=grad_sample_mode,
        )

    @classmethod
    def with_noise(
        cls,
        *,
        noise_multiplier: float,
        epsilon_budget: float,
        delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        accountant: Literal["rdp", "prv"] = "rdp",
        grad_sample_mode: GradSampleMode = "auto",
    ) -> PrivacySettings:
        """Return DP settings with a fixed σ, stopped by ``epsilon_budget``."""
        return cls(
            enabled=True,
            noise_multiplier=noise_multiplier,
            epsilon_budget=epsilon_budget,
            delta=delta,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
            grad_sample_mode=grad_sample_mode,
        )

    @classmethod
    def disabled(cls) -> PrivacySettings:
        """Return settings with DP off (no guarantee; :meth:`warn_if_weak` warns)."""
        return cls(enabled=False)

    def weaknesses(self, *, num_examples: int) -> list[str]:
        """Return why these settings are weak for ``num_examples`` training examples (may be empty)."""
        found: list[str] = []
        if not self.enabled:
            return [
                "differential privacy is DISABLED: models trained on this site's data leave it "
                "without any privacy guarantee; enable it (enabled = true) unless the ethics "
                "board approved training without DP"
            ]
        for name, value in (("target_epsilon", self.target_epsilon), ("epsilon_budget", self.epsilon_budget)):
            if value is not None and value > WEAK_EPSILON:
                found.append(
                    f"{name} = {value:g} is above {WEAK_EPSILON:g}: such an ε gives little "
                    "protection; lower it"
                )
        if num_examples > 0 and self.delta >= 1.0 / num_examples:
            found.append(
                f"delta = {self.delta:g} is not below 1/n = {1.0 / num_examples:g} for "
                f"{num_examples} training examples: a mechanism that publishes one patient's "
                "record outright would satisfy it; use delta well below 1/n (e.g. 1/(10 n))"
            )
        return found

    def warn_if_weak(self, *, num_examples: int, site: str | None = None, study: str | None = None) -> list[str]:
        """Warn loudly (``PrivacyWarning`` + a WARNING log) on each weakness; return the messages.

        With ``site`` / ``study`` the log line is written once per site, study and message in a
        process (:func:`~fedcare.privacy.errors.warn_privacy`); the warning is raised every time.
        """
        found = self.weaknesses(num_examples=num_examples)
        for message in found:
            warn_privacy(message, logger=logger, site=site, study=study)
        return found
