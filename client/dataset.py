"""What a site's loader hands to training: validated tensors per split, no Flower types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..models import Task

DataKind = Literal["table", "image", "sequence", "signal", "text"]


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

    @classmethod
    def concat(cls, splits: Sequence[Split], *, names: Sequence[str] | None = None) -> Split:
        """Return ``splits`` one after the other (pooling sites, or a site's splits for validation).

        Parameters
        ----------
        splits : sequence of Split
            At least one; all with the same number of inputs and the same shapes past the first
            dimension. Empty splits add nothing (a split of zero rows may have any shape).
        names : sequence of str, optional
            One name per split (the sites'). When given and every split has ``groups``, the
            result's groups are ``"<name>:<group>"`` (two sites may reuse a patient id);
            otherwise the result has no groups.

        Raises
        ------
        ValueError
            When ``splits`` is empty or ``names`` has another length: pass one name per split.
        """
        if not splits:
            raise ValueError("no splits to concatenate: pass at least one")
        if names is not None and len(names) != len(splits):
            raise ValueError(f"{len(names)} names for {len(splits)} splits: pass one name per split")
        rows = [s for s in splits if len(s)] or list(splits[:1])
        inputs = tuple(torch.cat([s.inputs[i] for s in rows]) for i in range(len(rows[0].inputs)))
        groups = None
        if names is not None and all(s.groups is not None for s in splits):
            groups = np.concatenate(
                [np.char.add(f"{name}:", np.asarray(s.groups).astype(str)) for s, name in zip(splits, names, strict=True)]
            )
        return cls(inputs=inputs, targets=torch.cat([s.targets for s in rows]), groups=groups)


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
