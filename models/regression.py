"""Linear and logistic regression for tabular risk and outcome models."""

from __future__ import annotations

import torch
from torch import nn


class LinearRegression(nn.Module):
    """Linear regression for a continuous outcome (e.g. disease progression).

    Parameters
    ----------
    in_features : int
        Number of input features.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return predictions shaped (N,)."""
        return self.linear(x).squeeze(-1)


class LogisticRegression(nn.Module):
    """Logistic (binary) or multinomial (multiclass) regression returning logits.

    Parameters
    ----------
    in_features : int
        Number of input features.
    num_classes : int
        2 for binary risk (one logit), more for multinomial (one logit per class).
    """

    def __init__(self, in_features: int, num_classes: int = 2) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError("in_features must be >= 1 and num_classes >= 2")
        self.num_classes = num_classes
        self.linear = nn.Linear(in_features, 1 if num_classes == 2 else num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits: shape (N,) for binary, (N, num_classes) for multiclass."""
        out = self.linear(x)
        return out.squeeze(-1) if self.num_classes == 2 else out
