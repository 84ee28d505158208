"""Experiment tracking (server/tracking.py, simulations/tracking.py): read back through MLflow's and TensorBoard's own readers.

The simulation test runs a small scenario once through ``fedcare simulate`` with ``--set``,
``--mlflow-uri`` (a local sqlite store) and ``--tensorboard``, then reads the MLflow run with
``mlflow.tracking.MlflowClient`` and the event file with TensorBoard's ``EventAccumulator``, and
checks that parameters, per-round global and per-site metrics, ε and the final metrics equal
what ``summary.json`` holds. The deployment test runs the ServerApp a deployment loads (``app``)
on an in-process grid, with the tracking keys ``fedcare run`` sends as run-config overrides.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from scenarios import dp_breast_cancer_scenario  # noqa: E402
from scripted_apps import scripted_app  # noqa: E402

from fedcare.server.config import RunConfig  # noqa: E402
from fedcare.server.tracking import (  # noqa: E402
    MLFLOW_URI_KEY,
    TENSORBOARD_KEY,
    TRACKING_DEFAULTS,
    Tracker,
    TrackingError,
    flatten_params,
    round_metrics,
    split_tracking,
    tracking_settings,
)

mlflow_tracking = pytest.importorskip("mlflow.tracking")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

SCENARIO = dp_breast_cancer_scenario(
    "tracked", rounds=3, max_epsilon_total=20.0, header='baselines = ["pooled", "local"]',
    policy='evaluation = "exact"',
    tables="[simulation]\nround_timeout_s = 600   # a shared CI machine may start Ray's workers slowly\n",
)


def _mlflow_run(uri: str, experiment: str) -> Any:
    client = mlflow_tracking.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _events(folder: Path) -> Any:
    (run_dir,) = [p for p in folder.iterdir() if p.is_dir()]
    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _text(accumulator: Any, tag: str) -> str:
    return accumulator.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode("utf-8")


def _f32(value: float) -> float:
    """TensorBoard stores scalars as float32."""
    return float(np.float32(value))


# --------------------------------------------------------------------------- what is logged (fast)


def test_round_metrics_name_global_per_site_and_epsilon_and_skip_what_is_not_a_number() -> None:
    # Prepare
    record = {
        "round": 2,
        "train": {"train-loss": 0.5, "epsilon": 1.25},
        "evaluate": {"auroc": 0.9, "accuracy": None},
        "site_train": {"site a": {"epsilon": 1.25, "train-loss": 0.4, "flag": True}},
        "site_evaluate": {"site a": {"auroc": float("nan"), "accuracy": 0.8}},
    }

    # Execute
    metrics = round_metrics(record)

    # Assert: None, NaN and booleans are left out; an odd character in a site name becomes "_"
    assert metrics == {
        "train/train-loss": 0.5,
        "train/epsilon": 1.25,
        "evaluate/auroc": 0.9,
        "epsilon/site a": 1.25,
        "site/site a/train/train-loss": 0.4,
        "site/site a/evaluate/accuracy": 0.8,
    }
    assert round_metrics({"round": 1, "site_train": {"a<b>": {"epsilon": 2.0}}}) == {"epsilon/a_b_": 2.0}


def test_flatten_params_gives_dotted_keys_and_json_lists() -> None:
    flat = flatten_params({"training": {"lr": 0.1, "batch_size": 32}, "baselines": ["pooled"], "policy": None})

    assert flat == {"training.lr": "0.1", "training.batch_size": "32", "baselines": '["pooled"]', "policy": "None"}


def test_a_uri_with_credentials_is_refused_without_repeating_it() -> None:
    # the run config (where `fedcare run` puts the URI) reaches every hospital
    with pytest.raises(TrackingError, match="holds credentials") as caught:
        tracking_settings(mlflow_uri="https://alice:s3cret@mlflow.example.org")
    assert "s3cret" not in str(caught.value)
    with pytest.raises(TrackingError, match="quotes"):
        tracking_settings(mlflow_uri='sqlite:///x".db')
    assert not tracking_settings(mlflow_uri="", tensorboard_dir="").enabled


def test_split_tracking_takes_the_keys_out_of_the_run_config() -> None:
    # Prepare
    raw = {"input-shape": "3", MLFLOW_URI_KEY: "sqlite:////tmp/x.db", TENSORBOARD_KEY: ""}

    # Execute
    settings, rest = split_tracking(raw)

    # Assert
    assert rest == {"input-shape": "3"}
    assert settings.mlflow_uri == "sqlite:////tmp/x.db" and settings.tensorboard_dir is None
    assert not split_tracking({"input-shape": "3", **TRACKING_DEFAULTS})[0].enabled


class _Broken:
    name = "broken"

    def log_params(self, params: Any) -> None:
        raise ConnectionError("tracking server down")

    def log_metrics(self, metrics: Any, step: int) -> None:
        raise AssertionError("a dropped sink is not called again")

    def log_artifacts(self, paths: Any) -> None:
        raise AssertionError("a dropped sink is not called again")

    def close(self, status: str) -> None:
        raise AssertionError("a dropped sink is not called again")


class _Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def log_params(self, params: Any) -> None:
        self.calls.append(("params", dict(params)))

    def log_metrics(self, metrics: Any, step: int) -> None:
        self.calls.append(("metrics", (dict(metrics), step)))

    def log_artifacts(self, paths: Any) -> None:
        self.calls.append(("files", list(paths)))

    def close(self, status: str) -> None:
        self.calls.append(("close", status))


def test_a_failing_sink_is_dropped_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    good = _Recorder()
    tracker = Tracker([_Broken(), good])

    # Execute
    tracker.log_params({"a": "1"})
    tracker.log_round({"round": 1, "evaluate": {"auroc": 0.7}})
    tracker.close("completed")

    # Assert
    assert good.calls == [("params", {"a": "1"}), ("metrics", ({"evaluate/auroc": 0.7}, 1)), ("close", "completed")]
    assert "broken tracking failed while logging parameters (ConnectionError)" in caplog.text
    assert not tracker.active


def test_tracking_is_off_unless_asked_for() -> None:
    tracker = Tracker.open(None)

    assert not tracker.active
    assert tracker.round_callback(None) is None


def test_a_missing_library_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare: neither library importable (None in sys.modules makes `import` raise ImportError)
    for name in ("mlflow", "mlflow.exceptions", "mlflow.tracking", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)

    # Execute / Assert
    with pytest.raises(TrackingError, match=r"--mlflow-uri needs MLflow: pip install 'fedcare\[tracking\]'"):
        Tracker.open(tracking_settings(mlflow_uri=f"sqlite:///{tmp_path / 'x.db'}"))
    with pytest.raises(TrackingError, match=r"--tensorboard needs TensorBoard: pip install 'fedcare\[tracking\]'"):
        Tracker.open(tracking_settings(tensorboard_dir=tmp_path / "tb"))


def test_neither_library_is_imported_unless_asked_for() -> None:
    # Prepare: a fresh interpreter loads the CLI, the runner and the deployed ServerApp
    code = ("import sys, fedcare.cli, fedcare.simulations.runner, fedcare.server.app; "
            "print(sorted(m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))")  # fmt: skip

    # Execute
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------- a simulation, read back


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the scenario once with both sinks and ``--set``; return the folders and summary.json."""
    from fedcare.simulations.cli import app as sim_app

    root = tmp_path_factory.mktemp("tracked")
    scenario = root / "scenario.toml"
    scenario.write_text(SCENARIO)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = CliRunner().invoke(
        sim_app,
        ["simulate", str(scenario), "--out", str(root / "out"), "--set", "rounds=2", "--set", "training.lr=0.4",
         "--mlflow-uri", uri, "--tensorboard", str(root / "tb")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((root / "out" / "summary.json").read_text())
    return {"root": root, "uri": uri, "summary": summary}


@pytest.mark.slow
def test_mlflow_holds_the_parameters_rounds_epsilon_and_final_metrics_of_summary_json(tracked_run: dict[str, Any]) -> None:
    # Prepare
    summary = tracked_run["summary"]

    # Execute
    client, run = _mlflow_run(tracked_run["uri"], "tracked")

    # Assert: parameters = the configuration as it ran (the --set overrides applied)
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten_params(summary["configuration"])
    assert run.data.params["training.lr"] == "0.4" and run.data.params["rounds"] == "2"
    assert run.data.tags["fedcare.version"] == summary["provenance"]["versions"]["fedcare"]
    assert run.data.tags["scenario.sha256"] == summary["provenance"]["scenario_sha256"]
    # per round: global and per-site metrics, ε of every site, each at step = round
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for name, expected in round_metrics(summary["rounds"][0]).items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        last = round_metrics(summary["rounds"][-1]).get(name)
        assert history[1] == expected, name
        assert history.get(2) == last, name
    for site, spent in summary["privacy"].items():
        history = client.get_metric_history(run.info.run_id, f"epsilon/{site}")
        assert [(m.step, m.value) for m in history][-1] == (2, spent["epsilon"])
    site = sorted(summary["final_sites"])[0]
    assert run.data.metrics[f"site/{site}/evaluate/auroc"] == summary["rounds"][-1]["site_evaluate"][site]["auroc"]
    # the final model scored as the baselines are, and the baselines
    for metric, value in summary["final_global"].items():
        if isinstance(value, float) and math.isfinite(value):
            assert run.data.metrics[f"final/{metric}"] == value, metric
    assert run.data.metrics["baseline/pooled/auroc"] == summary["baselines"]["pooled"]["auroc"]
    assert run.data.metrics["baseline/local/auroc"] == summary["baselines"]["local"]["auroc"]
    # the run's files, never the model
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.csv", "report.html", "privacy_report.json", "privacy_report.md"} <= files
    assert not any(f.startswith("final_model") for f in files)
    # a local store keeps its files beside the database, not in the current folder
    assert (tracked_run["root"] / "mlartifacts").is_dir()


@pytest.mark.slow
def test_tensorboard_holds_the_parameters_rounds_and_epsilon_of_summary_json(tracked_run: dict[str, Any]) -> None:
    # Prepare
    summary = tracked_run["summary"]

    # Execute
    events = _events(tracked_run["root"] / "tb")

    # Assert
    params = json.loads(re.sub(r"^```\n|\n```$", "", _text(events, "params")))
    assert params == flatten_params(summary["configuration"])
    assert _text(events, "status") == "completed"
    expected: dict[str, dict[int, float]] = {}
    for record in summary["rounds"]:
        for name, value in round_metrics(record).items():
            expected.setdefault(name, {})[record["round"]] = _f32(value)
    scalars = set(events.Tags()["scalars"])
    assert set(expected) <= scalars
    for name, by_round in expected.items():
        assert {e.step: e.value for e in events.Scalars(name)} == by_round, name
    for site, spent in summary["privacy"].items():
        assert events.Scalars(f"epsilon/{site}")[-1].value == _f32(spent["epsilon"])
    assert events.Scalars("final/auroc")[-1].value == _f32(summary["final_global"]["auroc"])
    assert events.Scalars("baseline/pooled/auroc")[-1].value == _f32(summary["baselines"]["pooled"]["auroc"])


@pytest.mark.slow
def test_the_tracked_run_writes_provenance_and_the_html_report(tracked_run: dict[str, Any]) -> None:
    summary = tracked_run["summary"]
    provenance = summary["provenance"]

    assert provenance["overrides"] == ["rounds=2", "training.lr=0.4"]
    assert provenance["scenario_file"] == str((tracked_run["root"] / "scenario.toml").resolve())
    assert provenance["seed"] == 1 and set(provenance["versions"]) >= {"fedcare", "flwr", "torch", "opacus"}
    report = Path(summary["files"]["report_html"]).read_text()
    assert report.count("data:image/png;base64,") == len([k for k in summary["files"] if k.startswith("plot")])
    assert provenance["scenario_sha256"] in report


# --------------------------------------------------------------------------- a deployment's ServerApp


def test_the_deployed_server_app_logs_each_round_from_the_run_config_overrides(tmp_path: Path) -> None:
    # Prepare: the run config a deployment's ServerApp receives: the app's keys + fedcare run's overrides
    from fedcare.server.app import app as deployed_server_app
    from fedcare.server.checkpoint import HISTORY_FILE
    from fedcare.simulations.inprocess import InProcessGrid

    config = RunConfig(study="deployed", input_shape=(3,), num_rounds=2, min_sites=2, seed=1,
                       checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_config = {**config.to_run_config(), MLFLOW_URI_KEY: uri, TENSORBOARD_KEY: str(tmp_path / "tb")}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)

    # Execute
    deployed_server_app(InProcessGrid(scripted_app(epsilon_per_round=True), num_nodes=3), context)

    # Assert: MLflow and TensorBoard hold the run config and every round of history.json
    history = json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())
    rounds = [r for r in history["rounds"] if r.get("complete", True)]
    client, run = _mlflow_run(uri, "deployed")
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten_params(config.to_run_config())
    events = _events(tmp_path / "tb")
    for record in rounds:
        for name, value in round_metrics(record).items():
            mlflow_values = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
            assert mlflow_values[record["round"]] == value, name
            assert {e.step: e.value for e in events.Scalars(name)}[record["round"]] == _f32(value), name
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epsilon/hospital-2")] == [1.5, 3.0]


def test_fedcare_run_overrides_reach_the_server_app_through_flowers_own_config_merge(tmp_path: Path) -> None:
    # Prepare: a study's app, and the --run-config arguments `fedcare run --mlflow-uri --tensorboard` passes
    import tomllib

    from flwr.common.config import fuse_dicts, parse_config_args

    from fedcare.server.deploy import _run_config_args
    from fedcare.server.flower_app import build_flower_app, load_study

    study_file = tmp_path / "study.toml"
    study_file.write_text('[study]\nname = "tracked"\n[run]\ninput-shape = "3"\nnum-server-rounds = 2\n')
    study = load_study(study_file)
    folder = build_flower_app(study, tmp_path / "app")
    config = tomllib.loads((folder / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tracking_settings(mlflow_uri=uri, tensorboard_dir=tmp_path / "tb").run_config_overrides()
    args = _run_config_args(overrides)

    # Execute: what flwr run parses and the SuperLink merges (it refuses a key the app lacks)
    fused = fuse_dicts(config, parse_config_args(args[1::2]), check_keys=True)
    settings, rest = split_tracking(fused)

    # Assert: the app ships the keys empty (tracking off, same app and hash either way); the
    # ServerApp reads the overrides and its RunConfig is the study's
    assert {k: config[k] for k in TRACKING_DEFAULTS} == TRACKING_DEFAULTS
    assert args[0::2] == ["--run-config", "--run-config"]
    assert settings.mlflow_uri == uri and settings.tensorboard_dir == (tmp_path / "tb").resolve()
    assert RunConfig.from_run_config(rest) == study.run_config()
