"""SecAgg+ rounds that lose sites: tolerated from the masked-vector stage down to the threshold, loud below it.

Five in-process hospitals run real SecAgg+ (flwr's workflow and mods, fedcare's ClientApp). A
node "killed" at a stage has its message handled or not and then never answers again: silently
(a deployed Grid gives up at ``round-timeout-s``), with the SuperLink's NODE_UNAVAILABLE error
reply (what a deployed SuperLink sends once the node's heartbeat stops), or with the ClientApp's
own crash reply.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict

from fedcare import flower_bridge
from fedcare.client.app import LocalSite, make_client_app
from fedcare.flower_bridge import ErrorCode
from fedcare.privacy.audit_log import generate_signing_key, load_verify_key, verify_log
from fedcare.privacy.policy import node_default_policy
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import _to_record, initial_arrays, run_server, train_config
from fedcare.server.checkpoint import CHECKPOINT_FILE, FINAL_MODEL_FILE, HISTORY_FILE, load_model_file
from fedcare.server.config import RunConfig
from fedcare.server.secagg import SITES_LOST, SecureAggregationError
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition
from fedcare.simulations.runner import InProcessGrid

RECORD_KEY_CONFIGS, _, Key, Stage = flower_bridge.secaggplus_names()
SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: the source of the SuperLink's own error replies
COLLECT = str(Stage.COLLECT_MASKED_VECTORS)
N = 5


class _KillingGrid(InProcessGrid):
    """An in-process Grid whose nodes can be killed at a (round, SecAgg+ stage); copies messages as the wire does.

    Parameters
    ----------
    kills : dict of node id to (round, stage)
        When the node dies: it handles that message (training and charging its ledger at the
        masked-vector stage), then never answers it or anything after it.
    mode : str
        How the Grid learns of the death: ``silent`` (no reply), ``unavailable`` (the SuperLink's
        NODE_UNAVAILABLE error reply) or ``crash`` (the node's own error reply, then silence).
    """

    def __init__(self, app: Any, num_nodes: int, kills: dict[int, tuple[int, str]], mode: str) -> None:
        super().__init__(app, num_nodes)
        self.kills, self.mode, self.dead = kills, mode, set[int]()
        self.ids = 0
        self.announced: set[int] = set()  # crash mode: dead nodes whose one crash reply was sent

    def get_node_ids(self) -> list[int]:
        return [n for n in super().get_node_ids() if n not in self.dead]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.ids += 1
            msg.metadata.__dict__["_message_id"] = f"orig-{self.ids}"  # as a deployed Grid sets it on push
            node = msg.metadata.dst_node_id
            if node in self.dead:
                replies += self._death_notice(msg)
                continue
            wire = Message(content=copy.deepcopy(msg.content), metadata=copy.copy(msg.metadata))
            (reply,) = super().send_and_receive([wire], timeout=timeout)
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = str(configs.get(Key.STAGE)) if configs is not None else "plain"
            if self.kills.get(node) == (_round_of(msg), stage):
                self.dead.add(node)
                replies += self._death_notice(msg)
                continue
            reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
            replies.append(reply)
        return replies

    def _death_notice(self, msg: Message) -> list[Message]:
        """Return what the Grid receives for a message to a dead node."""
        if self.mode == "silent":
            return []
        if self.mode == "crash" and msg.metadata.dst_node_id not in self.announced:
            self.announced.add(msg.metadata.dst_node_id)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="RuntimeError: killed"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            return [reply]
        if self.mode == "crash":
            return []
        reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        return [reply]


def _round_of(msg: Message) -> int:
    """Return the round a message belongs to (its group id), 0 when it names none."""
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else 0


@dataclasses.dataclass(frozen=True)
class _Sites:
    sites: tuple[LocalSite, ...]

    def __call__(self, context: Context) -> LocalSite:
        return self.sites[int(context.node_config["partition-id"])]  # type: ignore[arg-type]


def _sites(tmp_path: Path, *, min_secure_cohort: int = 3) -> tuple[LocalSite, ...]:
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=N, seed=0)
    policy = node_default_policy().model_copy(update={
        "require_dp": False, "require_secure_aggregation": False, "max_epsilon_per_study": 50.0, "max_epsilon_total": 50.0,
        "min_evaluation_cohort": 1, "evaluation": "exact", "min_secure_cohort": min_secure_cohort,
    })
    return tuple(LocalSite(data=d, privacy=PrivacySettings.disabled(), ledger_dir=tmp_path / "ledgers", name=d.name,
                           seed=i, policy=policy) for i, d in enumerate(data))


def _config(tmp_path: Path, **changes: Any) -> RunConfig:
    """Five sites, 5 shares, threshold 4 (tolerates one lost site), min-sites 4, client clipping, σ = 0."""
    values: dict[str, Any] = dict(
        input_shape=(30,), num_rounds=1, min_sites=4, lr=0.5, batch_size=32, seed=3, checkpoint_dir=tmp_path / "ckpt",
        secure_aggregation=True, secagg_num_shares=5, secagg_reconstruction_threshold=4,
        client_dp_clipping_norm=0.5, client_dp_noise_multiplier=0.0, round_timeout_s=60.0,
    )
    values.update(changes)
    return RunConfig(**values)


def _clipped_update(site: LocalSite, config: RunConfig, start: OrderedDict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Train one site as its node does (same handler, a plain round, its own ledger) and clip its update to C."""
    grid = InProcessGrid(make_client_app(_Sites((site,))), 1)  # sets flwr's task identity messages need
    record = train_config(config)
    record["server-round"] = 1
    msg = Message(RecordDict({"arrays": _to_record(start), "config": record}), dst_node_id=1, message_type="train")
    (reply,) = grid.send_and_receive([msg])
    assert not reply.has_error(), reply.error
    update = {k: v.numpy() - start[k] for k, v in reply.content["arrays"].items()}
    norm = float(np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update.values())))
    return {k: u * min(1.0, config.client_dp_clipping_norm / norm) for k, u in update.items()}


