"""A hospital's side of a deployment: start and stop its ``flower-supernode``.

The node connects to the coordinator's SuperLink over TLS (``--root-certificates`` = the
federation CA certificate from the hospital's node bundle), authenticates with its own EC P-384
private key (OpenSSH format, made at the hospital with ``fedcare node keygen``; the coordinator
registers only its public half), and passes the ClientApp what it must know about the
site through ``--node-config``: ``site-manifest`` (absolute path of the site manifest TOML),
``site-name`` and ``ledger-dir``. :func:`start_node` returns once the SuperLink accepted the
node (Flower logs ``SuperNode ID: ...``) and reports how long that took.

The node runs only the Flower Apps (FABs) whose SHA-256 the hospital pinned
(``trusted_app_hashes`` and the site policy's ``allowed_app_hashes``); every other app is
refused before its code is loaded (see :mod:`fedcare.client.app_gate`: flwr's own
``--trusted-entities`` cannot verify self-built apps). A node with no pin does not start,
unless its policy opts out with ``allow_unpinned_apps = true`` (warned as weakening).

By default (``warm``) every ClientApp task is forked from a warm SuperExec that has torch,
fedcare and the site's data loaded (:mod:`fedcare.client.warm_exec`), and the idle node polls
the SuperLink every ``poll_interval_s`` (0.5 s; flwr waits 3 s: :mod:`fedcare.client.supernode_main`).

TLS mismatches fail fast, naming the cause (:class:`NodeTlsError`). Before the SuperNode starts,
:func:`probe_superlink_tls` opens one TLS handshake to the SuperLink's address with the node's own
settings (Python's ``ssl``, ALPN ``h2`` as gRPC does): an ``--insecure`` node whose SuperLink
completes a TLS handshake (flwr would retry its plaintext channel until the ready timeout, logging
only "Connection attempt failed"), a CA that did not sign the SuperLink's certificate, a
certificate issued for another name, and a SuperLink that does not speak TLS are refused at
once. A SuperLink that does not answer yet is left to flwr's retries. A SuperNode that exits
before it is ready is read the same way: its log's TLS error names the cause.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
import ssl
import tempfile
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..flower_bridge import SUPERNODE_ID_LOG
from ..privacy.policy import SitePolicy, load_policy
from ..supervise import (
    ProcessExitedError,
    ProcessHandle,
    ReadyTimeoutError,
    find_executable,
    flower_env,
    spawn,
    stop_pid_file,
    stop_process,
    wait_for_log,
)
from .app_gate import GATE_POLICY_ENV, TRUSTED_APPS_ENV, parse_app_hash, write_gate_bin
from .supernode_main import IDLE_POLL_S, POLL_OPTION
from .warm_exec import WARM_MANIFEST_ENV

#: flwr 1.41's SuperExec task polling interval (seconds, environment)
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"

__all__ = [
    "NODE_LOG",
    "NODE_PID",
    "ConflictingNodeTlsError",
    "NodeConfigValueError",
    "NodeDeployError",
    "NodeInsecureNotRequestedError",
    "NoPinnedAppsError",
    "NodePlaintextWarning",
    "NodeSettings",
    "NodeStarted",
    "NodeTlsError",
    "PinAppError",
    "TrustedAppsFileError",
    "UnpinnedAppsWarning",
    "node_config_string",
    "pin_app_in_policy",
    "read_trusted_apps",
    "start_node",
    "stop_node",
    "supernode_command",
]

logger = logging.getLogger(__name__)

NODE_PID = "supernode.pid"
NODE_LOG = "supernode.log"
NODE_FLWR_HOME = "flwr-home"
NODE_GATE_BIN = "app-gate"
NODE_WARM_BIN = "warm-superexec"
#: SuperExec task polling (flwr's default is 1 s) when the node runs warm
WARM_TASK_POLL_INTERVAL_S = "0.1"
#: readiness: the node id flwr logs once the SuperLink accepted the node (no API tells the
#: node's operator its id; the pattern lives with flwr's other internals in the bridge)
_READY = SUPERNODE_ID_LOG

# node-config keys the ClientApp reads (client/app.py)
SITE_MANIFEST_KEY = "site-manifest"
SITE_NAME_KEY = "site-name"
LEDGER_DIR_KEY = "ledger-dir"


class NodeDeployError(Exception):
    """Base class of the hospital-side deployment errors."""


class NodeInsecureNotRequestedError(NodeDeployError):
    """Raised when no CA certificate is given and plaintext was not explicitly asked for."""


class ConflictingNodeTlsError(NodeDeployError):
    """Raised when TLS material and ``insecure`` are both given."""


class NoPinnedAppsError(NodeDeployError):
    """Raised when a node would start with no pinned app and its policy does not opt out."""


class NodeConfigValueError(NodeDeployError):
    """Raised when a node-config value cannot be quoted for ``--node-config``."""


class NodeTlsError(NodeDeployError):
    """Raised when the node's TLS settings do not match the SuperLink's (plaintext vs TLS, CA, name)."""


class NodePlaintextWarning(UserWarning):
    """Warned when a SuperNode connects without TLS."""


class TrustedAppsFileError(NodeDeployError):
    """Raised when a trusted apps file holds something other than app hashes, or none."""


class PinAppError(NodeDeployError):
    """Raised when an app hash cannot be added to a site policy file automatically."""


class UnpinnedAppsWarning(UserWarning):
    """Warned when a site's policy lets its SuperNode run apps nobody pinned."""


