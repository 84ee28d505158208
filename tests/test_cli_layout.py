"""The ``fedcare`` command tree: one module per role, every command name kept (docs and scripts use them)."""

from __future__ import annotations

import importlib.util

from typer.main import get_command

from fedcare.cli import app

EXPECTED = {
    "simulate": None,
    "evaluate": None,
    "compare": None,
    "run": None,
    "release": None,
    "node": ["check", "keygen", "pin-app", "start", "stop", "status"],
    "certs": ["init", "node-bundle"],
    "server": ["start", "stop", "register-node", "status", "status-page", "app-hash"],
    "audit": ["verify", "keygen", "artefact-key", "rotate", "membership"],
    "study": ["convert"],
    "examples": ["copy"],
}


def test_root_command_has_every_role_command_in_order() -> None:
    # Prepare
    root = get_command(app)
    # Execute
    tree = {
        name: (list(cmd.commands) if hasattr(cmd, "commands") else None)  # type: ignore[attr-defined]
        for name, cmd in root.commands.items()  # type: ignore[attr-defined]
    }
    # Assert
    assert tree == EXPECTED


def test_each_role_group_comes_from_its_role_module() -> None:
    # Prepare
    root = get_command(app)
    # Execute
    modules = {
        name: root.commands[name].commands[first].callback.__module__  # type: ignore[attr-defined]
        for name, first in (("node", "start"), ("certs", "init"), ("server", "start"), ("audit", "verify"))
    }
    membership = root.commands["audit"].commands["membership"].callback.__module__  # type: ignore[attr-defined]
    # Assert
    assert modules == {
        "node": "fedcare.client.cli",
        "certs": "fedcare.server.cli",
        "server": "fedcare.server.cli",
        "audit": "fedcare.privacy.cli",
    }
    assert membership == "fedcare.simulations.cli"
    assert importlib.util.find_spec("fedcare.client.node_cli") is None
