"""Coordinator commands: ``fedcare certs ...``, ``fedcare server ...``, ``fedcare run`` and ``fedcare release``.

Thin: each command parses its options, calls one function, and prints through rich
(``release_command`` is defined beside the release it runs, :mod:`fedcare.server.release`).
Wiring into the root command (``cli.py``)::

    from .server.cli import certs_app, release_command, run_command, server_app
    app.add_typer(certs_app, name="certs")
    app.add_typer(server_app, name="server")
    app.command("run")(run_command)
    app.command("release")(release_command)
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from ..privacy.certs import CertsError, init_certificates, write_node_bundle
from ..supervise import SuperviseError
from .deploy import (
    DeployError,
    FlowerConnection,
    SuperLinkSettings,
    register_node,
    start_superlink,
    stop_superlink,
    submit_run,
)
from .release import release_command

if TYPE_CHECKING:
    from .status_page import StatusSource

# .flower_app imports torch (via ..models): loaded by the commands that use it, so --help stays fast.

__all__ = ["certs_app", "release_command", "run_command", "server_app", "study_app"]

logger = logging.getLogger(__name__)
console = Console(stderr=True)
out = Console()

certs_app = typer.Typer(
    no_args_is_help=True,
    help="Create the federation's CA and server certificate, and the bundle each hospital receives.",
)
server_app = typer.Typer(no_args_is_help=True, help="Run the coordinator's SuperLink.")

_HANDLED = (CertsError, DeployError, SuperviseError, FileNotFoundError, ValidationError)


def _fail(err: BaseException, code: int = 1) -> NoReturn:
    if isinstance(err, ValidationError):
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    else:
        msg = str(err)
    console.print("[bold red]error:[/] ", end="")
    console.print(msg, markup=False, highlight=False)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    from .flower_app import AppFolderExistsError, InvalidStudyError  # noqa: PLC0415 - keep --help fast

    try:
        yield
    except (*_HANDLED, InvalidStudyError, AppFolderExistsError) as err:
        _fail(err)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for raw in values or [] for v in raw.split(",") if v.strip()]


@certs_app.command("init")
def certs_init(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the files into.")],
    server_name: Annotated[
        str, typer.Option("--server-name", help="The SuperLink's DNS name (certificate CN).")
    ],
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="IP SAN (repeat or comma-separate); 127.0.0.1 is always added."),
    ] = None,
    dns: Annotated[
        list[str] | None, typer.Option("--dns", help="More DNS SANs (repeat or comma-separate).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing keys and certificates.")] = False,
) -> None:
    """Write a CA (EC P-384) and the SuperLink's certificate; node keys are made at the nodes."""
    with _errors():
        layout = init_certificates(
            out_dir,
            server_name=server_name,
            dns_names=_split(dns),
            ips=_split(ip),
            force=force,
        )
    out.print(f"CA certificate      {layout.ca_cert}  (to every hospital: `fedcare certs node-bundle`)")
    out.print(f"CA key              {layout.ca_key}  (keep offline; mode 0600)")
    out.print(f"server certificate  {layout.server_cert}, key {layout.server_key}")
    out.print("node keys: each hospital runs `fedcare node keygen` and sends only its .pub file")


@certs_app.command("node-bundle")
def certs_node_bundle(
    out_dir: Annotated[Path, typer.Option("--out", help="The bundle folder to send to a hospital.")],
    certs: Annotated[Path, typer.Option("--certs", help="Folder from `fedcare certs init`.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")] = False,
) -> None:
    """Write what a hospital receives: the CA certificate only (no private key of anyone)."""
    with _errors():
        ca = write_node_bundle(certs, out_dir, force=force)
    out.print(f"node bundle {out_dir}: {ca} (start the node with `fedcare node start --ca {ca.name}`)")


