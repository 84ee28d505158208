"""The ``fedcare node`` commands a hospital's IT runs: ``check``, ``keygen``, ``pin-app``, ``start``, ``stop``.

Thin: each command parses its options, calls one function (:mod:`fedcare.client.check`,
:mod:`fedcare.client.deploy`, :mod:`fedcare.privacy.certs`) and prints through rich. The root
command (``cli.py``) mounts :data:`node_app` as ``fedcare node``::

    from .client.cli import node_app
    app.add_typer(node_app, name="node")
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from ..privacy.certs import CertsError, generate_node_key
from ..privacy.errors import LedgerError
from ..privacy.policy import PolicyFileError, load_policy
from ..supervise import SuperviseError, process_age_s
from .app_gate import parse_app_hash
from .deploy import (
    NodeDeployError,
    NodeSettings,
    NodeStarted,
    pin_app_in_policy,
    read_trusted_apps,
    start_node,
    stop_node,
)
from .errors import DataValidationError

# torch, Opacus and pandas load inside the commands that use them (.check, .data_digest,
# .manifest, ..privacy.ledger): `fedcare --help` stays fast.

__all__ = ["app_digest", "check", "node_app", "node_keygen", "node_pin_app", "node_start", "node_status_command", "node_stop"]

logger = logging.getLogger(__name__)
console = Console(stderr=True)
out = Console()

node_app = typer.Typer(
    name="node",
    help="A hospital's node: validate the site's data, then take part in a federation.",
    no_args_is_help=True,
    add_completion=False,
)


_HANDLED = (
    CertsError,
    NodeDeployError,
    SuperviseError,
    DataValidationError,
    FileNotFoundError,
    PolicyFileError,
    ValidationError,
)


def _fail(err: BaseException) -> NoReturn:
    """Print ``err`` as one error line on stderr (validation errors: field and message only) and exit 1."""
    if isinstance(err, ValidationError):
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    else:
        msg = str(err)
    console.print("[bold red]error:[/] ", end="")
    console.print(msg, markup=False, highlight=False)
    raise typer.Exit(1)


@node_app.callback()
def _node() -> None:
    """A hospital's node: validate the site's data, then take part in a federation."""


@node_app.command("check")
def check(
    site: Path = typer.Option(
        ...,
        "--site",
        help="The site manifest (TOML); relative data paths resolve against its folder.",
    ),
) -> None:
    """Load the site's data as training would and print counts, class balance and missingness."""
    from .check import check_site_file, report_renderables  # noqa: PLC0415 - keep --help fast

    report_out = Console(soft_wrap=True)
    report_err = Console(stderr=True, soft_wrap=True)
    try:
        report = check_site_file(site)
    except DataValidationError as exc:
        report_err.print(f"[bold red]✗ {site}: {type(exc).__name__}[/]", highlight=False)
        report_err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(code=1) from None
    for renderable in report_renderables(report):
        report_out.print(renderable)
    report_out.print(f"[bold green]✓ site {report.site} is ready to train[/]", highlight=False)


