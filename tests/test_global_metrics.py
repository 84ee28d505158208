"""Global metrics from summed sufficient statistics (privacy/global_metrics.py), with known numbers."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from histograms import hist  # noqa: E402

from fedcare.client.dataset import Split  # noqa: E402
from fedcare.client.metrics import evaluate, global_evaluation  # noqa: E402
from fedcare.privacy.global_metrics import (  # noqa: E402
    binary_at_threshold,
    binned_auroc,
    exact_binary_metrics,
    exact_regression_metrics,
    global_metrics_from_statistics,
    wilson_interval,
)
from fedcare.privacy.release_mechanisms import BINS, STAT_PREFIX, sufficient_statistics, sum_statistics  # noqa: E402


class _Fixed(torch.nn.Module):
    """A model whose logit is its input's first feature."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] * self.w


def _split(probs: list[float], labels: list[int]) -> Split:
    """Return a split whose model logits give ``probs``."""
    p = torch.tensor(probs, dtype=torch.float64)
    logits = torch.log(p / (1 - p)).float()[:, None]
    return Split(inputs=(logits,), targets=torch.tensor(labels, dtype=torch.long))


def test_wilson_interval_known_values() -> None:
    # Prepare / Execute
    low, high = wilson_interval(7, 10)
    zero_low, zero_high = wilson_interval(0, 20)
    # Assert: hand-computed Wilson score bounds (z = 1.959964)
    assert low == pytest.approx(0.396778147461, abs=1e-9)
    assert high == pytest.approx(0.892208732594, abs=1e-9)
    assert zero_low == pytest.approx(0.0, abs=1e-12)
    assert zero_high == pytest.approx(0.161125, abs=1e-6)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_binned_auroc_counts_ties_in_a_bin_as_one_half_and_differs_from_exact() -> None:
    # Prepare: negatives at 0.05 and 0.55, positives at 0.52 and 0.95
    neg, pos = hist(b0=1, b5=1), hist(b5=1, b9=1)
    # Execute
    binned = binned_auroc(neg, pos)
    exact = exact_binary_metrics(np.array([0.05, 0.55, 0.52, 0.95]), np.array([0, 0, 1, 1]))["auroc"]
    # Assert: pairs (0.52 vs 0.05) 1, (0.52 vs 0.55) tie in bin 5 -> 1/2, (0.95 vs both) 2 -> 3.5 / 4
    assert binned == pytest.approx(0.875)
    assert exact == pytest.approx(0.75)  # the within-bin pair is in fact misordered


def test_binned_auroc_of_separated_classes_is_one_and_nan_with_one_class() -> None:
    # Prepare / Execute / Assert
    assert binned_auroc(hist(b1=3, b2=4), hist(b7=2, b8=5)) == pytest.approx(1.0)
    assert math.isnan(binned_auroc(hist(b1=3), np.zeros(BINS)))


def test_confusion_at_a_bin_edge_is_exact() -> None:
    # Prepare: 4 negatives below 0.3, 1 at 0.35; 2 positives at 0.25, 3 above 0.7
    neg, pos = hist(b1=4, b3=1), hist(b2=2, b7=3)
    # Execute
    at_03 = binary_at_threshold(neg, pos, 0.3)
    at_05 = binary_at_threshold(neg, pos, 0.5)
    # Assert
    assert at_03["sensitivity"] == pytest.approx(3 / 5) and at_03["specificity"] == pytest.approx(4 / 5)
    assert at_03["accuracy"] == pytest.approx(7 / 10)
    assert at_05["balanced_accuracy"] == pytest.approx((3 / 5 + 5 / 5) / 2)
    assert (at_03["accuracy_low"], at_03["accuracy_high"]) == pytest.approx(wilson_interval(7, 10))
    with pytest.raises(ValueError, match="bin edge"):
        binary_at_threshold(neg, pos, 0.33)


