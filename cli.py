"""The ``fedcare`` command: wiring only; each role's commands live in that role's ``cli`` module.

Roles, their command groups and where the commands are:

- researcher (``simulations/cli.py``): ``fedcare simulate``, ``fedcare evaluate``,
  ``fedcare audit membership``; ``fedcare compare`` (``simulations/compare.py``)
- hospital IT (``client/cli.py``): ``fedcare node check|keygen|pin-app|start|stop``
- coordinator (``server/cli.py``): ``fedcare certs init|node-bundle``,
  ``fedcare server start|stop|register-node|app-hash``, ``fedcare run``, ``fedcare release``
- everyone (``privacy/cli.py``): ``fedcare audit verify|keygen|artefact-key|rotate``

Errors never print data values. Any exception a command does not handle itself ends as ONE line
on stderr (``error: <Type>: <message>``, exit code 1; usage errors keep click's exit code 2); the
message is shown only when fedcare raised it (its messages never quote patient values), a
library's message (numpy, pandas, torch… may quote a cell or a tensor) is replaced by its type
and where it was raised. ``--debug`` (anywhere on the command line) or ``FEDCARE_DEBUG=1`` prints a
plain traceback instead, without local variables (rich's pretty tracebacks with locals, which
printed feature and label tensors, are off for every command).
"""

from __future__ import annotations

import linecache
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Final

import typer
from pydantic import ValidationError

from .client.cli import node_app
from .privacy.cli import audit_app
from .server.cli import certs_app, release_command, run_command, server_app, study_app
from .simulations.cli import evaluate, examples_app, membership_command, simulate
from .simulations.compare import compare_command
from .supervise import quiet_flower

quiet_flower()  # Flower phones home unless told not to; a hospital's processes never do.

DEBUG_ENV: Final = "FEDCARE_DEBUG"
_PACKAGE_DIR: Final = Path(__file__).resolve().parent
_VENV_MARKERS: Final = ("site-packages", "dist-packages")
_SPACE = re.compile(r"\s+")

app = typer.Typer(
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell); root only
    help="fedcare: federated learning for hospitals. Add --debug (or FEDCARE_DEBUG=1) for a traceback on errors.",
    pretty_exceptions_enable=False,  # never rich's tracebacks: with locals they print data
    pretty_exceptions_show_locals=False,
)
app.command("simulate")(simulate)
app.command("evaluate")(evaluate)
app.command("compare")(compare_command)
app.add_typer(node_app, name="node")
app.add_typer(certs_app, name="certs")
app.add_typer(server_app, name="server")
app.command("run")(run_command)
app.add_typer(study_app, name="study")
app.add_typer(examples_app, name="examples")
app.command("release")(release_command)
audit_app.command("membership")(membership_command)
app.add_typer(audit_app, name="audit")
for _group in (app, node_app, certs_app, server_app, study_app, examples_app, audit_app):
    _group.suggest_commands = False  # click (8.2+) already says "Did you mean …?"; typer's would repeat it

_VERSIONED: Final = ("fedcare", "flwr", "torch", "opacus")


def version_line() -> str:
    """Return fedcare's version and those of flwr, torch and Opacus, read from package metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    parts = []
    for dist in _VERSIONED:
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts)


def _print_version(value: bool) -> None:
    """Print :func:`version_line` and exit 0 when ``--version`` is given."""
    if value:
        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the versions and exit."
    ),
) -> None:
    """fedcare: federated learning for hospitals. Add --debug (or FEDCARE_DEBUG=1) for a traceback on errors."""


def _raised_by_fedcare(exc: BaseException) -> bool:
    """Return whether fedcare wrote ``exc``'s message: its own exception type, or a ``raise`` in its code.

    A builtin error raised inside a C function called from fedcare (``float("…")`` quoting a cell)
    has fedcare's frame innermost too; only an explicit ``raise`` statement there counts.
    """
    if type(exc).__module__.startswith("fedcare"):
        return True
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    if not filename.is_relative_to(_PACKAGE_DIR) or any(m in filename.parts for m in _VENV_MARKERS):
        return False
    return linecache.getline(str(filename), tb.tb_lineno).lstrip().startswith("raise ")


def error_line(exc: BaseException) -> str:
    """Return the one line ``fedcare`` prints for an unhandled error: never a data value."""
    name = type(exc).__name__
    if isinstance(exc, ValidationError):  # field names and messages, never the input values
        text = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors())
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    elif _raised_by_fedcare(exc):
        text = str(exc)
    else:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" in {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        text = f"raised{where} (its message is not shown: it may quote data values)"
    return _SPACE.sub(" ", f"error: {name}: {text}").strip() + " (details: rerun with --debug)"


def main() -> None:
    """Run the ``fedcare`` command line: one line per error, a plain traceback with ``--debug``."""
    argv = sys.argv[1:]
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        app(args=argv, prog_name="fedcare")
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no data values
        if debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__)  # plain: no local variables
        else:
            sys.stderr.write(error_line(exc) + "\n")
        sys.exit(1)
