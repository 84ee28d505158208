"""Where a run came from: its scenario file and digest, overrides, seed, library versions, git commit.

:func:`collect_provenance` is called once per run by the simulation runner; the result goes into
``summary.json`` (``"provenance"``), ``report.html`` and the tracking run's tags. Versions are read
from package metadata (no import); the git commit only when fedcare runs from a git checkout
(``git rev-parse`` with a timeout; None otherwise).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Final

from ..config_base import FrozenModel
from ..supervise import flower_env

__all__ = ["PROVENANCE_PACKAGES", "Provenance", "collect_provenance", "git_commit", "package_versions"]

logger = logging.getLogger(__name__)

PROVENANCE_PACKAGES: Final = ("fedcare", "flwr", "torch", "opacus", "numpy", "scikit-learn", "pydantic")
_PACKAGE_DIR: Final = Path(__file__).resolve().parent.parent
_GIT_TIMEOUT_S: Final = 5.0


class Provenance(FrozenModel):
    """What identifies a run's inputs and software.

    Attributes
    ----------
    scenario_file : str, optional
        The scenario TOML the run read (absolute path); None for a scenario built in code.
    scenario_sha256 : str, optional
        SHA-256 of that file's bytes.
    overrides : list of str
        ``--set KEY=VALUE`` overrides applied on top of the file, in order.
    seed : int
        The scenario's seed.
    versions : dict of str to str
        Installed versions of fedcare, flwr, torch, opacus and the main libraries ("not installed").
    git_commit : str, optional
        ``git rev-parse HEAD`` of fedcare's checkout; None when fedcare is not run from one.
    git_dirty : bool, optional
        Whether that checkout has uncommitted changes to tracked files.
    python, platform : str
        Interpreter version and ``platform.platform()``.
    started_utc : str
        When the run started (ISO 8601, UTC).
    """

    scenario_file: str | None
    scenario_sha256: str | None
    overrides: list[str] = []
    seed: int
    versions: dict[str, str]
    git_commit: str | None
    git_dirty: bool | None
    python: str
    platform: str
    started_utc: str


def package_versions(names: Sequence[str] = PROVENANCE_PACKAGES) -> dict[str, str]:
    """Return ``{package: version}`` from installed metadata ("not installed" when absent)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git(*args: str) -> str | None:
    """Run ``git -C <fedcare> ARGS`` (bounded in time); return its stripped output or None."""
    exe = shutil.which("git")
    if exe is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [exe, "-C", str(_PACKAGE_DIR), *args],
            capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False, env=flower_env(),
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> tuple[str | None, bool | None]:
    """Return fedcare's git commit and whether its checkout is dirty; (None, None) outside a checkout.

    Only the checkout whose top level is fedcare's own folder counts (an installed fedcare inside
    some other repository reports None).
    """
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != _PACKAGE_DIR:
        return None, None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def collect_provenance(scenario_file: Path | str | None, *, seed: int, overrides: Sequence[str] = ()) -> Provenance:
    """Return the provenance of a run of ``scenario_file`` (None: a scenario built in code)."""
    path = Path(scenario_file).expanduser().resolve() if scenario_file is not None else None
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None
    commit, dirty = git_commit()
    return Provenance(
        scenario_file=None if path is None else str(path),
        scenario_sha256=digest,
        overrides=list(overrides),
        seed=seed,
        versions=package_versions(),
        git_commit=commit,
        git_dirty=dirty,
        python=sys.version.split()[0],
        platform=platform.platform(),
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