def _history(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())


# --------------------------------------------------------------------------- one site lost: the round goes on


@pytest.mark.parametrize("mode", ["silent", "unavailable", "crash"])
def test_a_site_killed_in_the_masked_stage_leaves_the_mean_of_the_four_survivors(tmp_path: Path, mode: str) -> None:
    # Prepare: node 3 (partition 2) dies while training; the sum of the other four is known in advance
    sites = _sites(tmp_path)
    config = _config(tmp_path)
    start = initial_arrays(config)
    survivors = [s for i, s in enumerate(sites) if i != 2]
    clipped = [_clipped_update(dataclasses.replace(s, ledger_dir=tmp_path / "plain-ledgers"), config, start)
               for s in survivors]
    expected = {k: start[k] + np.mean([c[k] for c in clipped], axis=0) for k in start}
    grid = _KillingGrid(make_client_app(_Sites(sites)), N, kills={3: (1, COLLECT)}, mode=mode)

    # Execute
    history = run_server(grid, config)

    # Assert: the mean of the four survivors' clipped updates, within SecAgg+'s quantisation (16 / 2**22 per value)
    arrays, _ = load_model_file(tmp_path / "ckpt" / FINAL_MODEL_FILE)
    for k in start:
        np.testing.assert_allclose(arrays[k], expected[k], atol=1e-4)
    mean_of_five = {k: start[k] + np.mean([*(c[k] for c in clipped),
                                           _clipped_update(dataclasses.replace(sites[2], ledger_dir=tmp_path / "l5"),
                                                           config, start)[k]], axis=0) for k in start}
    assert any(not np.allclose(arrays[k], mean_of_five[k], atol=1e-4) for k in start)  # the lost site is not in it
    record = history.rounds[0]
    assert record.complete and set(record.site_train) == {s.name for s in survivors}
    assert record.train[SITES_LOST] == 1.0
    assert [(r["stage"], r["node_id"]) for r in record.refusals] == [("collect-masked-vectors", 3)]
    assert _history(tmp_path)["status"] == "completed"


