"""Preprocessing carried by the model (models/preprocessing.py) and applied by ``fedcare evaluate``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedcare.client.loaders import load_site
from fedcare.client.manifest import load_manifest
from fedcare.client.metrics import predict
from fedcare.models import ModelSpec, build_for_data, get_weights
from fedcare.models.preprocessing import Moments, Preprocessing, global_standardiser, site_moments
from fedcare.server.checkpoint import MODEL_PREPROCESSING, MODEL_THRESHOLD, save_model_file
from fedcare.simulations.external import evaluate_model_file

SITES = Path(__file__).resolve().parents[1] / "simulations" / "sites"


def test_summed_site_moments_give_the_pooled_mean_and_std() -> None:
    # Prepare: two sites, one feature: [1, 3] and [5, 7, 9]
    a, b = site_moments(np.array([[1.0], [3.0]])), site_moments(np.array([[5.0], [7.0], [9.0]]))
    # Execute
    pre = global_standardiser([a, b])
    # Assert: pooled mean 5, population variance (16 + 4 + 0 + 4 + 16) / 5 = 8
    assert a == Moments(n=2, total=[4.0], squares=[10.0])
    assert pre.kind == "global" and pre.n == 5
    assert pre.mean == pytest.approx([5.0])
    assert pre.std == pytest.approx([np.sqrt(8.0)])


def test_a_constant_feature_keeps_a_positive_std_and_moments_must_agree() -> None:
    # Prepare / Execute
    pre = global_standardiser([site_moments(np.ones((4, 2)))])
    # Assert
    assert min(pre.std) >= 1e-8
    with pytest.raises(ValueError, match="features"):
        _ = site_moments(np.ones((2, 2))) + site_moments(np.ones((2, 3)))
    with pytest.raises(ValueError, match="no site"):
        global_standardiser([])


def test_preprocessing_records_are_validated_and_applied() -> None:
    # Prepare
    pre = Preprocessing(kind="global", mean=[1.0, 2.0], std=[2.0, 4.0], n=10)
    # Execute
    out = pre.apply(torch.tensor([[3.0, 6.0]]))
    # Assert
    assert out.tolist() == [[1.0, 1.0]]
    assert Preprocessing.from_meta({}).kind == "per-site"  # older model files
    assert Preprocessing.from_meta({MODEL_PREPROCESSING: pre.to_meta()}) == pre
    with pytest.raises(ValidationError):
        Preprocessing(kind="per-site", mean=[1.0], std=[1.0])
    with pytest.raises(ValidationError):
        Preprocessing(kind="global", mean=[1.0], std=[0.0])
    with pytest.raises(ValueError, match="features"):
        pre.apply(torch.ones((1, 3)))


def test_evaluate_applies_carried_statistics_to_raw_table_features(shared_data: Path, tmp_path: Path) -> None:
    # Prepare: global statistics of the four heart hospitals' raw training features
    raw = []
    for name in ("cleveland", "hungarian", "switzerland", "va"):
        manifest = load_manifest(SITES / f"heart_{name}.toml")
        raw.append(load_site(manifest.model_copy(update={"data": manifest.data.model_copy(update={"standardize": False})})))
    pre = global_standardiser([site_moments(s.train.inputs[0]) for s in raw])
    torch.manual_seed(0)
    model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=tuple(raw[0].input_shape))
    meta = {"model_spec": ModelSpec(family="logistic").model_dump(), "task": "binary", "num_classes": 2,
            "input_shape": list(raw[0].input_shape), "has_mask": False, "study": "t",
            MODEL_THRESHOLD: 0.5, MODEL_PREPROCESSING: pre.to_meta()}
    save_model_file(tmp_path / "m.npz", get_weights(model), meta)
    cleveland = raw[0]
    expected = torch.sigmoid(predict(model, type(cleveland.test)(inputs=(pre.apply(cleveland.test.inputs[0]),),
                                                                 targets=cleveland.test.targets))).numpy()
    # Execute
    result = evaluate_model_file(tmp_path / "m.npz", SITES / "heart_cleveland.toml", out=tmp_path / "r.json")
    # Assert: the site's raw features went through the carried statistics, not the site's own
    assert result["preprocessing"] == "global"
    y = cleveland.test.targets.numpy()
    assert result["metrics"]["accuracy"] == pytest.approx(float(np.mean((expected >= 0.5) == (y == 1))))
    assert result["num_examples"] == len(cleveland.test)
