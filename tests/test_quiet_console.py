"""A quiet console: the default simulation fits 80 columns, third-party notices are filtered at
their source (and only those), privacy warnings are logged once per site and study, run folders
are new per run.

The first test runs ``fedcare simulate`` (the README's first command, as
``benchmarks/default_simulate.sh`` does) in a subprocess with ``COLUMNS=80``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fedcare import notices
from fedcare.privacy.errors import PrivacyWarning, log_privacy_warning, warn_privacy
from fedcare.simulations.console import (
    RoundProgress,
    WrappedFormatter,
    default_out_dir,
    quiet_simulation_notices,
    summary_renderables,
)

WIDTH = 80
#: what the console printed before (3,299 lines on heart disease, 45 on the default run): never again
THIRD_PARTY = ("Secure RNG turned off", "FutureWarning", "DEPRECATED FEATURE", "Optimal order is the largest",
               "use PrivacyLedger.open", "Manually terminating", "warnings.warn(")


@pytest.mark.slow
def test_default_simulation_prints_under_60_lines_at_80_columns_with_each_privacy_warning_once(tmp_path: Path) -> None:
    # Prepare: the README's first command, in a fresh folder, on an 80-column console
    env = {**os.environ, "COLUMNS": str(WIDTH), "LINES": "24"}
    env.pop("FORCE_COLOR", None)
    # Execute
    done = subprocess.run(
        [sys.executable, "-c", "from fedcare.cli import main; main()", "simulate"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    # Assert
    output = done.stdout + done.stderr
    lines = output.splitlines()
    assert done.returncode == 0, output[-3000:]
    assert len(lines) < 60, output
    too_wide = [line for line in lines if len(line) > WIDTH]
    assert not too_wide, too_wide
    for notice in THIRD_PARTY:
        assert notice not in output, notice
    # the privacy warning that matters here (SecAgg+ without client-level DP) is said exactly once
    assert output.count("PRIVACY WARNING") == 1, output
    assert "without client-level DP" in output
    # one plain progress line per round (stdout is not a terminal), the local baseline in the table
    assert len(re.findall(r"^round [1-5]/5, [0-9.]+ s, auroc ", done.stderr, flags=re.MULTILINE)) == 5, done.stderr
    header = next(line.split() for line in done.stdout.splitlines() if line.split()[:1] == ["metric"])
    assert header[:4] == ["metric", "federated", "pooled", "local"], done.stdout
    assert re.search(r"^ ?auroc +(0\.\d{4} +){3}", done.stdout, flags=re.MULTILINE), done.stdout
    assert "…" not in output
    # a new timestamped run folder, holding the run
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"\d{8}-\d{6}-breast-cancer-dp", runs[0].name)
    assert (runs[0] / "summary.json").is_file()
    assert (runs[0] / "arms_auroc.png").is_file()


# --- third-party notices: exactly those, at their source -------------------------------------


def _shown(message: str, category: type[Warning], module: str) -> bool:
    """Return whether a warning raised from ``module`` gets past fedcare's filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notices.add_warning_filters()
        warnings.warn_explicit(message, category, filename=f"{module}.py", lineno=1, module=module)
    return bool(caught)


@pytest.mark.parametrize(
    ("message", "category", "module"),
    [
        ("Secure RNG turned off. This is perfectly fine for experimentation as it allows for much faster",
         UserWarning, "opacus.privacy_engine"),
        ("Optimal order is the largest alpha. Please consider expanding the range of alphas to get a tighter "
         "privacy bound.", UserWarning, "opacus.accountants.analysis.rdp"),
        ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var if "
         "num_gpus=0", FutureWarning, "ray._private.worker"),
    ],
)
def test_known_notice_is_filtered(message: str, category: type[Warning], module: str) -> None:
    # Execute / Assert
    assert not _shown(message, category, module)


@pytest.mark.parametrize(
    ("message", "category", "module"),
    [
        # another warning of the same module, the other end of the alpha grid, another module
        ("Secure RNG turned on but something new", UserWarning, "opacus.privacy_engine"),
        ("Optimal order is the smallest alpha. Please consider expanding the range of alphas",
         UserWarning, "opacus.accountants.analysis.rdp"),
        ("Secure RNG turned off. This is perfectly fine for experimentation", UserWarning, "someone.else"),
        ("differential privacy is DISABLED", PrivacyWarning, "fedcare.privacy.settings"),
        ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices",
         DeprecationWarning, "ray._private.worker"),
    ],
)
def test_other_warnings_still_show(message: str, category: type[Warning], module: str) -> None:
    # Execute / Assert
    assert _shown(message, category, module)


