"""What the plots read: one frozen record per federated round (global and per-site metrics, ε).

The runner fills a list of :class:`RoundRecord`, or converts the rounds it wrote to
``history.json`` (``server.checkpoint.RoundRecord.to_dict`` output) with
:func:`history_from_rounds`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field, field_validator

from ..config_base import FrozenModel
from ..models.wire import EPSILON, NUM_EXAMPLES

__all__ = ["RoundRecord", "history_from_rounds"]


def _as_float(value: Any) -> float:
    """Return ``value`` as a float; ``None`` (JSON's stand-in for NaN) becomes NaN."""
    return math.nan if value is None else float(value)


class RoundRecord(FrozenModel):
    """One finished round of a federation.

    Attributes
    ----------
    round : int
        Round number, from 1.
    global_metrics : dict of str to float
        The aggregated evaluation metrics of the global model (``auroc``, ``accuracy``…).
    site_metrics : dict of str to dict of str to float
        Each site's evaluation metrics of the global model, keyed by site name.
    site_epsilon : dict of str to float
        Each site's ε spent so far in the study (cumulative), keyed by site name.
    """

    round: int = Field(ge=1)
    global_metrics: dict[str, float] = Field(default_factory=dict)
    site_metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    site_epsilon: dict[str, float] = Field(default_factory=dict)

    @field_validator("global_metrics", "site_epsilon", mode="before")
    @classmethod
    def _flat_nan(cls, value: Any) -> Any:
        """Read ``None`` values as NaN."""
        if isinstance(value, Mapping):
            return {k: _as_float(v) for k, v in value.items()}
        return value

    @field_validator("site_metrics", mode="before")
    @classmethod
    def _nested_nan(cls, value: Any) -> Any:
        """Read ``None`` values as NaN, one level down."""
        if isinstance(value, Mapping):
            return {
                s: {k: _as_float(v) for k, v in m.items()} if isinstance(m, Mapping) else m
                for s, m in value.items()
            }
        return value


def history_from_rounds(rounds: Iterable[Mapping[str, Any]]) -> list[RoundRecord]:
    """Convert the runner's round dicts (``history.json`` / ``summary.json``) into records.

    Uses ``evaluate`` (global metrics), ``site_evaluate`` (per-site metrics) and each
    ``site_train[site]["epsilon"]``; rounds marked ``complete: false`` are skipped.
    """
    records = []
    for raw in rounds:
        if not raw.get("complete", True):
            continue
        site_train = raw.get("site_train", {}) or {}
        records.append(
            RoundRecord(
                round=int(raw["round"]),
                global_metrics={k: v for k, v in (raw.get("evaluate", {}) or {}).items() if k != NUM_EXAMPLES},
                site_metrics={
                    s: {k: v for k, v in m.items() if k != NUM_EXAMPLES}
                    for s, m in (raw.get("site_evaluate", {}) or {}).items()
                },
                site_epsilon={
                    s: m[EPSILON] for s, m in site_train.items() if m.get(EPSILON) is not None
                },
            )
        )
    return records
