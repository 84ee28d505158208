"""The ``fedcare`` command: thin; parses arguments and calls one function per command."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="fedcare: federated learning for hospitals.")


def main() -> None:
    """Run the ``fedcare`` command line."""
    app()
