"""Attack: kill a hospital node (``kill -9``) at the moment that suits you, then look at its ledger.

Two attackers, one rule ("a round whose update provably never left the site is voided on restart,
anything that left stays charged", issue 13):

- someone who can crash the node (a flaky host, a hostile neighbour process, a coordinator that
  keeps redoing rounds) kills it while it trains, again and again, to burn the site's budget
  without any model leaving. Before issue 13 every killed round was charged in full; now it is
  voided, within the site's retry reserve.
- someone who wants free ε kills the node *after* its reply left, hoping the restart voids the
  round whose update the server now holds. The release marker (persisted before the reply is
  returned to Flower) keeps that round charged.

Each kill is a real ``SIGKILL`` of a real ClientApp process (this file, run as a script, trains
one round through ``make_client_app`` and kills itself at the chosen point).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

SITE, STUDY = "hospital-a", "kill-study"
KILL_POINTS = ("training", "before-release", "after-reply", "none")


def _run_node(ledger_dir: Path, kill_at: str, round_index: int) -> dict[str, Any]:
    """Run one train message in a fresh node process that kills itself at ``kill_at``; return what it said."""
    out = ledger_dir / f"reply-{round_index}-{kill_at}.json"
    proc = subprocess.run(  # noqa: S603 - our own interpreter and file
        [sys.executable, __file__, "--ledger-dir", str(ledger_dir), "--kill-at", kill_at,
         "--round", str(round_index), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    killed = proc.returncode == -signal.SIGKILL
    assert killed == (kill_at != "none"), (proc.returncode, proc.stderr[-2000:])
    return {"killed": killed, **(json.loads(out.read_text()) if out.exists() else {})}


def _ledger(ledger_dir: Path) -> Any:
    from fedcare.privacy.ledger import PrivacyLedger  # noqa: PLC0415

    return PrivacyLedger.open(ledger_dir, site=SITE, study=STUDY)  # the restarted node's first open


@pytest.mark.slow
def test_killing_the_node_after_its_reply_left_does_not_void_the_round(tmp_path: Path) -> None:
    # Execute: round 1's reply is handed to Flower (the attacker holds it), then the node is killed
    reply = _run_node(tmp_path, "after-reply", 1)
    after = _ledger(tmp_path)  # the restarted node's first open
    # Assert: the round stays charged at what the reply said
    assert reply["epsilon"] > 0
    assert after.spent_epsilon() == pytest.approx(reply["epsilon"], rel=1e-12)
    assert [r["status"] for r in after.rounds] == ["completed"]
    assert "released_at" in after.rounds[-1]


@pytest.mark.slow
def test_killing_the_node_before_its_reply_leaves_does_not_burn_its_budget(tmp_path: Path) -> None:
    # Prepare: round 1 trains normally (the policy's retry reserve is 2)
    first = _run_node(tmp_path, "none", 1)
    # Execute: round 2 killed while training, then killed after training but before the release
    _run_node(tmp_path, "training", 2)
    after_first_kill = _ledger(tmp_path).spent_epsilon()
    _run_node(tmp_path, "before-release", 2)
    ledger = _ledger(tmp_path)
    # Assert: neither kill cost anything, and each void says why (the reserve's bound on voids and
    # the charge beyond it: tests/test_retries.py)
    assert first["retry-reserve"] == 2.0
    assert after_first_kill == pytest.approx(first["epsilon"], rel=1e-12)
    assert ledger.spent_epsilon() == pytest.approx(first["epsilon"], rel=1e-12)
    assert [r["status"] for r in ledger.rounds] == ["completed", "voided", "voided"]
    assert all("never left the site" in r["reason"] for r in ledger.rounds if r["status"] == "voided")


# ---------------------------------------------------------------- the node process (run as a script)


def _node(ledger_dir: Path, kill_at: str, round_index: int, out: Path) -> None:
    """Train one round through the real ClientApp; kill this process at ``kill_at``."""
    import numpy as np  # noqa: PLC0415
    from flwr.app import Array, ArrayRecord, Context, Message, RecordDict  # noqa: PLC0415
    from flwr.supercore.task_identity import TaskIdentity  # noqa: PLC0415

    from fedcare.client.app import LocalSite, make_client_app  # noqa: PLC0415
    from fedcare.models import ModelSpec, build_for_data, get_weights, wire  # noqa: PLC0415
    from fedcare.privacy.ledger import PrivacyLedger  # noqa: PLC0415
    from fedcare.privacy.policy import node_default_policy  # noqa: PLC0415
    from fedcare.privacy.settings import PrivacySettings  # noqa: PLC0415
    from fedcare.server.app import train_config  # noqa: PLC0415
    from fedcare.server.config import RunConfig  # noqa: PLC0415
    from fedcare.simulations.builtin import load_builtin  # noqa: PLC0415
    from fedcare.simulations.partition import PartitionScheme, partition  # noqa: PLC0415

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "training":
        PrivacyLedger.finalise_round = lambda self: die()  # type: ignore[method-assign]
    elif kill_at == "before-release":
        PrivacyLedger.release_round = lambda self: die()  # type: ignore[method-assign]
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=2, seed=0)[0]
    policy = node_default_policy().model_copy(update={"require_secure_aggregation": False})
    site = LocalSite(data=data, privacy=PrivacySettings.with_target(epsilon=3.0, delta=1e-5, max_grad_norm=1.0),
                     ledger_dir=ledger_dir, name=SITE, seed=1, policy=policy)

    @dataclasses.dataclass(frozen=True)
    class Provider:
        site: LocalSite

        def __call__(self, context: Context) -> LocalSite:
            return self.site

    config = RunConfig(input_shape=(30,), num_rounds=3, min_sites=1, checkpoint_dir=Path("/nonexistent"),
                       batch_size=32, lr=0.5, study=STUDY)
    record = train_config(config)
    record[wire.MODEL_SPEC] = ModelSpec(family="logistic").model_dump_json()
    record[wire.SERVER_ROUND] = round_index
    model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=(30,),
                           has_mask=False)
    arrays = ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in get_weights(model).items()))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: record}), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"msg-{round_index}"
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = make_client_app(Provider(site))(msg, context)
    if reply.has_error():
        raise SystemExit(f"the node refused: {reply.error.reason}")
    metrics = reply.content[wire.METRICS]
    out.write_text(json.dumps({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}))
    if kill_at == "after-reply":  # the reply has left: the attacker now kills the node
        die()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fedcare attack helper: one node round, killed on purpose")
    parser.add_argument("--ledger-dir", type=Path, required=True)
    parser.add_argument("--kill-at", choices=KILL_POINTS, required=True)
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _node(args.ledger_dir, args.kill_at, args.round, args.out)
