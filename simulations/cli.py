"""``fedcare simulate`` and ``fedcare evaluate``: thin commands over the simulation runner.

Root wiring (``cli.py``)::

    app.command("simulate")(simulate)
    app.command("evaluate")(evaluate)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app", "evaluate", "simulate"]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Simulations and external validation.",
    pretty_exceptions_enable=False,  # rich's tracebacks with locals print data (cli.main prints one line)
    pretty_exceptions_show_locals=False,
)

_console = Console()
_errors = Console(stderr=True, soft_wrap=True)


def _fail(exc: BaseException, code: int) -> typer.Exit:
    """Print ``exc`` as one line on stderr (no markup, no wrapping) and return the exit to raise."""
    _errors.print("[red]error:[/red] ", end="")
    _errors.print(" ".join(str(exc).split()), markup=False, highlight=False)
    return typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    """Log warnings (or everything with --verbose) to stderr, one plain line per record.

    The format is the logger's name and fedcare's message only (no traceback with locals, no
    wrapping). Flower configures its own ``flwr`` logger and console handler when it is imported;
    call this after the imports. Its records are not propagated as well (they would print twice).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    flower = logging.getLogger("flwr")
    flower.setLevel(level)
    flower.propagate = False


def _fmt(value: object) -> str:
    """Format a metric value ("-" when missing or NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@app.command("simulate")
def simulate(
    scenario: Annotated[
        Optional[Path], typer.Argument(help="Scenario TOML (default: the built-in breast-cancer scenario).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("fedcare-sim"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log Flower's and fedcare's progress.")] = False,
) -> None:
    """Run a federated simulation scenario and write summary.json, metrics.csv, the model and plots."""
    from ..client.errors import DataValidationError  # noqa: PLC0415 - keep --help fast
    from ..privacy.artefacts import KeyFileError  # noqa: PLC0415
    from ..privacy.audit import AuditError  # noqa: PLC0415
    from ..server.app import CheckpointExistsError, ResumeMismatchError  # noqa: PLC0415
    from ..server.checkpoint import CheckpointError  # noqa: PLC0415
    from .release import LedgerMismatchError  # noqa: PLC0415
    from .runner import run_scenario  # noqa: PLC0415
    from .scenario import DEFAULT_SCENARIO, InvalidScenarioError, load_scenario  # noqa: PLC0415

    _setup_logging(verbose)
    try:
        spec = load_scenario(scenario or DEFAULT_SCENARIO)
        summary = run_scenario(spec, out, resume=resume, console=_errors)
    except (InvalidScenarioError, DataValidationError, CheckpointExistsError, ResumeMismatchError) as exc:
        raise _fail(exc, 2) from None
    except (CheckpointError, KeyFileError, AuditError, LedgerMismatchError) as exc:
        raise _fail(exc, 2) from None
    table = Table(title=f"{summary.scenario}: {summary.status}, {summary.rounds_completed}/{summary.rounds_planned} rounds")
    table.add_column("model")
    metrics = sorted(summary.final_global)
    for name in metrics:
        table.add_column(name, justify="right")
    table.add_row("federated", *(_fmt(summary.final_global[m]) for m in metrics))
    pooled = summary.baselines.get("pooled")
    if isinstance(pooled, dict):
        table.add_row("pooled", *(_fmt(pooled.get(m, "-")) for m in metrics))
    _console.print(table)
    if summary.gap_vs_pooled:
        _console.print("federated − pooled: " + ", ".join(f"{k} {v:+.4f}" for k, v in sorted(summary.gap_vs_pooled.items())))
    if summary.privacy:
        _console.print("privacy spent: " + ", ".join(
            f"{site} ε={_fmt(p.get('epsilon'))} δ={p.get('delta'):g}" if p.get("delta") is not None
            else f"{site} ε={_fmt(p.get('epsilon'))}"
            for site, p in sorted(summary.privacy.items())
        ))
    _console.print(f"wall time {summary.wall_time_s:.1f} s (federated part {summary.federated_time_s:.1f} s); "
                   f"results in {summary.out_dir}")
    if summary.status != "completed":
        _errors.print(f"[red]{summary.status}:[/red] ", end="")
        _errors.print(str(summary.reason), markup=False, highlight=False)
        raise typer.Exit(1)


@app.command("evaluate")
def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="A final_model.npz written by a run.")],
    site: Annotated[Path, typer.Option("--site", "-s", help="Site manifest TOML of the validation site.")],
    split: Annotated[str, typer.Option("--split", help="Which split to evaluate: test, val, train or all.")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Metrics JSON (default beside the model).")] = None,
    key: Annotated[
        Optional[str],
        typer.Option("--key", help="Artefact key of an encrypted model (.npz.enc): a key file, 'env' or 'env:NAME'."),
    ] = None,
) -> None:
    """Validate a saved global model externally on any site's data; print and write the metrics."""
    from ..client.errors import DataValidationError  # noqa: PLC0415
    from ..privacy.artefacts import KeyFileError  # noqa: PLC0415
    from ..server.checkpoint import CheckpointError  # noqa: PLC0415
    from .runner import evaluate_model_file  # noqa: PLC0415

    _setup_logging(False)
    try:
        result = evaluate_model_file(model, site, split=split, out=out, key=key)
    except (DataValidationError, CheckpointError, KeyFileError, ValueError) as exc:
        raise _fail(exc, 2) from None
    table = Table(title=f"{result['site']} ({result['split']}, {result['num_examples']} examples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, _fmt(value))
    _console.print(table)
    _console.print(f"written to {result['file']}")
