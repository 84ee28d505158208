"""Plots: real PNG files for a metric per round, ε per round and the arms; clear errors on bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedcare.simulations.history import RoundRecord, history_from_rounds
from fedcare.simulations.plots import (
    PlotInputError,
    headline_metric,
    plot_arms,
    plot_epsilon_per_round,
    plot_metric_per_round,
    plot_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def history(num_sites: int = 3, rounds: int = 4) -> list[RoundRecord]:
    """A small made-up history."""
    sites = [f"site-{i:03d}" for i in range(num_sites)]
    return [
        RoundRecord(
            round=r,
            global_metrics={"auroc": 0.6 + 0.05 * r, "accuracy": 0.7},
            site_metrics={s: {"auroc": 0.55 + 0.05 * r + 0.01 * i} for i, s in enumerate(sites)},
            site_epsilon={s: 0.4 * r * (1 + 0.1 * i) for i, s in enumerate(sites)},
        )
        for r in range(1, rounds + 1)
    ]


def assert_png(path: Path) -> None:
    """The file exists, is not empty and starts with the PNG signature."""
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


def test_metric_per_round_writes_a_png(tmp_path: Path) -> None:
    # Execute
    out = plot_metric_per_round(history(), "auroc", tmp_path / "nested" / "auroc.png")
    # Assert
    assert out == tmp_path / "nested" / "auroc.png"
    assert_png(out)


def test_metric_per_round_with_many_sites_and_unsorted_rounds(tmp_path: Path) -> None:
    # Prepare
    records = list(reversed(history(num_sites=300, rounds=3)))
    # Execute
    out = plot_metric_per_round(records, "auroc", tmp_path / "many.png")
    # Assert
    assert_png(out)


def test_epsilon_per_round_writes_a_png(tmp_path: Path) -> None:
    # Execute
    out = plot_epsilon_per_round(history(num_sites=12), tmp_path / "eps.png")
    # Assert
    assert_png(out)


def test_arms_bar_chart_writes_a_png(tmp_path: Path) -> None:
    # Prepare
    results = {
        "pooled": {"auroc": 0.95, "sites": {"site-000": {"auroc": 0.94}}},
        "local": {"auroc": 0.81, "sites": {"site-000": {"auroc": 0.78}, "site-001": {"auroc": 0.84}}},
        "federated": {"auroc": 0.93},
    }
    # Execute
    out = plot_arms(results, "auroc", tmp_path / "arms.png")
    # Assert
    assert_png(out)


@pytest.mark.parametrize(
    "draw",
    [
        lambda p: plot_metric_per_round([], "auroc", p),
        lambda p: plot_epsilon_per_round([], p),
    ],
)
def test_empty_history_raises_a_clear_error(tmp_path: Path, draw) -> None:  # type: ignore[no-untyped-def]
    # Execute / Assert
    with pytest.raises(PlotInputError, match="empty history"):
        draw(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(PlotInputError, match="pick one of: accuracy, auroc"):
        plot_metric_per_round(history(), "rmse", tmp_path / "x.png")
    with pytest.raises(PlotInputError, match="RoundRecord"):
        plot_metric_per_round([{"round": 1}], "auroc", tmp_path / "x.png")  # type: ignore[list-item]
    no_eps = [RoundRecord(round=1, global_metrics={"auroc": 0.5})]
    with pytest.raises(PlotInputError, match="no round reports a site's ε"):
        plot_epsilon_per_round(no_eps, tmp_path / "x.png")
    with pytest.raises(PlotInputError, match="no arms"):
        plot_arms({}, "auroc", tmp_path / "x.png")
    with pytest.raises(PlotInputError, match="arm 'local' has no value for 'auroc'; it reports: rmse"):
        plot_arms({"pooled": {"auroc": 0.9}, "local": {"rmse": 1.0}}, "auroc", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_round_record_is_frozen_validated_and_reads_null_as_nan() -> None:
    # Prepare
    record = RoundRecord(round=2, global_metrics={"auroc": None}, site_metrics={"a": {"auroc": None}})  # type: ignore[dict-item]
    # Assert
    assert math.isnan(record.global_metrics["auroc"]) and math.isnan(record.site_metrics["a"]["auroc"])
    with pytest.raises(ValidationError):
        record.round = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        RoundRecord(round=0)
    with pytest.raises(ValidationError):
        RoundRecord(round=1, extra=1)  # type: ignore[call-arg]


def test_history_from_runner_rounds() -> None:
    # Prepare: the runner's history.json shape (server.checkpoint.RoundRecord.to_dict)
    rounds = [
        {
            "round": 1, "complete": True,
            "train": {"train-loss": 0.6, "epsilon": 0.9},
            "evaluate": {"auroc": 0.8, "num-examples": 100},
            "site_train": {"a": {"epsilon": 0.9, "delta": 1e-5}, "b": {"epsilon": 0.7, "delta": 1e-5}},
            "site_evaluate": {"a": {"auroc": 0.82, "num-examples": 60}, "b": {"auroc": 0.77, "num-examples": 40}},
        },
        {"round": 2, "complete": False, "evaluate": {"auroc": 0.9}},
    ]
    # Execute
    records = history_from_rounds(rounds)
    # Assert
    assert records == [
        RoundRecord(
            round=1, global_metrics={"auroc": 0.8}, site_metrics={"a": {"auroc": 0.82}, "b": {"auroc": 0.77}},
            site_epsilon={"a": 0.9, "b": 0.7},
        )
    ]


def test_plot_summary_draws_what_the_runner_summary_holds(tmp_path: Path) -> None:
    # Prepare
    summary = {
        "rounds": [
            {
                "round": r, "complete": True, "evaluate": {"auroc": 0.7 + 0.05 * r},
                "site_train": {"a": {"epsilon": 0.5 * r}}, "site_evaluate": {"a": {"auroc": 0.7}},
            }
            for r in (1, 2, 3)
        ],
        "final_global": {"auroc": 0.85},
        "final_sites": {"a": {"auroc": 0.86}},
        "baselines": {"pooled": {"auroc": 0.9, "sites": {"a": {"auroc": 0.9}}, "privacy": {"epsilon": 1.0}}},
    }
    # Execute
    files = plot_summary(summary, tmp_path)
    # Assert
    assert set(files) == {"plot_metric", "plot_epsilon", "plot_arms"}
    for path in files.values():
        assert_png(path)
    assert plot_summary({"rounds": [], "final_global": {}}, tmp_path / "none") == {}


def test_headline_metric_prefers_auroc_then_accuracy_then_rmse() -> None:
    # Assert
    assert headline_metric({"accuracy": 0.8, "auroc": 0.9}) == "auroc"
    assert headline_metric({"loss": 0.3, "accuracy": 0.8}) == "accuracy"
    assert headline_metric({"mae": 1.0, "rmse": 2.0}) == "rmse"
    assert headline_metric({"train-loss": 1.0}) is None
