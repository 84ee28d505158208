"""Model families (torch modules only), their registry, and which parameters travel."""

from __future__ import annotations

from .cnn import MedicalCNN
from .exchange import exchanged_state, get_weights, set_weights, unwrap
from .families import FAMILIES, ModelSpec, Task, build_for_data, build_model
from .lstm import ClinicalLSTM
from .registry import Registry, UnknownNameError
from .regression import LinearRegression, LogisticRegression

__all__ = [
    "FAMILIES",
    "ClinicalLSTM",
    "LinearRegression",
    "LogisticRegression",
    "MedicalCNN",
    "ModelSpec",
    "Registry",
    "Task",
    "UnknownNameError",
    "build_for_data",
    "build_model",
    "exchanged_state",
    "get_weights",
    "set_weights",
    "unwrap",
]
