"""Pick the torch device a site trains on: CUDA when available, else the CPU."""

from __future__ import annotations

import logging

import torch

__all__ = ["select_device"]

logger = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    """Return the torch device for ``preference``: ``"auto"`` (CUDA if available, else CPU) or a name.

    Parameters
    ----------
    preference : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``…

    Raises
    ------
    ValueError
        When the name is not a torch device, or names an accelerator this machine lacks.
    """
    name = preference.strip().lower()
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("device auto: using %s", device)
        return device
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(
            f"unknown device {preference!r} ({exc}); use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {preference!r} asked for, but CUDA is not available on this machine; "
                "use device 'auto' or 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {preference!r} asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {preference!r} asked for, but MPS is not available; use 'auto'")
    logger.info("using device %s", device)
    return device