def read_trusted_apps(path: Path) -> tuple[str, ...]:
    """Read pinned app hashes from a file: one SHA-256 hex digest per line, ``#`` comments.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    TrustedAppsFileError
        When a line is not a SHA-256 hex digest, or the file pins nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trusted apps file {path} not found: one app hash per line")
    hashes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                hashes.append(parse_app_hash(text))
            except ValueError as err:
                raise TrustedAppsFileError(f"{path}:{number}: {err}") from None
    if not hashes:
        raise TrustedAppsFileError(f"trusted apps file {path} pins no app: add the hashes to run")
    return tuple(dict.fromkeys(hashes))


_PIN_LINE = re.compile(r"^allowed_app_hashes\s*=\s*\[[^\]]*\][^\n]*$", re.MULTILINE)


def pin_app_in_policy(policy_path: Path, digest: str) -> bool:
    """Add app ``digest`` to the site policy's ``allowed_app_hashes``; return False if already there.

    The file is created (strict defaults plus the pin) when missing. Only the
    ``allowed_app_hashes`` line changes (other lines and comments stay); the edited file is
    parsed again and must equal the old policy plus the pin before it replaces the old one.

    Raises
    ------
    ValueError
        When ``digest`` is not a SHA-256 hex digest.
    fedcare.privacy.policy.PolicyFileError
        When the existing policy file is invalid.
    PinAppError
        When the file cannot be edited safely (edit ``allowed_app_hashes`` by hand then).
    """
    digest = parse_app_hash(digest)
    path = Path(policy_path)
    exists = path.is_file()
    old = load_policy(path) if exists else SitePolicy.strict_default()
    current = tuple(old.allowed_app_hashes or ())
    if digest in current:
        return False
    pins = (*current, digest)
    line = "allowed_app_hashes = [" + ", ".join(f'"{h}"' for h in pins) + "]"
    text = path.read_text(encoding="utf-8") if exists else ""
    if old.allowed_app_hashes is not None:
        new_text, count = _PIN_LINE.subn(line, text)
        if count != 1:
            raise PinAppError(
                f"{path}: cannot find one `allowed_app_hashes = [...]` line to extend; add "
                f'"{digest}" to it by hand'
            )
    else:  # a top-level key must come before any [table]: put it first
        new_text = f"{line}  # pinned with `fedcare node pin-app`\n{text}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".policy-", suffix=".toml", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new_text)
        tmp.chmod(path.stat().st_mode & 0o777 if exists else 0o644)
        expected = old.model_copy(update={"allowed_app_hashes": pins})
        if load_policy(tmp) != expected:
            raise PinAppError(
                f"{path}: editing allowed_app_hashes would change other settings; add "
                f'"{digest}" to allowed_app_hashes by hand'
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("pinned app %s in site policy %s", digest, path)
    return True


def _quote(value: str | int | float | bool) -> str:
    """Return ``value`` as a TOML value that flwr's ``--node-config`` parser reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if "\n" in value or "\r" in value:
        raise NodeConfigValueError(f"node-config value {value!r} holds a line break: rename it")
    # flwr splits on  key=('...'|"..."|\S+)  then reads each pair as TOML: a literal string
    # '...' keeps backslashes and spaces verbatim; fall back to "..." when the value has a '
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    raise NodeConfigValueError(
        f"node-config value {value!r} holds both quote kinds (or ' and a backslash), which "
        "flwr's --node-config cannot carry: move the file to a path without them"
    )


