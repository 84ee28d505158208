"""Shared pieces of the deployment benchmarks (chaos.py, load.py, framework_overhead.py).

The heart-disease study file, free loopback ports and the coordinator's certificates and
SuperLink settings come from the deployment tests' support module
(``tests/fixtures/deploy_support.py``), so that the tests and the benchmarks deploy the same
way; here, in addition, a process tree read from ``/proc`` (``/proc/PID/task/*/children``).
Imported by the scripts in this folder (``sys.path[0]`` when they run; ``tests/test_chaos.py``
loads ``chaos.py``, which puts this folder on ``sys.path`` itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))

from deploy_support import (  # noqa: E402
    Coordinator,
    free_port,
    heart_study_text,
    prepare_coordinator,
    write_heart_study,
)

__all__ = [
    "Coordinator",
    "children",
    "cmdline",
    "descendants",
    "free_port",
    "heart_study_text",
    "prepare_coordinator",
    "write_heart_study",
]


def cmdline(pid: int) -> str:
    """Return the command line of ``pid`` with spaces between its arguments ("" when gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """Return the child processes of ``pid`` (from /proc/PID/task/*/children; [] when gone)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Return the descendants of ``pid``, children before grandchildren of the same branch."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out
