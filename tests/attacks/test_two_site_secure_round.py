"""Attack: the coordinator runs a "secure" round with two sites, so each reads the other's update.

SecAgg+ hides individual updates only inside a sum of several. With two sites the aggregate
each site receives minus its own update is the other site's update; with a reconstruction
threshold of at most half the shares, a coordinator that reports a site dropped to some of its
neighbours and active to others collects both of its secrets and unmasks it alone; and dropping
sites after the masked vectors are in shrinks the sum at unmask time. These settings are the
coordinator's; the site's policy (``min_secure_cohort``, default 3) must refuse them before any
key or share leaves the site.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from fedcare.client.app import LocalSite, make_client_app
from fedcare.models import wire
from fedcare.privacy.policy import Rule, SitePolicy, load_policy, node_default_policy
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import run_server
from fedcare.server.checkpoint import FINAL_MODEL_FILE, HISTORY_FILE
from fedcare.server.config import RunConfig
from fedcare.server.secagg import SecureAggregationError
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition
from fedcare.simulations.runner import InProcessGrid

DP = PrivacySettings.with_target(epsilon=3.0, delta=1e-5, max_grad_norm=1.0)


@dataclass(frozen=True)
class _Sites:
    sites: tuple[LocalSite, ...]

    def __call__(self, context: Context) -> LocalSite:
        return self.sites[int(context.node_config.get("partition-id", 0))]  # type: ignore[arg-type]


class _WireGrid(InProcessGrid):
    """InProcessGrid that copies every message, as the wire does (SecAgg+'s mod pops record keys)."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        copies = [Message(content=copy.deepcopy(m.content), metadata=copy.copy(m.metadata)) for m in messages]
        return super().send_and_receive(copies, timeout=timeout)


def _sites(folder: Path, n: int, policy: SitePolicy | None = None) -> tuple[LocalSite, ...]:
    """``n`` hospitals holding the node default (strict) policy unless told otherwise."""
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=n, seed=0)
    return tuple(
        LocalSite(data=d, privacy=DP, ledger_dir=folder / "ledgers", name=d.name, seed=i,
                  policy=policy or node_default_policy())
        for i, d in enumerate(data)
    )


def _secagg_message(values: dict[str, Any]) -> Message:
    """A SecAgg+ train message as flwr's server workflow sends it (the coordinator crafts every value)."""
    if TaskIdentity._run_id is None:  # noqa: SLF001 - what flwr sets in a running app (as InProcessGrid does)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(values)}), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "msg-secagg"
    return msg


def _setup(n: int, k: int, t: int) -> Message:
    return _secagg_message({
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: k, Key.THRESHOLD: t,
        Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 1000.0,
    })


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


@pytest.mark.parametrize(
    ("n", "k", "t", "in_reason"),
    [
        (2, 2, 2, "sums the updates of 2 site(s), fewer than the site's minimum 3"),  # flwr's 2-site setup
        (3, 3, 1, "so that at least 2 shares are needed"),
        (5, 5, 2, "above half the shares (> 2.5)"),
    ],
)
def test_a_weak_secure_setup_is_refused_before_any_key_leaves(
    tmp_path: Path, n: int, k: int, t: int, in_reason: str
) -> None:
    # Prepare: a hospital with the node default policy receives the coordinator's setup message
    app = make_client_app(_Sites(_sites(tmp_path, 3)))
    context = _context()

    # Execute
    reply = app(_setup(n, k, t), context)

    # Assert: a policy refusal naming the rule and what to change; no key, no share, no state
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == wire.ERROR_POLICY
    assert reply.error.reason.startswith("site 'site-000' refused to join the secure round: site policy refuses")
    assert f"[{Rule.SECURE_COHORT.value}]" in reply.error.reason and in_reason in reply.error.reason
    assert RECORD_KEY_STATE not in context.state.config_records  # flwr's SecAgg+ never started


def test_a_three_site_setup_is_accepted_and_a_weaker_policy_accepts_two(tmp_path: Path) -> None:
    # Prepare: a hospital may accept two sites only in its own file, with a warning; never fewer
    file = tmp_path / "policy.toml"
    file.write_text("min_secure_cohort = 2\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="min_secure_cohort = 2 is below the strict default 3"):
        weaker = load_policy(file)
    with pytest.raises(ValidationError, match="min_secure_cohort"):
        SitePolicy(min_secure_cohort=1)
    strict = make_client_app(_Sites(_sites(tmp_path, 3)))
    weak = make_client_app(_Sites(_sites(tmp_path, 3, weaker)))

    # Execute
    three = strict(_setup(3, 3, 2), _context())  # flwr's default for 3 sites (shares 1.0, threshold 0.67)
    two = weak(_setup(2, 2, 2), _context())

    # Assert: both send their public keys (the setup went through flwr's SecAgg+)
    for reply in (three, two):
        assert not reply.has_error(), reply.error.reason
        keys = reply.content.config_records[RECORD_KEY_CONFIGS]
        assert isinstance(keys[Key.PUBLIC_KEY_1], bytes) and isinstance(keys[Key.PUBLIC_KEY_2], bytes)


def test_an_unmask_after_dropping_to_two_sites_or_listing_a_site_twice_is_refused(tmp_path: Path) -> None:
    # Prepare
    app = make_client_app(_Sites(_sites(tmp_path, 3)))
    dropped = _secagg_message({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]})
    both = _secagg_message({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: [2]})

    # Execute
    small = app(dropped, _context())
    twice = app(both, _context())

    # Assert: no share goes back in either case
    assert small.has_error() and not small.has_content() and small.error.code == wire.ERROR_POLICY
    assert "[secure_cohort]" in small.error.reason and "only 2 site(s) are still active" in small.error.reason
    assert twice.has_error() and not twice.has_content() and twice.error.code == wire.ERROR_SECURE_ROUND
    assert "both active and dropped" in twice.error.reason


def _config(folder: Path, n: int) -> RunConfig:
    return RunConfig(input_shape=(30,), num_rounds=1, min_sites=n, lr=0.5, batch_size=32, seed=3,
                     checkpoint_dir=folder / "ckpt", secure_aggregation=True, round_timeout_s=60.0)


def test_default_policy_sites_refuse_a_two_site_secure_round_and_train_in_a_three_site_one(tmp_path: Path) -> None:
    # Prepare: hospitals with the node default policy; the coordinator runs flwr's SecAgg+ workflow
    two, three = _sites(tmp_path / "two", 2), _sites(tmp_path / "three", 3)

    # Execute / Assert: the 2-site round fails in its setup stage, nothing is trained or charged
    with pytest.raises(SecureAggregationError, match=r"setup stage.*\[secure_cohort\]"):
        run_server(_WireGrid(make_client_app(_Sites(two)), 2), _config(tmp_path / "two", 2))
    assert not list((tmp_path / "two" / "ledgers").rglob("*.json"))
    assert not (tmp_path / "two" / "ckpt" / FINAL_MODEL_FILE).exists()

    history = run_server(_WireGrid(make_client_app(_Sites(three)), 3), _config(tmp_path / "three", 3))

    record = history.rounds[0]
    assert record.complete and set(record.site_train) == {s.name for s in three}
    assert all(m["secure-aggregation"] == 1.0 and 0 < m["epsilon"] <= 3.0 for m in record.site_train.values())
    assert json.loads((tmp_path / "three" / "ckpt" / HISTORY_FILE).read_text())["status"] == "completed"