def test_a_kill_in_round_two_is_named_by_site_in_the_record_and_the_audit_log(tmp_path: Path) -> None:
    # Prepare
    private, public = generate_signing_key(tmp_path / "audit.key")
    sites = _sites(tmp_path)
    config = _config(tmp_path, num_rounds=2, audit_key=private)
    grid = _KillingGrid(make_client_app(_Sites(sites)), N, kills={4: (2, COLLECT)}, mode="unavailable")

    # Execute
    history = run_server(grid, config)

    # Assert: both rounds complete; round 2 summed four sites and names the fifth (it reported its name in round 1)
    assert [r.complete for r in history.rounds] == [True, True]
    lost = history.node_sites[4]
    assert set(history.rounds[1].site_train) == {s.name for s in sites} - {lost}
    assert [(r["site"], r["stage"], r["code"]) for r in history.rounds[1].refusals] == [
        (lost, "collect-masked-vectors", int(ErrorCode.NODE_UNAVAILABLE))]
    log = tmp_path / "ckpt" / "audit.jsonl"
    assert verify_log(log, load_verify_key(public)).ok
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    refusals = [e["fields"] for e in entries if e["kind"] == "refusal"]
    assert [(f["site"], f["round"], f["rule"]) for f in refusals] == [
        (lost, 2, f"collect-masked-vectors.error_{int(ErrorCode.NODE_UNAVAILABLE)}")]
    rounds = [e["fields"] for e in entries if e["kind"] == "round"]
    assert [len(r["sites"]) for r in rounds] == [5, 4]
    assert _history(tmp_path)["status"] == "completed"


def test_client_level_noise_is_sized_to_the_sites_summed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: record the site count flwr's DP wrapper sizes its noise std σC/m with
    import flwr.server.strategy.dp_fixed_clipping as dp_module

    seen: list[int] = []
    real = dp_module.add_gaussian_noise_to_params

    def spy(params: Any, noise_multiplier: float, clipping_norm: float, num_sampled: int) -> Any:
        seen.append(num_sampled)
        return real(params, noise_multiplier, clipping_norm, num_sampled)

    monkeypatch.setattr(dp_module, "add_gaussian_noise_to_params", spy)
    grid = _KillingGrid(make_client_app(_Sites(_sites(tmp_path))), N, kills={2: (1, COLLECT)}, mode="silent")

    # Execute
    history = run_server(grid, _config(tmp_path, client_dp_noise_multiplier=1.0))

    # Assert: std σC/4 for the 4 sites summed (σC/5 would be too little noise for a mean of 4);
    # the accountant keeps the sampled count (5 of 5), never a lower sample rate
    assert seen == [4]
    assert history.rounds[0].train["client-sites-sampled"] == 5.0


# --------------------------------------------------------------------------- too many lost: loud, then resumable


def test_too_many_lost_sites_fail_the_round_by_name_and_the_study_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    # Prepare: two of five die in round 2; threshold 4 cannot unmask with three
    sites = _sites(tmp_path)
    private, _ = generate_signing_key(tmp_path / "audit.key")
    config = _config(tmp_path, num_rounds=2, min_sites=3, audit_key=private)
    app = make_client_app(_Sites(sites))
    grid = _KillingGrid(app, N, kills={2: (2, COLLECT), 5: (2, COLLECT)}, mode="unavailable")

    # Execute
    with pytest.raises(SecureAggregationError, match=r"collect-masked-vectors stage \(2 site failure\(s\)\).*"
                                                     r"3 site\(s\) remain, too few for the reconstruction threshold 4"):
        run_server(grid, config)

    # Assert: the message's count is the audit log's
    entries = [json.loads(line) for line in (tmp_path / "ckpt" / "audit.jsonl").read_text().splitlines()]
    failed_entry = [e["fields"] for e in entries if e["kind"] == "round_failed"]
    assert [(f["round"], f["failures"]) for f in failed_entry] == [(2, 2)]
    # failed with the reason, round 1 checkpointed, no final model; a resume with the nodes back completes
    failed = _history(tmp_path)
    assert failed["status"] == "failed" and "reconstruction threshold 4" in failed["reason"]
    assert (tmp_path / "ckpt" / CHECKPOINT_FILE).exists() and not (tmp_path / "ckpt" / FINAL_MODEL_FILE).exists()
    history = run_server(_KillingGrid(app, N, kills={}, mode="silent"), _config(tmp_path, num_rounds=2, min_sites=3,
                                                                               resume=True))
    assert [r.round for r in history.rounds if r.complete] == [1, 2]
    assert len(history.rounds[1].site_train) == N and _history(tmp_path)["status"] == "completed"


