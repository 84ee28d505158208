"""Attack: one Ray worker's cached ClientApp serves many virtual hospitals; make it mix them up.

Since the ClientApp pickles as a reference (``client.app._ProvidedClientApp``), every message a
Ray worker receives unpickles to the *same* app object, built once per process, and the worker's
hospital cache keeps every hospital it loaded (``simulations.runner.PartitionProvider``). The
attacker (the coordinator of the simulation, choosing which node gets which message) sends
hospital A a DP round, then hospital B a round through the same worker, then A again, hoping
that the shared app answers B with A's data or ledger, charges A's ε to B (or B's to nobody), or
replays A's noise in A's next round. Each hospital must answer with its own name and data, each
ledger must hold exactly its own hospital's rounds, and a hospital's next round must draw fresh
noise.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcare.client.app import LocalSite, make_client_app
from fedcare.models import ModelSpec, build_for_data, get_weights, wire
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import node_default_policy
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import train_config
from fedcare.server.config import RunConfig
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition
from fedcare.simulations.runner import PartitionProvider

STUDY = "shared-worker"
DP = PrivacySettings.with_target(epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
PLAIN_OK = node_default_policy().model_copy(update={"require_secure_aggregation": False})


def _write_sites(folder: Path, ledgers: Path) -> list[LocalSite]:
    """Write two virtual hospitals as the runner does (site-<i>.pkl); fresh entropy (no seed)."""
    folder.mkdir()
    parts = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=2, seed=0)
    sites = [
        LocalSite(data=data, privacy=DP, ledger_dir=ledgers, name=name, policy=PLAIN_OK)
        for data, name in zip(parts, ("hospital-a", "hospital-b"), strict=True)
    ]
    for i, site in enumerate(sites):
        (folder / f"site-{i}.pkl").write_bytes(pickle.dumps(site))
    return sites


def _train_message(server_round: int, message_id: str) -> Message:
    """Return the coordinator's train message for ``server_round`` (the same initial model every time)."""
    config = RunConfig(input_shape=(30,), num_rounds=3, min_sites=1, checkpoint_dir=Path("/nonexistent"),
                       batch_size=32, lr=0.5, study=STUDY)
    record = train_config(config)
    record[wire.MODEL_SPEC] = ModelSpec(family="logistic").model_dump_json()
    record[wire.SERVER_ROUND] = server_round
    torch_model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=(30,))
    weights = {k: np.zeros_like(v) for k, v in get_weights(torch_model).items()}  # the same model each time
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in weights.items())),
        wire.CONFIG: record,
    })
    if TaskIdentity._run_id is None:  # what flwr sets in a running app
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = message_id
    return msg


def _as_ray_ships_it(app: object) -> object:
    """Return ``app`` pickled and unpickled, as flwr's Ray backend does with every message."""
    return pickle.loads(pickle.dumps(app))  # noqa: S301 - our own bytes


def _context(partition_id: int) -> Context:
    return Context(run_id=1, node_id=10 + partition_id, node_config={"partition-id": partition_id},
                   state=RecordDict(), run_config={})


def _update(reply: Message) -> np.ndarray:
    return np.concatenate([v.numpy().ravel() for v in reply.content[wire.ARRAYS].values()])


def test_one_workers_cached_app_keeps_hospitals_ledgers_and_noise_apart(tmp_path: Path) -> None:
    # Prepare: the runner's provider over two hospitals; one "worker" (this process)
    sites = _write_sites(tmp_path / "sites", tmp_path / "ledgers")
    shipped = make_client_app(PartitionProvider(tmp_path / "sites", num_sites=2))

    # Execute: A, then B, then A again, each message unpickling the app as a Ray worker does
    first = _as_ray_ships_it(shipped)
    reply_a1 = first(_train_message(1, "m-a1"), _context(0))  # type: ignore[operator]
    spent_a = PrivacyLedger.open(tmp_path / "ledgers", site="hospital-a", study=STUDY).spent_epsilon()
    second = _as_ray_ships_it(shipped)
    reply_b = second(_train_message(1, "m-b1"), _context(1))  # type: ignore[operator]
    third = _as_ray_ships_it(shipped)
    reply_a2 = third(_train_message(2, "m-a2"), _context(0))  # type: ignore[operator]

    # Assert: the app is shared (what this attack targets) ...
    assert second is first and third is first
    assert not (reply_a1.has_error() or reply_b.has_error() or reply_a2.has_error())
    # ... yet each reply is its own hospital's, on its own data
    assert reply_a1.content[wire.CONFIG][wire.SITE] == "hospital-a"
    assert reply_b.content[wire.CONFIG][wire.SITE] == "hospital-b"
    assert reply_a2.content[wire.CONFIG][wire.SITE] == "hospital-a"
    assert not np.allclose(_update(reply_a1), _update(reply_b))
    # each ledger holds its own hospital's rounds only: B's round did not touch A's ε
    ledger_a = PrivacyLedger.open(tmp_path / "ledgers", site="hospital-a", study=STUDY)
    ledger_b = PrivacyLedger.open(tmp_path / "ledgers", site="hospital-b", study=STUDY)
    assert 0 < spent_a < ledger_a.spent_epsilon() <= 3.0  # A: two rounds, charged in A's ledger
    assert 0 < ledger_b.spent_epsilon() <= 3.0
    assert float(reply_b.content[wire.METRICS][wire.EPSILON]) == ledger_b.spent_epsilon()
    assert len(PrivacyLedger.candidate_paths(tmp_path / "ledgers", site="hospital-a")) == 1
    assert len(PrivacyLedger.candidate_paths(tmp_path / "ledgers", site="hospital-b")) == 1
    # A's second round on the same model drew fresh noise and sampling (no replay through the cache)
    assert not np.allclose(_update(reply_a1), _update(reply_a2))
    assert sites[0].seed is None
