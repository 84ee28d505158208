"""External validation (simulations/external.py): overlap warnings from the model file's data digests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcare.client.manifest import load_manifest
from fedcare.models import ModelSpec, build_for_data, get_weights
from fedcare.server.checkpoint import MODEL_THRESHOLD, MODEL_TRAINING_DATA, save_model_file
from fedcare.simulations.external import evaluate_model_file, overlap_warnings, source_digest, training_record

SITES = Path(__file__).resolve().parents[1] / "simulations" / "sites"


def _model_file(path: Path, training: list[dict]) -> Path:
    torch.manual_seed(0)
    model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=(15,))
    meta = {"model_spec": ModelSpec(family="logistic").model_dump(), "task": "binary", "num_classes": 2,
            "input_shape": [15], "has_mask": False, "study": "t", MODEL_THRESHOLD: 0.4,
            MODEL_TRAINING_DATA: training}
    save_model_file(path, get_weights(model), meta)
    return path


def test_overlap_rules() -> None:
    # Prepare
    held_out = {"val": 0.15, "test": 0.15, "seed": 0, "by": None, "stratify": True}
    trained = [training_record("a", source="d1", split=held_out, partitioned=False)]
    partitioned = [training_record("p", source="d1", split=None, partitioned=True)]
    # Execute / Assert: the held-out split of the same file and settings is internal validation
    assert overlap_warnings(trained, source="d1", split_settings=held_out, split="test", site="a") == []
    assert overlap_warnings(trained, source="d2", split_settings=held_out, split="train", site="b") == []
    assert len(overlap_warnings(trained, source="d1", split_settings=held_out, split="train", site="a")) == 1
    assert len(overlap_warnings(trained, source="d1", split_settings={**held_out, "seed": 1}, split="test", site="a")) == 1
    assert len(overlap_warnings(partitioned, source="d1", split_settings=held_out, split="test", site="x")) == 1


def test_evaluate_warns_when_the_validation_site_is_a_training_site(shared_data: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a model trained on Cleveland (its digest and split settings recorded)
    manifest = load_manifest(SITES / "heart_cleveland.toml")
    record = training_record("heart-cleveland", source=source_digest(manifest), split=manifest.split.model_dump(),
                             partitioned=False)
    path = _model_file(tmp_path / "m.npz", [record])
    # Execute
    internal = evaluate_model_file(path, SITES / "heart_cleveland.toml", split="test", out=tmp_path / "a.json")
    overlapping = evaluate_model_file(path, SITES / "heart_cleveland.toml", split="all", out=tmp_path / "b.json")
    external = evaluate_model_file(path, SITES / "heart_hungarian.toml", split="all", out=tmp_path / "c.json")
    # Assert
    assert internal["warnings"] == []
    assert len(overlapping["warnings"]) == 1 and "overlap" in overlapping["warnings"][0]
    assert "overlap" in caplog.text
    assert external["warnings"] == []
    assert external["threshold"] == pytest.approx(0.4) and external["threshold_stored"]
    assert set(external["intervals"]) >= {"accuracy", "balanced_accuracy", "auroc"}
    assert {"brier", "calibration_error", "auroc", "balanced_accuracy"} <= set(external["metrics"])
