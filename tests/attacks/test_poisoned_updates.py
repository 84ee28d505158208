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

import copy
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcare.client.secure import SecureSite, make_secure_train_mod
from fedcare.flower_bridge import KEY_CLIPPING_NORM
from fedcare.models import wire
from fedcare.privacy.policy import node_default_policy
from fedcare.server.app import initial_arrays, run_server
from fedcare.server.checkpoint import FINAL_MODEL_FILE, load_model_file
from fedcare.server.config import RunConfig
from fedcare.server.secagg import SecureAggregationError
from fedcare.simulations.runner import InProcessGrid

ATTACKER = 3  # partition id of the malicious hospital; 0-2 are honest
HONEST_WEIGHTS = (10, 20, 30)


def _poison(kind: str, arrays: OrderedDict[str, np.ndarray]) -> tuple[OrderedDict[str, np.ndarray], float]:
    """Return the attacker's arrays and weight for one attack."""
    if kind == "nan":
        arrays["linear.weight"][0, 0] = np.nan
    elif kind == "inf":
        arrays["linear.bias"][:] = np.inf
    elif kind == "shape":
        arrays["linear.bias"] = np.full((1, 1), 50.0, dtype=np.float32)  # broadcast into (1,) by a plain sum
    elif kind == "huge":
        arrays = OrderedDict((k, v + np.float32(1e6)) for k, v in arrays.items())
    elif kind == "weight":
        return arrays, float("nan")
    return arrays, 40.0


def _federation(kind: str) -> ClientApp:
    """Three honest hospitals (site i adds 0.01·(i + 1), weight 10·(i + 1)) and the attacker."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = OrderedDict((k, v.numpy() + np.float32(0.01 * (pid + 1))) for k, v in msg.content[wire.ARRAYS].items())
        weight = float(HONEST_WEIGHTS[pid]) if pid != ATTACKER else 40.0
        if pid == ATTACKER:
            arrays, weight = _poison(kind, arrays)
        return Message(RecordDict({
            wire.ARRAYS: ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items())),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: weight}),
            wire.CONFIG: ConfigRecord({wire.SITE: f"hospital-{pid}"}),
        }), reply_to=msg)

    return app


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


def _secure_federation() -> ClientApp:
    """Five hospitals in fedcare's SecAgg+ mod; the honest ones move each weight by 0.01, the attacker by 2.0."""
    policy = node_default_policy().model_copy(update={"require_dp": False})
    app = ClientApp()

    def site_of(context: Context) -> SecureSite:
        return SecureSite(name=f"hospital-{context.node_config['partition-id']}", policy=policy, seed=1)

    @app.train(mods=[make_secure_train_mod(site_of)])
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        delta = np.float32(2.0 if pid == ATTACKER else 0.01)
        arrays = OrderedDict((k, Array(v.numpy() + delta)) for k, v in msg.content[wire.ARRAYS].items())
        return Message(RecordDict({
            wire.ARRAYS: ArrayRecord(arrays), wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10}),
            wire.CONFIG: ConfigRecord({wire.SITE: f"hospital-{pid}"}),
        }), reply_to=msg)

    return app


class _AttackerSkipsClipping(InProcessGrid):
    """The wire, as the attacker's node sees it: the clipping norm never reaches its mods (it removed them)."""

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        copies = []
        for msg in messages:
            content = copy.deepcopy(msg.content)
            fit_config = content.config_records.get("fitins.config")
            if msg.metadata.dst_node_id == ATTACKER + 1 and fit_config is not None and KEY_CLIPPING_NORM in fit_config:
                del fit_config[KEY_CLIPPING_NORM]
            copies.append(Message(content=content, metadata=copy.copy(msg.metadata)))
        return super().send_and_receive(copies, timeout=timeout)


def test_an_unclipped_update_under_secagg_is_refused_before_it_becomes_the_model(tmp_path: Path) -> None:
    # Prepare: client-level DP clips each update to C = 0.5 (honest update norm 0.02; attacker's 4.0 unclipped)
    config = RunConfig(input_shape=(3,), num_rounds=1, min_sites=5, seed=1, checkpoint_dir=tmp_path,
                       fraction_evaluate=0.0, secure_aggregation=True, client_dp_clipping_norm=0.5,
                       client_dp_noise_multiplier=0.0)

    # Execute / Assert: the mean update, (4·0.01 + 2)/5 on each of 4 weights (norm 0.816 > C), is refused
    with pytest.raises(SecureAggregationError, match="skipped its clipping"):
        run_server(_AttackerSkipsClipping(_secure_federation(), 5), config)
    assert not (tmp_path / FINAL_MODEL_FILE).exists()