@server_app.command("start")
def server_start(
    address: Annotated[str, typer.Option("--address", help="HOST:PORT to listen on.")],
    state: Annotated[Path, typer.Option("--state", help="State folder: database, PID file, log.")],
    certs: Annotated[
        Path | None, typer.Option("--certs", help="Folder from `fedcare certs init`.")
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Plaintext, no node authentication. Test machines only."),
    ] = False,
    control_address: Annotated[
        str | None,
        typer.Option(
            "--control-address",
            help="Loopback HOST:PORT for the Control API (flwr run, register-node; needs the "
            "token STATE/control.token); the --address port serves the Fleet API only. "
            "Default: 127.0.0.1:<port+1>.",
        ),
    ] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait until it listens.")] = 60.0,
) -> None:
    """Start the SuperLink in the background (TLS, SuperNode authentication, no runtime installs)."""
    with _errors():
        settings = SuperLinkSettings(
            address=address,
            state_dir=state,
            certs_dir=certs,
            insecure=insecure,
            control_address=control_address,
        )
        handle = start_superlink(settings, ready_timeout=ready_timeout)
    if insecure:
        console.print("[bold red]WARNING: the SuperLink runs WITHOUT TLS and without node authentication.[/]")
    control = settings.effective_control_address
    out.print(
        f"SuperLink PID {handle.pid}: Fleet API (hospitals) on {address}; Control API on "
        f"{control} only, with the token in {settings.control_token_file} (register-node / run: "
        f"--superlink {control} --control-token {settings.control_token_file}); "
        f"log {settings.log_file}",
        highlight=False,
    )


@server_app.command("stop")
def server_stop(
    state: Annotated[Path, typer.Option("--state", help="The state folder given to `server start`.")],
    timeout: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 15.0,
) -> None:
    """Stop the SuperLink started with this state folder."""
    with _errors():
        stopped = stop_superlink(state, timeout=timeout)
    out.print("SuperLink stopped" if stopped else "SuperLink was not running (stale PID file removed)")


@server_app.command("register-node")
def server_register_node(
    public_key: Annotated[
        Path, typer.Argument(help="The node's public key (NAME.pub from `fedcare node keygen`).")
    ],
    superlink: Annotated[
        str, typer.Option("--superlink", help="HOST:PORT of the SuperLink's Control API.")
    ],
    certs: Annotated[Path | None, typer.Option("--certs", help="Folder holding ca.crt.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext connection.")] = False,
    control_token: Annotated[
        Path | None,
        typer.Option(
            "--control-token",
            help="The Control API token `fedcare server start` wrote (STATE/control.token).",
        ),
    ] = None,
    flwr_home: Annotated[
        Path | None, typer.Option("--flwr-home", help="FLWR_HOME for flwr (default: temporary).")
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state",
            help="The SuperLink's state folder: the node's hospital name is recorded in "
            "STATE/nodes.json for `fedcare server status`; --control-token defaults to "
            "STATE/control.token.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="The hospital's name on the status page (default: the key file's name)."),
    ] = None,
) -> None:
    """Allow a hospital's node to connect: register its public key with the SuperLink."""
    from .status_page import record_node_name  # noqa: PLC0415 - keep --help fast

    if control_token is None and state is not None:
        control_token = state / "control.token"
    with _errors():
        conn = FlowerConnection.from_certs_dir(
            superlink, certs, insecure=insecure, control_token_file=control_token
        )
        node_id = register_node(public_key, conn, flwr_home=flwr_home)
        if state is not None:
            record_node_name(state, node_id, name or public_key.stem, public_key=public_key)
    out.print(f"registered {public_key} as node {node_id}"
              + (f" ({name or public_key.stem})" if state is not None else ""), highlight=False)


def _status_source(state: Path, superlink: str, certs: Path | None, insecure: bool,
                   control_token: Path | None, study_dir: list[Path] | None) -> StatusSource:
    from .status_page import StatusSource  # noqa: PLC0415 - keep --help fast, F811

    conn = FlowerConnection.from_certs_dir(
        superlink, certs, insecure=insecure, control_token_file=control_token or state / "control.token"
    )
    return StatusSource(state_dir=state, connection=conn, study_dirs=tuple(study_dir or ()))


_StateOpt = Annotated[Path, typer.Option("--state", help="The SuperLink's state folder (nodes.json, control.token).")]
_SuperlinkOpt = Annotated[str, typer.Option("--superlink", help="HOST:PORT of the SuperLink's Control API.")]
_CertsOpt = Annotated[Path | None, typer.Option("--certs", help="Folder holding ca.crt.")]
_InsecureOpt = Annotated[bool, typer.Option("--insecure", help="Plaintext connection.")]
_TokenOpt = Annotated[
    Path | None, typer.Option("--control-token", help="The Control API token (default STATE/control.token).")
]
_StudyOpt = Annotated[
    list[Path] | None,
    typer.Option("--study-dir", help="A study's checkpoint-dir (its progress.json); repeat for more studies."),
]