def node_config_string(values: Mapping[str, str | int | float | bool]) -> str:
    """Return ``values`` as one ``--node-config`` argument: ``key='value' other=1``."""
    for key in values:
        if not key or any(c.isspace() or c in "='\"" for c in key):
            raise NodeConfigValueError(f"node-config key {key!r} must be one word without = or quotes")
    return " ".join(f"{key}={_quote(val)}" for key, val in values.items())


class NodeSettings(BaseModel):
    """How to start a hospital's SuperNode.

    Attributes
    ----------
    site_manifest : pathlib.Path
        The site manifest TOML (validated before the node starts).
    superlink : str
        ``HOST:PORT`` of the coordinator's SuperLink.
    port : int
        Port of this node's own Runtime API (the ClientApp process talks to it on
        ``127.0.0.1``); each SuperNode on one host needs its own.
    state_dir : pathlib.Path
        Holds the PID file, the log and the node's FLWR_HOME (installed app bundles); the node
        runs with it as working directory.
    ca_cert : pathlib.Path or None
        The federation's CA certificate (``ca.crt`` from the node bundle the coordinator sent).
    auth_key : pathlib.Path or None
        This node's OpenSSH private key (``NAME.key`` from ``fedcare node keygen``, made here).
    ledger_dir : pathlib.Path or None
        Where the ClientApp keeps the site's privacy ledger (default ``state_dir/ledger``).
    site_name : str or None
        Overrides the manifest's ``site``.
    insecure : bool
        Plaintext without authentication; only when explicitly asked for.
    max_wait_time : float or None
        Seconds flwr keeps retrying an unreachable SuperLink before exiting (None: forever).
    extra_node_config : dict
        More node-config entries for the ClientApp (e.g. ``policy``: the site policy path, whose
        ``allowed_app_hashes`` the app gate also accepts).
    trusted_app_hashes : tuple of str or None
        SHA-256 digests of the Flower Apps (FABs) this node may run besides the policy's
        ``allowed_app_hashes``; any other app is refused before its code is loaded. With no
        pin at all the node does not start unless the policy sets ``allow_unpinned_apps``.
    warm : bool
        Run each ClientApp task in a process forked from a warm SuperExec that has torch,
        flwr and fedcare imported and the site's data read (:mod:`fedcare.client.warm_exec`),
        polling for tasks every 0.1 s; False: flwr's own SuperExec starts a fresh
        ``flwr-clientapp`` per message. Either way each task has its own process.
    poll_interval_s : float
        Seconds the idle SuperNode waits between asking the SuperLink for a message (flwr 1.41
        waits a fixed 3 s; below 3 the node runs through :mod:`fedcare.client.supernode_main`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    site_manifest: Path
    superlink: str
    port: int
    state_dir: Path
    ca_cert: Path | None = None
    auth_key: Path | None = None
    ledger_dir: Path | None = None
    site_name: str | None = None
    insecure: bool = False
    max_wait_time: float | None = None
    extra_node_config: dict[str, str | int | float | bool] = {}
    trusted_app_hashes: tuple[str, ...] | None = None
    warm: bool = True
    poll_interval_s: float = Field(default=0.5, ge=0.05, le=3.0)

    @field_validator("trusted_app_hashes")
    @classmethod
    def _hashes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                "an empty list of trusted apps would refuse every run: pin at least one app "
                "hash, or give None and pin apps in the site policy (allowed_app_hashes)"
            )
        return tuple(dict.fromkeys(parse_app_hash(v) for v in value))

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 0 < value < 65536:
            raise ValueError(f"port {value} must be in 1-65535")
        return value

    @field_validator("superlink")
    @classmethod
    def _superlink(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if "://" in value or not sep or not host or not port.isdigit():
            raise ValueError(f"--superlink {value!r} must be HOST:PORT without a URL scheme")
        return value

    @model_validator(mode="after")
    def _tls(self) -> NodeSettings:
        if self.insecure and (self.ca_cert is not None or self.auth_key is not None):
            raise ConflictingNodeTlsError(
                "--insecure cannot be combined with --ca or --key: node authentication "
                "needs TLS. Drop --insecure (the coordinator's SuperLink uses TLS)"
            )
        if not self.insecure and (self.ca_cert is None or self.auth_key is None):
            raise NodeInsecureNotRequestedError(
                "pass --ca CA.crt (the federation's CA certificate from the node bundle) and "
                "--key NODE.key (this hospital's private key from `fedcare node keygen`); "
                "--insecure connects in plaintext without authentication and is for test "
                "machines only"
            )
        if self.ca_cert is not None and not self.ca_cert.is_file():
            raise FileNotFoundError(
                f"CA certificate {self.ca_cert} not found: pass the ca.crt of the node bundle "
                "the coordinator sent (`fedcare certs node-bundle`)"
            )
        if self.auth_key is not None and not self.auth_key.is_file():
            raise FileNotFoundError(
                f"node key {self.auth_key} not found: make this hospital's key pair with "
                "`fedcare node keygen --out DIR --name NAME` and pass DIR/NAME.key"
            )
        return self

    @property
    def pid_file(self) -> Path:
        """Return the PID file path."""
        return self.state_dir / NODE_PID

    @property
    def log_file(self) -> Path:
        """Return the log file path."""
        return self.state_dir / NODE_LOG


def write_warm_bin(folder: Path, python: str | None = None) -> Path:
    """Write the warm ``flower-superexec`` (:mod:`fedcare.client.warm_exec`) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flower-superexec"
    path.write_text(
        "#!/bin/sh\n"
        "# written by fedcare node start: ClientApp tasks fork from a warm process\n"
        f"exec {shlex.quote(python or sys.executable)} -m fedcare.client.warm_exec \"$@\"\n",
        encoding="utf-8",
    )
    path.chmod(0o755)
    return folder


