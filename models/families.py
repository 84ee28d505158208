"""The registry of model families and a validated specification to build them from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .cnn import MedicalCNN
from .lstm import ClinicalLSTM
from .registry import Registry
from .regression import LinearRegression, LogisticRegression

FAMILIES: Registry[type[nn.Module]] = Registry("model family")
FAMILIES.register("cnn")(MedicalCNN)
FAMILIES.register("lstm")(ClinicalLSTM)
FAMILIES.register("linear")(LinearRegression)
FAMILIES.register("logistic")(LogisticRegression)

Task = Literal["regression", "binary", "multiclass"]


class ModelSpec(BaseModel):
    """A model family and its size settings; the data's shape is supplied when building.

    Attributes
    ----------
    family : str
        A registered family: ``cnn``, ``lstm``, ``linear`` or ``logistic``.
    hidden_size, num_layers, bidirectional, width :
        Size settings used by the families that take them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str = "logistic"
    hidden_size: int = Field(default=32, ge=1)
    num_layers: int = Field(default=1, ge=1)
    bidirectional: bool = False
    width: int = Field(default=16, ge=1)


def build_model(name: str, /, **kwargs: Any) -> nn.Module:
    """Build a model of the registered family ``name`` with keyword arguments for its constructor."""
    return FAMILIES.get(name)(**kwargs)


def build_for_data(
    spec: ModelSpec,
    *,
    task: Task,
    num_classes: int,
    input_shape: tuple[int, ...],
    has_mask: bool = False,
) -> nn.Module:
    """Build the model ``spec`` describes for data of ``input_shape`` (one example, no batch).

    Parameters
    ----------
    spec : ModelSpec
        Family and size settings.
    task : {"regression", "binary", "multiclass"}
        What is predicted.
    num_classes : int
        Class count for classification (ignored for regression).
    input_shape : tuple of int
        ``(features,)`` for tables, ``(C, H, W)`` for images, ``(T, F)`` for sequences.
    has_mask : bool
        Whether sequences come with a missingness mask.
    """
    family = spec.family
    FAMILIES.get(family)  # raise early, listing the known families
    if task == "regression" and family not in ("linear", "lstm"):
        raise ValueError(
            f"model family {family!r} cannot fit a regression task; use 'linear' or 'lstm'"
        )
    if task != "regression" and family == "linear":
        raise ValueError(f"'linear' is for regression; use 'logistic' for a {task} task")
    classes = 1 if task == "regression" else num_classes
    if family == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"'cnn' needs images (C, H, W); this data has shape {input_shape}")
        return build_model(
            "cnn",
            in_channels=input_shape[0],
            num_classes=classes,
            image_size=input_shape[-1],
            width=spec.width,
        )
    if family == "lstm":
        if len(input_shape) != 2:
            raise ValueError(f"'lstm' needs sequences (T, F); this data has shape {input_shape}")
        return build_model(
            "lstm",
            input_size=input_shape[1],
            num_classes=classes,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            bidirectional=spec.bidirectional,
            use_mask=has_mask,
        )
    if len(input_shape) != 1:
        raise ValueError(
            f"{family!r} needs a table of features; this data has shape {input_shape}: "
            "use 'cnn' for images or 'lstm' for sequences"
        )
    if family == "linear":
        return build_model("linear", in_features=input_shape[0])
    return build_model("logistic", in_features=input_shape[0], num_classes=classes)
