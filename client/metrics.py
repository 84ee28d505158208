"""Evaluate a model on a split with scikit-learn's metrics (no Flower types).

Classification: ``loss``, ``accuracy``, ``balanced_accuracy``, ``auroc`` (macro one-vs-rest for
multiclass) and ``auprc`` (average precision; macro over classes for multiclass). Regression:
``loss`` (MSE), ``mae``, ``rmse``, ``r2``. A metric that is undefined on the split (AUROC with one
class present, R² with fewer than two examples) is NaN, with a logged warning, never a crash.
Only counts are logged, never patient values.

:func:`evaluation_statistics` returns instead the sufficient statistics that
:mod:`fedcare.privacy.release_mechanisms` noises for a DP evaluation release (probability
histograms per class, confusion matrix, clipped loss sums).
"""

from __future__ import annotations

import logging
import math

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
from ..privacy.release_mechanisms import sufficient_statistics
from .dataset import Split
from .training import TaskLoss

__all__ = ["evaluate", "evaluation_statistics", "predict"]

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


def _classification(outputs: torch.Tensor, targets: torch.Tensor, task: Task) -> dict[str, float]:
    """Return the classification metrics of logits ``outputs`` against class indices ``targets``."""
    y = targets.numpy().astype(np.int64)
    logits = outputs.double()
    if task == "binary":
        prob = torch.sigmoid(logits).numpy()
        pred = (prob >= 0.5).astype(np.int64)
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


def evaluate(model: nn.Module, split: Split, task: Task) -> dict[str, float]:
    """Return the metrics of ``model`` on ``split`` for ``task`` (see the module docstring).

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
    metrics = _regression(outputs, targets) if task == "regression" else _classification(outputs, targets, task)
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