@server_app.command("status")
def server_status(
    state: _StateOpt,
    superlink: _SuperlinkOpt,
    certs: _CertsOpt = None,
    insecure: _InsecureOpt = False,
    control_token: _TokenOpt = None,
    study_dir: _StudyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the snapshot as JSON.")] = False,
) -> None:
    """Show the federation: hospitals online or offline, runs, each study's round, ε per site, refusals."""
    import json  # noqa: PLC0415

    from rich.table import Table  # noqa: PLC0415

    from .status_page import collect_status, format_rows  # noqa: PLC0415 - keep --help fast

    with _errors():
        snapshot = collect_status(_status_source(state, superlink, certs, insecure, control_token, study_dir))
    if as_json:
        out.print_json(json.dumps(snapshot))
        return
    if snapshot["superlink"]["error"]:
        console.print(f"[bold red]SuperLink {superlink}:[/] ", end="")
        console.print(snapshot["superlink"]["error"], markup=False, highlight=False)
    rows = format_rows(snapshot)
    heads = {
        "hospitals": ("hospital", "node", "status", "last seen"),
        "sites": ("study", "status", "round", "stage", "site", "ε spent", "ε budget", "remaining"),
        "refusals": ("study", "round", "stage", "site", "reason"),
        "runs": ("run", "app", "status", "elapsed", "details"),
    }
    for key, head in heads.items():
        if not rows[key]:
            continue
        table = Table(*head, title=key, title_justify="left", expand=False)
        for row in rows[key]:
            table.add_row(*row)
        out.print(table)


@server_app.command("status-page")
def server_status_page(
    state: _StateOpt,
    superlink: _SuperlinkOpt,
    certs: _CertsOpt = None,
    insecure: _InsecureOpt = False,
    control_token: _TokenOpt = None,
    study_dir: _StudyOpt = None,
    listen: Annotated[str, typer.Option("--listen", help="Loopback HOST:PORT to serve the page on.")] = "127.0.0.1:9400",
    refresh: Annotated[float, typer.Option("--refresh", min=1.0, help="Seconds between snapshots.")] = 5.0,
) -> None:
    """Serve the live status page on a loopback address (foreground; open http://HOST:PORT/#token=TOKEN)."""
    from .status_page import serve  # noqa: PLC0415 - keep --help fast

    with _errors():
        source = _status_source(state, superlink, certs, insecure, control_token, study_dir)
        out.print(f"status page on http://{listen}/ : open it as http://{listen}/#token=<the token in "
                  f"{source.connection.control_token_file}> (Ctrl-C stops it)", highlight=False, soft_wrap=True)
        serve(source, listen=listen, refresh_s=refresh)


