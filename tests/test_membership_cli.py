"""``fedcare audit membership``: a deliberately overfitted non-private model is blocked by the gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.client.loaders import load_site_file
from fedcare.client.training import TrainSettings, train_local
from fedcare.models import ModelSpec, build_for_data, get_weights
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.checkpoint import save_model_file

RECIPE = TrainSettings(local_epochs=150, batch_size=16, lr=1.0, seed=0, device="cpu")


def _memorising_site(folder: Path) -> Path:
    """60 patients, 80 noise features, random labels: a model can only memorise its training set."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 80)), columns=[f"f{i}" for i in range(80)])
    frame["target"] = rng.integers(0, 2, size=60)
    frame.to_csv(folder / "noise.csv", index=False)
    manifest = folder / "site.toml"
    manifest.write_text(
        'site = "noise"\ntask = "binary"\nclasses = [0, 1]\n[split]\nval = 0.0\ntest = 0.5\nseed = 0\n'
        '[data]\nkind = "table"\npath = "noise.csv"\ntarget = "target"\n'
    )
    return manifest


def _overfitted_model(manifest: Path, folder: Path) -> Path:
    data = load_site_file(manifest)
    spec = ModelSpec(family="logistic")
    model = build_for_data(spec, task="binary", num_classes=2, input_shape=data.input_shape, has_mask=False)
    train_local(model, data, train=RECIPE, privacy=PrivacySettings.disabled(), ledger=None, planned_rounds=1, round_index=1)
    path = folder / "final_model.npz"
    save_model_file(path, get_weights(model), {"model_spec": spec.model_dump(), "task": "binary", "num_classes": 2,
                                               "input_shape": list(data.input_shape), "has_mask": False, "study": "t"})
    return path


def test_an_overfitted_non_private_model_is_blocked_by_the_release_gate(tmp_path: Path) -> None:
    # Prepare
    manifest = _memorising_site(tmp_path)
    model = _overfitted_model(manifest, tmp_path)
    out = tmp_path / "audit.json"

    # Execute
    result = CliRunner().invoke(app, [
        "audit", "membership", "--model", str(model), "--site", str(manifest), "--max-auc", "0.6",
        "--shadows", "4", "--local-epochs", str(RECIPE.local_epochs), "--batch-size", str(RECIPE.batch_size),
        "--lr", str(RECIPE.lr), "--out", str(out),
    ])

    # Assert
    assert result.exit_code == 1, result.output
    assert "release blocked: membership inference exceeds max AUC 0.600" in result.output
    assert "Do not release this model" in result.output
    record = json.loads(out.read_text())
    assert record["members"] == record["nonmembers"] >= 25  # equal sizes: the larger split is cut
    assert [a["attack"] for a in record["attacks"]] == ["loss_threshold", "lira_online"]
    assert record["gate"]["passed"] is False
    assert record["attacks"][0]["auc"] > 0.8  # the loss attack separates memorised members


def test_the_gate_rejects_an_impossible_limit_before_auditing(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "membership", "--model", str(tmp_path / "m.npz"),
                                      "--site", str(tmp_path / "s.toml"), "--max-auc", "0.4"])

    assert result.exit_code == 2
    assert "max_auc must be in (0.5, 1]" in result.output
