"""Attack: a malicious (or broken) hospital sends a poisoned model update to wreck the global model.

The attacker controls its own node and replies to every training message with an update of its
choosing: NaN or infinite values (one NaN turns a weighted mean into NaN everywhere), a shape
numpy silently broadcasts into the model, an update of enormous norm, or a poisoned weight. In a
SecAgg+ study the server never sees its update, so the attacker skips its client-level DP clipping
mod instead and drags the mean as far as the quantisation range allows.

Before the fix the server aggregated whatever came: the global model became NaN (or took the
attacker's shape, or its direction), and under SecAgg+ an unclipped update went into the model
unnoticed. Now every update is checked before aggregation (``server.update_checks``): the
attacker's update is refused, named in the round's record, and the honest sites' model goes on;
under SecAgg+ the unmasked mean of updates each clipped to C cannot be longer than C, so a longer
one fails the round loudly before it becomes the model.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from scripted_apps import WireGrid, plain_update_app, secure_app  # noqa: E402

from fedcare.flower_bridge import KEY_CLIPPING_NORM  # noqa: E402
from fedcare.models import wire  # noqa: E402
from fedcare.server.app import initial_arrays, run_server  # noqa: E402
from fedcare.server.checkpoint import FINAL_MODEL_FILE, load_model_file  # noqa: E402
from fedcare.server.config import RunConfig  # noqa: E402
from fedcare.server.secagg import SecureAggregationError  # noqa: E402
from fedcare.simulations.runner import InProcessGrid  # noqa: E402

ATTACKER = 3  # partition id of the malicious hospital; 0-2 are honest
HONEST_WEIGHTS = (10, 20, 30)


def _poison(kind: str, arrays: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Return the attacker's arrays for one attack ("weight": the honest arrays, a NaN weight)."""
    if kind == "nan":
        arrays["linear.weight"][0, 0] = np.nan
    elif kind == "inf":
        arrays["linear.bias"][:] = np.inf
    elif kind == "shape":
        arrays["linear.bias"] = np.full((1, 1), 50.0, dtype=np.float32)  # broadcast into (1,) by a plain sum
    elif kind == "huge":
        arrays = OrderedDict((k, v + np.float32(1e6)) for k, v in arrays.items())
    return arrays


def _federation(kind: str) -> ClientApp:
    """Three honest hospitals (site i adds 0.01·(i + 1), weight 10·(i + 1)) and the attacker (weight 40 or NaN)."""
    weights = {**{i: float(w) for i, w in enumerate(HONEST_WEIGHTS)}, ATTACKER: float("nan") if kind == "weight" else 40.0}
    return plain_update_app(weights, {ATTACKER: lambda arrays: _poison(kind, arrays)})


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "huge", "weight"])
def test_a_poisoned_update_does_not_reach_the_global_model(tmp_path: Path, kind: str) -> None:
    # Prepare: against "huge" the coordinator bounds update norms; the rest is checked without a setting
    bound: dict[str, Any] = {"max_update_norm": 10.0} if kind == "huge" else {}
    config = RunConfig(input_shape=(3,), num_rounds=2, min_sites=2, seed=1, checkpoint_dir=tmp_path,
                       fraction_evaluate=0.0, **bound)
    start = initial_arrays(config)

    # Execute: the attacker poisons every round
    history = run_server(InProcessGrid(_federation(kind), num_nodes=4), config)

    # Assert: the model is the honest sites' weighted mean, round after round; the attacker is named
    final, _ = load_model_file(tmp_path / FINAL_MODEL_FILE)
    honest_step = sum(w * 0.01 * (i + 1) for i, w in enumerate(HONEST_WEIGHTS)) / sum(HONEST_WEIGHTS)
    for name, value in start.items():
        assert final[name].shape == value.shape
        np.testing.assert_allclose(final[name], value + 2 * honest_step, rtol=1e-5, atol=1e-6)
    for record in history.rounds:
        assert [(r["site"], r["code"]) for r in record.refusals] == [(f"hospital-{ATTACKER}", wire.ERROR_UPDATE_REFUSED)]


# --------------------------------------------------------------------------- SecAgg+: the attacker skips its clipping


class _AttackerSkipsClipping(WireGrid):
    """The wire, as the attacker's node sees it: the clipping norm never reaches its mods (it removed them)."""

    def on_wire(self, message: Message) -> None:
        """Drop the clipping norm from the attacker's copy of a training message."""
        fit_config = message.content.config_records.get("fitins.config")
        if message.metadata.dst_node_id == ATTACKER + 1 and fit_config is not None and KEY_CLIPPING_NORM in fit_config:
            del fit_config[KEY_CLIPPING_NORM]


def test_an_unclipped_update_under_secagg_is_refused_before_it_becomes_the_model(tmp_path: Path) -> None:
    # Prepare: client-level DP clips each update to C = 0.5 (honest update norm 0.02; attacker's 4.0 unclipped)
    config = RunConfig(input_shape=(3,), num_rounds=1, min_sites=5, seed=1, checkpoint_dir=tmp_path,
                       fraction_evaluate=0.0, secure_aggregation=True, client_dp_clipping_norm=0.5,
                       client_dp_noise_multiplier=0.0)

    # Execute / Assert: the mean update, (4·0.01 + 2)/5 on each of 4 weights (norm 0.816 > C), is refused
    with pytest.raises(SecureAggregationError, match="skipped its clipping"):
        run_server(_AttackerSkipsClipping(secure_app({ATTACKER: 2.0}), 5), config)  # honest sites: +0.01
    assert not (tmp_path / FINAL_MODEL_FILE).exists()
