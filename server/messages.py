"""What the coordinator sends with the model: the train and evaluate configs, arrays as records.

Shared by the plain driver (``server.app``) and the SecAgg+ driver (``server.secagg``); the
field names are ``models.wire``'s, which the sites read.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from ..models import wire
from .config import RunConfig

__all__ = ["arrays_from_record", "arrays_to_record", "evaluate_config", "model_fields", "train_config"]


def model_fields(config: RunConfig) -> dict[str, Any]:
    """Return the config fields that describe the model and the data it expects."""
    return {
        wire.MODEL_SPEC: config.model.model_dump_json(),
        wire.TASK: config.task,
        wire.NUM_CLASSES: config.num_classes,
        wire.INPUT_SHAPE: list(config.input_shape),
        wire.HAS_MASK: config.has_mask,
    }


def train_config(config: RunConfig) -> ConfigRecord:
    """Return what every site receives with the model: training settings and the model's shape."""
    return ConfigRecord(
        {
            wire.STUDY: config.study,
            wire.NUM_ROUNDS: config.num_rounds,
            wire.LOCAL_EPOCHS: config.local_epochs,
            wire.BATCH_SIZE: config.batch_size,
            wire.LEARNING_RATE: config.lr,
            wire.CLIP_GRAD_NORM: config.clip_grad_norm,
            **model_fields(config),
        }
    )


def evaluate_config(config: RunConfig) -> ConfigRecord:
    """Return what every site receives with a model to evaluate: the study and the model's shape."""
    return ConfigRecord({wire.STUDY: config.study, **model_fields(config)})


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Return named NumPy arrays as an ArrayRecord keyed by name."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def arrays_from_record(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """Return an ArrayRecord's arrays by name."""
    return OrderedDict((k, v.numpy()) for k, v in record.items())
