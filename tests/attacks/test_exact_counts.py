"""Attack (issue 11, finding 4): the coordinator reads each site's exact example count from its replies.

Written as the coordinator. With the exact ``num-examples`` of every train and evaluate reply, the
add/remove-one ε that DP-SGD states is not a guarantee any more (the count alone tells whether
one record was added). A default-policy site now sends a Laplace-noised count (drawn once per
study, charged to its ledger, re-sent unchanged), its evaluation count is part of the noisy
statistics, and the privacy report states the relation and the ε per mechanism.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcare.client.app import LocalSite, make_client_app
from fedcare.models import ModelSpec, build_for_data, get_weights, wire
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import node_default_policy
from fedcare.privacy.report import PrivacyReport, render_markdown
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import train_config
from fedcare.server.checkpoint import MetricsHistory
from fedcare.server.config import RunConfig
from fedcare.server.safekeeping import site_privacy
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition

STUDY = "counts"
#: The node default policy; only plain rounds are accepted, so the handler can be called directly
#: (the SecAgg+ adapter forwards these same metrics).
POLICY = node_default_policy().model_copy(update={"require_secure_aggregation": False})


@dataclasses.dataclass(frozen=True)
class _Provider:
    site: LocalSite

    def __call__(self, context: Context) -> LocalSite:
        return self.site


def _site(tmp_path: Path) -> LocalSite:
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=2, seed=0)[0]
    return LocalSite(data=data, privacy=PrivacySettings.with_target(epsilon=3.0, delta=1e-5, max_grad_norm=1.0),
                     ledger_dir=tmp_path / "ledgers", name="hospital-a", seed=3, policy=POLICY)


def _message(kind: str, server_round: int) -> Message:
    config = RunConfig(input_shape=(30,), num_rounds=3, min_sites=1, checkpoint_dir=Path("/nonexistent"),
                       batch_size=32, lr=0.5, study=STUDY)
    record = train_config(config)
    record[wire.MODEL_SPEC] = ModelSpec(family="logistic").model_dump_json()
    record[wire.SERVER_ROUND] = server_round
    model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=(30,), has_mask=False)
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in get_weights(model).items())),
        wire.CONFIG: record,
    })
    if TaskIdentity._run_id is None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content, dst_node_id=1, message_type=kind)
    msg.metadata.__dict__["_message_id"] = f"{kind}-{server_round}"
    return msg


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_no_exact_count_leaves_a_default_policy_site(tmp_path: Path) -> None:
    # Prepare
    site = _site(tmp_path)
    app = make_client_app(_Provider(site))
    n_train, n_test = len(site.data.train), len(site.data.test)

    # Execute: two training rounds and an evaluation, as the coordinator sees them
    train = [app(_message("train", r), _context()) for r in (1, 2)]
    evaluation = app(_message("evaluate", 2), _context())

    # Assert: every count the coordinator receives is the stored Laplace release, never the exact one
    assert not any(m.has_error() for m in (*train, evaluation))
    sent = [int(m.content[wire.METRICS][wire.NUM_EXAMPLES]) for m in train]
    ledger = PrivacyLedger.open(site.ledger_dir, site=site.name, study=STUDY)
    counts = [r for r in ledger.releases if r["mechanism"] == "count"]
    assert len(counts) == 1  # drawn once; the second round re-sends it (nothing new released)
    assert counts[0]["epsilon"] == 0.1 and counts[0]["sensitivity"] == 1.0 and counts[0]["scale"] == 10.0
    assert sent == [counts[0]["value"]] * 2 and sent[0] != n_train
    metrics = evaluation.content[wire.METRICS]
    assert int(metrics[wire.NUM_EXAMPLES]) != n_test  # post-processed from the noisy histograms
    assert "accuracy" not in metrics and all(k.startswith(("stat-", "epsilon", "evaluation", wire.NUM_EXAMPLES))
                                             for k in metrics)
    # the replies' ε per mechanism add up to the ledger's total
    assert metrics[wire.EPSILON_COUNT] == 0.1 and metrics[wire.EPSILON_EVALUATION] == 0.1
    assert metrics[wire.EPSILON] == pytest.approx(ledger.spent_epsilon(), abs=1e-12)
    assert metrics[wire.EPSILON] == pytest.approx(metrics[wire.EPSILON_TRAINING] + 0.2, abs=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_report_states_the_relation_and_the_epsilon_per_mechanism(tmp_path: Path) -> None:
    # Prepare: what the server recorded from a site's train and evaluate replies
    site = _site(tmp_path)
    app = make_client_app(_Provider(site))
    history = MetricsHistory()
    record = history.round(1)
    record.site_train[site.name] = {k: float(v) for k, v in app(_message("train", 1), _context()).content[wire.METRICS].items()}
    record.site_info[site.name] = {"accountant": "rdp", "max_grad_norm": 1.0}
    record.site_evaluate[site.name] = {k: float(v) for k, v in app(_message("evaluate", 1), _context()).content[wire.METRICS].items()}
    record.complete = True
    ledger = PrivacyLedger.open(site.ledger_dir, site=site.name, study=STUDY)

    # Execute
    (entry,) = site_privacy(history)
    report = PrivacyReport(study=STUDY, round=1, sites=(entry,), secure_aggregation=False)
    text = render_markdown(report)

    # Assert: the total is the ledger's (training + count + evaluation), under add/remove one
    assert report.neighbouring_relation == "add/remove one record"
    assert entry.epsilon == pytest.approx(ledger.spent_epsilon(), abs=1e-12)
    assert entry.epsilon_training == pytest.approx(ledger.training_epsilon(), abs=1e-12)
    assert (entry.epsilon_count, entry.epsilon_evaluation, entry.evaluation_queries) == (0.1, 0.1, 1)
    assert "Neighbouring relation: **add/remove one record**" in text
    assert f"| {site.name} | {entry.epsilon_training:.4f} | 0.1000 | 0.1000 | 1 | 0 | {entry.epsilon:.4f} |" in text
