"""The researcher's commands: ``fedcare simulate``, ``fedcare evaluate``, ``fedcare audit membership``.

Thin commands over the simulation runner and the membership audit (:mod:`.audit`); the heavy
modules are imported inside each command, so ``--help`` stays fast. Root wiring (``cli.py``)::

    app.command("simulate")(simulate)
    app.command("evaluate")(evaluate)
    audit_app.command("membership")(membership_command)   # on privacy.cli's ``audit`` group
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..supervise import quiet_flower

if TYPE_CHECKING:
    from ..privacy.settings import PrivacySettings

__all__ = ["app", "evaluate", "membership_command", "simulate"]

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
    from .console import WrappedFormatter  # noqa: PLC0415

    quiet_flower()  # also the known third-party notices (fedcare.notices)
    level = logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(WrappedFormatter())  # wrapped to the terminal's width, like the tables
    logging.basicConfig(level=level, handlers=[handler], force=True)
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
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Output folder (default: a new runs/<date>-<time>-<scenario> per run)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log Flower's and fedcare's progress.")] = False,
    ray_address: Annotated[
        Optional[str],
        typer.Option("--ray-address", help="Run on this running Ray cluster (head host:port, or 'auto'); "
                     "overrides [simulation] ray_address. fedcare never starts or stops it."),
    ] = None,
    set_values: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override a scenario value, e.g. --set training.lr=0.05 (repeatable; "
                     "validated as the file is)."),
    ] = None,
    mlflow_uri: Annotated[
        Optional[str],
        typer.Option("--mlflow-uri", help="Log to MLflow: sqlite:///PATH/mlflow.db or http(s)://HOST:PORT "
                     "(needs the tracking extra of fedcare)."),
    ] = None,
    tensorboard: Annotated[
        Optional[Path],
        typer.Option("--tensorboard", help="Write TensorBoard events under this folder (needs the tracking extra of fedcare)."),
    ] = None,
) -> None:
    """Run a federated simulation scenario and write summary.json, metrics.csv, the model and plots."""
    from ..client.errors import DataValidationError  # noqa: PLC0415 - keep --help fast
    from ..privacy.artefacts import KeyFileError  # noqa: PLC0415
    from ..privacy.audit_log import AuditError  # noqa: PLC0415
    from ..server.app import CheckpointExistsError, ResumeMismatchError  # noqa: PLC0415
    from ..server.checkpoint import CheckpointError  # noqa: PLC0415
    from .release import LedgerMismatchError  # noqa: PLC0415
    from .console import default_out_dir, summary_renderables  # noqa: PLC0415
    from .runner import run_scenario  # noqa: PLC0415
    from .scenario import DEFAULT_SCENARIO, InvalidScenarioError, load_scenario, with_ray_address  # noqa: PLC0415
    from ..server.tracking import TrackingError, tracking_settings  # noqa: PLC0415
    from .overrides import apply_overrides  # noqa: PLC0415
    from .provenance import collect_provenance  # noqa: PLC0415

    _setup_logging(verbose)
    try:
        spec = apply_overrides(load_scenario(scenario or DEFAULT_SCENARIO), set_values or [])
        provenance = collect_provenance(scenario or DEFAULT_SCENARIO, seed=spec.seed, overrides=set_values or [])
        tracking = tracking_settings(mlflow_uri=mlflow_uri, tensorboard_dir=tensorboard)
        if ray_address is not None:
            spec = with_ray_address(spec, ray_address)
        if out is None and resume:
            raise InvalidScenarioError("--resume continues the run in --out: give --out with the run's folder")
        out_dir = out if out is not None else default_out_dir(spec.name)  # a new folder per run
        summary = run_scenario(spec, out_dir, resume=resume, console=_errors, tracking=tracking, provenance=provenance)
    except (InvalidScenarioError, DataValidationError, CheckpointExistsError, ResumeMismatchError) as exc:
        raise _fail(exc, 2) from None
    except TrackingError as exc:  # --mlflow-uri / --tensorboard refused, or the backend cannot be opened
        raise _fail(exc, 2) from None
    except (CheckpointError, KeyFileError, AuditError, LedgerMismatchError) as exc:
        raise _fail(exc, 2) from None
    for renderable in summary_renderables(summary):  # federated, pooled, local, as released; ε per site
        _console.print(renderable)
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
    """Validate a saved model (federated or baseline) on any site's data at its stored threshold; print and write the metrics."""
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
    table.add_column("95 % interval", justify="right")
    for name, value in result["metrics"].items():
        low, high = result["intervals"].get(name, (None, None))
        table.add_row(name, _fmt(value), "-" if low is None else f"{_fmt(low)} – {_fmt(high)}")
    _console.print(table)
    if result.get("threshold") is not None:
        origin = "stored in the model file" if result.get("threshold_stored") else "default: the model file stores none"
        _console.print(f"operating threshold {result['threshold']:.2f} ({origin}); preprocessing: {result['preprocessing']}")
    for text in result.get("warnings", []):
        _errors.print("[yellow]warning:[/yellow] ", end="")
        _errors.print(text, markup=False, highlight=False)
    _console.print(f"written to {result['file']}")


