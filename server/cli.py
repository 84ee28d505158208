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
from typing import Annotated, NoReturn

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

# .flower_app imports torch (via ..models): loaded by the commands that use it, so --help stays fast.

__all__ = ["certs_app", "release_command", "run_command", "server_app"]

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
) -> None:
    """Allow a hospital's node to connect: register its public key with the SuperLink."""
    with _errors():
        conn = FlowerConnection.from_certs_dir(
            superlink, certs, insecure=insecure, control_token_file=control_token
        )
        node_id = register_node(public_key, conn, flwr_home=flwr_home)
    out.print(f"registered {public_key} as node {node_id}")


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
) -> None:
    """Build the study's Flower App, submit it, stream its log, exit non-zero unless it completed."""
    from .flower_app import app_hash, build_flower_app, load_study  # noqa: PLC0415 - keep --help fast

    with _errors():
        study = load_study(study_file)
        run_config = study.run_config()
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
