"""Flower's telemetry and update check are off in every Flower process fedcare runs, set in one place.

The one place is ``fedcare.supervise`` (:data:`FLOWER_QUIET_ENV`, :func:`quiet_flower`): child
environments (:func:`flower_env`, :func:`spawn`) and the entry points (the ``fedcare`` command,
the ClientApp and ServerApp modules, the simulation runner) all go through it, and it forces the
values: a surrounding ``FLWR_TELEMETRY_ENABLED=1`` does not turn telemetry back on.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcare import supervise
from fedcare.supervise import FLOWER_QUIET_ENV, flower_env, quiet_flower, spawn, stop_process

PACKAGE = Path(supervise.__file__).resolve().parent
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
LOUD = {"FLWR_TELEMETRY_ENABLED": "1", "FLWR_DISABLE_UPDATE_CHECK": "0"}
_PRINT_ENV = "import os; print(os.environ.get('FLWR_TELEMETRY_ENABLED'), os.environ.get('FLWR_DISABLE_UPDATE_CHECK'))"


def _package_sources() -> list[Path]:
    """Return fedcare's own modules (not its tests, benchmarks or a virtual environment)."""
    skip = {"tests", "benchmarks", "docs", ".venv", "build", "fedcare.egg-info"}
    return [
        p for p in PACKAGE.rglob("*.py")
        if not (set(p.relative_to(PACKAGE).parts[:-1]) & skip) and not any(part.startswith(".") for part in p.parts)
    ]  # fmt: skip


def test_quiet_environment_is_what_the_architecture_requires() -> None:
    # Prepare / Execute / Assert
    assert dict(FLOWER_QUIET_ENV) == QUIET


def test_flower_env_forces_telemetry_off_over_the_callers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a shell that asks for telemetry, and a caller that passes it on explicitly
    for name, value in LOUD.items():
        monkeypatch.setenv(name, value)
    # Execute
    inherited = flower_env()
    explicit = flower_env(LOUD)
    # Assert
    assert {k: inherited[k] for k in QUIET} == QUIET
    assert {k: explicit[k] for k in QUIET} == QUIET


def test_quiet_flower_sets_the_mapping_given_and_returns_it() -> None:
    # Prepare
    env = {"PATH": "/usr/bin", **LOUD}
    # Execute
    returned = quiet_flower(env)
    # Assert
    assert returned is env
    assert env == {"PATH": "/usr/bin", **QUIET}


def test_spawned_child_runs_with_telemetry_off_even_when_given_an_environment_asking_for_it(tmp_path: Path) -> None:
    # Prepare
    log = tmp_path / "child.log"
    env = {**os.environ, **LOUD}
    # Execute
    handle = spawn([sys.executable, "-c", _PRINT_ENV], log_path=log, env=env)
    try:
        assert handle.popen is not None
        handle.popen.wait(timeout=60)
    finally:
        stop_process(handle, timeout=10)
    # Assert
    assert log.read_text(encoding="utf-8").split() == ["0", "1"]


@pytest.mark.parametrize("module", ["fedcare.cli", "fedcare.client.app"])
def test_entry_point_module_turns_telemetry_off_when_imported(module: str) -> None:
    # Prepare: a process started from a shell that asks for telemetry
    env = {**os.environ, **LOUD}
    code = f"import {module}; {_PRINT_ENV}"
    # Execute
    done = subprocess.run(  # noqa: S603 - fixed argv
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["0", "1"]


def test_flower_telemetry_variables_are_named_in_one_module_only() -> None:
    # Prepare
    named = [p for p in _package_sources() if "FLWR_TELEMETRY_ENABLED" in p.read_text(encoding="utf-8")]
    # Execute / Assert
    assert [p.relative_to(PACKAGE).as_posix() for p in named] == ["supervise.py"]


def test_every_child_process_fedcare_starts_gets_its_environment_through_supervise() -> None:
    # Prepare: every subprocess call in fedcare's modules
    calls = {"Popen", "run", "call", "check_call", "check_output"}
    offenders: list[str] = []
    for path in _package_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"):
                continue
            if node.func.attr not in calls:
                continue
            env = next((k.value for k in node.keywords if k.arg == "env"), None)
            # Execute: the environment must be built by flower_env or quiet_flower
            built = (
                isinstance(env, ast.Call)
                and isinstance(env.func, ast.Name)
                and env.func.id in {"flower_env", "quiet_flower"}
            )
            if not built:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    # Assert
    assert offenders == []