def test_a_lost_site_below_min_sites_fails_before_anything_is_unmasked(tmp_path: Path) -> None:
    sites = _sites(tmp_path)
    grid = _KillingGrid(make_client_app(_Sites(sites)), N, kills={1: (1, COLLECT)}, mode="silent")

    with pytest.raises(SecureAggregationError, match=r"only 4 site\(s\) remain, fewer than min-sites = 5"):
        run_server(grid, _config(tmp_path, min_sites=5))

    assert _history(tmp_path)["status"] == "failed"
    assert not any(r.get("complete") for r in _history(tmp_path)["rounds"])


def test_a_site_lost_before_its_shares_were_dealt_fails_the_round(tmp_path: Path) -> None:
    sites = _sites(tmp_path)
    grid = _KillingGrid(make_client_app(_Sites(sites)), N, kills={3: (1, str(Stage.SHARE_KEYS))}, mode="unavailable")

    with pytest.raises(SecureAggregationError, match=r"share-keys stage \(1 site failure\(s\)\)"):
        run_server(grid, _config(tmp_path))

    assert _history(tmp_path)["status"] == "failed"


# --------------------------------------------------------------------------- the site's secure-cohort rule holds


def test_sites_whose_minimum_cohort_a_dropout_breaks_refuse_to_be_unmasked_and_the_round_fails(tmp_path: Path) -> None:
    # Prepare: every site asks for a secure cohort of 5 (threshold 4 of 5 meets its setup rule); one dies
    sites = _sites(tmp_path, min_secure_cohort=5)
    grid = _KillingGrid(make_client_app(_Sites(sites)), N, kills={2: (1, COLLECT)}, mode="silent")

    # Execute
    with pytest.raises(SecureAggregationError, match=r"unmask stage: 4 site\(s\) refused to be unmasked.*"
                                                     r"secure_cohort.*fewer than the site's minimum 5"):
        run_server(grid, _config(tmp_path))

    # Assert: failed, no model, no round closed
    assert _history(tmp_path)["status"] == "failed"
    assert not (tmp_path / "ckpt" / FINAL_MODEL_FILE).exists()
    assert not any(r.get("complete") for r in _history(tmp_path)["rounds"])


# --------------------------------------------------------------------------- the progress file follows the stages


def test_the_progress_file_names_each_secure_stage_with_the_real_round_also_after_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record every (round, stage) the ServerApp writes to progress.json (what the status page and
    # benchmarks/chaos.py's stage triggers read): a study of one round, then resumed for a second
    from fedcare.server.progress import ProgressWriter

    seen: list[tuple[int, str]] = []
    real = ProgressWriter.stage

    def spy(self: ProgressWriter, rnd: int, stage: Any) -> None:
        seen.append((rnd, str(stage)))
        real(self, rnd, stage)

    monkeypatch.setattr(ProgressWriter, "stage", spy)
    app = make_client_app(_Sites(_sites(tmp_path)))
    run_server(_KillingGrid(app, N, kills={}, mode="silent"), _config(tmp_path, num_rounds=1))
    secure = ["setup", "share-keys", "collect-masked-vectors", "unmask"]
    assert seen == [(1, s) for s in secure] + [(1, "evaluate")]
    seen.clear()

    # Execute: a second round, resumed from round 1's checkpoint (flwr counts it as its round 1)
    run_server(_KillingGrid(app, N, kills={}, mode="silent"), _config(tmp_path, num_rounds=2, resume=True))

    # Assert: the real round number, and the file itself says so
    assert seen == [(2, s) for s in secure] + [(2, "evaluate")]
    progress = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    assert (progress["round"], progress["status"], progress["rounds_complete"]) == (2, "completed", 2)
