"""Attack (issue 11, finding 2): the coordinator uses federated evaluation as an exact query oracle.

Written as the coordinator. It sends crafted threshold models ("is feature j above t?": a logistic
model whose only weight selects j, with a huge slope) to a hospital's real ClientApp evaluate
handler and reads each patient's value of j back by bisection on t from the replies. Against a
site that releases exact metrics (what every site did before the fix, reproduced here with the
opt-in ``evaluation = "exact"`` and no limits) the attack recovers every test patient's age; against
a site with the default policy it is refused on small test splits, charged per answered query,
cut off after the query budget, and recovers about as much as guessing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

from statistics import NormalDist

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcare.client.app import LocalSite, make_client_app
from fedcare.client.loaders import load_site_file
from fedcare.models import ModelSpec, build_for_data, get_weights, wire
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import Rule, SitePolicy, node_default_policy
from fedcare.privacy.release_mechanisms import BINS, STAT_PREFIX
from fedcare.privacy.settings import PrivacySettings

SITES = Path(__file__).resolve().parents[2] / "simulations" / "sites"
STUDY = "heart-disease"
FEATURE = "age"
SLOPE = 1e4  # p = sigmoid(SLOPE (x - t)): 1 above the threshold, 0 below
LOW, HIGH, STEPS = -4.0, 4.0, 12  # bisection over standardised values: 8 / 2**12 ≈ 0.002 resolution
TOLERANCE = 0.05  # a patient's value is "recovered" within 0.05 SD (about half a year of age)


@dataclasses.dataclass(frozen=True)
class _Provider:
    site: LocalSite

    def __call__(self, context: Context) -> LocalSite:
        return self.site


def _site(shared_data: Path, tmp_path: Path, hospital: str, policy: SitePolicy) -> LocalSite:
    """Return the hospital's node; its own seed makes the noise (and this test) repeatable, never the coordinator."""
    del shared_data  # the manifests point at the shared data folder; the fixture skips without it
    data = load_site_file(SITES / f"heart_{hospital}.toml")
    return LocalSite(data=data, privacy=PrivacySettings(), ledger_dir=tmp_path / "ledgers", name=f"heart-{hospital}",
                     policy=policy, seed=11)


def _threshold_message(site: LocalSite, feature: int, threshold: float, *, bias: float | None = None) -> Message:
    """Return an evaluate message carrying the model 'feature > threshold' (or a constant model)."""
    data = site.data
    spec = ModelSpec(family="logistic")
    model = build_for_data(spec, task="binary", num_classes=2, input_shape=tuple(data.input_shape), has_mask=False)
    weights = get_weights(model)
    for name, value in weights.items():
        value[...] = 0.0
        if name.endswith("weight"):
            value.reshape(-1)[feature] = 0.0 if bias is not None else SLOPE
        elif name.endswith("bias"):
            value.reshape(-1)[0] = bias if bias is not None else -SLOPE * threshold
    config = ConfigRecord({
        wire.STUDY: STUDY, wire.MODEL_SPEC: spec.model_dump_json(), wire.TASK: "binary", wire.NUM_CLASSES: 2,
        wire.INPUT_SHAPE: list(data.input_shape), wire.HAS_MASK: False,
    })
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in weights.items())),
        wire.CONFIG: config,
    })
    if TaskIdentity._run_id is None:  # what flwr sets in a running app
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content, dst_node_id=1, message_type="evaluate")
    msg.metadata.__dict__["_message_id"] = "eval-1"
    return msg


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