def node_start(
    site: Annotated[Path, typer.Option("--site", help="The site manifest TOML.")],
    superlink: Annotated[str, typer.Option("--superlink", help="HOST:PORT of the SuperLink.")],
    port: Annotated[int, typer.Option("--port", help="Port of this node's local Runtime API.")],
    ca: Annotated[
        Path | None,
        typer.Option("--ca", help="The federation's CA certificate (ca.crt from the node bundle)."),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="This node's private key (NAME.key from `fedcare node keygen`)."),
    ] = None,
    ledger_dir: Annotated[
        Path | None, typer.Option("--ledger-dir", help="Privacy ledger folder (default STATE/ledger).")
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option("--state", help="PID file, log, app cache (default ./fedcare-node-SITE)."),
    ] = None,
    site_name: Annotated[
        str | None, typer.Option("--site-name", help="Overrides the manifest's site name.")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plaintext, no authentication. Test machines only.")
    ] = False,
    ready_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the SuperLink to accept the node.")
    ] = 120.0,
    trust_app: Annotated[
        list[str] | None,
        typer.Option(
            "--trust-app",
            help="SHA-256 of a Flower App this node may run (repeat), besides the policy's "
            "allowed_app_hashes; others are refused. The coordinator prints it: "
            "`fedcare server app-hash STUDY`.",
        ),
    ] = None,
    trusted_apps: Annotated[
        Path | None,
        typer.Option("--trusted-apps", help="File of app hashes this node may run, one per line."),
    ] = None,
    warm: Annotated[
        bool,
        typer.Option(
            "--warm/--cold",
            help="--warm (default): each ClientApp task forks from a process with torch, fedcare and "
            "the site's data already loaded; --cold: flwr starts a fresh process per message.",
        ),
    ] = True,
    poll_interval: Annotated[
        float,
        typer.Option(
            "--poll-interval",
            min=0.05,
            max=3.0,
            help="Seconds the idle node waits between asking the SuperLink for work (flwr's own "
            "wait is 3 s).",
        ),
    ] = 0.5,
    privacy_settings: Annotated[
        Path | None,
        typer.Option(
            "--privacy-settings",
            help="The site's DP-SGD settings TOML (PrivacySettings fields, node config "
            "privacy-settings); default: DP on with the built-in settings.",
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="The hospital's site policy TOML (docs/privacy.md), with the pinned apps "
            "(`fedcare node pin-app`). Without it the node applies the strict default: DP "
            "required, ε ≤ 3 per study, SecAgg+ studies only, and only --trust-app apps.",
        ),
    ] = None,
    foreground: Annotated[
        bool,
        typer.Option(
            "--foreground",
            help="Stay in the foreground (systemd Type=simple, a container's PID 1): echo the "
            "node's log, stop it and its children on SIGTERM/SIGINT/SIGHUP, exit with its status.",
        ),
    ] = False,
) -> None:
    """Start this hospital's SuperNode (in the background, or with --foreground as this process's child)."""
    from .data_digest import DATA_DIGEST_KEY  # noqa: PLC0415 - keep --help fast

    try:
        pins = _trusted_pins(trust_app, trusted_apps)
        node_files = _node_files(policy, privacy_settings)
        # `node check`'s full data check: exit 1 with one line before any process, gate or key use
        node_files[DATA_DIGEST_KEY] = _checked_data_digest(site)
        settings = NodeSettings(
            site_manifest=site,
            superlink=superlink,
            port=port,
            state_dir=state or Path.cwd() / f"fedcare-node-{site.stem}",
            ca_cert=ca,
            auth_key=key,
            ledger_dir=ledger_dir,
            site_name=site_name,
            insecure=insecure,
            trusted_app_hashes=tuple(pins) if pins else None,
            extra_node_config=node_files,
            warm=warm,
            poll_interval_s=poll_interval,
        )
        _verify_ledger(settings)
        if foreground:
            _run_in_foreground(settings, ready_timeout=ready_timeout, policy_given=policy is not None)
        started = start_node(settings, ready_timeout=ready_timeout)
    except (*_HANDLED, LedgerError) as err:
        _fail(err)
    _report_started(started, settings, policy_given=policy is not None)


def _run_in_foreground(settings: NodeSettings, *, ready_timeout: float, policy_given: bool) -> NoReturn:
    """Start the node as this process's child, supervise it until it exits or is signalled; exit with its status."""
    import sys  # noqa: PLC0415

    from ..supervise import TerminationRequested, stop_signals_raise, supervise_foreground  # noqa: PLC0415

    try:
        with stop_signals_raise():  # before the start: a SIGTERM while waiting for the SuperLink stops the node too
            started = start_node(settings, ready_timeout=ready_timeout)
            _report_started(started, settings, policy_given=policy_given)
            out.print("running in the foreground: SIGTERM or Ctrl-C stops the node", highlight=False)
            code = supervise_foreground(started.handle, echo=sys.stdout)
    except TerminationRequested as request:  # during the start: start_node stopped what it had started
        raise typer.Exit(code=128 + request.signum) from None
    logger.info("SuperNode %s exited with status %d", started.site_name, code)
    raise typer.Exit(code=code)


