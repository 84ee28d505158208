"""Attack: SecAgg+ rounding that is a function of the update, and a train reply that carries timing.

1. flwr's SecAgg+ quantisation rounds every parameter stochastically with NumPy's legacy global
   generator. If the site seeds that generator from a digest of its own update (to make runs
   repeat), the rounding is a deterministic function of the update: anyone who knows the code
   recomputes it, and it adds no randomness of its own. A deployed site must round from OS
   entropy; only a site with an explicit (own, secret) seed repeats.
2. A train reply carrying the site's local training time (``train-s``) is a timing side channel
   on the site's data, outside ε. It must be absent unless the node's operator opts in.
"""

from __future__ import annotations

import copy
import importlib
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from fedcare.client.app import LocalSite, make_client_app
from fedcare.client.secure import SecureSite, make_secure_train_mod
from fedcare.models import ModelSpec, build_for_data, get_weights, wire
from fedcare.privacy.errors import PrivacyWarning
from fedcare.privacy.policy import node_default_policy
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import train_config
from fedcare.server.config import RunConfig
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition

#: flwr's SecAgg+ client module (its package re-exports the mod function under the same name)
flwr_secaggplus = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
NAMES = ["w", "b"]
UPDATE = [np.linspace(-0.5, 0.5, 12, dtype=np.float32).reshape(3, 4), np.array([0.125], dtype=np.float32)]


def _msg(content: RecordDict, node: int) -> Message:
    if TaskIdentity._run_id is None:  # noqa: SLF001 - what flwr sets in a running app (as InProcessGrid does)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content, dst_node_id=node, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"msg-{node}"
    return msg


def _handler(msg: Message, context: Context) -> Message:
    """The site's train handler, reduced to returning a fixed update (the rounding's input)."""
    arrays = ArrayRecord(OrderedDict((n, Array(a.copy())) for n, a in zip(NAMES, UPDATE, strict=True)))
    content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 100}),
                          wire.CONFIG: ConfigRecord({wire.SITE: "site-1"})})
    return Message(content, reply_to=msg)


def _masked_stage_contexts(seed: int | None) -> tuple[Callable[..., Message], dict[int, Context], dict[int, Any]]:
    """Run SecAgg+ setup and share-keys for 3 sites (the test plays the server); return the mod and states."""
    mod = make_secure_train_mod(lambda c: SecureSite(name=f"site-{c.node_id}", policy=node_default_policy(), seed=seed))
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in (1, 2, 3)}
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
             Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 1000.0}
    keys = {}
    for n, ctx in contexts.items():
        reply = mod(_msg(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(setup))}), n), ctx, _handler)
        assert not reply.has_error(), reply.error.reason
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        keys[n] = [record[Key.PUBLIC_KEY_1], record[Key.PUBLIC_KEY_2]]
    shares: dict[int, Any] = {}
    for n, ctx in contexts.items():
        record = ConfigRecord({str(m): keys[m] for m in contexts})
        record[Key.STAGE] = Stage.SHARE_KEYS
        reply = mod(_msg(RecordDict({RECORD_KEY_CONFIGS: record}), n), ctx, _handler)
        assert not reply.has_error(), reply.error.reason
        out = reply.content.config_records[RECORD_KEY_CONFIGS]
        for dst, ctxt in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST], strict=True):
            shares.setdefault(dst, []).append((n, ctxt))
    return mod, contexts, shares


def _rounding_draws(mod: Callable[..., Message], context: Context, shares: list[Any], server_round: int,
                    monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """Send site 1 its masked-vector message; return the draws flwr's quantisation rounds with."""
    seen: list[np.ndarray] = []
    original = flwr_secaggplus.quantize

    def spy(parameters: list[np.ndarray], clipping_range: float, target_range: int) -> list[np.ndarray]:
        state = np.random.get_state()  # noqa: NPY002 - what quantize reads
        seen.append(np.random.rand(16))  # noqa: NPY002
        np.random.set_state(state)  # noqa: NPY002
        return original(parameters, clipping_range, target_range)

    monkeypatch.setattr(flwr_secaggplus, "quantize", spy)
    fitins = FitIns(ndarrays_to_parameters(UPDATE), {wire.PARAM_NAMES: '["w", "b"]', wire.SERVER_ROUND: server_round})
    content = compat.fitins_to_recorddict(fitins, True)
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({
        Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: [s for s, _ in shares],
        Key.CIPHERTEXT_LIST: [c for _, c in shares],
    })
    reply = mod(_msg(content, 1), copy.deepcopy(context), _handler)
    assert not reply.has_error(), reply.error.reason
    assert len(seen) == 1
    return seen[0]


def test_a_deployed_site_rounds_the_same_update_with_fresh_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a site without a seed; the attacker knows the update and the public code
    mod, contexts, shares = _masked_stage_contexts(seed=None)

    # Execute: the same update through the masked-vector stage twice
    first = _rounding_draws(mod, contexts[1], shares[1], 1, monkeypatch)
    second = _rounding_draws(mod, contexts[1], shares[1], 1, monkeypatch)

    # Assert: the rounding's randomness is not a function of the update
    assert not np.array_equal(first, second)


def test_a_seeded_site_repeats_its_rounding_and_the_caller_generator_is_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: simulations and tests give the site its own seed
    mod, contexts, shares = _masked_stage_contexts(seed=7)
    np.random.seed(123)  # noqa: NPY002 - the caller's global stream
    expected = np.random.rand(4)  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002

    # Execute
    first = _rounding_draws(mod, contexts[1], shares[1], 1, monkeypatch)
    second = _rounding_draws(mod, contexts[1], shares[1], 1, monkeypatch)
    next_round = _rounding_draws(mod, contexts[1], shares[1], 2, monkeypatch)
    after = np.random.rand(4)  # noqa: NPY002

    # Assert: repeatable per round, fresh across rounds, and the caller's stream is untouched
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, next_round)
    np.testing.assert_array_equal(after, expected)


def _site(tmp_path: Path) -> LocalSite:
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=2, seed=0)[0]
    policy = node_default_policy().model_copy(update={"require_secure_aggregation": False})
    return LocalSite(data=data, privacy=PrivacySettings.with_target(epsilon=3.0, delta=1e-5, max_grad_norm=1.0),
                     ledger_dir=tmp_path / "ledgers", name="hospital-a", policy=policy)


def _train_message() -> Message:
    config = RunConfig(input_shape=(30,), num_rounds=3, min_sites=1, checkpoint_dir=Path("/nonexistent"),
                       batch_size=32, lr=0.5, study="timing")
    record = train_config(config)
    record[wire.MODEL_SPEC] = ModelSpec(family="logistic").model_dump_json()
    record[wire.SERVER_ROUND] = 1
    model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=(30,), has_mask=False)
    arrays = ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in get_weights(model).items()))
    return _msg(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: record}), 1)


def test_a_train_reply_carries_no_timing_unless_the_node_opts_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.delenv("FEDCARE_REPORT_TIMING", raising=False)
    app = make_client_app(lambda _: _site(tmp_path))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    # Execute: a default node, then one whose operator set FEDCARE_REPORT_TIMING=1 (benchmarks)
    plain = app(_train_message(), context)
    monkeypatch.setenv("FEDCARE_REPORT_TIMING", "1")
    with pytest.warns(PrivacyWarning, match=re.escape("timing side channel")):
        timed = app(_train_message(), context)

    # Assert
    assert not plain.has_error() and not timed.has_error()
    assert wire.TRAIN_SECONDS not in plain.content[wire.METRICS]
    assert float(timed.content[wire.METRICS][wire.TRAIN_SECONDS]) > 0
