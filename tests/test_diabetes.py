"""The diabetes progression scenario: built-in data read from scikit-learn's own files, regression arms."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import sklearn.datasets

from fedcare.client.metrics import global_evaluation
from fedcare.server.checkpoint import MODEL_THRESHOLD, build_saved_model, load_model_file
from fedcare.simulations.baselines import run_baselines
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.external import training_data_of
from fedcare.simulations.runner import build_hospitals
from fedcare.simulations.scenario import load_scenario

SCENARIO = Path(__file__).resolve().parents[1] / "simulations" / "scenarios" / "diabetes_progression.toml"


def test_diabetes_ships_inside_scikit_learn_and_loads_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: any download attempt fails the test
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_diabetes tried the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    folder = Path(sklearn.datasets.__file__).parent / "data"
    # Execute
    data = load_builtin("diabetes", seed=0)
    # Assert: the two files scikit-learn reads, and the 442 patients in train / val / test
    assert (folder / "diabetes_data_raw.csv.gz").is_file() and (folder / "diabetes_target.csv.gz").is_file()
    assert data.task == "regression" and data.input_shape == (10,)
    assert len(data.train) + len(data.val) + len(data.test) == 442


def test_the_scenario_builds_four_hospitals_of_linear_regression() -> None:
    # Prepare / Execute
    scenario = load_scenario(SCENARIO)
    hospitals = build_hospitals(scenario)
    # Assert
    assert scenario.model.family == "linear" and scenario.privacy.enabled is False
    assert len(hospitals) == 4 and {h.task for h in hospitals} == {"regression"}
    assert sum(len(h.train) + len(h.val) + len(h.test) for h in hospitals) == 442


def test_baselines_report_global_r2_and_save_models_fedcare_evaluate_reads(tmp_path: Path) -> None:
    # Prepare
    scenario = load_scenario(SCENARIO).model_copy(update={"rounds": 3})
    hospitals = build_hospitals(scenario)
    # Execute
    summaries = run_baselines(scenario, hospitals, which=["pooled", "local"], out_dir=tmp_path,
                              training_data=training_data_of(scenario, hospitals))
    pooled = summaries["pooled"]
    # Assert: the headline is the R² of all test patients together, not the mean of per-site R²
    model_path = Path(pooled["model_files"]["pooled"])
    arrays, meta = load_model_file(model_path)
    again = global_evaluation(build_saved_model(arrays, meta), [h.test for h in hospitals], "regression")
    assert pooled["r2"] == pytest.approx(again.metrics["r2"])
    assert pooled["r2"] != pytest.approx(pooled["site_weighted_mean"]["r2"], abs=1e-6)
    assert pooled["mae"] == pytest.approx(pooled["site_weighted_mean"]["mae"])  # MAE is a mean: both agree
    assert pooled["intervals"]["mae"][0] <= pooled["mae"] <= pooled["intervals"]["mae"][1]
    assert meta[MODEL_THRESHOLD] == 0.5 and meta["training_data"][0]["partitioned"] is True
    assert sorted(summaries["local"]["model_files"]) == sorted(h.name for h in hospitals)
    assert all(Path(f).is_file() for f in summaries["local"]["model_files"].values())