def supernode_command(settings: NodeSettings, *, site_name: str) -> list[str]:
    """Return the ``flower-supernode`` command line (absolute paths, node config quoted)."""
    ledger = (settings.ledger_dir or settings.state_dir / "ledger").resolve()
    config = {
        SITE_MANIFEST_KEY: str(settings.site_manifest.resolve()),
        SITE_NAME_KEY: site_name,
        LEDGER_DIR_KEY: str(ledger),
        **settings.extra_node_config,
    }
    if settings.poll_interval_s < IDLE_POLL_S:  # flwr's loop with a shorter idle wait
        argv = [sys.executable, "-m", "fedcare.client.supernode_main",
                POLL_OPTION, repr(settings.poll_interval_s), "--"]  # fmt: skip
    else:
        argv = [find_executable("flower-supernode")]
    if settings.insecure:
        argv.append("--insecure")
    else:
        ca = Path(settings.ca_cert or "").resolve()
        argv += ["--root-certificates", str(ca)]
        argv += ["--auth-supernode-private-key", str(Path(settings.auth_key or "").resolve())]
    argv += [
        "--superlink", settings.superlink,
        "--host", "127.0.0.1",
        "--port", str(settings.port),
        "--node-config", node_config_string(config),
    ]  # fmt: skip
    if settings.max_wait_time is not None:
        argv += ["--max-wait-time", str(settings.max_wait_time)]
    return argv


@dataclass(frozen=True)
class NodeStarted:
    """A SuperNode the SuperLink accepted.

    Attributes
    ----------
    handle : fedcare.supervise.ProcessHandle
        The running process.
    node_id : int
        The id the SuperLink gave the node.
    site_name : str
        The site it serves.
    ready_s : float
        Seconds from the start call to the SuperLink's acceptance.
    """

    handle: ProcessHandle
    node_id: int
    site_name: str
    ready_s: float


#: seconds one TLS probe of the SuperLink may take (connect + handshake)
TLS_PROBE_TIMEOUT_S = 5.0
#: X509 verify codes of a certificate issued for another host name / IP address
_NAME_MISMATCH_CODES = frozenset({62, 64})
#: what a SuperNode's log says when its TLS handshake failed (flwr 1.42: exit code 305)
_LOG_TLS_CAUSES = (
    ("CERTIFICATE_VERIFY_FAILED", "ca"),
    ("WRONG_VERSION_NUMBER", "plaintext"),
    ("SSL/TLS handshake error", "handshake"),
)


