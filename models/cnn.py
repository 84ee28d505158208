"""A convolutional network for medical images, DP-ready (GroupNorm, no BatchNorm)."""

from __future__ import annotations

import torch
from torch import nn


def _groups(channels: int) -> int:
    """Return a GroupNorm group count that divides ``channels``."""
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class MedicalCNN(nn.Module):
    """A small CNN for images of any channel count, 28 to 224 px, and any class count.

    Each stage is conv -> GroupNorm -> ReLU -> 2x2 max-pool; a global average pool makes the
    head independent of the input size, so one network serves 28 px MedMNIST and 224 px scans.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for grey, 3 for RGB).
    num_classes : int
        Output classes; 2 gives one logit (binary), more give one logit per class.
    image_size : int
        Side of the square input, 28 to 224; sets the number of stages.
    width : int
        Channels of the first stage; each later stage doubles it (capped at 8x).
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, image_size: int = 28, width: int = 16
    ) -> None:
        super().__init__()
        if not 28 <= image_size <= 224:
            raise ValueError(f"image_size must be between 28 and 224 px, got {image_size}")
        if in_channels < 1 or num_classes < 2 or width < 1:
            raise ValueError("in_channels and width must be >= 1 and num_classes >= 2")
        stages = 2 if image_size < 64 else 3 if image_size < 128 else 4
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(stages):
            c_out = width * min(2**i, 8)
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                nn.GroupNorm(_groups(c_out), c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_classes = num_classes
        self.head = nn.Linear(c_in, 1 if num_classes == 2 else num_classes)
        self.image_size = image_size
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for images shaped (N, C, H, W): (N,) if binary, else (N, classes)."""
        out = self.head(self.pool(self.features(x)).flatten(1))
        return out.squeeze(-1) if self.num_classes == 2 else out
