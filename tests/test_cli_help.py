"""Every argument and option of every ``fedcare`` command has help text; shell completion works."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import typer

from fedcare.cli import app

CLI = [sys.executable, "-c", "from fedcare.cli import main; main()"]


def _params(command: click.Command, path: tuple[str, ...]) -> list[tuple[str, click.Parameter]]:
    """Return ``(command path, parameter)`` for every parameter of ``command`` and its subcommands."""
    found = [(" ".join(path), p) for p in command.params]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _params(sub, (*path, name))
    return found


def test_every_argument_and_option_has_help_text() -> None:
    # Prepare
    root = typer.main.get_command(app)
    # Execute
    params = _params(root, ("fedcare",))
    missing = [f"{where} {p.name}" for where, p in params if not (getattr(p, "help", None) or "").strip()]
    # Assert: the walk saw the whole tree (arguments included), and nothing lacks help
    assert len(params) > 100
    assert any(isinstance(p, click.Argument) for _, p in params)
    assert missing == []


def test_argument_help_is_shown_by_help() -> None:
    # Execute
    done = subprocess.run([*CLI, "simulate", "--help"], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "COLUMNS": "200"})
    # Assert: the argument's own help, not only its name
    assert done.returncode == 0, done.stderr
    assert "Scenario TOML" in done.stdout


def test_show_completion_prints_a_bash_script() -> None:
    # Execute
    done = subprocess.run([*CLI, "--show-completion", "bash"], capture_output=True, text=True, timeout=120, check=False)
    # Assert
    assert done.returncode == 0, done.stderr
    assert "_FEDCARE_COMPLETE=complete_bash" in done.stdout
    assert "complete -o default -F _fedcare_completion fedcare" in done.stdout


def test_completion_completes_commands_and_subcommands() -> None:
    # Prepare: what the installed bash script runs on <TAB>
    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "_FEDCARE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        done = subprocess.run(CLI, capture_output=True, text=True, timeout=120, check=False, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    # Execute / Assert
    assert complete("fedcare sim", 1) == ["simulate"]
    assert {"start", "stop"} <= set(complete("fedcare node st", 2))
    assert "--foreground" in complete("fedcare node start --fore", 3)
