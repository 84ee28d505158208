"""Scenarios, the simulation runner on Flower's engine (Ray), and external validation."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from fedcare.server.app import initial_arrays, model_meta
from fedcare.server.checkpoint import save_model_file
from fedcare.server.config import RunConfig
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.cli import app as sim_app
from fedcare.simulations.runner import (
    build_hospitals,
    evaluate_model_file,
    ray_backend_config,
    run_config_for,
    run_scenario,
)
from fedcare.simulations.scenario import DEFAULT_SCENARIO, InvalidScenarioError, SimulationSettings, load_scenario

SMALL = """
name = "e2e"
rounds = 2
seed = 1
baselines = ["pooled", "local"]

[data]
kind = "sklearn"
name = "breast_cancer"

[partition]
hospitals = 3
kind = "dirichlet"
alpha = 5.0
min_per_site = 40

[strategy]
name = "fedprox"
proximal-mu = 0.01

[training]
batch_size = 32
lr = 0.5

[privacy]
enabled = true
noise_multiplier = 1.0
epsilon_budget = 20.0

[policy]                      # every site allows this study's ε (fixed σ = 1: ≈ 4.9 after 3 rounds)
max_epsilon_per_study = 20.0
max_epsilon_total = 20.0
require_secure_aggregation = false  # and plain rounds: this tests the runner's outputs on the plain path
evaluation = "exact"          # exact federated evaluation (the default releases Laplace-noised statistics)
"""


def _scenario(tmp_path: Path, text: str = SMALL) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- scenarios


def test_the_default_scenario_needs_no_files_and_has_four_dp_hospitals() -> None:
    scenario = load_scenario(DEFAULT_SCENARIO)

    hospitals = build_hospitals(scenario)

    assert scenario.data.kind == "sklearn"
    assert scenario.privacy.enabled and scenario.privacy.target_epsilon == 3.0
    assert len(hospitals) == scenario.num_hospitals == 4
    assert sum(h.num_train for h in hospitals) == len(load_builtin("breast_cancer").train)
    assert scenario.baselines == ["pooled", "local"]  # the final table and plot show both baselines
    assert scenario.secure_aggregation.enabled and scenario.client_dp is None  # what the node default requires
    assert scenario.policy is None  # every virtual hospital applies the node default policy


def test_scenario_maps_to_the_run_config_the_server_runs(tmp_path: Path) -> None:
    scenario = load_scenario(_scenario(tmp_path))
    hospitals = build_hospitals(scenario)

    config = run_config_for(scenario, hospitals, tmp_path / "out")

    assert config.strategy == "fedprox" and config.proximal_mu == 0.01
    assert config.num_rounds == 2 and config.min_sites == 3
    assert config.input_shape == (30,) and config.task == "binary"
    assert config.checkpoint_dir == tmp_path / "out" / "checkpoints"
    assert all(h.num_train >= 40 for h in hospitals)


def test_scenario_training_and_evaluation_keys_reach_the_run_config(tmp_path: Path) -> None:
    # Prepare
    text = SMALL.replace("lr = 0.5", "lr = 0.5\nclip_grad_norm = 2.0") + "\n[simulation]\nevaluate_with_train = true\n"
    scenario = load_scenario(_scenario(tmp_path, text))
    # Execute
    config = run_config_for(scenario, build_hospitals(scenario), tmp_path / "out")
    # Assert
    assert config.clip_grad_norm == 2.0 and config.evaluate_with_train
    assert scenario.training.clip_grad_norm == 2.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('rounds = 2\ncolour = "red"', "colour"),
        ('rounds = 0', "rounds"),
        ('rounds = 2\n[simulation]\nnum_cpu = 2', "simulation.num_cpu"),
    ],
)
def test_invalid_scenarios_name_the_field(tmp_path: Path, change: str, message: str) -> None:
    text = SMALL.replace("rounds = 2", change, 1)
    with pytest.raises(InvalidScenarioError, match=message):
        load_scenario(_scenario(tmp_path, text))


def test_natural_manifests_take_no_partition(tmp_path: Path) -> None:
    text = 'name = "x"\n[data]\nkind = "manifests"\npaths = ["a.toml"]\n[partition]\nhospitals = 2\n'
    with pytest.raises(InvalidScenarioError, match=r"\[partition\] is for kind"):
        load_scenario(_scenario(tmp_path, text))


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ('name = "fedavg"', "proximal-mu applies to strategy 'fedprox' only"),
        ('name = "fedprox"\netaa = 0.1', "etaa: Extra inputs are not permitted"),
        ('name = "scaffold"', "unknown strategy 'scaffold'"),
    ],
)
def test_strategy_errors_surface_when_the_scenario_loads(tmp_path: Path, strategy: str, message: str) -> None:
    with pytest.raises(InvalidScenarioError, match=message):
        load_scenario(_scenario(tmp_path, SMALL.replace('name = "fedprox"', strategy)))


# --------------------------------------------------------------------------- external validation


def _external_site(tmp_path: Path, *, drop: int = 0) -> Path:
    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.iloc[:, drop:].copy()
    frame["target"] = 1 - frame["target"]  # 1 = malignant, as the built-in source codes it
    frame.to_csv(tmp_path / "wdbc.csv", index=False)
    manifest = tmp_path / "external.toml"
    manifest.write_text(
        'site = "wdbc-external"\ntask = "binary"\nclasses = [0, 1]\n'
        '[split]\nval = 0.0\ntest = 0.5\nseed = 0\n'
        '[data]\nkind = "table"\npath = "wdbc.csv"\ntarget = "target"\n'
    )
    return manifest


def _saved_model(tmp_path: Path) -> Path:
    config = RunConfig(input_shape=(30,), seed=0)
    arrays = initial_arrays(config)
    arrays = OrderedDict((k, np.zeros_like(v)) for k, v in arrays.items())
    arrays["linear.weight"][0, :] = 1.0  # every standardised feature pushes towards malignant
    arrays["linear.weight"][0, 10:20] = 0.0
    path = tmp_path / "final_model.npz"
    save_model_file(path, arrays, model_meta(config))
    return path


def test_evaluate_a_saved_model_on_another_site(tmp_path: Path) -> None:
    # Prepare
    model, site = _saved_model(tmp_path), _external_site(tmp_path)

    # Execute
    result = CliRunner().invoke(sim_app, ["evaluate", "--model", str(model), "--site", str(site)])

    # Assert
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "external_wdbc-external_test.json").read_text())
    assert written["site"] == "wdbc-external" and written["split"] == "test"
    assert written["num_examples"] == 285
    assert set(written["metrics"]) == {"loss", "accuracy", "balanced_accuracy", "sensitivity", "specificity",
                                       "auroc", "auprc", "brier", "calibration_error"}
    assert written["threshold"] == 0.5 and not written["threshold_stored"]  # a model file without one
    assert written["metrics"]["auroc"] > 0.9
    assert "auroc" in result.output


def test_evaluate_refuses_a_site_with_other_features(tmp_path: Path) -> None:
    model, site = _saved_model(tmp_path), _external_site(tmp_path, drop=2)

    with pytest.raises(ValueError, match=r"input shape.*\(28,\).*expects.*\(30,\)"):
        evaluate_model_file(model, site)
    result = CliRunner().invoke(sim_app, ["evaluate", "--model", str(model), "--site", str(site)])
    assert result.exit_code == 2


# --------------------------------------------------------------------------- a real simulation


@pytest.mark.slow
def test_simulation_end_to_end_writes_summary_metrics_model_and_plots(tmp_path: Path) -> None:
    # Prepare
    scenario = load_scenario(_scenario(tmp_path))
    out = tmp_path / "out"
    seen: list[int] = []

    # Execute
    summary = run_scenario(scenario, out, on_round=lambda r: seen.append(r.round))

    # Assert
    assert summary.status == "completed" and summary.rounds_completed == 2
    assert seen == [1, 2]
    data = json.loads((out / "summary.json").read_text())
    assert data["scenario"] == "e2e" and data["strategy"] == "fedprox"
    assert [h["name"] for h in data["hospitals"]] == ["site-000", "site-001", "site-002"]
    assert data["final_global"]["auroc"] > 0.8
    assert set(data["final_sites"]) == {"site-000", "site-001", "site-002"}
    for site, spent in data["privacy"].items():
        assert 0 < spent["epsilon"] <= 20.0 and spent["delta"] == 1e-5, site
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    assert set(data["rounds"][1]["site_train"]["site-001"]) >= {"epsilon", "delta", "train-loss", "steps"}
    assert {"pooled", "local"} <= set(data["baselines"])
    assert data["gap_vs_pooled"]["auroc"] == pytest.approx(
        data["final_global"]["auroc"] - data["baselines"]["pooled"]["auroc"]
    )
    assert data["wall_time_s"] >= data["federated_time_s"] > 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["site"]) == {"global", "site-000", "site-001", "site-002"}
    assert set(metrics["stage"]) == {"train", "evaluate"}
    assert (out / "final_model.npz").is_file()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all((out / p).stat().st_size > 1000 for p in pngs)
    assert not (out / ".sites").exists()
    assert evaluate_model_file(out / "final_model.npz", _external_site(tmp_path))["metrics"]["auroc"] > 0.8
    # the headline row is the final model scored like the baselines; the sites' own release is kept beside it
    from fedcare.server.checkpoint import build_saved_model, load_model_file
    from fedcare.simulations.baselines import evaluate_centrally

    central = evaluate_centrally(build_saved_model(*load_model_file(out / "final_model.npz")), build_hospitals(scenario))
    assert data["final_global"] == pytest.approx(central.metrics)
    assert data["final_pooled_test"] == pytest.approx(central.pooled_test)
    assert data["final_federated_evaluation"] == data["rounds"][-1]["evaluate"]


@pytest.mark.parametrize("path", sorted(DEFAULT_SCENARIO.parent.glob("*.toml")), ids=lambda p: p.stem)
def test_every_bundled_scenario_loads_and_partitions(path: Path) -> None:
    scenario = load_scenario(path)

    hospitals = build_hospitals(scenario)

    assert len(hospitals) == scenario.num_hospitals
    assert run_config_for(scenario, hospitals, Path("/nonexistent")).num_rounds == scenario.rounds
    # SecAgg+ on, or plain rounds allowed explicitly by the scenario's [policy] table
    policy = scenario.policy
    explicit_plain = (policy is not None and "require_secure_aggregation" in policy.model_fields_set
                      and not policy.require_secure_aggregation)
    assert scenario.secure_aggregation.enabled or explicit_plain, path.name


def test_a_plain_scenario_whose_hospitals_require_secagg_is_refused_before_ray_starts(tmp_path: Path) -> None:
    # Prepare: the small scenario without its policy's require_secure_aggregation = false
    text = SMALL.replace("require_secure_aggregation = false", "")
    scenario = load_scenario(_scenario(tmp_path, text))

    # Execute / Assert
    with pytest.raises(InvalidScenarioError, match=r"\[secure_aggregation\] enabled = true.*require_secure_aggregation = false"):
        run_scenario(scenario, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_simulation_gpus_reach_ray_and_are_refused_where_absent() -> None:
    # Prepare
    cpu = SimulationSettings()
    gpu = SimulationSettings(num_gpus=1, client_num_gpus=0.25)

    # Execute
    config = ray_backend_config(cpu)

    # Assert: CPU by default; a GPU share without GPUs is refused at parse time, and GPUs this
    # machine lacks are refused before anything is written
    assert config["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert config["init_args"]["num_gpus"] == 0
    with pytest.raises(ValidationError, match="num_gpus = 0: give Ray the GPUs"):
        SimulationSettings(client_num_gpus=0.5)
    if torch.cuda.is_available():
        assert ray_backend_config(gpu)["client_resources"]["num_gpus"] == 0.25
    else:
        with pytest.raises(InvalidScenarioError, match="num_gpus = 1 but this machine has 0 CUDA"):
            ray_backend_config(gpu)
