"""Model families (torch modules only), their registry, and which parameters travel."""

from __future__ import annotations

from .cnn import MedicalCNN
from .exchange import exchanged_state, get_weights, set_weights, unwrap
from .families import FAMILIES, TEXT_FAMILIES, ModelSpec, Task, build_for_data, build_model
from .lstm import ClinicalLSTM
from .registry import Registry, UnknownNameError
from .regression import LinearRegression, LogisticRegression
from .scatter import ScatterNetClassifier
from .text import HashingTokenizer, TextBagOfEmbeddings, TextLSTM

__all__ = [
    "FAMILIES",
    "TEXT_FAMILIES",
    "ClinicalLSTM",
    "HashingTokenizer",
    "LinearRegression",
    "LogisticRegression",
    "MedicalCNN",
    "ModelSpec",
    "Registry",
    "ScatterNetClassifier",
    "Task",
    "TextBagOfEmbeddings",
    "TextLSTM",
    "UnknownNameError",
    "build_for_data",
    "build_model",
    "exchanged_state",
    "get_weights",
    "set_weights",
    "unwrap",
]
