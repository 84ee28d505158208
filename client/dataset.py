"""What a site's loader hands to training: validated tensors per split, no Flower types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..models import Task

DataKind = Literal["table", "image", "sequence", "signal"]


@dataclass(frozen=True)
class Split:
    """One split (train, validation or test) of a site's data.

    Attributes
    ----------
    inputs : tuple of torch.Tensor
        The model's positional inputs, features first: ``(x,)`` for tables and images,
        ``(x, lengths, mask)`` for sequences (see ``ClinicalLSTM.forward``).
    targets : torch.Tensor
        float32 (N,) for regression, int64 (N,) class indices for classification.
    groups : numpy.ndarray, optional
        A group id per example (patient, record, ICU type…) used by partitioners; never sent.
    """

    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Check that every tensor has one row per example."""
        n = len(self.targets)
        for t in self.inputs:
            if len(t) != n:
                raise ValueError(f"split tensors disagree on length: {len(t)} rows vs {n} targets")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"groups has {len(self.groups)} rows vs {n} targets")

    def __len__(self) -> int:
        """Return the number of examples."""
        return len(self.targets)

    def dataset(self) -> TensorDataset:
        """Return a ``TensorDataset`` yielding ``(*inputs, target)``."""
        return TensorDataset(*self.inputs, self.targets)

    def subset(self, index: np.ndarray) -> Split:
        """Return the examples at ``index`` (an integer array)."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return Split(
            inputs=tuple(t[idx] for t in self.inputs),
            targets=self.targets[idx],
            groups=None if self.groups is None else self.groups[np.asarray(index)],
        )


@dataclass(frozen=True)
class SiteData:
    """A hospital's validated data, ready for local training.

    Attributes
    ----------
    name : str
        The site's name (from its manifest).
    kind : {"table", "image", "sequence", "signal"}
        What the data is.
    task : {"regression", "binary", "multiclass"}
        What is predicted.
    num_classes : int
        Number of classes (1 for regression).
    input_shape : tuple of int
        Shape of one example's features: ``(F,)``, ``(C, H, W)`` or ``(T, F)``.
    has_mask : bool
        Whether sequence inputs carry a missingness mask.
    train, val, test : Split
        The splits; ``val`` may be empty-free but is never None.
    feature_names : list of str
        Column / channel / parameter names, for reports.
    """

    name: str
    kind: DataKind
    task: Task
    num_classes: int
    input_shape: tuple[int, ...]
    train: Split
    val: Split
    test: Split
    has_mask: bool = False
    feature_names: list[str] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        """Return the number of training examples (what FedAvg weights by)."""
        return len(self.train)