def _checked_data_digest(site: Path) -> str:
    """Run `fedcare node check`'s full data check on ``site``; return its data digest, or exit 1 with one line.

    The digest (:func:`~fedcare.client.data_digest.data_digest`) is taken before and after the
    check, so the node records the very files that passed; the ClientApp refuses every task once
    they differ (node config ``data-digest``).
    """
    from .check import check_site_file  # noqa: PLC0415 - keep --help fast
    from .data_digest import data_digest  # noqa: PLC0415

    try:
        before = data_digest(site)
        check_site_file(site)
        after = data_digest(site)
    except DataValidationError as exc:
        console.print(
            f"error: {site}: {type(exc).__name__}: {exc}; the node was not started — fix the data, "
            "then `fedcare node check` and start again",
            markup=False, highlight=False, soft_wrap=True,
        )
        raise typer.Exit(1) from None
    if before != after:
        console.print(
            f"error: {site}: the site's data changed while it was being checked; the node was not "
            "started — start it again once the files are final",
            markup=False, highlight=False, soft_wrap=True,
        )
        raise typer.Exit(1)
    return after


def _trusted_pins(trust_app: list[str] | None, trusted_apps: Path | None) -> list[str]:
    """Return the app hashes given with ``--trust-app`` followed by those in the ``--trusted-apps`` file."""
    pins = list(trust_app or [])
    if trusted_apps is not None:
        pins += read_trusted_apps(trusted_apps)
    return pins


def _node_files(policy: Path | None, privacy_settings: Path | None) -> dict[str, str | int | float | bool]:
    """Return the node config naming the site policy and DP settings files (absolute), refusing missing or invalid ones."""
    extra: dict[str, str | int | float | bool] = {}
    if policy is not None:
        policy_path = policy.expanduser().resolve()
        if not policy_path.is_file():
            raise FileNotFoundError(f"site policy file {policy_path} not found; fix --policy, or leave "
                                    "it out for the strict default policy")
        load_policy(policy_path)  # refuse an invalid file now (the node reloads it every round)
        extra["policy"] = str(policy_path)
    if privacy_settings is not None:
        privacy_path = privacy_settings.expanduser().resolve()
        if not privacy_path.is_file():
            raise FileNotFoundError(f"privacy settings file {privacy_path} not found; fix --privacy-settings")
        extra["privacy-settings"] = str(privacy_path)
    return extra


def _verify_ledger(settings: NodeSettings) -> None:
    """Refuse to start on a deleted or rolled-back privacy ledger (fail closed: :func:`verify_site`)."""
    from ..privacy.ledger import verify_site  # noqa: PLC0415 - Opacus: keep --help fast
    from .manifest import load_manifest  # noqa: PLC0415

    verify_site(
        settings.ledger_dir or settings.state_dir / "ledger",
        site=settings.site_name or load_manifest(settings.site_manifest).site,
    )


def _report_started(started: NodeStarted, settings: NodeSettings, *, policy_given: bool) -> None:
    """Print the node's warnings and its ready line (how long `fedcare node start` took)."""
    if settings.insecure:
        console.print("[bold red]WARNING: this node connects WITHOUT TLS and without authentication.[/]")
    if not policy_given:
        out.print("site policy: none given, the strict default applies (DP required, ε ≤ 3 per study, "
                  "SecAgg+ studies only; plain studies are refused). --policy FILE to change it.",
                  highlight=False)
    since_command = process_age_s()
    logger.info(
        "SuperNode %s ready %.1f s after `fedcare node start` (flower-supernode: %.1f s)",
        started.site_name,
        since_command,
        started.ready_s,
    )
    out.print(
        f"SuperNode {started.site_name} ready: node {started.node_id}, PID {started.handle.pid}; "
        f"{since_command:.1f} s after `fedcare node start` ({started.ready_s:.1f} s for "
        f"flower-supernode to be accepted); log {settings.log_file}",
        highlight=False,
    )


def app_digest(source: str) -> str:
    """Return the SHA-256 of ``source``: a hash itself, a ``.fab`` file, or a Flower App folder."""
    path = Path(source)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        from ..flower_bridge import build_fab_from_disk  # noqa: PLC0415 - what `flwr run` builds

        return hashlib.sha256(build_fab_from_disk(path)).hexdigest()
    return parse_app_hash(source)