class Coordinator:
    """The attacker: asks the site's evaluate handler and turns each reply into counts above a threshold."""

    def __init__(self, site: LocalSite) -> None:
        self.site = site
        self.app = make_client_app(_Provider(site))
        self.feature = list(site.data.feature_names).index(FEATURE)
        self.queries = 0
        self.refusals: list[str] = []
        self.positives = self.negatives = None  # class sizes, learnt from a constant model (exact oracle)

    def ask(self, threshold: float, *, bias: float | None = None) -> dict[str, Any] | None:
        """Send one crafted model; return the reply's metrics, or None when the site refused."""
        self.queries += 1
        reply = self.app(_threshold_message(self.site, self.feature, threshold, bias=bias), _context())
        if reply.has_error():
            self.refusals.append(reply.error.reason)
            return None
        return dict(reply.content[wire.METRICS])

    def count_above(self, threshold: float) -> float | None:
        """Return how many test patients have the feature above ``threshold`` (as well as the reply tells)."""
        m = self.ask(threshold)
        if m is None:
            return None
        if f"{STAT_PREFIX}hist-1-{BINS - 1}" in m:  # statistics: everyone above lands in the top bin
            return float(m[f"{STAT_PREFIX}hist-0-{BINS - 1}"] + m[f"{STAT_PREFIX}hist-1-{BINS - 1}"])
        if self.positives is None:  # an exact oracle: accuracy and balanced accuracy give both classes' counts
            everyone = self.ask(0.0, bias=SLOPE)
            n = everyone[wire.NUM_EXAMPLES]
            self.positives = round(everyone["accuracy"] * n)
            self.negatives = n - self.positives
        pos, neg = self.positives, self.negatives
        # acc·n = a + (N − b);  2·bal − 1 = a/P − b/N  (a, b: positives / negatives above t)
        matrix = np.array([[1.0, -1.0], [1.0 / pos, -1.0 / neg]])
        rhs = np.array([m["accuracy"] * (pos + neg) - neg, 2 * m["balanced_accuracy"] - 1])
        above_pos, above_neg = np.linalg.solve(matrix, rhs)
        return float(round(above_pos) + round(above_neg))

    def reconstruct(self, n: int, max_queries: int) -> np.ndarray:
        """Return the attacker's estimate of the n sorted values by bisection on each rank."""
        cache: dict[float, float | None] = {}
        estimate = np.zeros(n)
        for rank in range(n):
            lo, hi = LOW, HIGH  # the rank-th smallest value v: the smallest t with count_above(t) ≤ n − 1 − rank
            for _ in range(STEPS):
                mid = (lo + hi) / 2
                if mid not in cache:
                    cache[mid] = self.count_above(mid) if self.queries < max_queries and not self.refusals else None
                above = cache[mid]
                if above is None:  # refused or out of queries: the attacker can only guess
                    break
                if above <= n - 1 - rank + 0.5:
                    hi = mid
                else:
                    lo = mid
            estimate[rank] = (lo + hi) / 2
        return estimate


