"""Built-in data sources that need no files: real clinical tables shipped with scikit-learn.

- ``breast_cancer``: Wisconsin Diagnostic Breast Cancer, 569 patients, 30 features, binary
  (1 = malignant, so that AUROC reads as detecting cancer);
- ``diabetes``: 442 patients, 10 baseline features, one-year disease progression (regression).

Splits are stratified for classification and seeded; features are standardised with the
training split's mean and standard deviation only (no statistics leak from validation / test).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.model_selection import train_test_split

from ..client.dataset import SiteData, Split
from ..models import Registry, Task

__all__ = ["BUILTIN_SOURCES", "load_builtin"]

logger = logging.getLogger(__name__)

_Loader = Callable[[], tuple[np.ndarray, np.ndarray, list[str], Task]]

BUILTIN_SOURCES: Registry[_Loader] = Registry("built-in data source")


@BUILTIN_SOURCES.register("breast_cancer")
def _breast_cancer() -> tuple[np.ndarray, np.ndarray, list[str], Task]:
    """Return WDBC features, labels (1 = malignant), names and task."""
    bunch = load_breast_cancer()
    # sklearn codes 0 = malignant, 1 = benign; flip so the positive class is the disease
    return bunch.data, 1 - bunch.target, list(bunch.feature_names), "binary"


@BUILTIN_SOURCES.register("diabetes")
def _diabetes() -> tuple[np.ndarray, np.ndarray, list[str], Task]:
    """Return the diabetes progression table (raw, unscaled features) and task."""
    bunch = load_diabetes(scaled=False)
    return bunch.data, bunch.target, list(bunch.feature_names), "regression"


_MIN_STD: Final = 1e-8


def load_builtin(
    name: str, *, val: float = 0.15, test: float = 0.2, seed: int = 0, site: str | None = None
) -> SiteData:
    """Load a built-in table as one :class:`SiteData` (train / val / test, standardised).

    Parameters
    ----------
    name : str
        ``breast_cancer`` or ``diabetes`` (see ``BUILTIN_SOURCES``).
    val, test : float
        Fractions of the patients held out for validation and test.
    seed : int
        Seed of the split.
    site : str, optional
        The site name (default: ``name``).
    """
    if not (0 <= val < 1 and 0 < test < 1 and val + test < 1):
        raise ValueError(f"val = {val} and test = {test} must be fractions with val + test < 1")
    x, y, names, task = BUILTIN_SOURCES.get(name)()
    x = x.astype(np.float64)
    index = np.arange(len(y))
    stratify = y if task != "regression" else None
    rest, test_idx = train_test_split(index, test_size=test, random_state=seed, stratify=stratify)
    if val > 0:
        rel = val / (1.0 - test)
        train_idx, val_idx = train_test_split(
            rest, test_size=rel, random_state=seed, stratify=None if stratify is None else y[rest]
        )
    else:
        train_idx, val_idx = rest, np.array([], dtype=int)
    mean = x[train_idx].mean(axis=0)
    std = np.maximum(x[train_idx].std(axis=0), _MIN_STD)
    xs = ((x - mean) / std).astype(np.float32)
    num_classes = 1 if task == "regression" else int(len(np.unique(y)))
    if task == "regression":
        # scale the target with train statistics too, so one learning rate suits every table
        t_mean, t_std = y[train_idx].mean(), max(float(y[train_idx].std()), _MIN_STD)
        targets = torch.as_tensor((y - t_mean) / t_std, dtype=torch.float32)
    else:
        targets = torch.as_tensor(y, dtype=torch.long)
    inputs = torch.as_tensor(xs)

    def split(idx: np.ndarray) -> Split:
        t = torch.as_tensor(np.sort(idx), dtype=torch.long)
        return Split(inputs=(inputs[t],), targets=targets[t], groups=np.sort(idx).astype(np.int64))

    logger.debug("built-in %s: %d train, %d val, %d test", name, len(train_idx), len(val_idx), len(test_idx))
    return SiteData(
        name=site or name,
        kind="table",
        task=task,
        num_classes=num_classes,
        input_shape=(x.shape[1],),
        train=split(train_idx),
        val=split(val_idx),
        test=split(test_idx),
        feature_names=names,
    )