def node_keygen(
    out_dir: Annotated[Path, typer.Option("--out", help="This hospital's own folder for the key pair.")],
    name: Annotated[str, typer.Option("--name", help="The node name, e.g. cleveland.")] = "node",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """Make this node's authentication key pair here; send only the .pub file to the coordinator."""
    try:
        paths = generate_node_key(out_dir, name, force=force)
    except _HANDLED as err:
        _fail(err)
    out.print(
        f"private key {paths.private_key} (mode 0600; never leaves this host: `node start --key`)\n"
        f"public key  {paths.public_key} (send it to the coordinator for `server register-node`)",
        highlight=False,
    )


def node_pin_app(
    app: Annotated[
        str,
        typer.Argument(help="The app's SHA-256 (`fedcare server app-hash STUDY`), its .fab file, or its folder."),
    ],
    policy: Annotated[
        Path, typer.Option("--policy", help="The site policy TOML to pin it in (created if missing).")
    ],
) -> None:
    """Allow this node to run one reviewed Flower App: add its hash to the policy's allowed_app_hashes."""
    try:
        digest = app_digest(app)
        added = pin_app_in_policy(policy, digest)
    except (*_HANDLED, ValueError) as err:
        _fail(err)
    state = "pinned" if added else "already pinned"
    out.print(
        f"app {digest} {state} in {policy}; the node runs it from its next task "
        f"(start it with --policy {policy})",
        highlight=False,
    )


def node_stop(
    state: Annotated[Path, typer.Option("--state", help="The state folder given to `node start`.")],
    timeout: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 15.0,
) -> None:
    """Stop the SuperNode started with this state folder."""
    try:
        stopped = stop_node(state, timeout=timeout)
    except _HANDLED as err:
        _fail(err)
    out.print("SuperNode stopped" if stopped else "SuperNode was not running (stale PID file removed)")


def node_status_command(
    ledger_dir: Annotated[Path, typer.Option("--ledger-dir", help="The node's privacy ledger folder (default of `node start`: STATE/ledger).")],
    site: Annotated[str, typer.Option("--site-name", help="The site's name (the manifest's, or --site-name of `node start`).")],
    policy: Annotated[
        Path | None, typer.Option("--policy", help="The site policy TOML: reserve and pinned apps.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show this hospital's privacy ledger per study (ε spent, reserve, remaining), recent rounds and pinned apps."""
    import json  # noqa: PLC0415

    from rich.table import Table  # noqa: PLC0415

    from .status import node_status  # noqa: PLC0415 - keep --help fast

    try:
        status = node_status(ledger_dir, site=site, policy_file=policy)
    except (*_HANDLED, LedgerError) as err:
        _fail(err)
    if as_json:
        out.print_json(json.dumps(status.to_dict()))
        return

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = Table("study", "ε spent", "DP-SGD", "releases", "budget", "reserve", "remaining", "rounds",
                  "running", title=f"site {site}: privacy ledger ({ledger_dir})", title_justify="left")
    for s in status.studies:
        table.add_row(s.study, num(s.spent), num(s.training), num(s.releases), num(s.budget), num(s.reserve),
                      num(s.remaining), f"{s.rounds_completed}/{s.rounds_charged}",
                      "-" if s.pending is None else f"round {s.pending}")
    out.print(table if status.studies else f"site {site}: no ledger in {ledger_dir} yet")
    for s in status.studies:
        if s.error:
            console.print(f"[bold red]{s.study}:[/] ", end="")
            console.print(s.error, markup=False, highlight=False)
        recent = ", ".join(f"{r['round']} {r['status']}" + ("" if r["epsilon_after"] is None else f" (ε {r['epsilon_after']:.3f})")
                           for r in s.recent)
        out.print(f"{s.study}: recent rounds {recent or '-'}", highlight=False)
        for r in s.not_completed:
            out.print(f"  round {r['round']} {r['status']}: charged in full (finished {r['finished_at']})", highlight=False)
    if status.pinned_apps is not None:
        out.print("pinned apps: " + (", ".join(status.pinned_apps) or "none"), highlight=False)
    elif policy is not None:
        out.print("pinned apps: none (this policy does not pin apps)", highlight=False)


# ``fedcare node --help`` lists the commands in this order
node_app.command("keygen")(node_keygen)
node_app.command("pin-app")(node_pin_app)
node_app.command("start")(node_start)
node_app.command("stop")(node_stop)
node_app.command("status")(node_status_command)
