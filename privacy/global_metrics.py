"""Global metrics of many sites from their summed sufficient statistics, with confidence intervals.

A federation's headline figure is the metric of **all evaluation patients together**, not a mean
of per-site metrics: an example-weighted mean of per-site AUROCs drops a site whose test split holds
one class (its AUROC is undefined) while that site still counts with a balanced accuracy of 1.0,
and the mean of per-site R² is not the R² of the whole. The functions here compute the global
metric from what sites can release (:mod:`fedcare.privacy.release_mechanisms`): per-class
histograms of the predicted probability in ``BINS`` equal bins (binary), confusion counts
(multiclass), error sums (regression); summed over sites, these are exactly the statistics of the
pooled evaluation set. They are pure NumPy / SciPy / scikit-learn, free of ε (post-processing).

Binary tasks from histograms:

- **operating threshold** (:func:`choose_threshold`): the bin edge that maximises Youden's
  J = sensitivity + specificity − 1 (the same as maximising balanced accuracy) on summed
  *validation* histograms; ties go to the edge nearest 0.5;
- **accuracy, balanced accuracy, sensitivity, specificity** at a threshold on a bin edge: exact
  (the confusion matrix at a bin edge is a sum of histogram cells); intervals: Wilson score
  intervals (SciPy's ``binomtest(...).proportion_ci(method="wilson")``) for proportions, and for
  balanced accuracy the mean of the two Wilson bounds of sensitivity and specificity (conservative);
- **AUROC from histograms** (:func:`binned_auroc`) is an **approximation**: pairs of a positive and
  a negative in the same bin count one half, whatever their order, so with 10 bins it differs from
  the exact AUROC when positives and negatives share bins (by +0.007 and +0.013 on the heart
  pooled model, BENCHMARKS.md); its interval is a percentile
  bootstrap that resamples each class's histogram (multinomial), which covers sampling error only,
  not the DP noise of a released histogram;
- **Brier score and calibration error** from histograms use each bin's midpoint as the predicted
  probability (approximate); from exact scores (:func:`exact_binary_metrics`) they are exact
  (``sklearn.metrics.brier_score_loss``; calibration error = expected calibration error over the
  same 10 bins, the bins' weighted mean |observed rate − mean predicted probability|).

Central (non-DP) scoring by a simulation's researcher or by ``fedcare evaluate`` has the scores
themselves and uses :func:`exact_binary_metrics` (exact AUROC, percentile bootstrap over patients).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)

from .release_mechanisms import BINS, STAT_PREFIX, metrics_from_statistics

__all__ = [
    "CONFIDENCE",
    "DEFAULT_THRESHOLD",
    "binary_at_threshold",
    "binned_auroc",
    "bootstrap_interval",
    "choose_threshold",
    "class_histograms",
    "exact_binary_metrics",
    "exact_regression_metrics",
    "global_metrics_from_statistics",
    "wilson_interval",
]

CONFIDENCE: Final = 0.95
DEFAULT_THRESHOLD: Final = 0.5
BOOTSTRAP: Final = 1000
"""Bootstrap resamples of an AUROC / regression interval."""


def wilson_interval(successes: float, trials: float, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Return the Wilson score interval of ``successes`` out of ``trials`` (rounded to counts); NaN when 0 trials."""
    k, n = int(round(max(float(successes), 0.0))), int(round(max(float(trials), 0.0)))
    if n < 1:
        return math.nan, math.nan
    ci = binomtest(min(k, n), n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def class_histograms(stats: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Return (negatives, positives): the per-bin counts of ``stat-hist-<class>-<bin>``, clamped at 0."""
    neg = np.array([max(float(stats.get(f"{STAT_PREFIX}hist-0-{b}", 0.0)), 0.0) for b in range(BINS)])
    pos = np.array([max(float(stats.get(f"{STAT_PREFIX}hist-1-{b}", 0.0)), 0.0) for b in range(BINS)])
    return neg, pos


def _edge(threshold: float) -> int:
    """Return the bin edge index k (threshold = k / BINS) of ``threshold``; refuse a threshold off the edges."""
    k = int(round(float(threshold) * BINS))
    if not (0 <= k <= BINS) or not math.isclose(k / BINS, float(threshold), abs_tol=1e-9):
        raise ValueError(f"threshold {threshold} is not a bin edge (multiples of 1/{BINS} in [0, 1]); "
                         "choose one with choose_threshold")
    return k


def choose_threshold(neg: np.ndarray, pos: np.ndarray) -> float:
    """Return the bin edge maximising Youden's J (sensitivity + specificity − 1); ties: nearest 0.5.

    ``neg`` / ``pos``: per-bin counts of the validation examples of each class (summed over sites).
    With one class missing J is undefined and 0.5 is returned.

    Raises
    ------
    ValueError
        When the histograms do not have ``BINS`` bins.
    """
    neg, pos = np.asarray(neg, dtype=np.float64), np.asarray(pos, dtype=np.float64)
    if neg.shape != (BINS,) or pos.shape != (BINS,):
        raise ValueError(f"need two histograms of {BINS} bins, got {neg.shape} and {pos.shape}")
    if pos.sum() <= 0 or neg.sum() <= 0:
        return DEFAULT_THRESHOLD
    best_k, best_j = BINS // 2, -math.inf
    for k in range(1, BINS):  # edges strictly inside (0, 1): predicting one class always has J = 0
        j = pos[k:].sum() / pos.sum() + neg[:k].sum() / neg.sum() - 1.0
        if j > best_j + 1e-12 or (abs(j - best_j) <= 1e-12 and abs(k - BINS / 2) < abs(best_k - BINS / 2)):
            best_k, best_j = k, j
    return best_k / BINS


def binary_at_threshold(neg: np.ndarray, pos: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Return accuracy, balanced accuracy, sensitivity, specificity at ``threshold`` (a bin edge), with Wilson intervals.

    Keys: the metric, and ``<metric>_low`` / ``<metric>_high``. A class with no example leaves its
    recall (and balanced accuracy) NaN: the global balanced accuracy is never inflated by a site
    that holds one class.
    """
    k = _edge(threshold)
    tp, fn = float(pos[k:].sum()), float(pos[:k].sum())
    tn, fp = float(neg[:k].sum()), float(neg[k:].sum())
    n = tp + fn + tn + fp
    out: dict[str, float] = {}
    for name, hits, total in (("accuracy", tp + tn, n), ("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp)):
        out[name] = hits / total if total > 0 else math.nan
        out[f"{name}_low"], out[f"{name}_high"] = wilson_interval(hits, total)
    out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2
    out["balanced_accuracy_low"] = (out["sensitivity_low"] + out["specificity_low"]) / 2
    out["balanced_accuracy_high"] = (out["sensitivity_high"] + out["specificity_high"]) / 2
    return out


def binned_auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Return the AUROC of per-class histograms (pairs within a bin count one half); NaN with a class missing."""
    neg, pos = np.asarray(neg, dtype=np.float64), np.asarray(pos, dtype=np.float64)
    p_total, n_total = pos.sum(), neg.sum()
    if p_total <= 0 or n_total <= 0:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float(np.sum(pos * (below + neg / 2)) / (p_total * n_total))


def bootstrap_interval(values: np.ndarray, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Return the percentile interval of bootstrap replicates ``values`` (NaN ones dropped)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2 * 100
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


def _binned_auroc_interval(neg: np.ndarray, pos: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """Return a percentile bootstrap interval of :func:`binned_auroc` (each class's histogram resampled)."""
    n_neg, n_pos = int(round(neg.sum())), int(round(pos.sum()))
    if n_neg < 1 or n_pos < 1:
        return math.nan, math.nan
    negs = rng.multinomial(n_neg, neg / neg.sum(), size=BOOTSTRAP)
    poss = rng.multinomial(n_pos, pos / pos.sum(), size=BOOTSTRAP)
    return bootstrap_interval(np.array([binned_auroc(a, b) for a, b in zip(negs, poss, strict=True)]))


def _calibration(prob_by_bin: np.ndarray, neg: np.ndarray, pos: np.ndarray) -> float:
    """Return the expected calibration error: the bins' weighted mean |positive rate − mean probability|."""
    counts = neg + pos
    total = counts.sum()
    if total <= 0:
        return math.nan
    filled = counts > 0
    rate = np.divide(pos, counts, out=np.zeros_like(pos), where=filled)
    return float(np.sum(counts[filled] * np.abs(rate[filled] - prob_by_bin[filled])) / total)


def global_metrics_from_statistics(
    stats: Mapping[str, float], *, threshold: float = DEFAULT_THRESHOLD, seed: int = 0
) -> dict[str, float]:
    """Return the global metrics (and intervals) that summed statistics ``stats`` determine.

    Binary: ``n``, ``loss``, accuracy / balanced accuracy / sensitivity / specificity at
    ``threshold`` with Wilson intervals, ``auroc`` (binned, approximate) with a bootstrap interval
    (``seed``), ``auprc`` (binned), ``brier`` and ``calibration_error`` (bin midpoints, approximate)
    and ``threshold``. Multiclass and regression: :func:`~fedcare.privacy.release_mechanisms.metrics_from_statistics`
    plus a Wilson interval of accuracy (multiclass).
    """
    base = metrics_from_statistics(stats)
    if not any(k.startswith(f"{STAT_PREFIX}hist-") for k in stats):
        out = dict(base)
        if "accuracy" in out and math.isfinite(out["accuracy"]):
            out["accuracy_low"], out["accuracy_high"] = wilson_interval(out["accuracy"] * out["n"], out["n"])
        return out
    neg, pos = class_histograms(stats)
    out = {"n": base["n"], "loss": base["loss"], "threshold": float(threshold)}
    out |= binary_at_threshold(neg, pos, threshold)
    out["auroc"] = binned_auroc(neg, pos)
    out["auroc_low"], out["auroc_high"] = _binned_auroc_interval(neg, pos, np.random.default_rng(seed))
    out["auprc"] = base.get("auprc", math.nan)
    mid = (np.arange(BINS) + 0.5) / BINS
    total = neg.sum() + pos.sum()
    out["brier"] = float((np.sum(neg * mid**2) + np.sum(pos * (1 - mid) ** 2)) / total) if total > 0 else math.nan
    out["calibration_error"] = _calibration(mid, neg, pos)
    return out


def exact_binary_metrics(
    prob: np.ndarray, y: np.ndarray, *, threshold: float | np.ndarray = DEFAULT_THRESHOLD, seed: int = 0
) -> dict[str, float]:
    """Return the global binary metrics of exact scores ``prob`` (of class 1) against labels ``y``.

    ``threshold`` may be one value or one per example (several models, each at its own threshold;
    ``threshold`` is then reported as their mean).

    Accuracy, balanced accuracy, sensitivity and specificity at ``threshold`` (Wilson intervals),
    exact ``auroc`` and ``auprc`` (scikit-learn) with a percentile bootstrap interval of AUROC over
    patients (``seed``), ``brier`` (``brier_score_loss``) and ``calibration_error`` (expected
    calibration error over ``BINS`` equal bins).
    """
    p = np.clip(np.nan_to_num(np.asarray(prob, dtype=np.float64).reshape(-1), nan=0.5), 0.0, 1.0)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    cut = np.asarray(threshold, dtype=np.float64)
    pred = p >= cut
    out: dict[str, float] = {"n": float(len(y)), "threshold": float(cut.mean()) if cut.size else DEFAULT_THRESHOLD}
    tp, fn = float(np.sum(pred & (y == 1))), float(np.sum(~pred & (y == 1)))
    tn, fp = float(np.sum(~pred & (y == 0))), float(np.sum(pred & (y == 0)))
    for name, hits, total in (("accuracy", tp + tn, len(y)), ("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp)):
        out[name] = hits / total if total > 0 else math.nan
        out[f"{name}_low"], out[f"{name}_high"] = wilson_interval(hits, total)
    for suffix in ("", "_low", "_high"):
        out[f"balanced_accuracy{suffix}"] = (out[f"sensitivity{suffix}"] + out[f"specificity{suffix}"]) / 2
    both = len(np.unique(y)) == 2
    out["auroc"] = float(roc_auc_score(y, p)) if both else math.nan
    out["auprc"] = float(average_precision_score(y, p)) if both else math.nan
    out["auroc_low"], out["auroc_high"] = math.nan, math.nan
    if both:
        rng = np.random.default_rng(seed)
        reps = np.full(BOOTSTRAP, math.nan)
        for i in range(BOOTSTRAP):
            idx = rng.integers(0, len(y), len(y))
            if 0 < y[idx].sum() < len(idx):
                reps[i] = roc_auc_score(y[idx], p[idx])
        out["auroc_low"], out["auroc_high"] = bootstrap_interval(reps)
    out["brier"] = float(brier_score_loss(y, p, pos_label=1)) if len(y) else math.nan
    bins = np.minimum((p * BINS).astype(np.int64), BINS - 1)
    counts = np.bincount(bins, minlength=BINS).astype(np.float64)
    mean_prob = np.divide(np.bincount(bins, weights=p, minlength=BINS), counts, out=np.zeros(BINS), where=counts > 0)
    pos = np.bincount(bins, weights=(y == 1).astype(np.float64), minlength=BINS)
    out["calibration_error"] = _calibration(mean_prob, counts - pos, pos)
    return out


def exact_regression_metrics(pred: np.ndarray, y: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """Return global MAE, RMSE and R² of ``pred`` against ``y`` with percentile bootstrap intervals of MAE and R²."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(y, dtype=np.float64).reshape(-1)
    out = {"n": float(len(t)), "mae": float(mean_absolute_error(t, p)),
           "rmse": float(math.sqrt(mean_squared_error(t, p))),
           "r2": float(r2_score(t, p)) if len(t) >= 2 else math.nan}  # fmt: skip
    rng = np.random.default_rng(seed)
    maes, r2s = np.empty(BOOTSTRAP), np.full(BOOTSTRAP, math.nan)
    for i in range(BOOTSTRAP):
        idx = rng.integers(0, len(t), len(t))
        maes[i] = mean_absolute_error(t[idx], p[idx])
        if len(t) >= 2 and np.ptp(t[idx]) > 0:
            r2s[i] = r2_score(t[idx], p[idx])
    out["mae_low"], out["mae_high"] = bootstrap_interval(maes)
    out["r2_low"], out["r2_high"] = bootstrap_interval(r2s)
    return out
