"""`fedcare --help` and `fedcare --version` start fast: importing the CLI loads no ML library."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

HEAVY = ("torch", "opacus", "sklearn", "pandas", "matplotlib")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -c`` or the CLI in a fresh interpreter, bounded in time."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, check=False)


def test_importing_the_cli_loads_no_heavy_library() -> None:
    """`import fedcare.cli` leaves torch, Opacus, scikit-learn, pandas and matplotlib unloaded."""
    # Prepare
    code = f"import sys, fedcare.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    # Execute
    done = _run("-c", code)
    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_version_prints_fedcare_version_and_exits_0() -> None:
    """`fedcare --version` prints fedcare's installed version and exits 0."""
    # Execute
    done = _run("-c", "from fedcare.cli import main; main()", "--version")
    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"fedcare {version('fedcare')}")
    assert f"flwr {version('flwr')}" in done.stdout


def test_typo_hint_is_printed_once() -> None:
    """A mistyped command gets exactly one "Did you mean" hint (typer and click both added one)."""
    # Execute
    done = _run("-c", "from fedcare.cli import main; main()", "simulat")
    # Assert
    assert done.returncode == 2
    assert done.stderr.count("Did you mean 'simulate'?") == 1
