"""fedcare.files: the one atomic-write helper (mode, atomic replacement, nothing left on error)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedcare.files import atomic_open, atomic_write, write_new


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_creates_file_with_owner_only_mode_by_default(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "ledger.json"
    # Execute
    returned = atomic_write(target, b'{"a": 1}')
    # Assert
    assert returned == target
    assert target.read_bytes() == b'{"a": 1}'
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_atomic_write_sets_the_mode_asked_for_regardless_of_umask(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "report.json"
    old_umask = os.umask(0o077)
    try:
        # Execute
        atomic_write(target, b"{}", mode=0o644)
    finally:
        os.umask(old_umask)
    # Assert
    assert _mode(target) == 0o644


def test_atomic_write_replaces_the_file_instead_of_rewriting_it_in_place(tmp_path: Path) -> None:
    # Prepare: a reader holding the old file open
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"old contents")
    old_inode = target.stat().st_ino
    with target.open("rb") as reader:
        # Execute
        atomic_write(target, b"new")
        # Assert: the reader still sees the whole old file (a rename, not a truncate + write)
        assert reader.read() == b"old contents"
    assert target.read_bytes() == b"new"
    assert target.stat().st_ino != old_inode


def test_error_while_writing_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "ledger.json"
    target.write_bytes(b"committed")
    # Execute
    with pytest.raises(RuntimeError, match="disk went away"):
        with atomic_open(target) as handle:
            handle.write(b"half of the new ")
            raise RuntimeError("disk went away")
    # Assert
    assert target.read_bytes() == b"committed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_missing_folder_is_an_error_unless_parents_are_made(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "run" / "state" / "history.json"
    # Execute / Assert
    with pytest.raises(FileNotFoundError):
        atomic_write(target, b"{}")
    atomic_write(target, b"{}", make_parents=True)
    assert target.read_bytes() == b"{}"


def test_write_new_creates_with_mode_and_refuses_an_existing_file(tmp_path: Path) -> None:
    # Prepare
    key = tmp_path / "node.key"
    # Execute
    write_new(key, b"secret", mode=0o600)
    # Assert
    assert key.read_bytes() == b"secret"
    assert _mode(key) == 0o600
    with pytest.raises(FileExistsError):
        write_new(key, b"other", mode=0o600)
    assert key.read_bytes() == b"secret"


def test_write_new_never_follows_a_symbolic_link(tmp_path: Path) -> None:
    # Prepare: a link planted where a key is about to be written, pointing elsewhere
    elsewhere = tmp_path / "elsewhere"
    link = tmp_path / "ca.key"
    link.symlink_to(elsewhere)
    # Execute / Assert
    with pytest.raises(FileExistsError):
        write_new(link, b"secret", mode=0o600)
    assert not elsewhere.exists()
