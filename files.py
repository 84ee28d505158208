"""Crash-safe file writes, the one place every package writes a file through.

Two ways to write, both durable (data ``fsync``-ed before the call returns):

- :func:`atomic_write` / :func:`atomic_open` replace a file *atomically*: the bytes go to a
  temporary file in the same folder (created with ``mode``, default 0600), which is ``fsync``-ed,
  renamed over the target with ``os.replace`` and the folder ``fsync``-ed, so a crash leaves the
  old file or the new one, never half of either, and no temporary file is left on an error.
  Ledgers, checkpoints, artefacts, reports and JSON results are written this way.
- :func:`write_new` creates a file that must not exist yet (``O_CREAT | O_EXCL``, no symbolic
  link followed) with ``mode`` from the start, for keys and certificates: never created with a
  wider mode and narrowed afterwards.

It lives at the package root, beside :mod:`fedcare.supervise`, because ``privacy/``, ``server/``,
``client/`` and ``simulations/`` all write files and ``privacy/`` may not import ``server/`` or
``client/``. It imports nothing from fedcare, so any module may import it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_open", "atomic_write", "fsync_dir", "write_new"]

#: the mode of a file fedcare writes unless told otherwise: readable by its owner only
PRIVATE_MODE = 0o600


def fsync_dir(folder: Path | str) -> None:
    """Flush a folder's entry table so that a rename in it survives a crash (best effort off POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path | str, *, mode: int = PRIVATE_MODE, make_parents: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary handle whose bytes replace ``path`` atomically when the block ends without error.

    Parameters
    ----------
    path : path
        The file to write (replaced when it exists).
    mode : int
        Its permission bits (set on the temporary file before any byte is written; not masked
        by the umask). Default 0600.
    make_parents : bool
        Create the missing parent folders first.

    Raises
    ------
    OSError
        When the folder is missing (without ``make_parents``) or not writable; the target is then
        unchanged and no temporary file is left behind. An exception raised in the block is
        re-raised the same way.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path | str, data: bytes, *, mode: int = PRIVATE_MODE, make_parents: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically (temporary file, ``fsync``, ``os.replace``, folder ``fsync``).

    See :func:`atomic_open` for ``mode`` and ``make_parents``. Returns ``path``.
    """
    with atomic_open(path, mode=mode, make_parents=make_parents) as handle:
        handle.write(data)
    return Path(path)


def write_new(path: Path | str, data: bytes, *, mode: int = PRIVATE_MODE) -> Path:
    """Create ``path`` with ``mode`` (masked by the umask, as ``open`` does) and write ``data``; it must not exist.

    Raises
    ------
    FileExistsError
        When ``path`` exists, as a file or as a symbolic link (never followed). Callers turn it
        into their own error saying how to replace the file.
    """
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # this call created it: leave no partial key behind
        raise
    return path
