"""The ``fedcare`` command: thin; parses arguments and calls one function per command.

Roles and their command groups:

- researcher: ``fedcare simulate``, ``fedcare evaluate``
- hospital IT: ``fedcare node check|start|stop``
- coordinator: ``fedcare certs init``, ``fedcare server start|stop|register-node``, ``fedcare run``,
  ``fedcare release``
- everyone: ``fedcare audit verify|membership|keygen|artefact-key|rotate``
"""

from __future__ import annotations

import os

import typer

from .client.cli import node_app
from .client.node_cli import node_start, node_stop
from .privacy.cli import audit_app
from .server.cli import certs_app, run_command, server_app
from .server.release import release_command
from .simulations.audit import membership_command
from .simulations.cli import evaluate, simulate

# Flower phones home unless told not to; a hospital's processes never do.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="fedcare: federated learning for hospitals.",
)
app.command("simulate")(simulate)
app.command("evaluate")(evaluate)
node_app.command("start")(node_start)
node_app.command("stop")(node_stop)
app.add_typer(node_app, name="node")
app.add_typer(certs_app, name="certs")
app.add_typer(server_app, name="server")
app.command("run")(run_command)
app.command("release")(release_command)
audit_app.command("membership")(membership_command)
app.add_typer(audit_app, name="audit")


def main() -> None:
    """Run the ``fedcare`` command line."""
    app()
