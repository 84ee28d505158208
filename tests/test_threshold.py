"""The operating threshold: chosen on validation histograms, stored in the model file, used by evaluate."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from histograms import hist  # noqa: E402

from fedcare.client.dataset import Split  # noqa: E402
from fedcare.client.metrics import evaluate, validation_threshold  # noqa: E402
from fedcare.models import ModelSpec, build_for_data, get_weights  # noqa: E402
from fedcare.privacy.artefacts import ArtefactKey, ArtefactMetadata  # noqa: E402
from fedcare.privacy.global_metrics import BINS, choose_threshold  # noqa: E402
from fedcare.server.checkpoint import (  # noqa: E402
    MODEL_THRESHOLD,
    CheckpointError,
    CheckpointTamperedError,
    amend_model_file,
    load_model_file,
    save_model_file,
)


def _logistic(weight: float, bias: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=(1,))
    with torch.no_grad():
        model.linear.weight.fill_(weight)
        model.linear.bias.fill_(bias)
    return model.eval()


def _meta() -> dict:
    return {"model_spec": ModelSpec(family="logistic").model_dump(), "task": "binary", "num_classes": 2,
            "input_shape": [1], "has_mask": False, "study": "t"}


def test_youden_threshold_on_known_histograms() -> None:
    # Prepare: negatives in bins 0-2, positives in bins 2-4: every example above 0.2 is positive
    # except the 3 negatives of bin 2
    neg, pos = hist(b0=10, b1=10, b2=3), hist(b2=2, b3=5, b4=5)
    # Execute
    threshold = choose_threshold(neg, pos)
    # Assert: J(0.2) = 12/12 + 20/23 − 1 = 0.870, J(0.3) = 10/12 + 23/23 − 1 = 0.833: 0.2 wins
    assert threshold == pytest.approx(0.2)


def test_ties_go_to_the_edge_nearest_one_half_and_one_class_keeps_one_half() -> None:
    # Prepare: perfectly separated at every edge from 0.3 to 0.7
    neg, pos = hist(b2=5), hist(b7=5)
    # Execute / Assert
    assert choose_threshold(neg, pos) == pytest.approx(0.5)
    assert choose_threshold(np.zeros(BINS), pos) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="histograms"):
        choose_threshold(np.zeros(3), pos)


def test_validation_threshold_sums_the_sites_histograms() -> None:
    # Prepare: logit = x, so P(1) = sigmoid(x); two sites' validation splits, a prevalence-shifted model
    model = _logistic(1.0, 0.0)
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    site_a = Split(inputs=(torch.tensor([[logit(0.05)], [logit(0.15)], [logit(0.25)]]),), targets=torch.tensor([0, 0, 1]))
    site_b = Split(inputs=(torch.tensor([[logit(0.12)], [logit(0.35)], [logit(0.45)]]),), targets=torch.tensor([0, 1, 1]))
    # Execute
    threshold = validation_threshold(model, [site_a, site_b], "binary")
    alone = validation_threshold(model, [site_a], "binary")
    # Assert: summed, negatives sit in bins 0-1 and positives in bins 2-4 -> 0.2 separates them
    assert threshold == pytest.approx(0.2)
    assert alone == pytest.approx(0.2)
    assert validation_threshold(model, [site_a], "regression") == 0.5


def test_evaluate_applies_the_threshold() -> None:
    # Prepare: probabilities 0.3 (positive) and 0.1 (negative)
    model = _logistic(1.0, 0.0)
    split = Split(inputs=(torch.tensor([[float(np.log(0.3 / 0.7))], [float(np.log(0.1 / 0.9))]]),),
                  targets=torch.tensor([1, 0]))
    # Execute / Assert
    assert evaluate(model, split, "binary")["balanced_accuracy"] == pytest.approx(0.5)
    assert evaluate(model, split, "binary", threshold=0.2)["balanced_accuracy"] == pytest.approx(1.0)


def test_threshold_is_stored_in_a_plaintext_model_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "final_model.npz"
    model = _logistic(0.5, -0.1)
    save_model_file(path, get_weights(model), _meta())
    # Execute
    amend_model_file(path, {MODEL_THRESHOLD: 0.3})
    arrays, meta = load_model_file(path)
    # Assert: weights unchanged, threshold stored, format kept
    assert meta[MODEL_THRESHOLD] == pytest.approx(0.3)
    assert meta["format"] == "fedcare-model/1"
    for name, value in get_weights(model).items():
        np.testing.assert_array_equal(arrays[name], value)
    with pytest.raises(ValueError, match="cannot change"):
        amend_model_file(path, {"names": []})


def test_threshold_is_stored_in_an_encrypted_model_file_under_the_same_binding(tmp_path: Path) -> None:
    # Prepare
    key = ArtefactKey(os.urandom(32))
    bound = ArtefactMetadata(study="s", kind="model", round=3, config_sha256="a" * 64)
    path = tmp_path / "final_model.npz.enc"
    save_model_file(path, get_weights(_logistic(1.0, 0.0)), _meta(), key=key, metadata=bound)
    # Execute
    amend_model_file(path, {MODEL_THRESHOLD: 0.7}, key=key, expected={"study": "s", "kind": "model"})
    _, meta = load_model_file(path, key=key, expected={"study": "s", "kind": "model", "round": 3})
    # Assert
    assert meta[MODEL_THRESHOLD] == pytest.approx(0.7)
    with pytest.raises(CheckpointError):
        load_model_file(path)  # still encrypted: no key, no model


def test_a_tampered_encrypted_model_cannot_be_amended(tmp_path: Path) -> None:
    # Prepare
    key = ArtefactKey(os.urandom(32))
    bound = ArtefactMetadata(study="s", kind="model", round=1, config_sha256="b" * 64)
    path = tmp_path / "m.npz.enc"
    save_model_file(path, get_weights(_logistic(1.0, 0.0)), _meta(), key=key, metadata=bound)
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 1
    path.write_bytes(bytes(blob))
    # Execute / Assert
    with pytest.raises(CheckpointTamperedError):
        amend_model_file(path, {MODEL_THRESHOLD: 0.1}, key=key)


def test_a_threshold_outside_zero_one_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "m.npz"
    save_model_file(path, get_weights(_logistic(1.0, 0.0)), {**_meta(), MODEL_THRESHOLD: 1.5})
    # Execute / Assert
    with pytest.raises(CheckpointError, match="threshold"):
        load_model_file(path)
