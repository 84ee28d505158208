"""Which parameters travel: exactly the model's own tensors, without Opacus wrapping artefacts."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

_WRAPPER_PREFIX = "_module."


def unwrap(model: nn.Module) -> nn.Module:
    """Return the original module inside an Opacus ``GradSampleModule`` (or ``model`` itself)."""
    inner = model
    while hasattr(inner, "_module") and isinstance(inner._module, nn.Module):
        inner = inner._module
    return inner


def exchanged_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Return the named parameters and buffers to exchange: no ``_module.`` prefix, no duplicates.

    Tensors that share storage (Opacus's DPLSTM registers its cells twice) appear once, under
    the first name the module gives them.
    """
    inner = unwrap(model)
    seen: set[int] = set()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in inner.state_dict(keep_vars=True).items():
        if name.startswith(_WRAPPER_PREFIX):  # pragma: no cover - unwrap() removed wrappers
            name = name[len(_WRAPPER_PREFIX) :]
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach()
    return out


def get_weights(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Return the exchanged tensors as float32 NumPy arrays on the CPU, keyed by name."""
    return OrderedDict(
        (k, v.cpu().numpy().astype(np.float32, copy=True)) for k, v in exchanged_state(model).items()
    )


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load exchanged tensors into ``model`` (wrapped or not), refusing missing or extra names."""
    target = exchanged_state(model)
    missing = sorted(set(target) - set(weights))
    extra = sorted(set(weights) - set(target))
    if missing or extra:
        raise ValueError(
            f"weights do not fit this model: missing {missing or 'none'}, unexpected "
            f"{extra or 'none'}; check that server and site use the same model family and size"
        )
    with torch.no_grad():
        for name, tensor in target.items():
            value = torch.as_tensor(np.asarray(weights[name]), dtype=tensor.dtype)
            if value.shape != tensor.shape:
                raise ValueError(
                    f"weight {name!r} has shape {tuple(value.shape)}, model expects "
                    f"{tuple(tensor.shape)}; check the model's size settings"
                )
            tensor.copy_(value.to(tensor.device))
