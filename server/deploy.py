"""The coordinator's side of a deployment: the SuperLink process, node registration, runs.

- :func:`start_superlink` / :func:`stop_superlink`: ``flower-superlink`` with TLS, SuperNode
  authentication on, runtime dependency installation off, telemetry and update check off, a
  state database file and a PID file in the state folder. It always runs through
  :mod:`fedcare.server.superlink_front`: the Fleet API only on ``address``, the Control and
  Runtime APIs on a loopback control address (default ``127.0.0.1:<port + 1>``), and every
  Control API request must carry the bearer token written to ``STATE/control.token`` (mode
  0600, new at every start): the open-source SuperLink has no Control API authentication.
  Ready means ``GET /health`` (flwr's own health route) answers 200 on both the fleet and the
  control address, over TLS verified with the study's CA.
- :func:`register_node`: ``flwr supernode register KEY.pub`` with a TLS connection.
- :func:`submit_run`: ``flwr run APP CONN --stream``, then the run's real status from
  ``flwr ls CONN --run-id ID --format json`` (``flwr run`` exits 0 even when the run failed).

The Flower CLI reads its connections from ``$FLWR_HOME/config.toml``: every call here writes
a connection named ``fedcare`` into a FLWR_HOME of its own (a temporary folder unless given).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import tomli_w
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ..flower_bridge import require, store_control_token
from ..privacy.certs import CertificateLayout
from ..supervise import (
    ProcessExitedError,
    ProcessHandle,
    ReadyTimeoutError,
    find_executable,
    flower_env,
    spawn,
    stop_pid_file,
    stop_popen,
    stop_process,
)

__all__ = [
    "CONNECTION_NAME",
    "SUPERLINK_CONTROL_TOKEN",
    "ControlTokenError",
    "ConflictingTlsOptionsError",
    "DeployError",
    "FlowerCommandError",
    "FlowerConnection",
    "InsecureNotRequestedError",
    "NodeRegistrationError",
    "PlaintextWarning",
    "RunFailedError",
    "RunOutcome",
    "RunSubmissionError",
    "RunTimeoutError",
    "SuperLinkSettings",
    "UnsafeControlAddressError",
    "default_control_address",
    "list_nodes",
    "list_runs",
    "parse_address",
    "read_control_token",
    "register_node",
    "run_status",
    "start_superlink",
    "stop_superlink",
    "submit_run",
    "superlink_command",
    "write_control_token",
]

logger = logging.getLogger(__name__)

CONNECTION_NAME = "fedcare"
SUPERLINK_PID = "superlink.pid"
SUPERLINK_LOG = "superlink.log"
SUPERLINK_DB = "superlink.db"
SUPERLINK_FLWR_HOME = "flwr-home"
SUPERLINK_CONTROL_TOKEN = "control.token"
_HEALTH_PATH = "/health"  # flwr's health route; the front serves it on both sockets
_HEALTH_POLL_S = 0.2
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DeployError(Exception):
    """Base class of the coordinator-side deployment errors."""


class InsecureNotRequestedError(DeployError):
    """Raised when no certificates are given and plaintext was not explicitly asked for."""


class ConflictingTlsOptionsError(DeployError):
    """Raised when certificates and ``insecure`` are both given."""


class UnsafeControlAddressError(DeployError):
    """Raised when the Control API would listen on a non-loopback address or clash with Fleet."""


class ControlTokenError(DeployError):
    """Raised when the Control API token file is missing, empty or readable by others."""


class FlowerCommandError(DeployError):
    """Raised when a ``flwr`` CLI call fails or prints what fedcare cannot read."""


class NodeRegistrationError(DeployError):
    """Raised when the SuperLink refuses to register a node's public key."""


class RunSubmissionError(DeployError):
    """Raised when ``flwr run`` did not start a run."""


class RunTimeoutError(DeployError):
    """Raised when a run did not finish in time (it has been asked to stop)."""


class RunFailedError(DeployError):
    """Raised when a run finished with a status other than ``finished:completed``."""