def test_flower_notices_are_dropped_and_other_flower_records_kept(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    notices.install_notice_filters()
    flower = logging.getLogger("flwr")
    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        flower.warning("DEPRECATED FEATURE: %s", "The `run_simulation` function is deprecated and will go")
        flower.warning("Manually terminating %s", "ClientAppActor")
        flower.warning("DEPRECATED FEATURE: %s", "something else")
        flower.warning("Manually terminating %s", "SomethingElse")
    # Assert
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["DEPRECATED FEATURE: something else", "Manually terminating SomethingElse"]


def test_baseline_ledger_notice_is_dropped_and_a_real_study_kept(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    from fedcare.privacy.ledger import PrivacyLedger

    quiet_simulation_notices()
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedcare.privacy.ledger"):
        PrivacyLedger.in_memory(site="pooled", study="baseline-pooled")
        PrivacyLedger.in_memory(site="site-1", study="heart-disease")
    # Assert
    texts = [r.getMessage() for r in caplog.records if "in-memory privacy ledger" in r.getMessage()]
    assert len(texts) == 1 and "heart-disease" in texts[0]


# --- privacy warnings once per site and study -----------------------------------------------


def test_privacy_warning_is_logged_once_per_site_and_study_and_raised_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    log = logging.getLogger("fedcare.tests.quiet")
    message = "plain round: the server sees this site's update (test-once)"
    # Execute
    with caplog.at_level(logging.WARNING, logger=log.name), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # three rounds of one study
            warn_privacy(message, logger=log, site="a", study="s1")
        warn_privacy(message, logger=log, site="b", study="s1")  # another site
        warn_privacy(message, logger=log, site="a", study="s2")  # another study
        warn_privacy(message, logger=log)  # nobody named: every call logs
        warn_privacy(message, logger=log)
    # Assert
    logged = [r for r in caplog.records if message in r.getMessage()]
    assert len(logged) == 5
    assert all(r.getMessage().startswith("PRIVACY WARNING: ") for r in logged)
    assert len([w for w in caught if issubclass(w.category, PrivacyWarning)]) == 7


def test_config_privacy_warning_log_is_deduplicated(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    log = logging.getLogger("fedcare.tests.quiet")
    # Execute
    with caplog.at_level(logging.WARNING, logger=log.name):
        first = log_privacy_warning("no client-level DP (test)", logger=log, study="study-x")
        second = log_privacy_warning("no client-level DP (test)", logger=log, study="study-x")
    # Assert
    assert (first, second) == (True, False)
    assert len([r for r in caplog.records if "no client-level DP (test)" in r.getMessage()]) == 1


# --- the live table, the progress lines, the final table --------------------------------------


def _round(n: int, *, site: str = "site-003", loss: float | None = None) -> SimpleNamespace:
    """A finished round as server.checkpoint.RoundRecord exposes it."""
    return SimpleNamespace(
        round=n,
        evaluate={"auroc": 0.6 + n / 100, "accuracy": 0.7, "num-examples": 100},
        train={"epsilon": 0.5 * n, "train-loss": loss if loss is not None else float("nan")},
        worst_site={"site": site, "metric": "auroc", "value": 0.33},
        refusals=[{"site": site, "reason": "budget"}] if n == 2 else [],
    )


def test_live_table_fits_80_columns_with_time_per_round() -> None:
    # Prepare: a terminal 80 columns wide; rounds finishing at t = 10, 12.5, 20 s
    buffer = io.StringIO()
    console = Console(file=buffer, width=WIDTH, force_terminal=True, color_system=None)
    ticks = iter([0.0, 0.0, 10.0, 12.5, 20.0])
    progress = RoundProgress("heart-disease: fedavg, 20 rounds", 20, console, clock=lambda: next(ticks))
    # Execute
    progress.start()
    for n in (1, 2, 3):
        progress(_round(n, site="hungarian", loss=0.25))
    progress.stop()
    plain = Console(file=io.StringIO(), width=WIDTH, color_system=None, record=True)
    plain.print(progress.table())
    text = plain.export_text()
    # Assert: nothing cut, the seconds each round took (not since the start), refusals counted
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert "…" not in text
    header = next(line for line in text.splitlines() if "worst site" in line)
    for column in ("round", "s", "loss", "auroc", "worst site", "max ε", "refused"):
        assert column in header
    rows = [line.split() for line in text.splitlines() if re.match(r"\s*\d+/20", line)]
    assert [r[1] for r in rows] == ["10.0", "2.5", "7.5"]
    assert [r[-1] for r in rows] == ["0", "1", "0"]


def test_no_loss_column_when_no_round_reports_one() -> None:
    # Prepare: SecAgg+ rounds release no training loss
    progress = RoundProgress("x", 5, None)
    progress(_round(1))
    # Execute
    console = Console(file=io.StringIO(), width=WIDTH, color_system=None, record=True)
    console.print(progress.table())
    # Assert
    assert "loss" not in console.export_text()


def test_one_plain_line_per_round_when_not_a_terminal() -> None:
    # Prepare
    buffer = io.StringIO()
    console = Console(file=buffer, width=WIDTH, color_system=None)  # a file: not a terminal
    ticks = iter([0.0, 0.0, 3.0, 4.0])
    progress = RoundProgress("x", 5, console, clock=lambda: next(ticks))
    # Execute
    progress.start()
    progress(_round(1))
    progress(_round(2))
    progress.stop()
    # Assert: printed as each round finished, no table
    assert progress.live is None
    assert buffer.getvalue().splitlines() == [
        "round 1/5, 3.0 s, auroc 0.6100, worst site-003 0.3300, max ε 0.500, refused 0",
        "round 2/5, 1.0 s, auroc 0.6200, worst site-003 0.3300, max ε 1.000, refused 1",
    ]


def _summary(**baselines: Any) -> SimpleNamespace:
    """A run summary as simulations.runner.Summary exposes it."""
    return SimpleNamespace(
        scenario="breast-cancer-dp", status="completed", rounds_completed=5, rounds_planned=5,
        final_global={"auroc": 0.98, "accuracy": 0.93, "balanced_accuracy": 0.92, "auprc": 0.97, "loss": 0.15,
                      "brier": 0.04, "calibration_error": 0.02, "sensitivity": 0.95, "specificity": 0.93},
        final_federated_evaluation={"auroc": 0.5, "accuracy": 0.5},
        baselines=baselines, gap_vs_pooled={"auroc": -0.01},
        privacy={f"site-00{i}": {"epsilon": 2.9, "delta": 1e-5} for i in range(4)} | {"site-004": {"epsilon": 1.0, "delta": 1e-5}},
        wall_time_s=30.0, federated_time_s=20.0, out_dir="runs/x",
    )


def test_final_table_shows_the_local_baseline_and_fits_80_columns() -> None:
    # Prepare
    summary = _summary(pooled={"auroc": 0.99, "accuracy": 0.95}, local={"auroc": 0.97, "accuracy": 0.91})
    console = Console(file=io.StringIO(), width=WIDTH, color_system=None, record=True)
    # Execute
    for renderable in summary_renderables(summary):
        console.print(renderable)
    text = console.export_text()
    # Assert
    header = next(line.split() for line in text.splitlines() if line.split()[:1] == ["metric"])
    rows = {line.split()[0]: line.split() for line in text.splitlines() if re.match(r"\s*\w+ +[0-9-]", line)}
    assert header == ["metric", "federated", "pooled", "local", "as", "released", "fed", "−", "pooled"]
    assert rows["auroc"] == ["auroc", "0.9800", "0.9900", "0.9700", "0.5000", "-0.0100"]
    assert rows["brier"] == ["brier", "0.0400", "-", "-", "-", "-"]
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert "…" not in text
    assert "ε=2.9000 δ=1e-05 at site-000, site-001, site-002, site-003; ε=1.0000 δ=1e-05 at site-004" in " ".join(
        text.split()
    )


def test_log_lines_wrap_to_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    record = logging.LogRecord("fedcare.server.config", logging.WARNING, __file__, 1,
                               "PRIVACY WARNING: %s", ("word " * 60,), None)
    # Execute
    text = WrappedFormatter().format(record)
    # Assert
    lines = text.splitlines()
    assert len(lines) > 1 and all(len(line) <= WIDTH for line in lines)
    assert lines[0].startswith("WARNING fedcare.server.config: PRIVACY WARNING: word")
    assert all(line.startswith("  ") for line in lines[1:])


# --- run folders ------------------------------------------------------------------------------


def test_default_run_folder_is_timestamped_and_never_reused(tmp_path: Path) -> None:
    # Prepare
    now = datetime(2026, 12, 7, 20, 15, 0)
    # Execute
    first = default_out_dir("heart disease/x", now=now, root=tmp_path)
    first.mkdir()
    second = default_out_dir("heart disease/x", now=now, root=tmp_path)
    # Assert
    assert first == tmp_path / "20261207-201500-heart_disease_x"
    assert second == tmp_path / "20261207-201500-heart_disease_x-2"


def test_two_simulate_runs_without_out_use_two_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the runner replaced by one that leaves a checkpoint, as a real run does
    from fedcare import cli
    from fedcare.simulations import runner

    seen: list[Path] = []

    def fake_run(spec: Any, out_dir: Path, *, resume: bool, console: Any, **_: Any) -> SimpleNamespace:
        out = Path(out_dir)
        if (out / "checkpoints" / "checkpoint.npz").exists() and not resume:
            raise AssertionError(f"{out} reused")
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "checkpoint.npz").write_bytes(b"x")
        seen.append(out)
        return _summary(pooled={"auroc": 0.99})

    monkeypatch.setattr(runner, "run_scenario", fake_run)
    monkeypatch.chdir(tmp_path)
    cli_runner = CliRunner()
    # Execute
    results = [cli_runner.invoke(cli.app, ["simulate"]) for _ in range(2)]
    resumed = cli_runner.invoke(cli.app, ["simulate", "--resume"])
    # Assert
    assert [r.exit_code for r in results] == [0, 0], [r.output for r in results]
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(p.parent == Path("runs") and re.fullmatch(r"\d{8}-\d{6}-breast-cancer-dp(-\d+)?", p.name) for p in seen)
    assert resumed.exit_code == 2 and "--out" in resumed.output