def _host_port(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) into host and port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _tls_message(cause: str, settings: NodeSettings, detail: str) -> str:
    """Return the one-line explanation of a TLS mismatch ``cause`` with what to do next."""
    link, ca = settings.superlink, settings.ca_cert
    if cause == "insecure":
        return (f"the SuperLink at {link} speaks TLS, but this node was started with --insecure (plaintext): "
                "start it with --ca BUNDLE/ca.crt (the federation's CA from the node bundle) and --key NODE.key "
                "instead of --insecure")
    if cause == "ca":
        return (f"the SuperLink at {link} presented a certificate that the CA certificate {ca} (--ca) did not "
                f"sign ({detail}): use the ca.crt of this federation's node bundle, or check --superlink")
    if cause == "name":
        return (f"the SuperLink's certificate is not issued for {_host_port(link)[0]!r} ({detail}): connect "
                "with --superlink to a name or address the certificate lists (`fedcare certs init --ip/--dns`)")
    if cause == "plaintext":
        return (f"the SuperLink at {link} does not speak TLS ({detail}); it was started with --insecure: start "
                "the SuperLink with --certs, or (test machines only) this node with --insecure")
    return (f"the TLS handshake with the SuperLink at {link} failed ({detail}): check --superlink, --ca and "
            "that the SuperLink runs with --certs")


def probe_superlink_tls(settings: NodeSettings, *, timeout: float = TLS_PROBE_TIMEOUT_S) -> bool:
    """Refuse TLS settings that cannot work with the SuperLink; return whether it answered the probe.

    One TCP connection and TLS handshake with the node's settings (``--ca`` verified, host name
    checked; or, ``--insecure``, no verification: only whether the peer speaks TLS at all).

    Raises
    ------
    NodeTlsError
        ``--insecure`` against a TLS SuperLink; a CA that did not sign its certificate; a
        certificate for another name; a TLS node against a plaintext SuperLink.
    """
    host, port = _host_port(settings.superlink)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:  # not listening (yet): flwr's own retries and the ready timeout apply
        logger.info("SuperLink %s did not answer the TLS probe (%s); the node will retry", settings.superlink, exc)
        return False
    if settings.insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # only: does the peer speak TLS?
    else:
        context = ssl.create_default_context(cafile=str(settings.ca_cert))
    context.set_alpn_protocols(["h2"])
    with sock:
        try:
            with context.wrap_socket(sock, server_hostname=host):
                handshake = True
        except ssl.SSLCertVerificationError as exc:
            cause = "name" if exc.verify_code in _NAME_MISMATCH_CODES else "ca"
            raise NodeTlsError(_tls_message(cause, settings, str(exc.verify_message))) from None
        except ssl.SSLError as exc:
            if settings.insecure:  # a plaintext SuperLink, as the node expects
                return True
            raise NodeTlsError(_tls_message("plaintext", settings, exc.reason or str(exc))) from None
        except (TimeoutError, OSError) as exc:  # the peer closed or stalled: inconclusive for a TLS node
            if settings.insecure:
                return True
            logger.info("TLS probe of %s inconclusive (%s); the node will try", settings.superlink, exc)
            return False
    if handshake and settings.insecure:
        raise NodeTlsError(_tls_message("insecure", settings, "TLS handshake completed"))
    return True


def _tls_error_from_log(settings: NodeSettings, log_tail: str) -> NodeTlsError | None:
    """Return the TLS error a SuperNode's log names (an early exit), or None."""
    for marker, cause in _LOG_TLS_CAUSES:
        if marker in log_tail:
            line = next((ln.strip() for ln in log_tail.splitlines() if marker in ln or "[SSL" in ln), marker)
            return NodeTlsError(_tls_message(cause, settings, line[:200]) + f"; the node's log: {settings.log_file}")
    return None


