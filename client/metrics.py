"""Evaluate a model on a split with scikit-learn's metrics (no Flower types).

Classification: ``loss``, ``accuracy``, ``balanced_accuracy``, ``auroc`` (macro one-vs-rest for
multiclass) and ``auprc`` (average precision; macro over classes for multiclass). Regression:
``loss`` (MSE), ``mae``, ``rmse``, ``r2``. A metric that is undefined on the split (AUROC with one
class present, R² with fewer than two examples) is NaN, with a logged warning, never a crash.
Only counts are logged, never patient values.

:func:`evaluation_statistics` returns instead the sufficient statistics that
:mod:`fedcare.privacy.release_mechanisms` noises for a DP evaluation release (probability
histograms per class, confusion matrix, clipped loss sums).

Binary decisions use an operating threshold (default 0.5): :func:`validation_threshold` chooses
one from the summed validation histograms of several sites (Youden's J on the bin edges,
:func:`fedcare.privacy.global_metrics.choose_threshold`), and the model file stores it.
:func:`global_evaluation` scores one model on several sites' splits as **one evaluation set**
(exact metrics over all their patients, with confidence intervals), the headline figure of a
federation, beside each site's own metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    recall_score,
    roc_auc_score,
)
from torch import nn

from ..models import Task
from ..privacy.global_metrics import (
    DEFAULT_THRESHOLD,
    binned_auroc,
    choose_threshold,
    class_histograms,
    exact_binary_metrics,
    exact_regression_metrics,
    wilson_interval,
)
from ..privacy.release_mechanisms import sufficient_statistics, sum_statistics
from .dataset import Split
from .training import TaskLoss

__all__ = ["GlobalEvaluation", "evaluate", "evaluation_statistics", "global_evaluation", "predict",
           "validation_threshold"]

logger = logging.getLogger(__name__)


def predict(model: nn.Module, split: Split, *, batch_size: int = 1024) -> torch.Tensor:
    """Return ``model``'s outputs on ``split`` (eval mode, no gradients), on the CPU."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                inputs = [t[start : start + batch_size].to(device) for t in split.inputs]
                outputs.append(model(*inputs).detach().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Return the mean recall over the classes present in ``y`` (``balanced_accuracy_score``'s value).

    Computed as the macro recall over the present classes, which is what scikit-learn's
    ``balanced_accuracy_score`` returns, without its warning when a prediction names a class
    the split lacks.
    """
    return float(recall_score(y, pred, labels=np.unique(y), average="macro", zero_division=0))


def _classification(
    outputs: torch.Tensor, targets: torch.Tensor, task: Task, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, float]:
    """Return the classification metrics of logits ``outputs`` against class indices ``targets``."""
    y = targets.numpy().astype(np.int64)
    logits = outputs.double()
    if task == "binary":
        prob = torch.sigmoid(logits).numpy()
        pred = (prob >= threshold).astype(np.int64)
        scores = prob[:, None]
        num_classes = 2
    else:
        probs = torch.softmax(logits, dim=1).numpy()
        pred = probs.argmax(axis=1)
        scores = probs
        num_classes = probs.shape[1]
    present = np.unique(y)
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": _balanced_accuracy(y, pred),
    }
    if len(present) < 2:
        logger.warning(
            "only one class present among %d evaluation examples: AUROC and AUPRC are undefined "
            "(reported as NaN)", len(y),
        )
        out["auroc"] = math.nan
        out["auprc"] = math.nan
        return out
    if task == "binary":
        out["auroc"] = float(roc_auc_score(y, scores[:, 0]))
        out["auprc"] = float(average_precision_score(y, scores[:, 0]))
        return out
    if len(present) == num_classes:
        out["auroc"] = float(roc_auc_score(y, scores, multi_class="ovr", average="macro",
                                           labels=list(range(num_classes))))
    else:
        logger.warning(
            "%d of %d classes present among %d evaluation examples: AUROC and AUPRC are macro "
            "averages over the present classes only", len(present), num_classes, len(y),
        )
        out["auroc"] = float(np.mean([roc_auc_score(y == c, scores[:, c]) for c in present]))
    out["auprc"] = float(np.mean([average_precision_score(y == c, scores[:, c]) for c in present]))
    return out


def _regression(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Return MAE, RMSE and R² of ``outputs`` against ``targets``."""
    y = targets.double().numpy()
    p = outputs.double().numpy()
    out = {
        "mae": float(mean_absolute_error(y, p)),
        "rmse": float(math.sqrt(mean_squared_error(y, p))),
    }
    if len(y) < 2:
        logger.warning("R² is undefined for %d evaluation example(s) (reported as NaN)", len(y))
        out["r2"] = math.nan
    else:
        out["r2"] = float(r2_score(y, p))
    return out


def evaluate(model: nn.Module, split: Split, task: Task, *, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Return the metrics of ``model`` on ``split`` for ``task`` (see the module docstring).

    ``threshold``: the operating threshold of a binary model (accuracy, balanced accuracy).

    Raises
    ------
    ValueError
        When the split is empty or the model's output does not fit the task.
    """
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split; give the site a test or validation split")
    outputs = predict(model, split)
    targets = split.targets.cpu()
    loss = float(TaskLoss(task)(outputs.double(), targets.double() if task != "multiclass" else targets))
    metrics = (_regression(outputs, targets) if task == "regression"
               else _classification(outputs, targets, task, threshold))  # fmt: skip
    return {"loss": loss, **metrics}


def evaluation_statistics(model: nn.Module, split: Split, task: Task) -> dict[str, float]:
    """Return the exact sufficient statistics of ``model`` on ``split`` (``release_mechanisms``).

    Binary: histograms of the predicted probability per true class; multiclass: the confusion
    matrix; both with the sum of per-example losses clipped to ``LOSS_CLIP``. Regression: count
    and clipped squared / absolute error sums. Never leaves the site without the mechanism's noise
    unless the site's policy says ``evaluation = "exact"``.
    """
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split; give the site a test or validation split")
    outputs = predict(model, split).double()
    targets = split.targets.cpu()
    losses = TaskLoss(task, reduction="none")(outputs, targets.double() if task != "multiclass" else targets)
    if task == "regression":
        scores, num_classes = outputs.numpy(), 2
    elif task == "binary":
        scores, num_classes = torch.sigmoid(outputs).numpy(), 2
    else:
        scores, num_classes = outputs.argmax(dim=1).numpy(), int(outputs.shape[1])
    return sufficient_statistics(task, scores=scores, targets=targets.numpy(), losses=losses.numpy(),
                                 num_classes=num_classes)


def validation_threshold(model: nn.Module, splits: Sequence[Split], task: Task) -> float:
    """Return the operating threshold chosen on ``splits`` (sites' validation splits) from their summed histograms.

    Each split contributes its per-class probability histogram (the statistics a site can
    release, :func:`evaluation_statistics`); the sum's Youden-optimal bin edge is returned
    (:func:`~fedcare.privacy.global_metrics.choose_threshold`). 0.5 for a non-binary task, when
    no split has examples, or when the splits hold one class only (logged).
    """
    filled = [s for s in splits if len(s)]
    if task != "binary" or not filled:
        return DEFAULT_THRESHOLD
    summed = sum_statistics(evaluation_statistics(model, s, task) for s in filled)
    neg, pos = class_histograms(summed)
    if neg.sum() <= 0 or pos.sum() <= 0:
        logger.warning("validation splits hold one class only: operating threshold left at %.1f", DEFAULT_THRESHOLD)
    threshold = choose_threshold(neg, pos)
    logger.info("operating threshold %.2f chosen on %d validation examples (Youden's J)", threshold, int(neg.sum() + pos.sum()))
    return threshold


@dataclasses.dataclass(frozen=True)
class GlobalEvaluation:
    """One model scored on several splits taken together as one evaluation set.

    Attributes
    ----------
    metrics : dict of str to float
        Global metrics over every example: ``loss`` plus, binary: ``accuracy``,
        ``balanced_accuracy``, ``sensitivity``, ``specificity`` (at ``threshold``), ``auroc``,
        ``auprc``, ``brier``, ``calibration_error``; multiclass: ``accuracy``,
        ``balanced_accuracy``, ``auroc``, ``auprc`` (as :func:`evaluate`); regression: ``mae``,
        ``rmse``, ``r2``.
    intervals : dict of str to list of float
        95 % intervals ``[low, high]``: Wilson for proportions (balanced accuracy: the mean of the
        sensitivity and specificity bounds), percentile bootstrap over patients for AUROC, MAE, R².
    binned : dict of str to float
        Binary only: ``auroc`` computed from the summed 10-bin histograms, what a DP evaluation
        release supports (an approximation of the exact ``metrics["auroc"]``).
    threshold : float
        The operating threshold used (0.5 unless given).
    num_examples : int
        Examples in the evaluation set.
    """

    metrics: dict[str, float]
    intervals: dict[str, list[float]]
    binned: dict[str, float]
    threshold: float
    num_examples: int


_INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auroc", "mae", "r2")


def global_evaluation(
    model: nn.Module,
    splits: Sequence[Split],
    task: Task,
    *,
    threshold: float | Sequence[float] = DEFAULT_THRESHOLD,
    seed: int = 0,
) -> GlobalEvaluation:
    """Return ``model``'s global metrics on ``splits`` taken together (exact, with 95 % intervals).

    ``threshold``: the operating threshold, or one per split (several models each at its own;
    the reported ``threshold`` is then the examples' mean).

    Raises
    ------
    ValueError
        When the splits hold no example.
    """
    cuts = [float(threshold)] * len(splits) if isinstance(threshold, (int, float)) else [float(t) for t in threshold]
    if len(cuts) != len(splits):
        raise ValueError(f"{len(cuts)} thresholds for {len(splits)} splits: pass one threshold, or one per split")
    per_row = np.concatenate([np.full(len(s), t) for s, t in zip(splits, cuts, strict=True) if len(s)] or [np.zeros(0)])
    filled = [s for s in splits if len(s)]
    if not filled:
        raise ValueError("cannot evaluate on empty splits; give the sites a test or validation split")
    outputs = torch.cat([predict(model, s) for s in filled]).double()
    targets = torch.cat([s.targets.cpu() for s in filled])
    loss = float(TaskLoss(task)(outputs, targets.double() if task != "multiclass" else targets))
    binned: dict[str, float] = {}
    if task == "binary":
        full = exact_binary_metrics(torch.sigmoid(outputs).numpy(), targets.numpy(), threshold=per_row, seed=seed)
        summed = sum_statistics(evaluation_statistics(model, s, task) for s in filled)
        binned["auroc"] = binned_auroc(*class_histograms(summed))
    elif task == "regression":
        full = exact_regression_metrics(outputs.numpy(), targets.numpy(), seed=seed)
    else:
        full = _classification(outputs, targets, task)
        n = len(targets)
        full["accuracy_low"], full["accuracy_high"] = wilson_interval(full["accuracy"] * n, n)
    intervals = {m: [full.pop(f"{m}_low"), full.pop(f"{m}_high")] for m in _INTERVAL_METRICS if f"{m}_low" in full}
    full.pop("n", None)
    full.pop("threshold", None)
    return GlobalEvaluation(metrics={"loss": loss, **full}, intervals=intervals, binned=binned,
                            threshold=float(per_row.mean()), num_examples=len(targets))  # fmt: skip
