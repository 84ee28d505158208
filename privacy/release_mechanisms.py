"""What a site releases besides its DP-SGD model: its example count and its evaluations, under ε-DP.

Neighbouring relation: **add/remove one record** (Opacus's relation for DP-SGD). Two datasets are
neighbours when one is the other with one record added or removed. Under this relation the
exact example count is itself a query of sensitivity 1 and must not leave the site in clear
(with the exact count published, add/remove-one ε is unbounded and only the replace-one
relation, with about twice the ε, would hold). Every release below is an ε-DP Laplace mechanism
for this relation, charged as its own entry in the site's privacy ledger and composed with the
DP-SGD ε by basic composition (ε values add up; δ stays the DP-SGD δ).

- **Count** (:func:`noisy_count`): ``n + Laplace(1 / ε)``, rounded, at least 1 (L1 sensitivity 1).
  Drawn once per study and training-set size, stored in the ledger and re-sent every round, so
  repeated rounds release nothing new. It is the site's FedAvg weight.
- **Evaluation** (:func:`release_statistics`): Laplace noise on sufficient statistics of the
  site's test split, from which the server computes the metrics (:func:`metrics_from_statistics`)
  and sums them across sites (:func:`sum_statistics`):

  * binary: the histogram of the predicted probability in :data:`BINS` equal bins of [0, 1], per
    true class (``stat-hist-<class>-<bin>``; 0.5 is a bin edge, so the confusion matrix at 0.5
    is a sum of cells), and the sum of per-example losses clipped to [0, :data:`LOSS_CLIP`]
    (``stat-loss-sum``). One record moves one cell by 1 and the loss sum by at most C: with the
    loss sum weighted by 1 / C the L1 sensitivity is 2, noise ``Laplace(2 / ε)`` on every cell
    and ``Laplace(2 C / ε)`` on the loss sum;
  * multiclass: the confusion matrix (``stat-cm-<true>-<predicted>``) and the clipped loss sum,
    sensitivity 2 likewise (AUROC and AUPRC are not released);
  * regression: the count (``stat-n``), the sum of squared errors clipped to [0, C]
    (``stat-se-sum``) and of absolute errors clipped to [0, √C] (``stat-ae-sum``): weighted
    sensitivity 3, noise ``Laplace(3 / ε)``, ``Laplace(3 C / ε)``, ``Laplace(3 √C / ε)``
    (R² is not released).

Noise comes from :func:`release_rng`: NumPy's generator seeded from the operating system's entropy
(``secrets``), or, for simulations and tests only, from the site's own seed; never from anything
the coordinator sends. The values sent are the raw noisy sums (negative cells included, so sums
over sites stay unbiased); clamping to valid ranges happens only when metrics are computed
(post-processing, free of ε).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Iterable, Mapping
from typing import Final

import numpy as np

from .policy import PolicyViolation, Rule, SitePolicy

__all__ = [
    "BINS",
    "COUNT",
    "EVALUATION",
    "EVALUATION_EXACT",
    "LOSS_CLIP",
    "NEIGHBOURING_RELATION",
    "STAT_PREFIX",
    "check_evaluation",
    "laplace_scale",
    "metrics_from_statistics",
    "noisy_count",
    "release_reserve",
    "release_rng",
    "release_statistics",
    "statistics_sensitivity",
    "sufficient_statistics",
    "sum_statistics",
]

logger = logging.getLogger(__name__)

BINS: Final = 10
"""Bins of the predicted probability per class (binary tasks); even, so 0.5 is a bin edge."""
LOSS_CLIP: Final = 5.0
"""Per-example loss (cross-entropy in nats; squared error) is clipped to [0, LOSS_CLIP]."""
STAT_PREFIX: Final = "stat-"
COUNT: Final = "count"
EVALUATION: Final = "evaluation"
EVALUATION_EXACT: Final = "evaluation-exact"
NEIGHBOURING_RELATION: Final = "add/remove one record"


def laplace_scale(*, sensitivity: float, epsilon: float) -> float:
    """Return the Laplace scale b = Δ₁ / ε of the ε-DP Laplace mechanism."""
    if not (sensitivity > 0 and epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"need sensitivity > 0 and finite ε > 0, got {sensitivity}, {epsilon}")
    return float(sensitivity) / float(epsilon)


def release_rng(*, seed: int | None, stream: str) -> np.random.Generator:
    """Return the generator of one release: OS entropy, or (simulations, tests) the site's own seed and ``stream``."""
    if seed is None:
        return np.random.default_rng(secrets.randbits(128))
    words = hashlib.sha256(stream.encode("utf-8")).digest()
    return np.random.default_rng(np.random.SeedSequence([int(seed), int.from_bytes(words[:16], "big")]))


