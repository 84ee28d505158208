"""A scenario's secure aggregation and client-level DP: its TOML tables (``server/study_tables.py``,
shared with study files) and its summary entry.

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

from ..server.study_tables import ClientDpSpec, SecureAggregationSpec, secure_run_fields

__all__ = ["ClientDpSpec", "SecureAggregationSpec", "secure_run_fields", "secure_summary"]


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
