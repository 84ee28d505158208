"""A hospital's gate on which Flower Apps its SuperNode may run: pinned by SHA-256.

flwr 1.41's own mechanism, ``flower-supernode --trusted-entities FILE`` (ed25519 publisher
keys), does not work for apps a consortium builds itself: the SuperNode accepts a FAB only if
the SuperLink attached Flower Hub verification records (``valid_license`` + signatures), and
the SuperLink attaches them only to apps it downloads from Flower Hub
(``control_handlers._get_remote_fab``); a FAB submitted with ``flwr run APP`` has none, so a
node with ``--trusted-entities`` refuses *every* self-built app, signed or not.

So fedcare pins apps by hash, at the node, **before any of the app's code is loaded**:
``fedcare node start --trust-app SHA256`` starts ``flower-supernode`` with a folder of
executables first on ``PATH``. flwr's SuperExec starts every task by command name
(``flwr-clientapp``, ``flwr-agentapp``, ... from ``TASK_TYPE_TO_COMMAND``), so:

- ``flwr-clientapp`` runs :func:`clientapp_main`: flwr's own ``flwr-clientapp`` with its FAB
  installation step wrapped. The FAB's SHA-256 is computed from the bytes the SuperNode
  received (not from the hash the SuperLink claims); an unpinned FAB raises
  :class:`UntrustedAppError` before it is unpacked, which flwr turns into an error reply to
  the ServerApp. A pinned FAB's hash is put in ``FEDCARE_APP_HASH`` for the ClientApp (same
  process) to record or check.
- every other task command (AgentApp, connector, model, ServerApp, simulation) is refused: a
  hospital node runs ClientApps only.

The pins come from ``FEDCARE_TRUSTED_APP_HASHES`` (comma-separated, set by ``node start``);
when it is empty or unset the gate refuses everything (fails closed).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "APP_HASH_ENV",
    "GATED_COMMANDS",
    "TRUSTED_APPS_ENV",
    "UntrustedAppError",
    "clientapp_main",
    "main",
    "parse_app_hash",
    "trusted_hashes_from_env",
    "write_gate_bin",
]

#: comma-separated SHA-256 hex digests the node may run (set by ``fedcare node start``)
TRUSTED_APPS_ENV = "FEDCARE_TRUSTED_APP_HASHES"
#: the verified FAB hash, set in the ``flwr-clientapp`` process before the ClientApp loads
APP_HASH_ENV = "FEDCARE_APP_HASH"
#: the task commands flwr 1.41 starts by name (``flwr.supercore.constant.TASK_TYPE_TO_COMMAND``)
GATED_COMMANDS = (
    "flwr-clientapp",
    "flwr-agentapp",
    "flwr-connector",
    "flwr-model",
    "flwr-serverapp",
    "flwr-simulation",
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class UntrustedAppError(Exception):
    """Raised in ``flwr-clientapp`` when the received FAB's hash is not pinned by the site."""


def parse_app_hash(value: str) -> str:
    """Return ``value`` as a lowercase SHA-256 hex digest; raise ValueError if it is not one."""
    digest = value.strip().lower()
    if not _SHA256.match(digest):
        raise ValueError(
            f"app hash {value!r} is not a SHA-256 hex digest (64 hex digits): take it from "
            "`fedcare server app-hash STUDY` or the `app ... hash` line `fedcare run` prints"
        )
    return digest


def trusted_hashes_from_env(environ: dict[str, str] | None = None) -> frozenset[str]:
    """Return the pinned hashes from ``FEDCARE_TRUSTED_APP_HASHES`` (empty set if unset)."""
    raw = (os.environ if environ is None else environ).get(TRUSTED_APPS_ENV, "")
    return frozenset(parse_app_hash(h) for h in raw.split(",") if h.strip())


def write_gate_bin(folder: Path, python: str | None = None) -> Path:
    """Write the gate's executables (one per task command) into ``folder``; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    interpreter = shlex.quote(python or sys.executable)
    for command in GATED_COMMANDS:
        path = folder / command
        path.write_text(
            "#!/bin/sh\n"
            "# written by fedcare node start: only apps pinned with --trust-app run here\n"
            f"exec {interpreter} -m fedcare.client.app_gate {command} \"$@\"\n",
            encoding="utf-8",
        )
        path.chmod(0o755)
    return folder


def _fab_digest(fab_file: Path | bytes) -> str:
    content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
    return hashlib.sha256(content).hexdigest()


def clientapp_main(argv: Sequence[str], trusted: Iterable[str]) -> None:
    """Run flwr's ``flwr-clientapp`` with ``argv``, refusing FABs whose hash is not ``trusted``."""
    allowed = frozenset(trusted)
    import flwr.supernode.runtime.run_clientapp as runtime  # noqa: PLC0415 - heavy import
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # noqa: PLC0415

    install = runtime.install_from_fab

    def checked_install(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Path:
        digest = _fab_digest(fab_file)
        if digest not in allowed:
            pinned = ", ".join(sorted(h[:12] + "..." for h in allowed)) or "none"
            raise UntrustedAppError(
                f"this site does not run app {digest} (pinned: {pinned}); the coordinator must "
                "run an app the hospital reviewed, or the hospital must pin it with "
                "`fedcare node start --trust-app HASH`"
            )
        os.environ[APP_HASH_ENV] = digest
        return install(fab_file, *args, **kwargs)

    runtime.install_from_fab = checked_install
    sys.argv = ["flwr-clientapp", *argv]
    flwr_clientapp()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the gate executables: ``python -m fedcare.client.app_gate COMMAND ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    if command not in GATED_COMMANDS:
        sys.stderr.write(f"fedcare app gate: unknown command {command!r}\n")
        return 2
    if command != "flwr-clientapp":
        sys.stderr.write(
            f"fedcare app gate: refused `{command}`: a hospital node runs pinned ClientApps only\n"
        )
        return 1
    try:
        trusted = trusted_hashes_from_env()
    except ValueError as err:
        sys.stderr.write(f"fedcare app gate: {TRUSTED_APPS_ENV} is invalid: {err}\n")
        return 2
    clientapp_main(args[1:], trusted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