def noisy_count(true_count: int, *, epsilon: float, rng: np.random.Generator) -> int:
    """Return ``true_count + Laplace(1 / ε)`` rounded, at least 1 (ε-DP: L1 sensitivity 1)."""
    noise = rng.laplace(0.0, laplace_scale(sensitivity=1.0, epsilon=epsilon))
    return max(1, int(round(int(true_count) + noise)))


def _clipped(losses: np.ndarray, bound: float) -> np.ndarray:
    """Return ``losses`` clipped to [0, bound] (NaN counts as the bound)."""
    out = np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=bound, posinf=bound, neginf=0.0)
    return np.clip(out, 0.0, bound)


def sufficient_statistics(
    task: str, *, scores: np.ndarray, targets: np.ndarray, losses: np.ndarray, num_classes: int = 2
) -> dict[str, float]:
    """Return the exact sufficient statistics of one evaluation (see the module docstring).

    Parameters
    ----------
    task : {"binary", "multiclass", "regression"}
        The study's task.
    scores : numpy.ndarray
        Binary: predicted probability of class 1; multiclass: predicted class; regression: prediction.
    targets : numpy.ndarray
        True class (binary, multiclass) or value (regression).
    losses : numpy.ndarray
        Per-example loss (classification); ignored for regression (squared error is used).
    num_classes : int
        Classes of a multiclass task.
    """
    y = np.asarray(targets)
    if task == "regression":
        err = np.asarray(scores, dtype=np.float64).reshape(-1) - y.astype(np.float64).reshape(-1)
        return {
            f"{STAT_PREFIX}n": float(len(err)),
            f"{STAT_PREFIX}se-sum": float(_clipped(err**2, LOSS_CLIP).sum()),
            f"{STAT_PREFIX}ae-sum": float(_clipped(np.abs(err), math.sqrt(LOSS_CLIP)).sum()),
        }
    out: dict[str, float] = {}
    labels = y.astype(np.int64).reshape(-1)
    if task == "binary":
        p = np.nan_to_num(np.asarray(scores, dtype=np.float64).reshape(-1), nan=0.5)
        bins = np.minimum((np.clip(p, 0.0, 1.0) * BINS).astype(np.int64), BINS - 1)
        for c in (0, 1):
            counts = np.bincount(bins[labels == c], minlength=BINS)
            out |= {f"{STAT_PREFIX}hist-{c}-{b}": float(counts[b]) for b in range(BINS)}
    elif task == "multiclass":
        pred = np.asarray(scores).astype(np.int64).reshape(-1)
        cm = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(cm, (labels, pred), 1)
        out |= {f"{STAT_PREFIX}cm-{t}-{q}": float(cm[t, q]) for t in range(num_classes) for q in range(num_classes)}
    else:
        raise ValueError(f"unknown task {task!r}; known: binary, multiclass, regression")
    out[f"{STAT_PREFIX}loss-sum"] = float(_clipped(losses, LOSS_CLIP).sum())
    return out


