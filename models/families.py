"""The registry of model families and a validated specification to build them from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from ..config_base import FrozenModel
from .cnn import MedicalCNN
from .lstm import ClinicalLSTM
from .registry import Registry
from .scatter import ScatterNetClassifier
from .regression import LinearRegression, LogisticRegression
from .text import MAX_BUCKETS, MAX_TEXT_LENGTH, HashingTokenizer, TextBagOfEmbeddings, TextLSTM

FAMILIES: Registry[type[nn.Module]] = Registry("model family")
FAMILIES.register("cnn")(MedicalCNN)
FAMILIES.register("lstm")(ClinicalLSTM)
FAMILIES.register("linear")(LinearRegression)
FAMILIES.register("logistic")(LogisticRegression)
FAMILIES.register("text_lstm")(TextLSTM)
FAMILIES.register("text_bag")(TextBagOfEmbeddings)
FAMILIES.register("scatternet")(ScatterNetClassifier)

TEXT_FAMILIES = ("text_lstm", "text_bag")
"""Families that read token ids from :class:`~fedcare.models.text.HashingTokenizer`."""

Task = Literal["regression", "binary", "multiclass"]


class ModelSpec(FrozenModel):
    """A model family and its size settings; the data's shape is supplied when building.

    Attributes
    ----------
    family : str
        A registered family: ``cnn``, ``scatternet`` (fixed scattering features + linear head,
        the DP recipe for images), ``lstm``, ``linear``, ``logistic``, ``text_lstm`` or
        ``text_bag``.
    hidden_size, num_layers, bidirectional, width :
        Size settings used by the families that take them.
    embedding_dim : int
        Token embedding size of the text families.
    buckets, max_length, lowercase :
        The text families' tokenisation (:class:`~fedcare.models.text.HashingTokenizer`):
        recorded here so that every site, the saved model and ``fedcare evaluate`` use the same
        one; a site whose manifest tokenises otherwise is refused with the values to set.
    """

    family: str = "logistic"
    hidden_size: int = Field(default=32, ge=1)
    num_layers: int = Field(default=1, ge=1)
    bidirectional: bool = False
    width: int = Field(default=16, ge=1)
    embedding_dim: int = Field(default=64, ge=1)
    buckets: int = Field(default=HashingTokenizer.model_fields["buckets"].default, ge=2, le=MAX_BUCKETS)
    max_length: int = Field(
        default=HashingTokenizer.model_fields["max_length"].default, ge=1, le=MAX_TEXT_LENGTH
    )
    lowercase: bool = True

    def tokenizer(self) -> HashingTokenizer:
        """Return the hashing tokeniser these settings describe (text families)."""
        return HashingTokenizer(buckets=self.buckets, max_length=self.max_length, lowercase=self.lowercase)


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
    if family in TEXT_FAMILIES:
        return _build_text(spec, task=task, num_classes=num_classes, input_shape=input_shape,
                           has_mask=has_mask)
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
    if family == "scatternet":
        if len(input_shape) != 3:
            raise ValueError(f"'scatternet' needs images (C, H, W); this data has shape {input_shape}")
        return build_model(
            "scatternet", in_channels=input_shape[0], num_classes=classes, image_size=input_shape[-1]
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


def _build_text(
    spec: ModelSpec, *, task: Task, num_classes: int, input_shape: tuple[int, ...], has_mask: bool
) -> nn.Module:
    """Build a text family for token ids of ``input_shape == (max_length,)``."""
    family = spec.family
    if task == "regression":
        raise ValueError(f"{family!r} classifies texts; use task 'binary' or 'multiclass'")
    tokenizer = spec.tokenizer()
    if len(input_shape) != 1 or has_mask:
        raise ValueError(
            f"{family!r} reads token ids shaped (max_length,) from a kind = 'text' site; this "
            f"data has shape {input_shape}{' with a mask' if has_mask else ''}"
        )
    if input_shape[0] != tokenizer.max_length:
        raise ValueError(
            f"the texts are tokenised to {input_shape[0]} tokens but the model spec says "
            f"max_length = {tokenizer.max_length}; set the same max_length in the site manifest's "
            "[data] table and the study's [model] table"
        )
    if family == "text_lstm":
        return build_model(
            "text_lstm", num_classes=num_classes, embedding_dim=spec.embedding_dim,
            hidden_size=spec.hidden_size, num_layers=spec.num_layers,
            bidirectional=spec.bidirectional, tokenizer=tokenizer,
        )
    return build_model("text_bag", num_classes=num_classes, embedding_dim=spec.embedding_dim,
                       tokenizer=tokenizer)