def _recovery(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Return the fraction of patients whose (sorted) value the attacker recovered within the tolerance."""
    return float(np.mean(np.abs(np.sort(estimate) - np.sort(truth)) < TOLERANCE))


def _true_values(site: LocalSite, feature: str) -> np.ndarray:
    column = list(site.data.feature_names).index(feature)
    return site.data.test.inputs[0][:, column].double().numpy()


def test_a_site_below_the_minimum_evaluation_cohort_answers_no_query(shared_data: Path, tmp_path: Path) -> None:
    # Prepare: the two hospitals whose evaluation splits held 7 and 19 patients, default policy
    sites = [_site(shared_data, tmp_path, h, node_default_policy()) for h in ("switzerland", "va")]

    attackers = [Coordinator(site) for site in sites]

    # Execute
    replies = [attacker.ask(0.0) for attacker in attackers]

    # Assert: refused on the evaluation-cohort rule (no count in the reason), nothing charged or released
    assert replies == [None, None]
    for attacker, site in zip(attackers, sites, strict=True):
        assert len(site.data.test) < 20
        assert f"[{Rule.EVALUATION_COHORT.value}]" in attacker.refusals[0]
        assert str(len(site.data.test)) not in attacker.refusals[0].split("]", 1)[1].replace("20", "")
        assert PrivacyLedger.open(site.ledger_dir, site=site.name, study=STUDY).releases == []


def test_exact_evaluation_is_a_reconstruction_oracle(shared_data: Path, tmp_path: Path) -> None:
    """The attack as it worked before the fix: exact metrics, no cohort floor, no query budget."""
    # Prepare: what every site released before (exact metrics), reproduced with the opt-in and no limits
    exact = node_default_policy().model_copy(update={
        "evaluation": "exact", "min_evaluation_cohort": 1, "max_evaluation_queries_per_study": 100_000,
    })
    site = _site(shared_data, tmp_path, "switzerland", exact)
    truth = _true_values(site, FEATURE)
    attacker = Coordinator(site)

    # Execute
    with pytest.warns(UserWarning):
        estimate = attacker.reconstruct(len(truth), max_queries=10_000)

    # Assert: every one of the 7 test patients' ages read back
    assert len(truth) == 7
    assert _recovery(estimate, truth) == 1.0
    assert attacker.refusals == []


def test_default_policy_charges_each_query_stops_at_the_budget_and_defeats_the_reconstruction(
    shared_data: Path, tmp_path: Path
) -> None:
    # Prepare: the largest hospital (46 test patients, above the cohort floor), default policy
    policy = node_default_policy()
    site = _site(shared_data, tmp_path, "cleveland", policy)
    truth = _true_values(site, FEATURE)
    attacker = Coordinator(site)
    # chance: an attacker who learns nothing guesses the standard normal quantiles (standardised feature)
    guess = np.array([NormalDist().inv_cdf((i + 0.5) / len(truth)) for i in range(len(truth))])

    # Execute: the same bisection attack, as many queries as the site answers
    estimate = attacker.reconstruct(len(truth), max_queries=10_000)

    # Assert (b): only max_evaluation_queries_per_study answered, the next refused on the query budget
    answered = attacker.queries - len(attacker.refusals)
    assert answered == policy.max_evaluation_queries_per_study == 5
    assert len(attacker.refusals) == 1 and f"[{Rule.EVALUATION_QUERIES.value}]" in attacker.refusals[0]
    # Assert (c): each answered query is its own ledger entry, ε = 0.1 each, in the study's spent ε
    ledger = PrivacyLedger.open(site.ledger_dir, site=site.name, study=STUDY)
    entries = [r for r in ledger.releases if r["mechanism"] == "evaluation"]
    assert [r["epsilon"] for r in entries] == [0.1] * 5
    assert [r["sensitivity"] for r in entries] == [2.0] * 5 and [r["scale"] for r in entries] == [20.0] * 5
    assert ledger.spent_epsilon() == pytest.approx(0.5, abs=1e-12)
    # Assert (d): the reconstruction that read back every patient now recovers no more than guessing
    recovered, chance = _recovery(estimate, truth), _recovery(guess, truth)
    assert recovered <= chance + 0.1, (recovered, chance)
    assert recovered < 0.25
    state = json.loads(ledger.path.read_text())  # the ledger holds no metric or patient value
    assert all(set(r) <= {"mechanism", "epsilon", "at", "sensitivity", "scale"} for r in state["releases"])


def test_noisy_answers_alone_do_not_resolve_patients(shared_data: Path, tmp_path: Path) -> None:
    """Even with an unlimited query budget (a weakened policy), 0.1-DP answers do not give the bisection exact counts."""
    # Prepare
    many = node_default_policy().model_copy(update={"max_evaluation_queries_per_study": 200,
                                                   "max_epsilon_per_study": 30.0, "max_epsilon_total": 30.0})
    site = dataclasses.replace(_site(shared_data, tmp_path, "cleveland", many),
                               privacy=PrivacySettings(target_epsilon=3.0, epsilon_budget=30.0))
    truth = _true_values(site, FEATURE)
    attacker = Coordinator(site)

    # Execute: each answer is the count above t plus Laplace noise of scale 20 on two cells
    errors = [attacker.count_above(t) - float(np.sum(truth > t)) for t in np.linspace(-1.5, 1.5, 40)]

    # Assert: the answers are off by many patients, so no rank can be bisected to one patient
    assert all(e is not None for e in errors)
    assert float(np.median(np.abs(errors))) > 5.0
    assert math.isclose(PrivacyLedger.open(site.ledger_dir, site=site.name, study=STUDY).spent_epsilon(), 4.0)
