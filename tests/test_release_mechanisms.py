"""The count and evaluation release mechanisms: sensitivity, noise scale, ε charged, metrics, aggregation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from fedcare.privacy.errors import BudgetExceededError
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import PolicyViolation, Rule, node_default_policy
from fedcare.privacy.release_mechanisms import (
    BINS,
    LOSS_CLIP,
    check_evaluation,
    laplace_scale,
    metrics_from_statistics,
    noisy_count,
    release_reserve,
    release_statistics,
    statistics_sensitivity,
    sufficient_statistics,
)
from fedcare.server.strategy import aggregate_evaluate_metrics


def _binary_stats(probs: list[float], labels: list[int], losses: list[float] | None = None) -> dict[str, float]:
    return sufficient_statistics("binary", scores=np.array(probs), targets=np.array(labels),
                                 losses=np.array(losses if losses is not None else [0.1] * len(probs)))


def test_laplace_scale_is_sensitivity_over_epsilon() -> None:
    assert laplace_scale(sensitivity=1.0, epsilon=0.1) == 10.0
    assert laplace_scale(sensitivity=2.0, epsilon=0.1) == 20.0
    with pytest.raises(ValueError):
        laplace_scale(sensitivity=1.0, epsilon=0.0)


def test_noisy_count_is_the_count_plus_laplace_of_scale_one_over_epsilon_rounded_at_least_one() -> None:
    expected_noise = np.random.default_rng(5).laplace(0.0, 10.0)

    value = noisy_count(100, epsilon=0.1, rng=np.random.default_rng(5))
    floor = noisy_count(3, epsilon=0.1, rng=np.random.default_rng(3))  # draws -17.64: clamped

    assert value == max(1, round(100 + expected_noise))
    assert np.random.default_rng(3).laplace(0.0, 10.0) == pytest.approx(-17.64, abs=0.01)
    assert floor == 1


def test_binary_statistics_have_sensitivity_two_with_the_loss_weighted_by_the_clip() -> None:
    stats = _binary_stats([0.05, 0.55, 0.95], [0, 1, 1], [0.2, 9.0, 0.1])

    sensitivity, weights = statistics_sensitivity(stats)

    assert len(stats) == 2 * BINS + 1
    assert (stats["stat-hist-0-0"], stats["stat-hist-1-5"], stats["stat-hist-1-9"]) == (1.0, 1.0, 1.0)
    assert stats["stat-loss-sum"] == pytest.approx(0.2 + LOSS_CLIP + 0.1)  # 9.0 clipped to 5
    assert sensitivity == 2.0 and weights["stat-loss-sum"] == LOSS_CLIP and weights["stat-hist-0-3"] == 1.0


def test_regression_statistics_have_sensitivity_three() -> None:
    stats = sufficient_statistics("regression", scores=np.array([1.0, 4.0]), targets=np.array([0.0, 0.0]),
                                  losses=np.zeros(0))

    sensitivity, weights = statistics_sensitivity(stats)

    assert stats == {"stat-n": 2.0, "stat-se-sum": 1.0 + LOSS_CLIP, "stat-ae-sum": 1.0 + math.sqrt(LOSS_CLIP)}
    assert sensitivity == 3.0 and weights == {"stat-n": 1.0, "stat-se-sum": LOSS_CLIP, "stat-ae-sum": math.sqrt(LOSS_CLIP)}


def test_release_adds_weight_times_laplace_of_sensitivity_over_epsilon() -> None:
    stats = _binary_stats([0.05, 0.95], [0, 1])
    keys = sorted(stats)
    draws = np.random.default_rng(9).laplace(0.0, 2.0 / 0.1, size=len(keys))

    noisy = release_statistics(stats, epsilon=0.1, rng=np.random.default_rng(9))

    for key, draw in zip(keys, draws, strict=True):
        weight = LOSS_CLIP if key == "stat-loss-sum" else 1.0
        assert noisy[key] == pytest.approx(stats[key] + weight * draw, abs=1e-12)


def test_exact_statistics_give_sklearns_metrics_when_no_two_classes_share_a_bin() -> None:
    probs = [0.05, 0.15, 0.35, 0.45, 0.55, 0.65, 0.85, 0.95, 0.25, 0.75]
    labels = [0, 0, 1, 0, 1, 0, 1, 1, 0, 1]

    metrics = metrics_from_statistics(_binary_stats(probs, labels))

    pred = [int(p >= 0.5) for p in probs]
    assert metrics["n"] == 10 and metrics["loss"] == pytest.approx(0.1)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, probs))


def test_the_server_sums_statistics_so_the_global_metrics_are_the_pooled_ones() -> None:
    a = _binary_stats([0.05, 0.95, 0.65], [0, 1, 0])
    b = _binary_stats([0.15, 0.85], [1, 1])
    records = [RecordDict({"m": MetricRecord({"num-examples": 3, **a})}),
               RecordDict({"m": MetricRecord({"num-examples": 2, **b})})]

    out = aggregate_evaluate_metrics(records, "num-examples")

    pooled = metrics_from_statistics(_binary_stats([0.05, 0.95, 0.65, 0.15, 0.85], [0, 1, 0, 1, 1]))
    assert {k: out[k] for k in ("accuracy", "balanced_accuracy", "auroc", "loss")} == pytest.approx(
        {k: pooled[k] for k in ("accuracy", "balanced_accuracy", "auroc", "loss")})
    assert out["accuracy"] == pytest.approx(3 / 5)


def test_the_default_reserve_is_the_count_and_five_evaluations() -> None:
    policy = node_default_policy()

    assert release_reserve(policy) == pytest.approx(0.1 + 5 * 0.1)
    assert release_reserve(policy.model_copy(update={"evaluation": "off"})) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("update", "kwargs", "rule"),
    [
        ({"evaluation": "off"}, {}, Rule.EVALUATION),
        ({}, {"cohort": 19}, Rule.EVALUATION_COHORT),
        ({}, {"queries_done": 5}, Rule.EVALUATION_QUERIES),
        ({}, {"spent_study": 2.95}, Rule.EPSILON_STUDY),
        ({}, {"spent_total": 5.95}, Rule.EPSILON_TOTAL),
        ({}, {"spent_study": math.inf, "spent_total": math.inf}, Rule.EPSILON_STUDY),
    ],
)
def test_an_evaluation_over_the_policy_is_refused(update: dict, kwargs: dict, rule: Rule) -> None:
    policy = node_default_policy().model_copy(update=update)
    args = {"cohort": 20, "queries_done": 0, "spent_study": 1.0, "spent_total": 1.0, "budget": 3.0} | kwargs

    with pytest.raises(PolicyViolation) as err:
        check_evaluation(policy, **args)

    assert err.value.rule == rule


def test_an_allowed_evaluation_costs_the_per_query_epsilon_and_exact_costs_none() -> None:
    policy = node_default_policy()
    args = {"cohort": 20, "queries_done": 4, "spent_study": 2.9, "spent_total": 2.9, "budget": 3.0}

    assert check_evaluation(policy, **args) == 0.1
    assert check_evaluation(policy.model_copy(update={"evaluation": "exact"}), **args) is None


def test_the_ledger_charges_releases_persists_them_and_counts_them_in_every_budget_check(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, site="a", study="s", accountant="rdp", delta=1e-5, epsilon_budget=4.5)
    ledger.commit_round(round_index=1, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    trained = ledger.training_epsilon()

    ledger.record_release(mechanism="count", epsilon=0.1, sensitivity=1.0, scale=10.0, value=42, of=40)
    ledger.record_release(mechanism="evaluation", epsilon=0.25, sensitivity=2.0, scale=8.0)
    ledger.record_release(mechanism="evaluation-exact", epsilon=None)
    reopened = PrivacyLedger.open(tmp_path, site="a", study="s")

    assert reopened.spent_epsilon() == pytest.approx(trained + 0.35, abs=1e-12)
    assert reopened.release_epsilon("count") == 0.1 and reopened.release_epsilon("evaluation") == 0.25
    assert reopened.release_count("evaluation-exact") == 1
    assert [r["mechanism"] for r in reopened.releases] == ["count", "evaluation", "evaluation-exact"]
    # DP-SGD alone: ε(σ=1, q=0.1, 20 steps, δ=1e-5, RDP) ≈ 4.224 fits 4.5; with the releases' 0.35 it does not
    assert trained == pytest.approx(3.4413, abs=1e-4)
    assert reopened.projected_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=10) == pytest.approx(4.2240, abs=1e-4)
    with pytest.raises(BudgetExceededError):
        reopened.check_round(noise_multiplier=1.0, sample_rate=0.1, steps=10)