class PlaintextWarning(UserWarning):
    """Warned when a SuperLink, SuperNode or connection runs without TLS."""


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[IPv6]:PORT`` too) into host and port; raise ValueError if malformed."""
    if "://" in address:
        raise ValueError(f"address {address!r} must be HOST:PORT without a URL scheme")
    host, sep, port_s = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"address {address!r} must be HOST:PORT with a port in 1-65535")
    return host, int(port_s)


def is_loopback(host: str) -> bool:
    """Return whether ``host`` is a loopback address (``localhost`` counts)."""
    from .superlink_front import is_loopback as _is_loopback  # noqa: PLC0415 - light module

    return _is_loopback(host)


def default_control_address(fleet_address: str) -> str:
    """Return ``127.0.0.1:<fleet port + 1>``, the default Control address of a split SuperLink."""
    port = parse_address(fleet_address)[1]
    if port >= 65535:
        raise UnsafeControlAddressError(
            f"fleet port {port} has no next port for the Control API: pass --control-address"
        )
    return f"127.0.0.1:{port + 1}"


def warn_plaintext(what: str) -> None:
    """Warn loudly (warning + log at WARNING) that ``what`` runs without TLS."""
    message = (
        f"{what} runs WITHOUT TLS (--insecure): model updates and metrics travel in plaintext "
        "and SuperNode authentication is off, so any process that reaches the port can join "
        "or submit runs. Use this only on a test machine, never with patient data."
    )
    warnings.warn(message, PlaintextWarning, stacklevel=3)
    logger.warning(message)


class FlowerConnection(BaseModel):
    """How the ``flwr`` CLI reaches a SuperLink (one entry of ``$FLWR_HOME/config.toml``).

    Attributes
    ----------
    address : str
        ``HOST:PORT`` of the SuperLink's Control API (its control address when Fleet and
        Control are split, else its single port).
    root_certificates : pathlib.Path or None
        The CA certificate (``ca.crt``) that signed the SuperLink's certificate.
    insecure : bool
        Plaintext; only when explicitly asked for.
    control_token_file : pathlib.Path or None
        The Control API token ``fedcare server start`` wrote (``STATE/control.token``); ``flwr``
        sends it as ``Authorization: Bearer`` (through its account-auth credential store in
        this connection's FLWR_HOME). None: no credential (a SuperLink fedcare did not start).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str
    root_certificates: Path | None = None
    insecure: bool = False
    control_token_file: Path | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @model_validator(mode="after")
    def _tls(self) -> FlowerConnection:
        if self.insecure and self.root_certificates is not None:
            raise ConflictingTlsOptionsError(
                "give either the CA certificate (--certs) or --insecure, not both"
            )
        if not self.insecure and self.root_certificates is None:
            raise InsecureNotRequestedError(
                "no CA certificate given: pass --certs DIR (the folder with ca.crt), or "
                "--insecure to connect in plaintext (test machines only)"
            )
        if self.root_certificates is not None and not self.root_certificates.is_file():
            raise FileNotFoundError(
                f"CA certificate {self.root_certificates} not found: pass --certs pointing at "
                "the folder written by `fedcare certs init`"
            )
        return self

    @classmethod
    def from_certs_dir(
        cls,
        address: str,
        certs_dir: Path | None,
        *,
        insecure: bool = False,
        control_token_file: Path | None = None,
    ) -> FlowerConnection:
        """Return a connection using ``certs_dir/ca.crt`` (or plaintext when ``insecure``)."""
        ca = None if certs_dir is None else CertificateLayout(Path(certs_dir)).ca_cert
        if ca is not None:
            ca = ca.resolve()
        token = None if control_token_file is None else Path(control_token_file).resolve()
        return cls(address=address, root_certificates=ca, insecure=insecure, control_token_file=token)

    def _write_credentials(self, flwr_home: Path) -> None:
        """Store the Control API token where ``flwr`` reads account-auth credentials (0600).

        flwr's CLI sends it as ``Authorization: Bearer`` to this address; fedcare's SuperLink
        front checks it. Raises :class:`fedcare.flower_bridge.UnsupportedFlowerError` on a
        flwr whose credential layout fedcare does not know.
        """
        token = read_control_token(Path(self.control_token_file or ""))
        store_control_token(flwr_home, self.address, token)

    def write(self, flwr_home: Path) -> Path:
        """Write this connection as ``[superlink.fedcare]`` into ``flwr_home/config.toml``.

        Other connections already in the file are kept; ``fedcare`` becomes the default only
        when no default is set (fedcare always names it explicitly).
        """
        entry: dict[str, Any] = {"address": self.address}
        if self.insecure:
            warn_plaintext("the flwr CLI connection")
            entry["insecure"] = True
        else:
            entry["root-certificates"] = str(Path(self.root_certificates or "").resolve())
        flwr_home.mkdir(parents=True, exist_ok=True)
        path = flwr_home / "config.toml"
        doc: dict[str, Any] = {}
        if path.is_file():
            try:
                doc = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as err:
                raise FlowerCommandError(
                    f"{path} is not valid TOML ({err}): fix it or pass another --flwr-home"
                ) from None
        superlink = doc.setdefault("superlink", {})
        superlink.setdefault("default", CONNECTION_NAME)
        superlink[CONNECTION_NAME] = entry
        path.write_text(tomli_w.dumps(doc), encoding="utf-8")
        if self.control_token_file is not None:
            self._write_credentials(flwr_home)
        return path


def read_control_token(path: Path) -> str:
    """Return the Control API token in ``path``; refuse a missing, empty or shared file.

    Raises
    ------
    ControlTokenError
        When the file is missing, empty, or readable by group or others.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ControlTokenError(
            f"cannot read the Control API token {path} ({err.strerror}): pass --control-token "
            "STATE/control.token, the file `fedcare server start --state STATE` wrote"
        ) from None
    if mode & 0o077:
        raise ControlTokenError(
            f"the Control API token {path} is readable by other users (mode {mode & 0o777:o}): "
            f"run `chmod 600 {path}` or restart the SuperLink to make a new one"
        )
    if not token:
        raise ControlTokenError(f"the Control API token {path} is empty: restart the SuperLink")
    return token


def write_control_token(path: Path) -> Path:
    """Write a new random Control API token to ``path`` (mode 0600), replacing an old one."""
    path = Path(path)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return path


@contextmanager
def _flwr_home(connection: FlowerConnection, flwr_home: Path | None) -> Iterator[Path]:
    if flwr_home is not None:
        connection.write(flwr_home)
        yield flwr_home
        return
    with tempfile.TemporaryDirectory(prefix="fedcare-flwr-home-") as tmp:
        connection.write(Path(tmp))
        yield Path(tmp)


class SuperLinkSettings(BaseModel):
    """How to start the SuperLink.

    Attributes
    ----------
    address : str
        ``HOST:PORT`` the hospitals' SuperNodes connect to: the Fleet API only (Control and
        Runtime paths get HTTP 403 there).
    control_address : str or None
        Loopback ``HOST:PORT`` for the Control and Runtime APIs (``flwr run``, node
        registration, the ServerApp); default ``127.0.0.1:<port + 1>``. Control API requests
        need the token in ``state_dir/control.token``.
    state_dir : pathlib.Path
        Holds the state database, PID file, log, and the SuperLink's FLWR_HOME (installed apps);
        the SuperLink (hence the ServerApp) runs with this folder as working directory.
    certs_dir : pathlib.Path or None
        Folder written by ``fedcare certs init`` (``ca.crt``, ``server.pem``, ``server.key``).
    insecure : bool
        Plaintext without node authentication; must be asked for explicitly.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str
    state_dir: Path
    certs_dir: Path | None = None
    insecure: bool = False
    control_address: str | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("control_address")
    @classmethod
    def _control(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _ = parse_address(value)
        if not is_loopback(host):
            raise UnsafeControlAddressError(
                f"--control-address {value!r} is not a loopback address: the Control API "
                "(submit runs, register nodes) has no authentication, so it listens on "
                "127.0.0.1 only; reach it from elsewhere through SSH, never over the network"
            )
        return value

    @model_validator(mode="after")
    def _split(self) -> SuperLinkSettings:
        control = self.effective_control_address
        if parse_address(control)[1] == self.port:
            raise UnsafeControlAddressError(
                f"the Control port and the Fleet port are both {self.port}: give "
                "--control-address another port"
            )
        return self

    @property
    def effective_control_address(self) -> str:
        """Return the Control API's loopback address (never the Fleet port)."""
        if self.control_address is not None:
            return self.control_address
        return default_control_address(self.address)

    @property
    def coordinator_address(self) -> str:
        """Return where ``flwr run`` / ``register-node`` connect (the Control API)."""
        return self.effective_control_address

    @property
    def control_token_file(self) -> Path:
        """Return the Control API token file (written at every start, mode 0600)."""
        return self.state_dir / SUPERLINK_CONTROL_TOKEN

    @model_validator(mode="after")
    def _tls(self) -> SuperLinkSettings:
        if self.insecure and self.certs_dir is not None:
            raise ConflictingTlsOptionsError(
                "give either --certs (TLS + SuperNode authentication) or --insecure, not both"
            )
        if not self.insecure and self.certs_dir is None:
            raise InsecureNotRequestedError(
                "no certificates given: pass --certs DIR (see `fedcare certs init`), or "
                "--insecure to run plaintext without node authentication (test machines only)"
            )
        if self.certs_dir is not None:
            layout = CertificateLayout(self.certs_dir)
            layout.require(layout.ca_cert, layout.server_cert, layout.server_key)
        return self

    @property
    def host(self) -> str:
        """Return the host to bind."""
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        """Return the port to bind."""
        return parse_address(self.address)[1]

    @property
    def pid_file(self) -> Path:
        """Return the PID file path."""
        return self.state_dir / SUPERLINK_PID

    @property
    def log_file(self) -> Path:
        """Return the log file path."""
        return self.state_dir / SUPERLINK_LOG


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """Return the SuperLink command line for ``settings`` (absolute paths).

    ``python -m fedcare.server.superlink_front --fleet-address ADDRESS --control-token-file
    STATE/control.token -- <flower-superlink arguments with --host/--port = the control
    address>``: flwr's SuperLink with the Fleet API alone on ``address``.
    """
    state = settings.state_dir.resolve()
    argv = [sys.executable, "-m", "fedcare.server.superlink_front",
            "--fleet-address", settings.address,
            "--control-token-file", str(settings.control_token_file.resolve()), "--"]  # fmt: skip
    host, port = parse_address(settings.effective_control_address)
    if settings.insecure:
        argv.append("--insecure")
    else:
        layout = CertificateLayout(Path(settings.certs_dir or "").resolve())
        argv += [
            "--ssl-ca-certfile", str(layout.ca_cert),
            "--ssl-certfile", str(layout.server_cert),
            "--ssl-keyfile", str(layout.server_key),
            "--enable-supernode-auth",
        ]  # fmt: skip
    argv += [
        "--disable-runtime-dependency-installation",
        "--database", str(state / SUPERLINK_DB),
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    return argv


def _superlink_env(state_dir: Path, extra_env: dict[str, str] | None) -> dict[str, str]:
    env = {"FLWR_HOME": str((state_dir / SUPERLINK_FLWR_HOME).resolve())}
    env.update(extra_env or {})
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return flower_env(env)


def _health_context(settings: SuperLinkSettings) -> ssl.SSLContext | None:
    if settings.insecure:
        return None
    ca = CertificateLayout(Path(settings.certs_dir or "")).ca_cert
    context = ssl.create_default_context(cafile=str(ca))
    # the probe dials a loopback alias that need not be a name in the certificate; the chain
    # is still verified against the study's CA
    context.check_hostname = False
    return context


def _wait_for_health(
    handle: ProcessHandle,
    address: tuple[str, int],
    context: ssl.SSLContext | None,
    *,
    timeout: float,
) -> None:
    """Wait until ``GET /health`` answers 200 at ``address`` while the process runs; bounded."""
    host, port = address
    url_host = f"[{host}]" if ":" in host else host
    url = f"{'http' if context is None else 'https'}://{url_host}:{port}{_HEALTH_PATH}"
    deadline = time.monotonic() + timeout
    while True:
        if not handle.running():
            status = handle.wait_exit_status()
            raise ProcessExitedError(
                f"flower-superlink exited (status {status}) before {url} answered; its log "
                f"{handle.log_path} ends with:\n{handle.log_tail()}",
                returncode=status,
                log_tail=handle.log_tail(),
            )
        try:
            # our own URL (http/https to the SuperLink just started)
            with urllib.request.urlopen(url, timeout=2.0, context=context) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ReadyTimeoutError(
                f"flower-superlink did not answer {url} within {timeout:.0f} s; its log "
                f"{handle.log_path} ends with:\n{handle.log_tail()}",
                log_tail=handle.log_tail(),
            )
        time.sleep(_HEALTH_POLL_S)


def start_superlink(
    settings: SuperLinkSettings,
    *,
    ready_timeout: float = 60.0,
    extra_env: dict[str, str] | None = None,
) -> ProcessHandle:
    """Start ``flower-superlink`` in the background and wait until it listens; bounded.

    Parameters
    ----------
    settings : SuperLinkSettings
        Where and how to run it.
    ready_timeout : float
        Seconds to wait for it to listen; on timeout or early exit it is stopped and the
        error carries its log tail.
    extra_env : dict, optional
        More environment variables (e.g. ``PYTHONPATH`` for apps installed outside the venv).

    Returns
    -------
    ProcessHandle
        The running SuperLink (PID also in ``state_dir/superlink.pid``).

    Raises
    ------
    fedcare.flower_bridge.UnsupportedFlowerError
        When the installed flwr is not one whose SuperLink the front (or the Control API
        token) knows: nothing is started.
    """
    require("superlink-front")  # fail closed before anything is written or started
    require("control-token")
    if settings.insecure:
        warn_plaintext("the SuperLink")
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    (state / SUPERLINK_FLWR_HOME).mkdir(exist_ok=True)
    write_control_token(settings.control_token_file)
    handle = spawn(
        superlink_command(settings),
        log_path=settings.log_file,
        pid_file=settings.pid_file,
        env=_superlink_env(state, extra_env),
        cwd=state.resolve(),
    )
    control = settings.effective_control_address
    try:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
        host = "::1" if host == "::" else host
        context = _health_context(settings)
        _wait_for_health(handle, (host, settings.port), context, timeout=ready_timeout)
        _wait_for_health(handle, parse_address(control), context, timeout=ready_timeout)
    except BaseException:
        stop_process(handle)
        raise
    logger.info(
        "SuperLink PID %d: Fleet API on %s, Control/Runtime APIs on %s (token %s)",
        handle.pid, settings.address, control, settings.control_token_file,
    )  # fmt: skip
    return handle


def stop_superlink(state_dir: Path, *, timeout: float = 15.0) -> bool:
    """Stop the SuperLink whose PID file is in ``state_dir``; return False if it was gone.

    Raises
    ------
    fedcare.supervise.NotRunningError
        When ``state_dir`` holds no PID file.
    """
    return stop_pid_file(Path(state_dir) / SUPERLINK_PID, "SuperLink", timeout=timeout)


def _flwr(
    args: Sequence[str],
    *,
    flwr_home: Path,
    timeout: float,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = dict(extra_env or {})
    env["FLWR_HOME"] = str(flwr_home)
    try:
        return subprocess.run(  # noqa: S603 - argv built here, no shell
            [find_executable("flwr"), *args],
            env=flower_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FlowerCommandError(
            f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s: check that the "
            "SuperLink runs and is reachable"
        ) from None


def _json_from(output: str, command: str) -> dict[str, Any]:
    start = output.find("{")
    try:
        data = json.loads(output[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise FlowerCommandError(f"`{command}` printed no JSON object: {output.strip()[-500:]}")
    return data


def register_node(
    public_key: Path,
    connection: FlowerConnection,
    *,
    flwr_home: Path | None = None,
    timeout: float = 60.0,
) -> int:
    """Register a node's OpenSSH public key with the SuperLink; return its node id.

    Raises
    ------
    NodeRegistrationError
        When the SuperLink refuses (e.g. the key is already registered).
    """
    if not Path(public_key).is_file():
        raise FileNotFoundError(
            f"public key {public_key} not found: give the node's .pub file from "
            "the hospital's `fedcare node keygen` (NAME.pub)"
        )
    with _flwr_home(connection, flwr_home) as home:
        proc = _flwr(
            ["supernode", "register", str(Path(public_key).resolve()), CONNECTION_NAME,
             "--format", "json"],
            flwr_home=home,
            timeout=timeout,
        )  # fmt: skip
    data = _json_from(proc.stdout, "flwr supernode register")
    # `--format json` exits 0 even when registration failed: read "success"
    if not data.get("success") or "node-id" not in data:
        detail = str(data.get("error-message", proc.stderr)).strip()
        raise NodeRegistrationError(
            f"the SuperLink did not register {public_key}: {detail}. A key that is 'already in "
            "use' is registered already; otherwise check the address and CA certificate"
        )
    node_id = int(data["node-id"])
    logger.info("registered %s as node %d", public_key, node_id)
    return node_id


def run_status(
    run_id: int,
    connection: FlowerConnection,
    *,
    flwr_home: Path | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Return the run's entry from ``flwr ls CONN --run-id ID --format json``."""
    with _flwr_home(connection, flwr_home) as home:
        proc = _flwr(
            ["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"],
            flwr_home=home,
            timeout=timeout,
        )
    data = _json_from(proc.stdout, "flwr ls")
    runs = data.get("runs") or []
    if not data.get("success") or not runs:
        raise FlowerCommandError(
            f"`flwr ls --run-id {run_id}` failed: {data.get('error-message', proc.stderr)}"
        )
    return dict(runs[0])


def _flwr_listing(
    connection: FlowerConnection, command: list[str], key: str, *, flwr_home: Path | None, timeout: float
) -> list[dict[str, Any]]:
    """Return the ``key`` list of ``flwr COMMAND CONN --format json`` (one dict an entry)."""
    name = " ".join(["flwr", *command])
    with _flwr_home(connection, flwr_home) as home:
        proc = _flwr([*command, CONNECTION_NAME, "--format", "json"], flwr_home=home, timeout=timeout)
    data = _json_from(proc.stdout, name)
    if not data.get("success"):
        raise FlowerCommandError(
            f"`{name}` failed: {data.get('error-message', proc.stderr)}; check the address, CA "
            "certificate and Control API token"
        )
    return [dict(entry) for entry in data.get(key) or []]


def list_nodes(
    connection: FlowerConnection, *, flwr_home: Path | None = None, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Return ``flwr supernode ls CONN --format json``'s nodes (node id, status, online / offline at)."""
    return _flwr_listing(connection, ["supernode", "ls"], "nodes", flwr_home=flwr_home, timeout=timeout)


def list_runs(
    connection: FlowerConnection, *, flwr_home: Path | None = None, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Return ``flwr ls CONN --format json``'s runs (run id, app, status, times)."""
    return _flwr_listing(connection, ["ls"], "runs", flwr_home=flwr_home, timeout=timeout)


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended.

    Attributes
    ----------
    run_id : int
        The Flower run id.
    status : str
        ``finished:completed``, ``finished:failed``, ``finished:stopped``…
    details : str
        Flower's status details (the exception message when the ServerApp failed).
    elapsed_s : float
        Wall time from submission to the final status.
    """

    run_id: int
    status: str
    details: str
    elapsed_s: float

    @property
    def completed(self) -> bool:
        """Return whether the run finished successfully."""
        return self.status == "finished:completed"

    def check(self) -> None:
        """Raise :class:`RunFailedError` unless the run completed."""
        if not self.completed:
            raise RunFailedError(
                f"run {self.run_id} ended {self.status}: {self.details}. See the SuperLink "
                "log in its state folder and the streamed log above"
            )


def _pump(stream: Any, on_line: Callable[[str], None], seen: list[str]) -> None:
    for raw in iter(stream.readline, ""):
        line = raw.rstrip("\n")
        seen.append(line)
        on_line(line)


def _run_config_args(overrides: Mapping[str, str | bool] | None) -> list[str]:
    """Return ``--run-config 'key="value"'`` arguments (values quoted as TOML strings; quotes refused;
    a bool as a TOML bool: ``key=true``)."""
    args: list[str] = []
    for key, value in (overrides or {}).items():
        if isinstance(value, bool):  # fedcare run --resume
            args += ["--run-config", f"{key}={'true' if value else 'false'}"]
            continue
        if '"' in value or "'" in value or "\\" in value:
            raise RunSubmissionError(f"run-config override {key} may not contain quotes or backslashes; change it")
        args += ["--run-config", f'{key}="{value}"']
    return args


#: how long ``submit_run`` keeps polling a run's status while the SuperLink is unreachable (restarting)
SUPERLINK_PATIENCE_S: Final = 120.0


def submit_run(
    app_dir: Path,
    connection: FlowerConnection,
    *,
    timeout: float = 3600.0,
    status_timeout: float = 60.0,
    on_line: Callable[[str], None] | None = None,
    flwr_home: Path | None = None,
    extra_env: dict[str, str] | None = None,
    run_config: Mapping[str, str | bool] | None = None,
) -> RunOutcome:
    """Submit the Flower App in ``app_dir`` with ``flwr run --stream``; return its final status.

    ``flwr run`` exits 0 even when the run fails: the status is read with ``flwr ls``.

    Parameters
    ----------
    app_dir : pathlib.Path
        Folder with the app's ``pyproject.toml``.
    connection : FlowerConnection
        The SuperLink to submit to.
    timeout : float
        Seconds the run may take; past it the run is stopped and :class:`RunTimeoutError`
        raised.
    status_timeout : float
        Seconds to wait at least, after the log stream ends, for the run to report a finished
        status (polling goes on until ``timeout`` anyway). A SuperLink that becomes unreachable
        meanwhile (a restart: it keeps its runs in its database) is waited for, at most
        ``SUPERLINK_PATIENCE_S``, before :class:`FlowerCommandError` says how to resume.
    on_line : callable, optional
        Called with every streamed line (default: logged at INFO).
    flwr_home : pathlib.Path, optional
        FLWR_HOME for the ``flwr`` CLI (default: a temporary folder).
    extra_env : dict, optional
        More environment variables for ``flwr`` (it imports the app's modules to validate them).
    run_config : dict, optional
        Text overrides of keys the app's config holds (``flwr run --run-config``; the app and its
        hash are unchanged), e.g. the tracking keys of ``server.tracking``.

    Raises
    ------
    RunSubmissionError
        When no run was started.
    RunTimeoutError
        When the run did not finish in time.
    FlowerCommandError
        When ``flwr ls`` fails, or the SuperLink stays unreachable past ``SUPERLINK_PATIENCE_S``.
    """
    emit = on_line or (lambda line: logger.info("%s", _ANSI.sub("", line)))
    started = time.monotonic()
    with _flwr_home(connection, flwr_home) as home:
        env = dict(extra_env or {})
        env["FLWR_HOME"] = str(home)
        proc = subprocess.Popen(  # noqa: S603 - argv built here, no shell
            [find_executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION_NAME,
             "--stream", *_run_config_args(run_config)],
            env=flower_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        seen: list[str] = []
        reader = threading.Thread(target=_pump, args=(proc.stdout, emit, seen), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                stop_popen(proc, timeout=5.0)
            reader.join(timeout=5.0)
        text = _ANSI.sub("", "\n".join(seen))
        match = _RUN_ID.search(text)
        if match is None:
            raise RunSubmissionError(
                f"`flwr run` started no run (exit {proc.returncode}): {text.strip()[-1500:]}"
            )
        run_id = int(match.group(1))
        logger.info("run %d submitted", run_id)
        # the log stream can end before the run does (e.g. a dropped connection): keep
        # polling until the run's own deadline, and at least ``status_timeout`` after the stream
        now = time.monotonic()
        timed_out = now - started >= timeout
        deadline = now if timed_out else max(started + timeout, now + status_timeout)
        lost_since: float | None = None  # when `flwr ls` first found the SuperLink unavailable
        while True:
            try:
                entry = run_status(run_id, connection, flwr_home=home)
            except FlowerCommandError as err:  # a SuperLink restarting keeps its runs: wait for it, bounded
                now = time.monotonic()
                lost_since = now if lost_since is None else lost_since
                # unreachable (restarting) or too busy to answer in time (a loaded machine): both pass
                waitable = any(sign in str(err).lower() for sign in ("unavailable", "did not answer within"))
                if not waitable or now - lost_since >= SUPERLINK_PATIENCE_S or now > deadline:
                    raise FlowerCommandError(
                        f"lost the SuperLink while run {run_id} was running (unreachable for "
                        f"{now - lost_since:.0f} s): {err}. Restart it with the same state folder (fedcare "
                        "server start --state ...), check the run (fedcare server status), then resume the "
                        "study: fedcare run STUDY.toml --resume"
                    ) from err
                logger.warning("run %d: the SuperLink is unreachable (%.0f s); waiting for it", run_id, now - lost_since)
                time.sleep(2.0)
                continue
            lost_since = None
            status = str(entry.get("status", ""))
            if status.startswith("finished") or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        if not status.startswith("finished"):
            _flwr(["stop", str(run_id), CONNECTION_NAME], flwr_home=home, timeout=60.0)
            raise RunTimeoutError(
                f"run {run_id} had not finished after {time.monotonic() - started:.0f} s "
                f"(status {status!r}); it was asked to stop. Raise --timeout for longer studies"
            )
    outcome = RunOutcome(
        run_id=run_id,
        status=status,
        details=str(entry.get("status-details", "")),
        elapsed_s=time.monotonic() - started,
    )
    logger.info("run %d ended %s after %.1f s", run_id, outcome.status, outcome.elapsed_s)
    return outcome

