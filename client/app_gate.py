"""A hospital's gate on which Flower Apps its SuperNode may run: pinned by SHA-256.

flwr's own mechanism, ``flower-supernode --trusted-entities FILE`` (ed25519 publisher
keys), does not work for apps a consortium builds itself: the SuperNode accepts a FAB only if
the SuperLink attached Flower Hub verification records (``valid_license`` + signatures), and
the SuperLink attaches them only to apps it downloads from Flower Hub
(``control_handlers._get_remote_fab``); a FAB submitted with ``flwr run APP`` has none, so a
node with ``--trusted-entities`` refuses *every* self-built app, signed or not.

So fedcare pins apps by hash, at the node, **before any of the app's code is loaded**. Every
``fedcare node start`` starts ``flower-supernode`` with a folder of executables first on
``PATH`` (there is no ungated node: an app nobody pinned is refused unless the site's policy
says ``allow_unpinned_apps = true``). flwr's SuperExec starts every task by command name
(``flwr-clientapp``, ``flwr-agentapp``, ... from flwr's ``TASK_TYPE_TO_COMMAND``, read through
:func:`fedcare.flower_bridge.gated_task_commands`), so:

- ``flwr-clientapp`` runs :func:`clientapp_main`: flwr's own ``flwr-clientapp`` with its FAB
  installation step wrapped (:func:`fedcare.flower_bridge.run_gated_clientapp`). The FAB's
  SHA-256 is computed from the bytes the SuperNode received (not from the hash the SuperLink
  claims); an unpinned FAB raises
  :class:`UntrustedAppError` before it is unpacked, which flwr turns into an error reply to
  the ServerApp. A pinned FAB's hash is put in ``FEDCARE_APP_HASH`` for the ClientApp (same
  process) to record or check.
- every other task command (AgentApp, connector, model, ServerApp, simulation) is refused: a
  hospital node runs ClientApps only.

The pins are read when each task starts: ``FEDCARE_TRUSTED_APP_HASHES`` (comma-separated,
``node start --trust-app`` / ``--trusted-apps``) plus the ``allowed_app_hashes`` of the site
policy file named in ``FEDCARE_GATE_POLICY`` (``node start --policy``; ``fedcare node pin-app``
adds to it, effective from the next task). With no pin at all the gate refuses everything
(fails closed); an unreadable or invalid policy file refuses everything too. Only the policy
key ``allow_unpinned_apps = true`` lets an unpinned app through (warned as weakening).

The gate reaches into flwr (its task table, its FAB installation step); that patch is a
security control, so on a flwr whose version or code :mod:`fedcare.flower_bridge` does not
recognise the gate fails closed: ``node start`` refuses to start
(:class:`~fedcare.flower_bridge.UnsupportedFlowerError` from :func:`write_gate_bin`) and a
gated task refuses to run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..flower_bridge import UnsupportedFlowerError, gated_task_commands, run_gated_clientapp

__all__ = [
    "APP_HASH_ENV",
    "GATE_POLICY_ENV",
    "TRUSTED_APPS_ENV",
    "UntrustedAppError",
    "app_allowed",
    "clientapp_main",
    "gated_commands",
    "main",
    "parse_app_hash",
    "trusted_hashes_from_env",
    "write_gate_bin",
]

#: comma-separated SHA-256 hex digests the node may run (set by ``fedcare node start``)
TRUSTED_APPS_ENV = "FEDCARE_TRUSTED_APP_HASHES"
#: absolute path of the site policy file whose pins the gate also accepts (``node start --policy``)
GATE_POLICY_ENV = "FEDCARE_GATE_POLICY"
#: the verified FAB hash, set in the ``flwr-clientapp`` process before the ClientApp loads
APP_HASH_ENV = "FEDCARE_APP_HASH"
#: the only task command a hospital node runs
_CLIENTAPP = "flwr-clientapp"
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


def gated_commands() -> tuple[str, ...]:
    """Return every task command flwr starts by name (each gets a gate executable).

    Raises
    ------
    fedcare.flower_bridge.UnsupportedFlowerError
        When the installed flwr is not one whose task table and FAB installation the gate
        knows (the node must not start).
    """
    commands = gated_task_commands()
    if _CLIENTAPP not in commands:  # pragma: no cover - guarded by the fingerprint
        raise UnsupportedFlowerError(f"flwr starts no {_CLIENTAPP} task: fedcare cannot gate this flwr")
    return commands


def write_gate_bin(folder: Path, python: str | None = None) -> Path:
    """Write the gate's executables (one per task command) into ``folder``; return it.

    Raises
    ------
    fedcare.flower_bridge.UnsupportedFlowerError
        When the gate does not recognise the installed flwr (fails closed: nothing is written).
    """
    commands = gated_commands()
    folder.mkdir(parents=True, exist_ok=True)
    interpreter = shlex.quote(python or sys.executable)
    for command in commands:
        path = folder / command
        path.write_text(
            "#!/bin/sh\n"
            "# written by fedcare node start: only apps the site pinned run here\n"
            f"exec {interpreter} -m fedcare.client.app_gate {command} \"$@\"\n",
            encoding="utf-8",
        )
        path.chmod(0o755)
    return folder


def _fab_digest(fab_file: Path | bytes) -> str:
    content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
    return hashlib.sha256(content).hexdigest()


def app_allowed(digest: str, trusted: Iterable[str], policy_path: str | None) -> bool:
    """Return True if app ``digest`` is pinned, False if it runs only because the policy allows
    unpinned apps (warned); raise :class:`UntrustedAppError` if it must not run.

    The policy file is read now (so a pin added with ``fedcare node pin-app`` counts from the
    next task); an unreadable or invalid one refuses the app (fail closed).
    """
    from ..privacy.policy import PolicyFileError, load_policy  # noqa: PLC0415

    allowed = set(trusted)
    allow_unpinned = False
    if policy_path:
        try:
            policy = load_policy(policy_path)
        except PolicyFileError as err:
            raise UntrustedAppError(
                f"this site does not run app {digest}: its policy file cannot be read ({err}); "
                "fix the policy file, then the next round is checked again"
            ) from None
        allowed.update(policy.allowed_app_hashes or ())
        allow_unpinned = policy.allow_unpinned_apps
    if digest in allowed:
        return True
    if allow_unpinned:
        sys.stderr.write(
            f"fedcare app gate: WARNING running app {digest}, which the site did not pin, "
            "because its policy says allow_unpinned_apps = true\n"
        )
        return False
    pinned = ", ".join(sorted(h[:12] + "..." for h in allowed)) or "none"
    raise UntrustedAppError(
        f"this site does not run app {digest} (pinned: {pinned}); the coordinator must run an "
        "app the hospital reviewed, or the hospital must pin it with `fedcare node pin-app "
        "HASH --policy FILE` (or `fedcare node start --trust-app HASH`)"
    )


def clientapp_main(argv: Sequence[str], trusted: Iterable[str], *, policy_path: str | None = None) -> None:
    """Run flwr's ``flwr-clientapp`` with ``argv``, refusing FABs the site did not pin.

    Raises :class:`~fedcare.flower_bridge.UnsupportedFlowerError` (runs nothing) on a flwr
    the gate does not recognise.

    Parameters
    ----------
    argv : sequence of str
        ``flwr-clientapp``'s arguments.
    trusted : iterable of str
        Pinned SHA-256 digests (``--trust-app``).
    policy_path : str or None
        The site policy file: its ``allowed_app_hashes`` count as pins and its
        ``allow_unpinned_apps`` is honoured; read when the FAB arrives.
    """
    allowed = frozenset(trusted)

    def check_fab(content: bytes) -> None:
        digest = _fab_digest(content)
        if app_allowed(digest, allowed, policy_path):
            os.environ[APP_HASH_ENV] = digest
        else:
            os.environ.pop(APP_HASH_ENV, None)

    run_gated_clientapp(argv, check_fab)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the gate executables: ``python -m fedcare.client.app_gate COMMAND ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    try:
        commands = gated_commands()
    except UnsupportedFlowerError as err:  # fail closed: no task runs on an unknown flwr
        sys.stderr.write(f"fedcare app gate: refused `{command}`: {err}\n")
        return 1
    if command not in commands:
        sys.stderr.write(f"fedcare app gate: unknown command {command!r}\n")
        return 2
    if command != _CLIENTAPP:
        sys.stderr.write(
            f"fedcare app gate: refused `{command}`: a hospital node runs pinned ClientApps only\n"
        )
        return 1
    try:
        trusted = trusted_hashes_from_env()
    except ValueError as err:
        sys.stderr.write(f"fedcare app gate: {TRUSTED_APPS_ENV} is invalid: {err}\n")
        return 2
    clientapp_main(args[1:], trusted, policy_path=os.environ.get(GATE_POLICY_ENV) or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
