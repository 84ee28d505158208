"""report.html (simulations/report_html.py): self-contained, the run's metrics with intervals, ε, provenance.

A real run writes the report too: ``tests/test_tracking.py::test_the_tracked_run_writes_provenance_and_the_html_report``.
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from fedcare.simulations.plots import plot_summary
from fedcare.simulations.provenance import collect_provenance
from fedcare.simulations.report_html import REPORT_FILE, render_report, write_report


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of every table cell."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells[-1] += data


def _parse(text: str) -> _Tags:
    parser = _Tags()
    parser.feed(text)
    return parser


def _rounds() -> list[dict[str, Any]]:
    return [
        {"round": r, "train": {"train-loss": 0.6 / r, "epsilon": 1.5 * r},
         "evaluate": {"auroc": 0.8 + 0.05 * r, "num-examples": 100},
         "site_train": {"north": {"epsilon": 1.5 * r, "delta": 1e-5}, "<b>south</b>": {"epsilon": 1.0 * r, "delta": 1e-5}},
         "site_evaluate": {"north": {"auroc": 0.8 + 0.04 * r}, "<b>south</b>": {"auroc": 0.79 + 0.05 * r}},
         "refusals": [], "complete": True}
        for r in (1, 2)
    ]  # fmt: skip


def _summary(tmp_path: Path) -> dict[str, Any]:
    rounds = _rounds()
    scenario = tmp_path / "scenario.toml"
    scenario.write_text('name = "report"\n')
    (tmp_path / "privacy_report.md").write_text("# Privacy report\n\nsite north: ε = 3.0000\n")
    summary: dict[str, Any] = {
        "scenario": "report", "status": "completed", "reason": None, "strategy": "fedavg",
        "hospitals": [{"name": "north", "train": 100, "val": 20, "test": 30},
                      {"name": "<b>south</b>", "train": 80, "val": 15, "test": 25}],
        "rounds_planned": 2, "rounds_completed": 2,
        "final_global": {"auroc": 0.91, "accuracy": 0.88, "accuracy_low": 0.81, "accuracy_high": 0.93},
        "final_global_intervals": {"auroc": [0.86, 0.95]},
        "final_pooled_test": {}, "final_federated_evaluation": rounds[-1]["evaluate"],
        "final_sites": rounds[-1]["site_evaluate"],
        "privacy": {"north": {"epsilon": 3.0, "delta": 1e-5}, "<b>south</b>": {"epsilon": 2.0, "delta": 1e-5}},
        "rounds": rounds,
        "baselines": {
            "pooled": {"auroc": 0.93, "accuracy": 0.9, "intervals": {"auroc": [0.9, 0.96]}, "sites": {}},
            "local": {"auroc": 0.85, "accuracy": 0.8, "sites": {"north": {"auroc": 0.86}, "<b>south</b>": {"auroc": 0.84}}},
        },
        "gap_vs_pooled": {"auroc": -0.02}, "wall_time_s": 12.5, "federated_time_s": 10.0, "out_dir": str(tmp_path),
        "files": {"summary": str(tmp_path / "summary.json")},
        "release": {"released": True, "report": str(tmp_path / "privacy_report.json")},
        "configuration": {"name": "report", "rounds": 2, "training": {"lr": 0.05, "batch_size": 32}},
        "provenance": collect_provenance(scenario, seed=7, overrides=["training.lr=0.05"]).model_dump(mode="json"),
    }  # fmt: skip
    summary["files"].update({k: str(v) for k, v in plot_summary(summary, tmp_path).items()})
    return summary


def test_the_report_is_self_contained_and_embeds_every_plot_the_run_drew(tmp_path: Path) -> None:
    # Prepare
    summary = _summary(tmp_path)
    plots = {k: Path(v) for k, v in summary["files"].items() if k.startswith("plot")}

    # Execute
    path = write_report(summary, tmp_path)

    # Assert: no script, stylesheet link or remote resource; each plot's bytes, base64 in the page
    parsed = _parse(path.read_text(encoding="utf-8"))
    assert path.name == REPORT_FILE
    assert len(plots) == 3  # metric per round, ε per round, pooled / local / federated
    assert not [t for t, _ in parsed.tags if t in ("script", "link", "iframe", "object")]
    sources = [a["src"] or "" for t, a in parsed.tags if t == "img"]
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = sorted(base64.b64decode(s.split(",", 1)[1]) for s in sources)
    assert embedded == sorted(p.read_bytes() for p in plots.values())
    assert not [a for _, a in parsed.tags for k, v in a.items() if k in ("src", "href") and v and "://" in v]


def test_the_report_shows_metrics_with_intervals_baselines_and_epsilon_per_site(tmp_path: Path) -> None:
    # Prepare
    summary = _summary(tmp_path)

    # Execute
    cells = _parse(render_report(summary)).cells

    # Assert: the three interval spellings a summary may carry
    assert "0.9100 [0.8600, 0.9500]" in cells  # final_global_intervals
    assert "0.8800 [0.8100, 0.9300]" in cells  # accuracy_low / accuracy_high
    assert "0.9300 [0.9000, 0.9600]" in cells  # a baseline's nested intervals
    assert {"pooled baseline", "local baseline", "federated (scored on every site's evaluation split)"} <= set(cells)
    north = cells.index("north", cells.index("site"))  # the per-site table: metrics, ε, δ, local-only
    assert cells[north : north + 6] == ["north", "100 / 20 / 30", "0.8800", "3.0000", "1e-05", "0.8600"]


def test_the_report_shows_provenance_configuration_and_the_privacy_report(tmp_path: Path) -> None:
    # Prepare
    summary = _summary(tmp_path)
    provenance = summary["provenance"]

    # Execute
    text = render_report(summary)
    cells = _parse(text).cells

    # Assert
    for key in ("scenario_sha256", "git_commit", "seed", "overrides", "fedcare version", "flwr version",
                "torch version", "opacus version", "training.lr"):  # fmt: skip
        assert key in cells, key
    assert cells[cells.index("scenario_sha256") + 1] == provenance["scenario_sha256"]
    assert cells[cells.index("overrides") + 1] == "training.lr=0.05"
    assert cells[cells.index("training.lr") + 1] == "0.05"
    assert "site north: ε = 3.0000" in text  # the privacy report, verbatim


def test_names_from_the_summary_are_escaped(tmp_path: Path) -> None:
    summary = _summary(tmp_path)

    text = render_report(summary)

    assert "<b>south</b>" not in text
    assert "&lt;b&gt;south&lt;/b&gt;" in text


def test_an_older_summary_without_provenance_or_rounds_still_renders(tmp_path: Path) -> None:
    summary = {"scenario": "old", "status": "stopped", "reason": "too few sites", "rounds": [], "files": {}}

    text = render_report(summary)

    assert "carries no provenance" in text and "carries no configuration" in text
    assert "No finished round." in text and "too few sites" in text
    json.dumps(summary)  # untouched, still JSON
    assert summary == {"scenario": "old", "status": "stopped", "reason": "too few sites", "rounds": [], "files": {}}
