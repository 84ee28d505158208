"""Audit commands: ``fedcare audit verify``, ``keygen``, ``artefact-key`` and ``rotate``.

Thin: each command parses its options, calls one function, and prints through rich. Wiring into
the root command (``cli.py``)::

    from .privacy.cli import audit_app
    app.add_typer(audit_app, name="audit")

``fedcare audit membership --model M --site SITE.toml`` needs the site loaders and the training
recipe from ``client/``, which ``privacy/`` must not import: it is registered on ``audit_app``
from ``simulations/`` (see ``docs/privacy.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from .artefacts import ArtefactError, ArtefactKey, generate_key, rotate
from .audit_log import AuditError, generate_signing_key, load_verify_key, verify_log

__all__ = ["audit_app"]

logger = logging.getLogger(__name__)
console = Console(stderr=True)
out = Console()

audit_app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # rich's tracebacks with locals print data (cli.main prints one line)
    pretty_exceptions_show_locals=False,
    help="Verify the signed audit log; create audit and artefact keys; rotate artefact keys.",
)

_HANDLED = (ArtefactError, AuditError, FileNotFoundError, IsADirectoryError, PermissionError)


def _fail(err: BaseException, code: int = 1) -> NoReturn:
    console.print("[bold red]error:[/] ", end="", soft_wrap=True)
    console.print(" ".join(str(err).split()), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@audit_app.command("verify")
def verify_command(
    log: Annotated[Path, typer.Argument(help="The audit log (JSON lines).")],
    key: Annotated[Path, typer.Option("--key", help="The coordinator's audit public key (PEM).")],
    anchor: Annotated[
        str | None,
        typer.Option("--anchor", help="An entry hash recorded elsewhere (the privacy report's audit head): the log must contain it."),
    ] = None,
) -> None:
    """Verify the whole chain and every signature; exit 1 naming the first bad entry."""
    try:
        report = verify_log(log, load_verify_key(key), anchor=anchor)
    except _HANDLED as err:
        _fail(err, 2)
    if not report.ok:
        console.print(f"[bold red]audit log {log} FAILED[/] at {report.describe()}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"audit log {log}: {report.describe()}", highlight=False, soft_wrap=True)


@audit_app.command("keygen")
def keygen_command(
    path: Annotated[Path, typer.Argument(help="Where to write the private key (mode 0600); .pub beside it.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key.")] = False,
) -> None:
    """Create the coordinator's Ed25519 audit signing key."""
    try:
        private, public = generate_signing_key(path, force=force)
    except _HANDLED as err:
        _fail(err)
    out.print(f"private key {private} (mode 0600, stays with the coordinator); public key {public}", highlight=False, soft_wrap=True)


@audit_app.command("artefact-key")
def artefact_key_command(
    path: Annotated[Path, typer.Argument(help="Where to write the AES-256 key (mode 0600).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key.")] = False,
) -> None:
    """Create a random AES-256-GCM key for encrypting artefacts at rest."""
    try:
        key = generate_key(path, force=force)
    except _HANDLED as err:
        _fail(err)
    out.print(f"artefact key {path} (mode 0600), key id {key.key_id}", highlight=False, soft_wrap=True)


@audit_app.command("rotate")
def rotate_command(
    files: Annotated[list[Path], typer.Argument(help="Encrypted artefacts to re-encrypt.")],
    old_key: Annotated[Path, typer.Option("--old-key", help="Key file they are encrypted under now.")],
    new_key: Annotated[Path, typer.Option("--new-key", help="Key file to re-encrypt them under.")],
) -> None:
    """Re-encrypt artefacts under a new key (all authenticated first; each file replaced atomically)."""
    try:
        old, new = ArtefactKey.from_file(old_key), ArtefactKey.from_file(new_key)
        done = rotate(files, old, new)
    except _HANDLED as err:
        _fail(err)
    out.print(f"re-encrypted {len(done)} of {len(files)} artefacts under key id {new.key_id}", highlight=False, soft_wrap=True)
