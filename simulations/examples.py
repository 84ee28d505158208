"""The shipped examples: scenarios and site manifests, copied out of the installed package.

``fedcare examples copy DIR`` writes ``DIR/scenarios/*.toml`` and ``DIR/sites/*.toml`` with the
same relative layout as in the package (a scenario names its manifests as ``../sites/x.toml``),
so the copies run as they are once ``FEDCARE_DATA_ROOT`` names the data folder (the example
manifests read their data under ``${FEDCARE_DATA_ROOT}/``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Final

__all__ = ["EXAMPLE_FOLDERS", "ExamplesExistError", "copy_examples", "example_files"]

logger = logging.getLogger(__name__)

_PACKAGE: Final = Path(__file__).resolve().parent

#: folder in DIR -> folder in the package
EXAMPLE_FOLDERS: Final = {"scenarios": _PACKAGE / "scenarios", "sites": _PACKAGE / "sites"}


class ExamplesExistError(FileExistsError):
    """Raised when a file ``copy_examples`` would write already exists (nothing is overwritten)."""


def example_files() -> dict[str, list[Path]]:
    """Return the shipped example files by folder (``scenarios``, ``sites``), sorted."""
    return {
        name: sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".toml", ".md"))
        for name, folder in EXAMPLE_FOLDERS.items()
    }


def copy_examples(destination: Path | str) -> list[Path]:
    """Copy every shipped scenario and site manifest into ``destination``; return the files written.

    Raises
    ------
    ExamplesExistError
        When any target file exists (checked before anything is written, so nothing is
        half-copied); choose an empty or new folder.
    """
    destination = Path(destination).expanduser()
    plan = [
        (source, destination / name / source.name)
        for name, files in example_files().items()
        for source in files
    ]
    taken = [str(target) for _, target in plan if target.exists() or target.is_symlink()]
    if taken:
        raise ExamplesExistError(
            f"{len(taken)} example file(s) already exist in {destination} (first: {taken[0]}); "
            "copy into a new or empty folder, nothing was written"
        )
    written = []
    for source, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    logger.info("copied %d example files into %s", len(written), destination)
    return written