def run_command(
    study_file: Annotated[Path, typer.Argument(help="The study TOML.")],
    superlink: Annotated[
        str, typer.Option("--superlink", help="HOST:PORT of the SuperLink's Control API.")
    ],
    certs: Annotated[Path | None, typer.Option("--certs", help="Folder holding ca.crt.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext connection.")] = False,
    control_token: Annotated[
        Path | None,
        typer.Option(
            "--control-token",
            help="The Control API token `fedcare server start` wrote (STATE/control.token).",
        ),
    ] = None,
    app_dir: Annotated[
        Path | None,
        typer.Option("--app-dir", help="Where to build the Flower App (default: temporary)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds the run may take before it is stopped.")] = 3600.0,
    flwr_home: Annotated[
        Path | None, typer.Option("--flwr-home", help="FLWR_HOME for flwr (default: temporary).")
    ] = None,
    mlflow_uri: Annotated[
        str | None,
        typer.Option("--mlflow-uri", help="The ServerApp logs the run to MLflow: sqlite:///PATH/mlflow.db or "
                     "http(s)://HOST:PORT, no credentials in it (needs the tracking extra of fedcare on the coordinator)."),
    ] = None,
    tensorboard: Annotated[
        Path | None,
        typer.Option("--tensorboard", help="The ServerApp writes TensorBoard events under this folder of the "
                     "coordinator (needs the tracking extra of fedcare)."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the study from its checkpoint-dir (after a crash or a stop): a "
                     "run-config override, so the app and its hash stay those the hospitals pinned."),
    ] = False,
) -> None:
    """Build the study's Flower App, submit it, stream its log, exit non-zero unless it completed."""
    from .flower_app import app_hash, build_flower_app, load_study  # noqa: PLC0415 - keep --help fast

    from .tracking import TrackingError, tracking_settings  # noqa: PLC0415

    with _errors():
        try:  # the same app (and hash) with tracking on or off: the keys travel as run-config overrides
            overrides = tracking_settings(mlflow_uri=mlflow_uri, tensorboard_dir=tensorboard).run_config_overrides()
        except TrackingError as err:
            _fail(err, 2)
        study = load_study(study_file)
        run_config = study.run_config()
        if resume:
            from .config import InvalidRunConfigError, resume_override  # noqa: PLC0415

            try:
                overrides = {**overrides, **resume_override(run_config)}
            except InvalidRunConfigError as err:
                _fail(err, 2)
            out.print(f"resuming study {study.study.name} from {run_config.checkpoint_dir}: the checkpoint's "  # type: ignore[union-attr]
                      "rounds are kept, the log shows the study's round numbers", highlight=False)
        if run_config is not None and run_config.checkpoint_dir is not None and run_config.artefact_key is None:
            console.print(
                "[bold yellow]warning:[/] this study writes its checkpoints and final model UNENCRYPTED; "
                "create a key with `fedcare audit artefact-key KEYFILE` and set artefact-key in [run]",
                highlight=False, soft_wrap=True,
            )
        conn = FlowerConnection.from_certs_dir(
            superlink, certs, insecure=insecure, control_token_file=control_token
        )
        with tempfile.TemporaryDirectory(prefix="fedcare-app-") as tmp:
            folder = build_flower_app(study, app_dir or Path(tmp) / study.app_name)
            out.print(f"app {study.app_name} hash {app_hash(folder)}", highlight=False)
            outcome = submit_run(
                folder,
                conn,
                timeout=timeout,
                flwr_home=flwr_home,
                on_line=lambda line: out.print(Text.from_ansi(line)),
                run_config=overrides,
            )
    if not outcome.completed:
        console.print(f"[bold red]run {outcome.run_id} ended {outcome.status}:[/] ", end="")
        console.print(outcome.details, markup=False, highlight=False)
        raise typer.Exit(1)
    out.print(f"run {outcome.run_id} {outcome.status} in {outcome.elapsed_s:.0f} s")


@server_app.command("app-hash")
def server_app_hash(
    study_file: Annotated[Path, typer.Argument(help="The study TOML.")],
) -> None:
    """Print the SHA-256 of the app `fedcare run STUDY` submits: hospitals pin it with
    `fedcare node pin-app HASH --policy FILE`."""
    from .flower_app import app_hash, build_flower_app, load_study  # noqa: PLC0415 - keep --help fast

    with _errors():
        study = load_study(study_file)
        with tempfile.TemporaryDirectory(prefix="fedcare-app-") as tmp:
            digest = app_hash(build_flower_app(study, Path(tmp) / study.app_name))
    out.print(digest, highlight=False)


study_app = typer.Typer(no_args_is_help=True, help="Work with study files (what `fedcare run` submits).")


@study_app.command("convert")
def study_convert(
    study_file: Annotated[Path, typer.Argument(help="A study TOML in the old form (every setting in [run]).")],
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the converted study here (a new file); default: print it.")
    ] = None,
) -> None:
    """Rewrite a study file into the tables a scenario uses ([model], [training], [strategy]…);
    the run configuration and the app hash stay the same."""
    from .flower_app import convert_study_file  # noqa: PLC0415 - keep --help fast

    try:
        with _errors():
            text = convert_study_file(study_file, output)
    except FileExistsError:
        _fail(FileExistsError(f"{output} exists; choose a new --out file (the converter never overwrites)"))
    if output is None:
        out.print(text, end="", markup=False, highlight=False)
    else:
        console.print(f"wrote {output} (same run configuration and app hash as {study_file})")
