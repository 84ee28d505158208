"""Attack (issue 14, item 3): the coordinator uses the operating-threshold query to read validation data.

Written as a curious coordinator. A deployed binary study ends with one evaluate message naming
``evaluation-split = "validation"``: each site releases the final model's per-class score
histograms on its validation split, so the coordinator can choose the model's threshold. The
coordinator tries to get more out of it than the site's evaluation policy allows:

- ask for the validation histograms again and again, to average the Laplace noise away (or to
  probe with crafted models, as in ``test_evaluation_oracle.py``), beyond
  ``max_evaluation_queries_per_study``;
- ask after the study's test evaluations used the budget (the two share one budget);
- ask a site whose policy says ``evaluation = "off"``;
- name another split (``train``, ``all``…) to read the training patients' histograms.

Against the real ClientApp every such request is refused with the rule that applies, the reply
carries no statistic, and nothing beyond the budget is charged or released. A node that served the
validation split outside the policy path (exact statistics, no query count, any split name) hands
the coordinator everything it asks for and fails every test here.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcare.client.app import LocalSite, make_client_app
from fedcare.models import ModelSpec, build_for_data, get_weights, wire
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import Rule, SitePolicy, node_default_policy
from fedcare.privacy.release_mechanisms import EVALUATION, EVALUATION_EXACT, STAT_PREFIX
from fedcare.privacy.settings import PrivacySettings
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition

STUDY = "threshold-oracle"
DEFAULT = node_default_policy()  # evaluation = "dp", 5 queries of ε = 0.1


@dataclasses.dataclass(frozen=True)
class _Provider:
    site: LocalSite

    def __call__(self, context: Context) -> LocalSite:
        return self.site


def _site(tmp_path: Path, policy: SitePolicy) -> LocalSite:
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=3, seed=0)[0]
    return LocalSite(data=data, privacy=PrivacySettings.with_target(epsilon=3.0, delta=1e-5, max_grad_norm=1.0),
                     ledger_dir=tmp_path / "ledgers", name="hospital-a", seed=7, policy=policy)


class Coordinator:
    """The attacker: sends the site's real ClientApp evaluate messages naming the split it wants."""

    def __init__(self, site: LocalSite) -> None:
        self.site = site
        self.app = make_client_app(_Provider(site))
        model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=(30,))
        self.weights = get_weights(model)
        self.refusals: list[str] = []
        self.answers: list[dict[str, Any]] = []
        self.sent = 0

    def ask(self, split: str | None) -> dict[str, Any] | None:
        """Send the model once for ``split`` (None: no split named, the test split); return the statistics or None."""
        config = ConfigRecord({
            wire.STUDY: STUDY, wire.MODEL_SPEC: ModelSpec(family="logistic").model_dump_json(), wire.TASK: "binary",
            wire.NUM_CLASSES: 2, wire.INPUT_SHAPE: [30], wire.HAS_MASK: False,
            **({} if split is None else {wire.EVALUATION_SPLIT: split}),
        })
        arrays = ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in self.weights.items()))
        if TaskIdentity._run_id is None:  # what flwr sets in a running app
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.sent += 1
        msg = Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}), dst_node_id=1, message_type="evaluate")
        msg.metadata.__dict__["_message_id"] = f"probe-{self.sent}"
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        reply = self.app(msg, context)
        if reply.has_error():
            self.refusals.append(reply.error.reason)
            return None
        stats = {k: float(v) for k, v in reply.content[wire.METRICS].items() if k.startswith(STAT_PREFIX)}
        self.answers.append(stats)
        return stats


def _ledger(site: LocalSite) -> PrivacyLedger:
    return PrivacyLedger.open(site.ledger_dir, site=site.name, study=STUDY)


def test_repeating_the_validation_query_to_average_the_noise_stops_at_the_query_budget(tmp_path: Path) -> None:
    # Prepare: a site on the node default policy
    site = _site(tmp_path, DEFAULT)
    attacker = Coordinator(site)
    limit = DEFAULT.max_evaluation_queries_per_study

    # Execute: 4 times the budget of validation queries, to average the Laplace noise away
    for _ in range(4 * limit):
        attacker.ask(wire.SPLIT_VALIDATION)

    # Assert: only the budget answered, each charged ε = 0.1; every further request refused on the budget rule
    assert len(attacker.answers) == limit
    assert len(attacker.refusals) == 3 * limit
    assert all(f"[{Rule.EVALUATION_QUERIES.value}]" in r for r in attacker.refusals)
    entries = [r for r in _ledger(site).releases if r["mechanism"] == EVALUATION]
    assert [(r["split"], r["epsilon"]) for r in entries] == [("validation", DEFAULT.evaluation_epsilon_per_query)] * limit
    # the answers are noised: no two releases of the same model on the same patients are equal
    assert len({tuple(sorted(a.items())) for a in attacker.answers}) == limit


def test_the_validation_query_shares_the_budget_of_the_test_evaluations(tmp_path: Path) -> None:
    # Prepare: a study whose test evaluations already used the site's budget
    site = _site(tmp_path, DEFAULT)
    attacker = Coordinator(site)
    for _ in range(DEFAULT.max_evaluation_queries_per_study):
        assert attacker.ask(None) is not None

    # Execute
    stats = attacker.ask(wire.SPLIT_VALIDATION)

    # Assert: refused on the budget rule, nothing more charged
    assert stats is None
    assert f"[{Rule.EVALUATION_QUERIES.value}]" in attacker.refusals[-1]
    assert _ledger(site).release_count(EVALUATION) == DEFAULT.max_evaluation_queries_per_study
    assert not any(r.get("split") == "validation" for r in _ledger(site).releases)


def test_a_site_with_evaluation_off_releases_no_validation_histogram(tmp_path: Path) -> None:
    # Prepare
    site = _site(tmp_path, DEFAULT.model_copy(update={"evaluation": "off"}))
    attacker = Coordinator(site)

    # Execute
    replies = [attacker.ask(wire.SPLIT_VALIDATION) for _ in range(3)]

    # Assert: refused every time on the evaluation rule; the ledger holds no release
    assert replies == [None, None, None]
    assert all(f"[{Rule.EVALUATION.value}]" in r for r in attacker.refusals)
    assert _ledger(site).releases == []


@pytest.mark.parametrize("split", ["train", "training", "all", "val", ""])
def test_naming_another_split_releases_nothing(tmp_path: Path, split: str) -> None:
    # Prepare: even a site that releases exact evaluations (opt-in)
    site = _site(tmp_path, DEFAULT.model_copy(update={"evaluation": "exact"}))
    attacker = Coordinator(site)

    # Execute
    stats = attacker.ask(split)

    # Assert: refused as a bad request before any release; nothing recorded
    assert stats is None
    assert "refused to evaluate" in attacker.refusals[0] and "validation" in attacker.refusals[0]
    assert _ledger(site).releases == []


def test_an_exact_site_is_also_cut_off_at_its_query_budget(tmp_path: Path) -> None:
    # Prepare: exact evaluations (opt-in, outside ε) still answer at most the policy's queries
    policy = DEFAULT.model_copy(update={"evaluation": "exact", "max_evaluation_queries_per_study": 2})
    site = _site(tmp_path, policy)
    attacker = Coordinator(site)

    # Execute
    with pytest.warns(UserWarning, match="exact evaluation"):
        for _ in range(6):
            attacker.ask(wire.SPLIT_VALIDATION)

    # Assert
    assert len(attacker.answers) == 2 and len(attacker.refusals) == 4
    assert _ledger(site).release_count(EVALUATION_EXACT) == 2
