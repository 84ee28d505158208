"""Helpers shared by the image loaders: layout (N, C, H, W), scaling to [0, 1], shape checks."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError


def expected_chw(expected: list[int] | None) -> tuple[int, ...] | None:
    """Return a declared ``[H, W]`` or ``[C, H, W]`` as ``(C, H, W)``."""
    if expected is None:
        return None
    return (1, *expected) if len(expected) == 2 else tuple(expected)


def to_unit_float(arr: np.ndarray, source: str) -> np.ndarray:
    """Scale integer images to float32 in [0, 1]; float images must already be in [0, 1]."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        top = 255.0 if arr.dtype.itemsize == 1 else float(np.iinfo(arr.dtype).max)
        if arr.dtype.itemsize > 1 and arr.size and arr.max() <= 255:
            top = 255.0  # 8-bit values stored in a wider integer type
        return (arr.astype(np.float32) / top).astype(np.float32)
    out = arr.astype(np.float32)
    if out.size and (not np.isfinite(out).all() or out.min() < 0.0 or out.max() > 1.0):
        raise ShapeError(
            f"{source}: float images must hold values in [0, 1]; store them as uint8 (0..255) "
            "or rescale them to [0, 1]",
            path=None,
        )
    return out


def to_nchw(batch: np.ndarray, expected: tuple[int, ...] | None, source: str) -> np.ndarray:
    """Return images (N, H, W), (N, C, H, W) or (N, H, W, C) as (N, C, H, W), checking the shape.

    Raises
    ------
    ShapeError
        When the images do not have the expected shape (or no image shape at all).
    """
    if batch.ndim == 3:
        batch = batch[:, None, :, :]
    elif batch.ndim == 4:
        channel_first = batch.shape[1:]
        channel_last = (batch.shape[3], batch.shape[1], batch.shape[2])
        if expected is not None:
            if channel_first != expected and channel_last == expected:
                batch = np.moveaxis(batch, 3, 1)
        elif batch.shape[3] in (1, 3, 4) and batch.shape[1] not in (1, 3, 4):
            batch = np.moveaxis(batch, 3, 1)
    else:
        raise ShapeError(
            f"{source}: images have shape {batch.shape[1:]} per image; expected 2-D grey "
            "images (H, W) or 3-D (C, H, W) / (H, W, C)",
            path=None,
        )
    if expected is not None and tuple(batch.shape[1:]) != expected:
        raise ShapeError(
            f"{source}: images are {tuple(batch.shape[1:])} (C, H, W) but expected_shape "
            f"declares {expected}; resize the images or fix data.expected_shape",
            path=None,
        )
    return batch
