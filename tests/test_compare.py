"""``fedcare compare RUN_DIR...`` (simulations/compare.py): runs side by side from their summary.json."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.simulations.compare import compare_rows


def _run(folder: Path, *, lr: float, auroc: float, epsilon: float, commit: str) -> Path:
    folder.mkdir(parents=True)
    summary: dict[str, Any] = {
        "scenario": "sweep", "status": "completed", "strategy": "fedavg", "rounds_planned": 3, "rounds_completed": 3,
        "final_global": {"auroc": auroc, "accuracy": 0.9, "num-examples": 120},
        "final_global_intervals": {"auroc": [auroc - 0.05, auroc + 0.03]},
        "baselines": {"pooled": {"auroc": 0.95, "intervals": {"auroc": [0.9, 0.98]}, "sites": {"a": {"auroc": 0.9}}}},
        "privacy": {"a": {"epsilon": epsilon, "delta": 1e-5}, "b": {"epsilon": epsilon / 2, "delta": 1e-5}},
        "wall_time_s": 30.0,
        "configuration": {"name": "sweep", "seed": 0, "training": {"lr": lr, "batch_size": 32}},
        "provenance": {"seed": 0, "versions": {"fedcare": "0.1.0"}, "git_commit": commit},
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _table(rows: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in rows}


def test_compare_shows_what_differs_the_metrics_with_intervals_and_epsilon(tmp_path: Path) -> None:
    # Prepare: two runs of a learning-rate sweep
    slow = _run(tmp_path / "lr-0.01", lr=0.01, auroc=0.9, epsilon=3.0, commit="a" * 40)
    fast = _run(tmp_path / "lr-0.1", lr=0.1, auroc=0.93, epsilon=2.5, commit="a" * 40)

    # Execute
    headers, rows = compare_rows([slow, fast])
    table = _table(rows)

    # Assert: the changed value is a row, the unchanged ones are not; counts are not metrics
    assert headers == ["", "lr-0.01", "lr-0.1"]
    assert table["training.lr"] == ["0.01", "0.1"]
    assert "training.batch_size" not in table and "name" not in table
    assert table["federated auroc"] == ["0.9000 [0.8500, 0.9300]", "0.9300 [0.8800, 0.9600]"]
    assert table["pooled auroc"] == ["0.9500 [0.9000, 0.9800]", "0.9500 [0.9000, 0.9800]"]
    assert "federated num-examples" not in table
    assert table["max ε (sites)"] == ["3.0000", "2.5000"]
    assert table["git commit"] == ["aaaaaaaaaaaa", "aaaaaaaaaaaa"]
    assert table["rounds"] == ["3/3", "3/3"]


def test_fedcare_compare_prints_csv_for_scripts(tmp_path: Path) -> None:
    # Prepare
    runs = [_run(tmp_path / f"lr-{lr}", lr=lr, auroc=0.9, epsilon=1.0, commit="b" * 40) for lr in (0.01, 0.1)]

    # Execute
    result = CliRunner().invoke(app, ["compare", "--csv", *map(str, runs)])

    # Assert
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["key", "lr-0.01", "lr-0.1"]
    assert ["training.lr", "0.01", "0.1"] in rows


def test_fedcare_compare_prints_a_table(tmp_path: Path) -> None:
    runs = [_run(tmp_path / f"run{i}", lr=0.01 * (i + 1), auroc=0.9, epsilon=1.0, commit="c" * 40) for i in range(2)]

    result = CliRunner().invoke(app, ["compare", *map(str, runs)], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    assert "training.lr" in result.stdout and "run0" in result.stdout and "run1" in result.stdout


def test_a_folder_without_summary_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    result = CliRunner().invoke(app, ["compare", str(tmp_path / "empty")])

    assert result.exit_code == 2
    assert "summary.json not found; pass run folders written by `fedcare simulate`" in result.stderr