def _privacy_from_file(path: Path | None) -> PrivacySettings:
    """Read PrivacySettings from a TOML (top level or ``[privacy]``); None: training without DP."""
    import tomllib  # noqa: PLC0415

    from pydantic import ValidationError  # noqa: PLC0415

    from ..privacy.settings import PrivacySettings  # noqa: PLC0415
    from .membership_audit import MembershipAuditError  # noqa: PLC0415

    if path is None:
        return PrivacySettings.disabled()

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        return PrivacySettings.model_validate(raw.get("privacy", raw))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise MembershipAuditError(f"privacy settings {path} are invalid: {exc}") from None


def membership_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="A final_model.npz written by a run.")],
    site: Annotated[Path, typer.Option("--site", "-s", help="Site manifest TOML: its train split are the members.")],
    max_auc: Annotated[
        Optional[float], typer.Option("--max-auc", help="Release gate: exit 1 when an attack's upper 95% bound exceeds it.")
    ] = None,
    shadows: Annotated[int, typer.Option("--shadows", help="LiRA shadow models (even, ≥ 4; 0: loss attack only).")] = 16,
    rounds: Annotated[int, typer.Option("--rounds", help="Recipe: rounds the model was trained for.")] = 1,
    local_epochs: Annotated[int, typer.Option("--local-epochs", help="Recipe: local epochs per round.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Recipe: batch size.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Recipe: learning rate.")] = 0.1,
    privacy: Annotated[
        Optional[Path], typer.Option("--privacy", help="Recipe: the site's PrivacySettings TOML (absent: no DP).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the splits, shadows and bootstrap.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Result JSON (default beside the model).")] = None,
    key: Annotated[
        Optional[str], typer.Option("--key", help="Artefact key of an encrypted model: a key file, 'env' or 'env:NAME'.")
    ] = None,
) -> None:
    """Membership-inference audit (loss threshold + LiRA) of a saved model; optionally gate its release."""
    from pydantic import ValidationError  # noqa: PLC0415

    from ..client.errors import DataValidationError  # noqa: PLC0415
    from ..client.training import TrainSettings  # noqa: PLC0415
    from ..privacy.artefacts import KeyFileError  # noqa: PLC0415
    from ..privacy.membership import ReleaseGate  # noqa: PLC0415
    from ..server.checkpoint import CheckpointError  # noqa: PLC0415
    from .membership_audit import MembershipAuditError, audit_membership_file  # noqa: PLC0415

    try:
        if shadows and (shadows < 4 or shadows % 2):
            raise MembershipAuditError(f"--shadows must be 0 or an even number ≥ 4, got {shadows}")
        if max_auc is not None:
            ReleaseGate(max_auc=max_auc)  # validate before the (slow) audit
        record, result = audit_membership_file(
            model, site, train=TrainSettings(local_epochs=local_epochs, batch_size=batch_size, lr=lr, device="cpu"),
            privacy=_privacy_from_file(privacy), rounds=rounds, n_shadow=shadows, seed=seed, max_auc=max_auc,
            out=out, key=key,
        )
    except (CheckpointError, DataValidationError, ValueError, ValidationError, KeyFileError) as exc:
        _errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _console.print(f"membership audit of {model} on site {record['site']} "
               f"({record['members']} members, {record['nonmembers']} non-members):", highlight=False)  # fmt: skip
    for attack in result.attacks:
        _console.print(f"  {attack.describe()}, {attack.describe_tpr()}", highlight=False)
    _console.print(f"written to {record['file']}", highlight=False, soft_wrap=True)
    if max_auc is not None:
        decision = ReleaseGate(max_auc=max_auc).decide(result)
        if not decision.passed:  # block or inconclusive: exit 1, the reason says which
            _errors.print(f"[bold red]{decision.reason}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        _console.print(decision.reason, highlight=False)


examples_app = typer.Typer(no_args_is_help=True, help="The shipped example scenarios and site manifests.")


@examples_app.command("copy")
def examples_copy(
    destination: Annotated[Path, typer.Argument(help="Folder to copy into (new or empty): gets scenarios/ and sites/.")],
) -> None:
    """Copy the example scenarios and site manifests out of the package; set FEDCARE_DATA_ROOT to run them."""
    from .examples import ExamplesExistError, copy_examples  # noqa: PLC0415

    try:
        written = copy_examples(destination)
    except ExamplesExistError as exc:
        _errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    _console.print(
        f"copied {len(written)} files into {destination} (scenarios/, sites/); the site manifests read "
        "their data under ${FEDCARE_DATA_ROOT}: export FEDCARE_DATA_ROOT=/path/to/data, then e.g. "
        f"fedcare simulate {destination}/scenarios/heart_disease.toml",
        highlight=False, soft_wrap=True, markup=False,
    )