def test_a_one_class_site_no_longer_inflates_balanced_accuracy() -> None:
    # Prepare: site A holds only positives, all predicted positive (site balanced accuracy 1.0);
    # site B holds both classes and the model calls everything positive (0.5)
    site_a = _split([0.9] * 10, [1] * 10)
    site_b = _split([0.8] * 10, [0] * 5 + [1] * 5)
    model = _Fixed()
    # Execute
    per_site = [evaluate(model, s, "binary")["balanced_accuracy"] for s in (site_a, site_b)]
    weighted = (per_site[0] * 10 + per_site[1] * 10) / 20
    overall = global_evaluation(model, [site_a, site_b], "binary")
    # Assert: the mean of per-site values says 0.75, the whole evaluation set says 0.5
    assert per_site == pytest.approx([1.0, 0.5])
    assert weighted == pytest.approx(0.75)
    assert overall.metrics["balanced_accuracy"] == pytest.approx(0.5)
    assert overall.metrics["specificity"] == pytest.approx(0.0)
    assert overall.num_examples == 20


def test_global_statistics_of_summed_sites_equal_the_pooled_evaluation() -> None:
    # Prepare
    rng = np.random.default_rng(3)
    probs, labels = rng.uniform(size=200), rng.integers(0, 2, size=200)
    halves = [slice(0, 80), slice(80, 200)]
    stats = [sufficient_statistics("binary", scores=probs[h], targets=labels[h], losses=np.zeros(len(labels[h])))
             for h in halves]
    pooled = sufficient_statistics("binary", scores=probs, targets=labels, losses=np.zeros(200))
    # Execute
    from_sites = global_metrics_from_statistics(sum_statistics(stats), threshold=0.5)
    from_pool = global_metrics_from_statistics(pooled, threshold=0.5)
    # Assert
    assert from_sites == pytest.approx(from_pool, nan_ok=True)
    assert from_sites["n"] == 200
    exact = exact_binary_metrics(probs, labels, threshold=0.5)
    assert from_sites["accuracy"] == pytest.approx(exact["accuracy"])  # exact at a bin edge
    assert abs(from_sites["auroc"] - exact["auroc"]) < 0.05  # binned: an approximation
    assert from_sites["auroc_low"] <= from_sites["auroc"] <= from_sites["auroc_high"]


def test_histogram_brier_and_calibration_use_bin_midpoints() -> None:
    # Prepare: 10 examples in bin 8 (midpoint 0.85), 8 of them positive
    stats = {f"{STAT_PREFIX}hist-0-8": 2.0, f"{STAT_PREFIX}hist-1-8": 8.0, f"{STAT_PREFIX}loss-sum": 1.0}
    # Execute
    out = global_metrics_from_statistics(stats)
    # Assert: Brier (2·0.85² + 8·0.15²) / 10; calibration |0.8 − 0.85|
    assert out["brier"] == pytest.approx((2 * 0.85**2 + 8 * 0.15**2) / 10)
    assert out["calibration_error"] == pytest.approx(0.05)


def test_exact_binary_metrics_brier_and_calibration() -> None:
    # Prepare
    p, y = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 1, 1, 1])
    # Execute
    out = exact_binary_metrics(p, y, threshold=0.5)
    # Assert: Brier mean (0.01, 0.64, 0.04, 0.01); ECE bins 1, 2, 8, 9 each |rate − p| = .1, .8, .2, .1
    assert out["brier"] == pytest.approx(0.175)
    assert out["calibration_error"] == pytest.approx((0.1 + 0.8 + 0.2 + 0.1) / 4)
    assert out["sensitivity"] == pytest.approx(2 / 3) and out["specificity"] == pytest.approx(1.0)


def test_regression_global_r2_is_not_the_mean_of_site_r2() -> None:
    # Prepare: two sites whose targets sit at different levels; the model predicts each site's mean
    y = np.array([0.0, 1.0, 10.0, 11.0])
    pred = np.array([0.5, 0.5, 10.5, 10.5])
    # Execute
    out = exact_regression_metrics(pred, y)
    # Assert: each site's R² is 0 (it predicts the site mean), the whole set's R² is 1 − 1/101
    assert out["r2"] == pytest.approx(1 - 1.0 / 101.0)
    assert out["mae"] == pytest.approx(0.5)
    assert out["mae_low"] <= 0.5 <= out["mae_high"]
