"""A DP-friendly image classifier: fixed wavelet scattering features and a linear head.

Tramèr & Boneh (ICLR 2021, "Differentially private learning needs better features (or much more
data)") showed that under DP-SGD a linear model on hand-crafted ScatterNet features beats
end-to-end CNNs at small and moderate ε: the features cost no privacy (they are fixed, not
learned from anyone's patients) and the few trainable parameters spend the noise budget well.

:class:`ScatterNetClassifier` (family ``scatternet``): a 2-D scattering transform (kymatio's
``Scattering2D``, ``J = 2``, ``L = 8``: 81 channels per image channel at a quarter of the side),
average-pooled to 7 x 7, GroupNorm without learned scale (per example, so it needs no batch
statistics and is safe under per-example clipping), then one linear layer. The scattering
filters are a fixed function of the image size, rebuilt by every site and evaluation; they are
neither trained nor exchanged (not in ``state_dict``), so the update that leaves a site holds
only the linear head.

The transform is the costly part of training (a site sees the same images every round), so its
output is memoised per process (:class:`FeatureCache`): keyed by a BLAKE2b digest of each image's
bytes, shape and dtype plus the transform's settings, bounded in bytes (least recently used out
first). A hit returns exactly what the transform computes (it is deterministic and computed per
image); the cache lives in process memory only, is never written or sent, and a deployed node's
task process starts with an empty one.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["SCATTER_CHANNELS", "FeatureCache", "ScatterNetClassifier"]

SCATTER_J = 2
"""Scales of the scattering transform: features at 1/4 of the image side."""
SCATTER_ANGLES = 8
"""Orientations per scale."""
SCATTER_CHANNELS = 1 + SCATTER_J * SCATTER_ANGLES + SCATTER_ANGLES**2 * SCATTER_J * (SCATTER_J - 1) // 2
"""Scattering coefficients per image channel (81 for J = 2, L = 8)."""
POOLED_SIDE = 7
"""Side of the pooled feature map: 28 px images keep every coefficient, larger ones are pooled."""


CACHE_BYTES = 512 * 2**20
"""Most bytes of scattering features one process keeps (about 32,000 grey 28 px images)."""


class FeatureCache:
    """A bounded, least-recently-used map from image digests to their scattering features.

    Parameters
    ----------
    max_bytes : int
        Most bytes of feature tensors kept; the least recently used are dropped first.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Return how many images' features are held."""
        return len(self._entries)

    @staticmethod
    def key(image: torch.Tensor, settings: bytes) -> bytes:
        """Return the digest of one image (its bytes, shape and dtype) under the transform's ``settings``."""
        digest = hashlib.blake2b(settings, digest_size=20)
        digest.update(repr((tuple(image.shape), str(image.dtype))).encode())
        digest.update(image.detach().cpu().contiguous().numpy().tobytes())
        return digest.digest()

    def get(self, key: bytes) -> torch.Tensor | None:
        """Return the features stored under ``key`` (marking them recently used), or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: bytes, features: torch.Tensor) -> None:
        """Store ``features`` (kept on the CPU) under ``key``, dropping the least recently used over the bound."""
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = features.detach().cpu()
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0


FEATURES = FeatureCache()
"""The process's scattering feature cache."""


def _scattering(image_size: int) -> nn.Module:
    """Return kymatio's torch ``Scattering2D`` for square images of ``image_size`` px."""
    # The 2-D front end only: kymatio's top-level package imports its 3-D transform, which needs
    # scipy.special.sph_harm (removed in SciPy 1.17).
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=SCATTER_J, shape=(image_size, image_size), L=SCATTER_ANGLES)


class ScatterNetClassifier(nn.Module):
    """Fixed scattering features -> GroupNorm -> linear, for images of any channel and class count.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for grey, 3 for RGB).
    num_classes : int
        Output classes; 2 gives one logit (binary), more give one logit per class.
    image_size : int
        Side of the square input, 28 to 224 px, a multiple of 4.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, image_size: int = 28) -> None:
        super().__init__()
        if not 28 <= image_size <= 224 or image_size % 4:
            raise ValueError(
                f"scatternet needs square images of 28 to 224 px whose side is a multiple of 4, got "
                f"{image_size}; resize the site's images (manifest [data] resize) or use family 'cnn'"
            )
        if in_channels < 1 or num_classes < 2:
            raise ValueError("in_channels must be >= 1 and num_classes >= 2")
        channels = in_channels * SCATTER_CHANNELS
        # A list hides the transform from state_dict(), parameters() and Opacus: its filters are
        # a fixed function of image_size, rebuilt wherever the model is built, never exchanged.
        self._scatter: list[nn.Module] = [_scattering(image_size)]
        self.pool = nn.AdaptiveAvgPool2d(POOLED_SIDE)
        self.norm = nn.GroupNorm(in_channels * 27, channels, affine=False)
        self.num_classes = num_classes
        self.head = nn.Linear(channels * POOLED_SIDE**2, 1 if num_classes == 2 else num_classes)
        self.image_size = image_size
        self.in_channels = in_channels

    def scattering(self, x: torch.Tensor) -> torch.Tensor:
        """Return the raw scattering coefficients (N, C * 81, h, w) of images (N, C, H, W), memoised per image."""
        settings = f"scattering2d:J={SCATTER_J}:L={SCATTER_ANGLES}:side={self.image_size}".encode()
        keys = [FeatureCache.key(image, settings) for image in x]
        found = [FEATURES.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            scatter = self._scatter[0]
            if next(scatter.buffers()).device != x.device:
                scatter.to(x.device)
            with torch.no_grad():
                fresh = scatter(x[missing].contiguous()).flatten(1, 2)  # (M, C, 81, h, w) -> (M, C * 81, h, w)
            for i, features in zip(missing, fresh, strict=True):
                found[i] = features
                FEATURES.put(keys[i], features)
        return torch.stack([f.to(x.device) for f in found])  # type: ignore[union-attr]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the fixed, normalised scattering features of images (N, C, H, W)."""
        return self.norm(self.pool(self.scattering(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for images shaped (N, C, H, W): (N,) if binary, else (N, classes)."""
        out = self.head(self.features(x).flatten(1))
        return out.squeeze(-1) if self.num_classes == 2 else out
