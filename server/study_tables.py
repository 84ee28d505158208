"""The training tables a scenario and a study file share: one spelling for the same settings.

A simulation scenario (``simulations/scenario.py``) and a deployment study file
(``server/flower_app.py``) describe the same training with the same tables::

    rounds = 5
    seed = 0

    [model]                      # models.ModelSpec (+ task / num_classes / input_shape / has_mask
    family = "logistic"          #   in a study file: a simulation reads them off the data)

    [strategy]
    name = "fedavg"              # and its parameters, in run-config spelling:
    # proximal-mu = 0.01

    [training]
    local_epochs = 1
    batch_size = 32
    lr = 0.1
    clip_grad_norm = 0.0

    [secure_aggregation]         # optional: SecAgg+
    enabled = true
    [client_dp]                  # optional: client-level DP on the secure sum
    clipping_norm = 1.0

A study file keeps only deployment settings in ``[run]`` (``min-sites``, ``checkpoint-dir``,
``round-timeout-s``, ``artefact-key``…). The tables become the flat kebab-case run config the
ServerApp reads (:func:`tables_to_run_config`); :func:`convert_run_table` turns the old form
(everything in ``[run]``) into the tables (``fedcare study convert``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from pydantic import ConfigDict, Field

from ..config_base import FrozenModel
from ..models import ModelSpec, Task

__all__ = [
    "RUN_KEYS_WITH_TABLES",
    "ClientDpSpec",
    "SecureAggregationSpec",
    "StrategySpec",
    "StudyModelSpec",
    "TrainingSpec",
    "convert_run_table",
    "secure_run_fields",
    "tables_to_run_config",
]


class StrategySpec(FrozenModel):
    """The strategy name plus its parameters, spelled as run-config keys (``proximal-mu``…)."""

    model_config = ConfigDict(extra="allow")  # frozen (FrozenModel); extra keys are the parameters

    name: str = "fedavg"

    @property
    def params(self) -> dict[str, Any]:
        """Return the strategy parameters (every field but ``name``)."""
        return dict(self.model_extra or {})


class TrainingSpec(FrozenModel):
    """Local training settings the server sends every round."""

    local_epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=0.1, gt=0.0)
    clip_grad_norm: float = Field(default=0.0, ge=0.0)


class SecureAggregationSpec(FrozenModel):
    """The ``[secure_aggregation]`` table (RunConfig ``secure-aggregation`` / ``secagg-*``)."""

    enabled: bool = False
    num_shares: int | float = Field(default=1.0, gt=0)
    reconstruction_threshold: int | float = Field(default=0.67, gt=0)
    clipping_range: float = Field(default=8.0, gt=0)


class ClientDpSpec(FrozenModel):
    """The ``[client_dp]`` table (RunConfig ``client-dp-*``)."""

    clipping_norm: float = Field(gt=0)
    noise_multiplier: float = Field(default=1.0, ge=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)


class StudyModelSpec(ModelSpec):
    """A study file's ``[model]``: the model plus the data's shape, which a simulation reads off its data.

    Attributes
    ----------
    task : str
        ``binary``, ``multiclass`` or ``regression``.
    num_classes : int
        Number of classes (2 for binary).
    input_shape : list of int
        One example's shape: ``[F]``, ``[C, H, W]`` or ``[T, F]``.
    has_mask : bool
        Sequences carry a missingness mask.
    """

    task: Task = "binary"
    num_classes: int = Field(default=2, ge=1)
    input_shape: list[int] = Field(min_length=1)
    has_mask: bool = False


def secure_run_fields(secure: SecureAggregationSpec, client_dp: ClientDpSpec | None) -> dict[str, Any]:
    """Return the RunConfig fields of the two tables (empty when secure aggregation is off).

    Raises ``ValueError`` for ``[client_dp]`` without ``[secure_aggregation] enabled = true``.
    """
    if not secure.enabled:
        if client_dp is not None:
            raise ValueError("[client_dp] needs [secure_aggregation] enabled = true (client-level DP runs on the SecAgg+ path)")
        return {}
    fields: dict[str, Any] = {
        "secure_aggregation": True,
        "secagg_num_shares": secure.num_shares,
        "secagg_reconstruction_threshold": secure.reconstruction_threshold,
        "secagg_clipping_range": secure.clipping_range,
    }
    if client_dp is not None:
        fields |= {
            "client_dp_clipping_norm": client_dp.clipping_norm,
            "client_dp_noise_multiplier": client_dp.noise_multiplier,
            "client_dp_delta": client_dp.delta,
        }
    return fields


#: old ``[run]`` key -> (table, key in that table); ``None`` table = top level of the file
_TABLE_OF: Final[Mapping[str, tuple[str | None, str]]] = {
    "num-server-rounds": (None, "rounds"),
    "seed": (None, "seed"),
    "strategy": ("strategy", "name"),
    **{k: ("strategy", k) for k in (
        "proximal-mu", "server-momentum", "server-learning-rate", "eta", "eta-l", "beta-1", "beta-2", "tau",
        "trim-beta", "num-malicious-nodes",
    )},
    "local-epochs": ("training", "local_epochs"),
    "batch-size": ("training", "batch_size"),
    "lr": ("training", "lr"),
    "clip-grad-norm": ("training", "clip_grad_norm"),
    "model-family": ("model", "family"),
    **{k: ("model", k.replace("-", "_")) for k in (
        "hidden-size", "num-layers", "bidirectional", "width", "embedding-dim", "buckets",
        "max-length", "lowercase", "task", "num-classes", "input-shape", "has-mask",
    )},
    "secure-aggregation": ("secure_aggregation", "enabled"),
    "secagg-num-shares": ("secure_aggregation", "num_shares"),
    "secagg-reconstruction-threshold": ("secure_aggregation", "reconstruction_threshold"),
    "secagg-clipping-range": ("secure_aggregation", "clipping_range"),
    "client-dp-clipping-norm": ("client_dp", "clipping_norm"),
    "client-dp-noise-multiplier": ("client_dp", "noise_multiplier"),
    "client-dp-delta": ("client_dp", "delta"),
}

#: the ``[run]`` keys that have a table spelling (the old form; ``fedcare study convert``)
RUN_KEYS_WITH_TABLES: Final = frozenset(_TABLE_OF)

#: table key -> old ``[run]`` key, per table
_RUN_KEY_OF: Final[Mapping[tuple[str | None, str], str]] = {v: k for k, v in _TABLE_OF.items()}


def _shape_text(value: Any) -> str:
    """Return an input shape as the run config spells it (``"1,28,28"``)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(int(d)) for d in value)
    return str(value)


