"""The coordinator's run configuration: one frozen model, parsed once at the ServerApp entry.

Flower hands the ServerApp ``context.run_config``, a flat dict of ``bool | int | float | str``
(nested tables of the app's ``[tool.flwr.app.config]`` arrive flattened with dotted keys).
:meth:`RunConfig.from_run_config` reads it with these kebab-case keys (every one optional
except ``input-shape``)::

    study = "heart-disease"        # the study / federation name sites keep their ledgers under
    num-server-rounds = 5
    strategy = "fedavg"            # fedavg | fedavgm | fedprox | fedadam | fedyogi | fedadagrad |
                                   # fedmedian | fedtrimmedavg | krum
    proximal-mu = 0.01             # fedprox only
    server-momentum = 0.9          # fedavgm only: server momentum β in [0, 1) (Hsu et al. 2019)
    server-learning-rate = 1.0     # fedavgm only: server learning rate (> 0)
    eta = 0.1                      # fedadam, fedyogi, fedadagrad: server learning rate
    eta-l = 0.1                    # fedadam, fedyogi, fedadagrad: client learning rate flwr records
    beta-1 = 0.9                   # fedadam, fedyogi
    beta-2 = 0.99                  # fedadam, fedyogi
    tau = 0.001                    # fedadam, fedyogi, fedadagrad: adaptivity (added to sqrt(v))
    trim-beta = 0.2                # fedtrimmedavg only: fraction cut at each end
    num-malicious-nodes = 0        # krum only
    fraction-train = 1.0
    fraction-evaluate = 1.0        # 0 skips federated evaluation
    evaluate-with-train = false    # true: sites evaluate each global model when the next round's
                                   # train message brings it (one message exchange per round
                                   # instead of two); the evaluate stage runs after the last round only
    min-sites = 2                  # minimum available / training / evaluating sites
    round-timeout-s = 600.0
    max-update-norm = 0.0          # > 0: refuse a site's update longer than this L2 norm (0: no
                                   # bound; NaN / Inf, names and shapes are always checked)
    local-epochs = 1               # sent to the sites each round
    batch-size = 32
    lr = 0.05
    clip-grad-norm = 0.0           # > 0: sites training without DP clip each batch's gradient norm
    model-family = "logistic"      # models.FAMILIES
    hidden-size = 32               # lstm
    num-layers = 1                 # lstm
    bidirectional = false          # lstm
    width = 16                     # cnn
    task = "binary"                # binary | multiclass | regression
    num-classes = 2
    input-shape = "13"             # one example's shape: "F", "C,H,W" or "T,F"
    has-mask = false               # sequences with a missingness mask
    checkpoint-dir = ""            # "" = no checkpoints
    resume = false                 # better: `fedcare run STUDY --resume`, a run-config override that
                                   # leaves the app (and the hash hospitals pinned) unchanged
    seed = 0
    artefact-key = ""              # AES key of checkpoints / final model: a 0600 key file, "env"
                                   # (FEDCARE_ARTEFACT_KEY) or "env:NAME"; "" = plaintext (warned)
    audit-key = ""                 # Ed25519 key (fedcare audit keygen): sign an audit log; "" = none
    audit-log = ""                 # the audit log; "" = <checkpoint-dir>/audit.jsonl
    secure-aggregation = false     # SecAgg+: the server sees only the sum of the sites' updates
    secagg-num-shares = 1.0        # int > 2: shares per site; float in (0, 1]: fraction of sites
    secagg-reconstruction-threshold = 0.67  # int, or float in (0, 1]: fraction of the shares
    secagg-clipping-range = 8.0    # parameters must lie in [-range, range] to be quantised
    client-dp-clipping-norm = 0.0  # > 0: client-level DP (each site's update clipped to this L2 norm)
    client-dp-noise-multiplier = 1.0  # σ of the server's Gaussian noise on the mean (std σC/m)
    client-dp-delta = 1e-5         # δ of the client-level ε the server reports

A strategy parameter given for another strategy is an error (it would be silently ignored).
The server optimisers (fedavgm, fedadam, fedyogi, fedadagrad: Reddi et al. 2021) are flwr's own
classes; every parameter key has one default whichever of them uses it (flwr's FedYogi defaults
to eta = 0.01, fedcare's eta defaults to 0.1 for all three: set it). fedavgm's server-momentum
defaults to 0.9 here (flwr's 0.0 would make it FedAvg). flwr 1.42 ships no SCAFFOLD.
Secure aggregation needs a mean-based strategy (fedavg, fedprox): robust aggregators need the
individual updates SecAgg+ hides. Client-level DP runs on the secure path only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..models import ModelSpec, Task
from ..privacy.errors import log_privacy_warning

__all__ = [
    "RUN_CONFIG_KEYS",
    "STRATEGY_NAMES",
    "STRATEGY_PARAMS",
    "InvalidRunConfigError",
    "RESUME_KEY",
    "RunConfig",
    "SECURE_AGGREGATION_STRATEGIES",
    "resume_override",
]

logger = logging.getLogger(__name__)

#: the strategies ``server.strategy.STRATEGIES`` builds (it refuses to load when the two differ)
STRATEGY_NAMES: Final = (
    "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian", "fedprox", "fedtrimmedavg", "fedyogi", "krum",
)

#: strategies whose aggregate is a (weighted) mean, the only thing SecAgg+ can compute
SECURE_AGGREGATION_STRATEGIES: Final = ("fedavg", "fedprox")

#: fields written by ``to_run_config`` only when secure aggregation is on
_SECURE_FIELDS: Final = frozenset({
    "secagg_num_shares", "secagg_reconstruction_threshold", "secagg_clipping_range",
    "client_dp_clipping_norm", "client_dp_noise_multiplier", "client_dp_delta",
})


class InvalidRunConfigError(ValueError):
    """Raised when the run configuration has an unknown key, a missing key or a bad value."""


#: the run-config key ``fedcare run --resume`` overrides (``flwr run --run-config resume=true``)
RESUME_KEY: Final = "resume"


def resume_override(config: RunConfig | None) -> dict[str, bool]:
    """Return the run-config override that resumes ``config``'s study from its checkpoint folder.

    An override, not an edit of the study: the Flower App, and so the hash hospitals pinned
    (``allowed_app_hashes``), stay the same.

    Raises
    ------
    InvalidRunConfigError
        For a study that is not fedcare's apps (None) or that keeps no checkpoints.
    """
    if config is None:
        raise InvalidRunConfigError(
            "--resume applies to studies that run fedcare's own ServerApp and ClientApp; remove --resume"
        )
    if config.checkpoint_dir is None:
        raise InvalidRunConfigError(
            f"study {config.study!r} keeps no checkpoints (checkpoint-dir is empty), so there is nothing to "
            "resume from: set checkpoint-dir in its [run] table for the next run, or run it again without --resume"
        )
    return {RESUME_KEY: True}


_FEDOPT: Final = ("fedadagrad", "fedadam", "fedyogi")

#: which strategies each strategy-specific field belongs to
STRATEGY_PARAMS: Final[Mapping[str, tuple[str, ...]]] = {
    "proximal_mu": ("fedprox",),
    "server_momentum": ("fedavgm",),
    "server_learning_rate": ("fedavgm",),
    "eta": _FEDOPT,
    "eta_l": _FEDOPT,
    "beta_1": ("fedadam", "fedyogi"),  # FedAdagrad has no first / second moment decay
    "beta_2": ("fedadam", "fedyogi"),
    "tau": _FEDOPT,
    "trim_beta": ("fedtrimmedavg",),
    "num_malicious_nodes": ("krum",),
}

_MODEL_KEYS: Final[Mapping[str, str]] = {
    "model-family": "family",
    "hidden-size": "hidden_size",
    "num-layers": "num_layers",
    "bidirectional": "bidirectional",
    "width": "width",
    "embedding-dim": "embedding_dim", "buckets": "buckets", "max-length": "max_length", "lowercase": "lowercase",
}

#: run-config key -> RunConfig field (model keys map into ``model``)
RUN_CONFIG_KEYS: Final[Mapping[str, str]] = {
    "study": "study",
    "num-server-rounds": "num_rounds",
    "strategy": "strategy",
    "proximal-mu": "proximal_mu",
    "server-momentum": "server_momentum",
    "server-learning-rate": "server_learning_rate",
    "eta": "eta",
    "eta-l": "eta_l",
    "beta-1": "beta_1",
    "beta-2": "beta_2",
    "tau": "tau",
    "trim-beta": "trim_beta",
    "num-malicious-nodes": "num_malicious_nodes",
    "fraction-train": "fraction_train",
    "fraction-evaluate": "fraction_evaluate",
    "evaluate-with-train": "evaluate_with_train",
    "min-sites": "min_sites",
    "round-timeout-s": "round_timeout_s",
    "max-update-norm": "max_update_norm",
    "local-epochs": "local_epochs",
    "batch-size": "batch_size",
    "lr": "lr",
    "clip-grad-norm": "clip_grad_norm",
    **{k: f"model.{v}" for k, v in _MODEL_KEYS.items()},
    "task": "task",
    "num-classes": "num_classes",
    "input-shape": "input_shape",
    "has-mask": "has_mask",
    "checkpoint-dir": "checkpoint_dir",
    "resume": "resume",
    "seed": "seed",
    "artefact-key": "artefact_key",
    "audit-key": "audit_key",
    "audit-log": "audit_log",
    "secure-aggregation": "secure_aggregation",
    "secagg-num-shares": "secagg_num_shares",
    "secagg-reconstruction-threshold": "secagg_reconstruction_threshold",
    "secagg-clipping-range": "secagg_clipping_range",
    "client-dp-clipping-norm": "client_dp_clipping_norm",
    "client-dp-noise-multiplier": "client_dp_noise_multiplier",
    "client-dp-delta": "client_dp_delta",
}
_OPTIONAL_TEXT: Final = ("checkpoint_dir", "artefact_key", "audit_key", "audit_log")
_FIELD_TO_KEY: Final[Mapping[str, str]] = {v: k for k, v in RUN_CONFIG_KEYS.items()}


class RunConfig(BaseModel):
    """Everything the coordinator needs to run one study; built once, never mutated.

    Attributes
    ----------
    study : str
        Study name; sites keep one privacy ledger per study.
    num_rounds : int
        Total federated rounds (a resumed run continues up to this number).
    strategy : str
        A strategy of :data:`STRATEGY_NAMES` (built by ``server.strategy.STRATEGIES``).
    proximal_mu, server_momentum, server_learning_rate, eta, eta_l, beta_1, beta_2, tau, trim_beta, num_malicious_nodes :
        Strategy parameters, each allowed only with its strategies (see ``STRATEGY_PARAMS``).
    evaluate_with_train : bool
        Federated evaluation without its own message exchange: the train message of round r + 1
        asks the sites to evaluate the model it carries (round r's global model) on their test
        split before training, and the reply brings those metrics; they are recorded as round
        r's evaluation. Only the last round's model gets a separate evaluate stage (sampled with
        ``fraction_evaluate``). Halves the messages per round; round r's evaluation is known one
        round later, and comes from the sites sampled to train (a site that refuses to train
        reports none). Not with secure aggregation (SecAgg+ runs flwr's own workflow).
    fraction_train, fraction_evaluate : float
        Fractions of connected sites sampled each round (at least ``min_sites``).
    min_sites : int
        Minimum sites available, training and evaluating; a round with fewer successful
        training replies stops the run.
    round_timeout_s : float
        How long the server waits for replies in each stage of a round.
    max_update_norm : float
        The largest L2 norm of a site's update (its model minus the global model sent) the
        server aggregates; a longer one is refused and the round goes on without it
        (``server.update_checks``). Under SecAgg+ it bounds the mean update. 0: no bound.
    local_epochs, batch_size, lr :
        Local training settings sent to the sites.
    clip_grad_norm : float
        Sent to the sites: without DP each batch's gradient is clipped to this L2 norm (0: off);
        DP sites clip every example to their own ``max_grad_norm`` instead.
    model : ModelSpec
        Model family and size.
    task, num_classes, input_shape, has_mask :
        What the sites' data looks like, so the server can build the initial model.
    checkpoint_dir : pathlib.Path or None
        Where checkpoints, the final model and the metrics history go; None keeps nothing.
    resume : bool
        Continue from the checkpoint in ``checkpoint_dir``.
    seed : int
        Seeds the initial model, site sampling and the sites' local training.
    artefact_key : str or None
        Encrypts checkpoints and the final model (AES-256-GCM): a key file path (mode 0600),
        ``"env"`` (``FEDCARE_ARTEFACT_KEY``) or ``"env:NAME"``; None writes them in plaintext.
    audit_key : pathlib.Path or None
        The coordinator's Ed25519 audit signing key; when set the server appends a signed,
        hash-chained audit log.
    audit_log : pathlib.Path or None
        Where the audit log goes (default ``<checkpoint_dir>/audit.jsonl``).
    secure_aggregation : bool
        Run every round through SecAgg+ (``server.secagg``): the server learns only the sum.
    secagg_num_shares, secagg_reconstruction_threshold : int or float
        SecAgg+ shares per site and shares needed to unmask (flwr's ``SecAggPlusWorkflow``).
    secagg_clipping_range : float
        Model parameters are quantised in ``[-range, range]``; a site whose parameters leave it
        refuses the round rather than send a silently clipped model.
    client_dp_clipping_norm : float
        L2 bound of each site's update (client-level DP); 0 turns client-level DP off.
    client_dp_noise_multiplier : float
        σ of client-level DP: the server adds N(0, (σ C / m)²) to the mean of m clipped updates.
    client_dp_delta : float
        δ at which the server reports the client-level ε (Opacus RDP accountant).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    study: str = Field(default="fedcare", min_length=1)
    num_rounds: int = Field(default=3, ge=1)
    strategy: str = "fedavg"
    proximal_mu: float = Field(default=0.01, ge=0.0)
    server_momentum: float = Field(default=0.9, ge=0.0, lt=1.0, allow_inf_nan=False)
    server_learning_rate: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    eta: float = Field(default=0.1, gt=0.0, allow_inf_nan=False)
    eta_l: float = Field(default=0.1, gt=0.0, allow_inf_nan=False)
    beta_1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(default=0.99, ge=0.0, lt=1.0)
    tau: float = Field(default=1e-3, gt=0.0, allow_inf_nan=False)
    trim_beta: float = Field(default=0.2, ge=0.0, lt=0.5)
    num_malicious_nodes: int = Field(default=0, ge=0)
    fraction_train: float = Field(default=1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(default=1.0, ge=0.0, le=1.0)
    evaluate_with_train: bool = False
    min_sites: int = Field(default=2, ge=1)
    round_timeout_s: float = Field(default=600.0, gt=0.0)
    max_update_norm: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    local_epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=0.05, gt=0.0)
    clip_grad_norm: float = Field(default=0.0, ge=0.0)
    model: ModelSpec = ModelSpec()
    task: Task = "binary"
    num_classes: int = Field(default=2, ge=1)
    input_shape: tuple[int, ...] = Field(min_length=1, max_length=3)
    has_mask: bool = False
    checkpoint_dir: Path | None = None
    resume: bool = False
    seed: int = 0
    artefact_key: str | None = Field(default=None, min_length=1)
    audit_key: Path | None = None
    audit_log: Path | None = None
    secure_aggregation: bool = False
    secagg_num_shares: int | float = Field(default=1.0, gt=0)
    secagg_reconstruction_threshold: int | float = Field(default=0.67, gt=0)
    secagg_clipping_range: float = Field(default=8.0, gt=0)
    client_dp_clipping_norm: float = Field(default=0.0, ge=0)
    client_dp_noise_multiplier: float = Field(default=1.0, ge=0)
    client_dp_delta: float = Field(default=1e-5, gt=0, lt=1)

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        """Refuse zero or negative dimensions."""
        if any(d < 1 for d in value):
            raise ValueError(f"every dimension of input-shape must be >= 1, got {value}")
        return value

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        """Refuse strategies ``server.strategy`` has no builder for, listing the known ones."""
        if value not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {value!r}; known strategies: {', '.join(STRATEGY_NAMES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        """Check strategy parameters against the strategy and the task against the classes."""
        for name, owners in STRATEGY_PARAMS.items():
            if name in self.model_fields_set and self.strategy not in owners:
                which = " or ".join(repr(o) for o in owners)
                raise ValueError(
                    f"{_FIELD_TO_KEY[name]} applies to strategy {which} only, but strategy is "
                    f"{self.strategy!r}: remove it or set strategy = {owners[0]!r}"
                )
        if self.task == "regression" and self.num_classes != 1 and "num_classes" in self.model_fields_set:
            raise ValueError("a regression task has num-classes = 1 (or leave it out)")
        if self.task == "binary" and self.num_classes != 2:
            raise ValueError(f"task 'binary' needs num-classes = 2, got {self.num_classes}")
        if self.task == "multiclass" and self.num_classes < 3:
            raise ValueError(
                f"task 'multiclass' needs num-classes >= 3, got {self.num_classes}; "
                "use task = 'binary' for two classes"
            )
        if self.audit_key is not None and self.audit_log is None and self.checkpoint_dir is None:
            raise ValueError("audit-key needs audit-log or checkpoint-dir (where the audit log goes)")
        if self.strategy == "krum" and self.min_sites < 2 * self.num_malicious_nodes + 3:
            raise ValueError(
                f"krum with num-malicious-nodes = {self.num_malicious_nodes} needs min-sites >= "
                f"{2 * self.num_malicious_nodes + 3} (n > 2f + 2)"
            )
        if self.evaluate_with_train and self.fraction_evaluate == 0:
            raise ValueError(
                "evaluate-with-train = true asks for federated evaluation, fraction-evaluate = 0 turns "
                "it off: remove one of the two"
            )
        if self.evaluate_with_train and self.secure_aggregation:
            raise ValueError(
                "evaluate-with-train is not available with secure-aggregation = true (SecAgg+ runs "
                "flwr's own round workflow): remove evaluate-with-train"
            )
        self._check_secure_aggregation()
        return self

    def _check_secure_aggregation(self) -> None:
        """Refuse secure settings that cannot work; warn about a weaker combination."""
        if not self.secure_aggregation:
            given = sorted(_FIELD_TO_KEY[f] for f in _SECURE_FIELDS & self.model_fields_set)
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to secure aggregation only (client-level DP runs on "
                    "the SecAgg+ path): set secure-aggregation = true or remove them"
                )
            return
        if self.strategy not in SECURE_AGGREGATION_STRATEGIES:
            raise ValueError(
                f"secure-aggregation = true needs a mean-based strategy "
                f"({', '.join(SECURE_AGGREGATION_STRATEGIES)}), not {self.strategy!r}: SecAgg+ "
                "reveals only the sum of the sites' updates, while median, trimmed-mean and Krum "
                "need each update and the server optimisers' state (fedavgm, fedadam, fedyogi, "
                "fedadagrad) is not wired to the secure path"
            )
        for name in ("secagg_num_shares", "secagg_reconstruction_threshold"):
            value = getattr(self, name)
            if isinstance(value, float) and value > 1:
                raise ValueError(f"{_FIELD_TO_KEY[name]} as a fraction must be in (0, 1], got {value}")
        if isinstance(self.secagg_num_shares, int) and not isinstance(self.secagg_num_shares, bool) \
                and self.secagg_num_shares == 2:
            raise ValueError("secagg-num-shares as a count must be greater than 2 (or a fraction in (0, 1])")
        if self.client_dp_clipping_norm == 0:  # logged once per study (the config is parsed several times)
            log_privacy_warning(
                "secure-aggregation = true without client-level DP "
                "(client-dp-clipping-norm = 0): the released model carries no client-level "
                "guarantee; set client-dp-clipping-norm and client-dp-noise-multiplier",
                logger=logger, study=self.study,
            )

    @property
    def client_dp(self) -> bool:
        """Return whether client-level DP (client clipping + server noise) is on."""
        return self.secure_aggregation and self.client_dp_clipping_norm > 0

    @property
    def output_classes(self) -> int:
        """Return the class count the model is built with (1 for regression)."""
        return 1 if self.task == "regression" else self.num_classes

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's ``context.run_config`` (kebab-case keys, see the module docstring).

        Raises
        ------
        InvalidRunConfigError
            On an unknown key (listing the known ones), a missing ``input-shape`` or a bad value.
        """
        flat = _flatten(run_config)
        unknown = sorted(set(flat) - set(RUN_CONFIG_KEYS))
        if unknown:
            raise InvalidRunConfigError(
                f"unknown run-config key(s) {unknown}; known keys: {', '.join(RUN_CONFIG_KEYS)}. "
                "Fix the study's [run] table (or --run-config)."
            )
        fields: dict[str, Any] = {}
        model: dict[str, Any] = {}
        for key, value in flat.items():
            target = RUN_CONFIG_KEYS[key]
            if target.startswith("model."):
                model[target.removeprefix("model.")] = value
            elif target == "input_shape":
                fields[target] = _parse_shape(value)
            elif target in _OPTIONAL_TEXT:
                text = str(value)
                if target != "artefact_key" and text:
                    fields[target] = Path(text).expanduser()
                else:
                    fields[target] = text or None
            else:
                fields[target] = value
        if model:
            fields["model"] = model
        return _validate(fields)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Return the flat kebab-case run config that :meth:`from_run_config` reads back."""
        out: dict[str, bool | int | float | str] = {}
        for key, target in RUN_CONFIG_KEYS.items():
            if target in STRATEGY_PARAMS and self.strategy not in STRATEGY_PARAMS[target]:
                continue
            if target in _SECURE_FIELDS and not self.secure_aggregation:
                continue
            if target == "max_update_norm" and self.max_update_norm == 0:
                continue  # the default: a study without the bound keeps its configuration hash
            if target.startswith("model."):
                value: Any = getattr(self.model, target.removeprefix("model."))
            else:
                value = getattr(self, target)
            if target == "input_shape":
                value = ",".join(str(d) for d in value)
            elif target in _OPTIONAL_TEXT:
                value = "" if value is None else str(value)
            out[key] = value
        return out


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested tables into dotted keys (as flwr does with ``[tool.flwr.app.config]``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _parse_shape(value: Any) -> Any:
    """Read ``input-shape`` written as ``"1,28,28"`` (or ``"1x28x28"``, or a single int)."""
    if isinstance(value, bool):
        raise InvalidRunConfigError(f"input-shape must be like \"13\" or \"1,28,28\", got {value!r}")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    text = str(value).strip().strip("()[]").replace("x", ",")
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidRunConfigError(
            f"input-shape must be comma-separated integers like \"1,28,28\", got {value!r}"
        ) from None


def _validate(fields: dict[str, Any]) -> RunConfig:
    """Build the RunConfig, turning pydantic errors into one readable message in run-config keys."""
    try:
        return RunConfig.model_validate(fields)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            field = ".".join(loc)
            key = _FIELD_TO_KEY.get(field) or _FIELD_TO_KEY.get(f"model.{loc[-1]}" if loc else "")
            where = key or field or "(run config)"
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = "missing; set it in the study's [run] table (e.g. input-shape = \"13\")"
            value = err.get("input")
            shown = f" (got {value!r})" if isinstance(value, (int, float, str, bool)) else ""
            lines.append(f"  - {where}: {msg}{shown}")
        raise InvalidRunConfigError("invalid run config:\n" + "\n".join(lines)) from None