def statistics_sensitivity(stats: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """Return (L1 sensitivity Δ of the weighted vector, weight of each statistic) for add/remove one.

    A statistic ``s`` enters the mechanism as ``s / w`` (its weight ``w`` bounds one record's
    effect on it), so the noise added to ``s`` is ``w · Laplace(Δ / ε)``.
    """
    keys = [k for k in stats if k.startswith(STAT_PREFIX)]
    if f"{STAT_PREFIX}se-sum" in stats:  # regression: count, squared-error and absolute-error sums
        weights = {f"{STAT_PREFIX}n": 1.0, f"{STAT_PREFIX}se-sum": LOSS_CLIP,
                   f"{STAT_PREFIX}ae-sum": math.sqrt(LOSS_CLIP)}
        return 3.0, weights
    if f"{STAT_PREFIX}loss-sum" not in stats or len(keys) < 2:
        raise ValueError("not a set of evaluation statistics (no stat-loss-sum / stat-se-sum)")
    weights = {k: 1.0 for k in keys}  # one record lands in exactly one histogram / confusion cell
    weights[f"{STAT_PREFIX}loss-sum"] = LOSS_CLIP
    return 2.0, weights


def release_statistics(stats: Mapping[str, float], *, epsilon: float, rng: np.random.Generator) -> dict[str, float]:
    """Return ``stats`` with Laplace noise calibrated to ε (module docstring); the raw noisy values."""
    sensitivity, weights = statistics_sensitivity(stats)
    scale = laplace_scale(sensitivity=sensitivity, epsilon=epsilon)
    keys = sorted(weights)
    noise = rng.laplace(0.0, scale, size=len(keys))
    return {k: float(stats[k]) + weights[k] * float(z) for k, z in zip(keys, noise, strict=True)}


def sum_statistics(records: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Return the key-wise sum of several sites' statistics (what a pooled evaluation would hold)."""
    out: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(STAT_PREFIX):
                out[key] = out.get(key, 0.0) + float(value)
    return out


def _cells(stats: Mapping[str, float], kind: str) -> dict[tuple[int, int], float]:
    """Return the ``stat-<kind>-<i>-<j>`` cells, clamped at 0 (post-processing)."""
    prefix = f"{STAT_PREFIX}{kind}-"
    return {
        (int(k.split("-")[-2]), int(k.split("-")[-1])): max(float(v), 0.0)
        for k, v in stats.items() if k.startswith(prefix)
    }


def _binary_metrics(hist: dict[tuple[int, int], float]) -> dict[str, float]:
    """Return accuracy, balanced accuracy, AUROC and AUPRC from per-class probability histograms."""
    neg = np.array([hist.get((0, b), 0.0) for b in range(BINS)])
    pos = np.array([hist.get((1, b), 0.0) for b in range(BINS)])
    half = BINS // 2
    tp, fn, fp, tn = pos[half:].sum(), pos[:half].sum(), neg[half:].sum(), neg[:half].sum()
    n = tp + fn + fp + tn
    out = {"accuracy": float((tp + tn) / n)}
    recalls = [r for r in ((tp / (tp + fn)) if tp + fn > 0 else None, (tn / (tn + fp)) if tn + fp > 0 else None)
               if r is not None]
    out["balanced_accuracy"] = float(np.mean(recalls))
    p_total, n_total = pos.sum(), neg.sum()
    if p_total <= 0 or n_total <= 0:
        out["auroc"] = out["auprc"] = math.nan
        return out
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in lower bins; ties count half
    out["auroc"] = float(np.sum(pos * (below + neg / 2)) / (p_total * n_total))
    tp_at = np.cumsum(pos[::-1])  # thresholds at bin edges, from the top bin down
    fp_at = np.cumsum(neg[::-1])
    recall = tp_at / p_total
    precision = np.divide(tp_at, tp_at + fp_at, out=np.ones_like(tp_at), where=(tp_at + fp_at) > 0)
    out["auprc"] = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    return out


def metrics_from_statistics(stats: Mapping[str, float]) -> dict[str, float]:
    """Return the metrics (and ``n``) that ``stats`` (one site's or a sum, noisy or exact) determine.

    Counts are clamped at 0 and the loss sum to [0, C·n] first; with no example left every metric
    is NaN. Binary: ``loss``, ``accuracy``, ``balanced_accuracy``, ``auroc`` and ``auprc`` (from
    the histograms: thresholds at bin edges, ties within a bin counted half); multiclass: ``loss``,
    ``accuracy``, ``balanced_accuracy``; regression: ``loss`` (MSE), ``mae``, ``rmse``.
    """
    if f"{STAT_PREFIX}se-sum" in stats:
        n = max(float(stats.get(f"{STAT_PREFIX}n", 0.0)), 0.0)
        if n < 1:
            return {"n": n, "loss": math.nan, "mae": math.nan, "rmse": math.nan}
        mse = min(max(float(stats[f"{STAT_PREFIX}se-sum"]), 0.0), LOSS_CLIP * n) / n
        mae = min(max(float(stats.get(f"{STAT_PREFIX}ae-sum", 0.0)), 0.0), math.sqrt(LOSS_CLIP) * n) / n
        return {"n": n, "loss": mse, "mae": mae, "rmse": math.sqrt(mse)}
    hist, cm = _cells(stats, "hist"), _cells(stats, "cm")
    n = float(sum(hist.values()) + sum(cm.values()))
    if n < 1:
        keys = ("loss", "accuracy", "balanced_accuracy") + (("auroc", "auprc") if hist else ())
        return {"n": n, **{k: math.nan for k in keys}}
    loss = min(max(float(stats.get(f"{STAT_PREFIX}loss-sum", math.nan)), 0.0), LOSS_CLIP * n) / n
    if hist:
        return {"n": n, "loss": loss, **_binary_metrics(hist)}
    classes = 1 + max(max(t, q) for t, q in cm)
    correct = sum(cm.get((c, c), 0.0) for c in range(classes))
    rows = [sum(cm.get((c, q), 0.0) for q in range(classes)) for c in range(classes)]
    recalls = [cm.get((c, c), 0.0) / rows[c] for c in range(classes) if rows[c] > 0]
    return {"n": n, "loss": loss, "accuracy": correct / n, "balanced_accuracy": float(np.mean(recalls))}


def release_reserve(policy: SitePolicy) -> float:
    """Return the ε a site sets aside in each study for its count and its DP evaluations.

    ``count_epsilon`` plus, when ``evaluation = "dp"``, ``max_evaluation_queries_per_study ×
    evaluation_epsilon_per_query``. The site calibrates DP-SGD to its target ε minus this, so the
    study's total (training + count + evaluations) stays within the target.
    """
    reserve = float(policy.count_epsilon)
    if policy.evaluation == "dp":
        reserve += policy.max_evaluation_queries_per_study * float(policy.evaluation_epsilon_per_query)
    return reserve


def check_evaluation(
    policy: SitePolicy,
    *,
    cohort: int,
    queries_done: int,
    spent_study: float,
    spent_total: float,
    budget: float,
) -> float | None:
    """Return the ε one evaluation would cost (None: exact, outside ε), or raise ``PolicyViolation``.

    Refused when the policy says ``evaluation = "off"``, when the evaluation split holds fewer
    than ``min_evaluation_cohort`` records, when the study already had
    ``max_evaluation_queries_per_study`` evaluations, and (``dp``) when the query would take the
    study's ε over ``min(max_epsilon_per_study, budget)`` or the site's total over
    ``max_epsilon_total``.
    """
    if policy.evaluation == "off":
        raise PolicyViolation(
            Rule.EVALUATION,
            'this site releases no evaluation (evaluation = "off"); the coordinator must leave it out '
            "of evaluation (fraction-evaluate, evaluate-with-train)",
            asked="evaluate", limit="off",
        )
    if cohort < policy.min_evaluation_cohort:
        raise PolicyViolation(
            Rule.EVALUATION_COHORT,
            f"the evaluation split is below the minimum evaluation cohort of {policy.min_evaluation_cohort} "
            "records; the coordinator must leave this site out of evaluation (or the hospital must give it "
            "a larger test split)",
            limit=policy.min_evaluation_cohort,
        )
    if queries_done >= policy.max_evaluation_queries_per_study:
        raise PolicyViolation(
            Rule.EVALUATION_QUERIES,
            f"this study already had {queries_done} evaluations, the site's maximum "
            f"(max_evaluation_queries_per_study = {policy.max_evaluation_queries_per_study}); the coordinator "
            "must evaluate fewer models (fraction-evaluate, evaluate-with-train) or start a new study",
            asked=queries_done + 1, limit=policy.max_evaluation_queries_per_study,
        )
    if policy.evaluation == "exact":
        return None
    epsilon = float(policy.evaluation_epsilon_per_query)
    limit = min(float(policy.max_epsilon_per_study), float(budget))
    if not math.isfinite(spent_total):
        raise PolicyViolation(
            Rule.EPSILON_STUDY if not math.isfinite(spent_study) else Rule.EPSILON_TOTAL,
            "this site released a model trained WITHOUT differential privacy, so its ε is unbounded and "
            "no DP evaluation can be charged; the coordinator must leave it out of evaluation (the "
            'hospital may opt in to evaluation = "exact")',
            asked=math.inf,
        )
    after = spent_study + epsilon
    if after > limit + 1e-12:
        raise PolicyViolation(
            Rule.EPSILON_STUDY,
            f"one more evaluation (ε = {epsilon:g}) would take the study to ε = {after:.6g} (spent "
            f"{spent_study:.6g}), above the site's limit {limit:g}; the coordinator must stop evaluating",
            asked=after, limit=limit,
        )
    total = spent_total + epsilon
    if total > policy.max_epsilon_total + 1e-12:
        raise PolicyViolation(
            Rule.EPSILON_TOTAL,
            f"one more evaluation (ε = {epsilon:g}) would take the site's total ε to {total:.6g}, above "
            f"its maximum {policy.max_epsilon_total:g}; the coordinator must stop evaluating",
            asked=total, limit=policy.max_epsilon_total,
        )
    return epsilon
