"""A scenario's secure aggregation and client-level DP: its TOML tables, run-config fields and summary.

::

    [secure_aggregation]                 # SecAgg+ (server.secagg): the server sees only the sum
    enabled = true
    num_shares = 1.0                     # int > 2, or a fraction of the sampled sites
    reconstruction_threshold = 0.67      # int, or a fraction of the shares
    clipping_range = 8.0                 # parameters are quantised in [-range, range]

    [client_dp]                          # client-level DP (needs [secure_aggregation] enabled)
    clipping_norm = 1.0                  # L2 bound of each site's update
    noise_multiplier = 1.0               # server noise std = σ C / (sites sampled)
    delta = 1e-5
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..config_base import FrozenModel

__all__ = ["ClientDpSpec", "SecureAggregationSpec", "secure_run_fields", "secure_summary"]


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


def secure_summary(secure: SecureAggregationSpec, client_dp: ClientDpSpec | None,
                   rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Return summary.json's ``secure_aggregation`` entry: on/off and the client-level ε / δ reached."""
    last = rounds[-1].get("train", {}) if rounds else {}
    return {
        "enabled": secure.enabled,
        "client_dp": client_dp is not None and secure.enabled,
        "client_epsilon": last.get("client-epsilon"),
        "client_delta": last.get("client-delta"),
        "client_noise_multiplier": None if client_dp is None else client_dp.noise_multiplier,
        "client_clipping_norm": None if client_dp is None else client_dp.clipping_norm,
    }