def start_node(
    settings: NodeSettings,
    *,
    ready_timeout: float = 120.0,
    extra_env: Mapping[str, str] | None = None,
) -> NodeStarted:
    """Start ``flower-supernode`` in the background and wait until the SuperLink accepts it.

    Parameters
    ----------
    settings : NodeSettings
        Where and how to run it.
    ready_timeout : float
        Seconds to wait for the SuperLink's acceptance; on timeout or early exit (e.g. an
        unregistered key: "Failed to activate SuperNode") the node is stopped and the error
        carries its log tail.
    extra_env : mapping, optional
        More environment variables (e.g. ``PYTHONPATH``).

    Returns
    -------
    NodeStarted
        The running node, its id, and the measured time to ready.
    """
    t0 = time.monotonic()
    from .manifest import load_manifest  # noqa: PLC0415 - torch via ..models: keep `fedcare --help` fast

    manifest = load_manifest(settings.site_manifest)
    site_name = settings.site_name or manifest.site
    if settings.insecure:
        message = (
            f"SuperNode {site_name!r} connects WITHOUT TLS (--insecure): model updates travel "
            "in plaintext and the node is not authenticated. Test machines only, never with "
            "patient data."
        )
        warnings.warn(message, NodePlaintextWarning, stacklevel=2)
        logger.warning(message)
    probe_superlink_tls(settings)  # a TLS mismatch fails here, in seconds, naming the cause
    # every node runs behind the app gate; the pins: --trust-app and the policy's own
    pins = tuple(settings.trusted_app_hashes or ())
    policy_file = settings.extra_node_config.get("policy")
    policy = load_policy(str(policy_file) if policy_file is not None else None)
    pins = tuple(dict.fromkeys(pins + tuple(policy.allowed_app_hashes or ())))
    if not pins and not policy.allow_unpinned_apps:
        raise NoPinnedAppsError(
            f"SuperNode {site_name!r} pins no app, so it would refuse every run: pin the study's "
            "app (the coordinator prints its hash: `fedcare server app-hash STUDY`) with "
            "`fedcare node pin-app HASH --policy FILE` and start with --policy FILE, or "
            "--trust-app HASH. Only a test node may opt out, with allow_unpinned_apps = true "
            "in its policy"
        )
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    (settings.ledger_dir or state / "ledger").mkdir(parents=True, exist_ok=True)
    env = {"FLWR_HOME": str((state / NODE_FLWR_HOME).resolve())}
    env.update(extra_env or {})
    env = flower_env(env)
    env.pop(TRUSTED_APPS_ENV, None)
    env.pop(GATE_POLICY_ENV, None)
    if policy.allow_unpinned_apps:
        message = (
            f"SuperNode {site_name!r} runs apps nobody pinned (allow_unpinned_apps = true in its "
            "policy): such an app may skip the site policy, the privacy ledger and DP. Pin the "
            "study's app hash instead before using patient data."
        )
        warnings.warn(message, UnpinnedAppsWarning, stacklevel=2)
        logger.warning(message)
    gate = write_gate_bin(state.resolve() / NODE_GATE_BIN)
    env["PATH"] = os.pathsep.join([str(gate), env["PATH"]])
    env[TRUSTED_APPS_ENV] = ",".join(settings.trusted_app_hashes or ())
    if policy_file is not None:
        env[GATE_POLICY_ENV] = str(Path(str(policy_file)).resolve())
    logger.info(
        "SuperNode %s runs only apps %s%s",
        site_name,
        ", ".join(h[:12] for h in pins) or "(none pinned)",
        " and, by its policy, unpinned ones" if policy.allow_unpinned_apps else "",
    )
    if settings.warm:
        warm_bin = write_warm_bin(state.resolve() / NODE_WARM_BIN)
        env["PATH"] = os.pathsep.join([str(warm_bin), env["PATH"]])
        env[WARM_MANIFEST_ENV] = str(settings.site_manifest.resolve())
        env.setdefault(TASK_POLL_ENV, WARM_TASK_POLL_INTERVAL_S)
    handle = spawn(
        supernode_command(settings, site_name=site_name),
        log_path=settings.log_file,
        pid_file=settings.pid_file,
        env=env,
        cwd=state.resolve(),
    )
    try:
        match = wait_for_log(handle, _READY, timeout=ready_timeout, what=f"SuperNode {site_name}")
    except (ProcessExitedError, ReadyTimeoutError) as exc:
        stop_process(handle)
        tls = _tls_error_from_log(settings, exc.log_tail or "")
        if tls is not None:
            raise tls from None
        raise
    except BaseException:
        stop_process(handle)
        raise
    ready_s = time.monotonic() - t0
    node_id = int(match.group(1))
    logger.info(
        "SuperNode %s (PID %d) accepted by %s as node %d, %.1f s after start",
        site_name,
        handle.pid,
        settings.superlink,
        node_id,
        ready_s,
    )
    return NodeStarted(handle=handle, node_id=node_id, site_name=site_name, ready_s=ready_s)


def stop_node(state_dir: Path, *, timeout: float = 15.0) -> bool:
    """Stop the SuperNode whose PID file is in ``state_dir``; return False if it was gone.

    Raises
    ------
    fedcare.supervise.NotRunningError
        When ``state_dir`` holds no PID file.
    """
    return stop_pid_file(Path(state_dir) / NODE_PID, "SuperNode", timeout=timeout)
