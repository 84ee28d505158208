"""The ``fedcare node`` commands a hospital runs: ``check`` validates a site before training.

The root CLI mounts :data:`node_app` as ``fedcare node``; ``keygen`` (this hospital's key pair)
and ``pin-app`` (the apps it runs) are added here, ``start`` and ``stop`` in ``cli.py``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from .check import check_site_file, report_renderables
from .errors import DataValidationError
from .node_cli import node_keygen, node_pin_app

__all__ = ["node_app"]

node_app = typer.Typer(
    name="node",
    help="A hospital's node: validate the site's data, then take part in a federation.",
    no_args_is_help=True,
    add_completion=False,
)


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
    out = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    try:
        report = check_site_file(site)
    except DataValidationError as exc:
        err.print(f"[bold red]✗ {site}: {type(exc).__name__}[/]", highlight=False)
        err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(code=1) from None
    for renderable in report_renderables(report):
        out.print(renderable)
    out.print(f"[bold green]✓ site {report.site} is ready to train[/]", highlight=False)


node_app.command("keygen")(node_keygen)
node_app.command("pin-app")(node_pin_app)