def tables_to_run_config(
    *,
    rounds: int | None,
    seed: int | None,
    model: StudyModelSpec | None,
    strategy: StrategySpec | None,
    training: TrainingSpec | None,
    secure_aggregation: SecureAggregationSpec | None,
    client_dp: ClientDpSpec | None,
) -> dict[str, bool | int | float | str]:
    """Return the flat kebab-case run-config keys the given tables stand for (absent tables add nothing).

    Raises ``ValueError`` for ``[client_dp]`` without secure aggregation.
    """
    out: dict[str, Any] = {}
    if rounds is not None:
        out["num-server-rounds"] = rounds
    if seed is not None:
        out["seed"] = seed
    if strategy is not None:
        out["strategy"] = strategy.name
        out.update(strategy.params)
    if training is not None:
        for key, value in training.model_dump().items():
            out[_RUN_KEY_OF[("training", key)]] = value
    if model is not None:
        for key, value in model.model_dump().items():
            run_key = _RUN_KEY_OF[("model", key)]
            out[run_key] = _shape_text(value) if key == "input_shape" else value
    if secure_aggregation is not None or client_dp is not None:
        fields = secure_run_fields(secure_aggregation or SecureAggregationSpec(), client_dp)
        for field, value in fields.items():
            out[field.replace("_", "-")] = value
    return out


def convert_run_table(document: Mapping[str, Any]) -> dict[str, Any]:
    """Return a study document with every ``[run]`` key that has a table spelling moved into its table.

    Keys with no table spelling (``min-sites``, ``checkpoint-dir``…) stay in ``[run]``; the
    result describes the same run configuration (``fedcare study convert`` checks that).

    Raises ``ValueError`` when a key is given both in ``[run]`` and in its table.
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in document.items()}
    run = dict(out.pop("run", {}) or {})
    kept: dict[str, Any] = {}
    for key, value in run.items():
        if key not in _TABLE_OF:
            kept[key] = value
            continue
        table, name = _TABLE_OF[key]
        if key == "input-shape":
            text = str(value).strip().strip("()[]").replace("x", ",")
            value = [int(d) for d in text.split(",") if d.strip()] if not isinstance(value, int) else [value]
        target = out if table is None else out.setdefault(table, {})
        if name in target:
            raise ValueError(f"[run] {key} is also given as {'' if table is None else f'[{table}] '}{name}; keep one")
        target[name] = value
    if kept:
        out["run"] = kept
    return out
