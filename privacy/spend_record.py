"""A site's append-only, hash-chained record of the privacy it has spent, checked against its ledgers.

The privacy ledger (``privacy.ledger``) is one JSON file per (site, study), rewritten atomically
on every change. Deleting it, or putting back an older copy, would silently restart ε (at zero or
at the older value). This module keeps, beside the ledgers, one *spend record* per site: a JSON
lines file to which every ledger write appends one line::

    {"seq": 7, "site": "hospital-a", "study": "heart", "epsilon": 1.234, "ledger_sha256": "…",
     "at": "2026-01-15T10:00:00.000+00:00", "prev": "<hash of line 6>", "hash": "<sha256>"}

``epsilon`` is the study's ε spent after the write (``"inf"`` once a model was released without
DP), ``ledger_sha256`` the ledger's own checksum, ``hash`` the SHA-256 of the line's canonical JSON
without ``hash`` and ``prev`` the previous line's hash (64 zeros for the first). Lines are only
appended (under an exclusive ``flock``, then ``fsync``); nothing ever rewrites the file.

When a ledger is opened (``PrivacyLedger.open``, so at every round of the ClientApp, and at
``fedcare node start``) the record is verified: the chain must be intact, and for every study it
names the ledger file must exist and hold an ε at least the last one recorded. Otherwise
:class:`~fedcare.privacy.errors.LedgerRollbackError` stops the site (fail closed) saying which file
is missing or rolled back and how to restore it. The ledger is written before its line is
appended, so a crash between the two leaves a ledger *ahead* of the record, which is accepted.

A second copy. ``FEDCARE_SPEND_RECORD_COPY`` (a folder, ideally on another volume or host the
hospital backs up separately) receives the same lines. The two must agree (one a prefix of the
other); a record missing from the ledger folder while its copy shows spending stops the site too,
which is how the deletion of the *whole* ledger folder is detected. A missing copy is re-seeded
from the ledger folder's record (with a warning).

Limits (docs/privacy.md). The hash chain detects accidental or careless changes, deletions and
rollbacks of single files; it is not keyed: someone with write access who deletes (or rewrites
consistently) the ledgers *and* every copy of the record is not detected. Without a copy, deleting
the whole ledger folder cannot be detected from inside that folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Final

from .errors import LedgerRollbackError, SpendRecordCorruptError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - not on the supported platforms
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "COPY_ENV",
    "GENESIS",
    "RECORD_SUFFIX",
    "SpendRecord",
    "record_path",
]

logger = logging.getLogger(__name__)

RECORD_SUFFIX: Final = ".spend-record.jsonl"
COPY_ENV: Final = "FEDCARE_SPEND_RECORD_COPY"
GENESIS: Final = "0" * 64
_FIELDS: Final = ("seq", "site", "study", "epsilon", "ledger_sha256", "at", "prev")
#: a ledger's ε may differ from the recorded one by floating-point noise only (same history)
_REL_TOL: Final = 1e-9


def _slug(text: str) -> str:
    """Return a file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:48] or "x"


def record_path(directory: Path | str, *, site: str) -> Path:
    """Return the spend record of ``site`` in ``directory``."""
    digest = hashlib.sha256(site.encode()).hexdigest()[:12]
    return Path(directory) / f"{_slug(site)}__{digest}{RECORD_SUFFIX}"


def _hash(line: dict[str, Any]) -> str:
    """Return the SHA-256 of a line's canonical JSON without its ``hash``."""
    body = {k: line[k] for k in _FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def _epsilon_value(raw: Any) -> float:
    """Return a recorded ε as a float (``"inf"`` is infinity)."""
    if raw == "inf":
        return math.inf
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
        raise ValueError(f"ε {raw!r} is not a non-negative number")
    return float(raw)


def _read_chain(path: Path, site: str) -> list[dict[str, Any]]:
    """Return the verified lines of one record file ([] when absent); raise when the chain is broken."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise SpendRecordCorruptError(path, f"unreadable ({type(exc).__name__})") from None
    lines: list[dict[str, Any]] = []
    prev = GENESIS
    raw_lines = text.split("\n")
    if raw_lines and raw_lines[-1] == "":
        raw_lines.pop()
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = json.loads(raw)
            if not isinstance(line, dict) or set(line) != {*_FIELDS, "hash"}:
                raise ValueError("unexpected fields")
            _epsilon_value(line["epsilon"])
            ok = line["seq"] == number and line["prev"] == prev and line["site"] == site and _hash(line) == line["hash"]
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise SpendRecordCorruptError(path, f"line {number} is malformed or breaks the hash chain")
        lines.append(line)
        prev = line["hash"]
    return lines


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[IO[str]]:
    """Open ``path`` for appending (created 0600) under an exclusive ``flock``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a+", encoding="utf-8") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _append_line(handle: IO[str], line: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk."""
    handle.write(json.dumps(line, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


class SpendRecord:
    """The spend record of one site: ``record_path(directory)`` plus the optional copy.

    Parameters
    ----------
    directory : path
        The site's ledger folder.
    site : str
        The site's name.
    copy_dir : path, optional
        Folder of the second copy; default ``$FEDCARE_SPEND_RECORD_COPY`` (none when unset).
    """

    def __init__(self, directory: Path | str, *, site: str, copy_dir: Path | str | None = None) -> None:
        self.site = site
        self.path = record_path(directory, site=site)
        copy = copy_dir if copy_dir is not None else os.environ.get(COPY_ENV) or None
        self.copy_path = record_path(Path(copy).expanduser(), site=site) if copy else None

    def lines(self) -> list[dict[str, Any]]:
        """Return the verified record (the longer of the two copies); raise when they disagree.

        Raises
        ------
        SpendRecordCorruptError
            A copy's chain is broken, or the two copies fork.
        LedgerRollbackError
            The record is missing from the ledger folder while its copy shows spending.
        """
        main = _read_chain(self.path, self.site)
        if self.copy_path is None:
            return main
        copy = _read_chain(self.copy_path, self.site)
        short, long_ = (main, copy) if len(main) <= len(copy) else (copy, main)
        if [line["hash"] for line in short] != [line["hash"] for line in long_[: len(short)]]:
            raise SpendRecordCorruptError(
                self.path, f"it disagrees with its copy {self.copy_path} (one of them was rolled back or edited)"
            )
        if not main and copy:
            raise LedgerRollbackError(
                f"the spend record of site {self.site!r} ({self.path}) is missing but its copy {self.copy_path} "
                f"shows {len(copy)} ledger write(s): the ledger folder was deleted or replaced. The site must "
                f"not train: restore the ledger folder from a backup, then copy {self.copy_path} to {self.path}. "
                "Never start the site over with empty ledgers: ε spent would restart at zero."
            )
        return long_

    def last_by_study(self) -> dict[str, tuple[float, str]]:
        """Return, per study, (ε recorded last, ledger checksum recorded last)."""
        out: dict[str, tuple[float, str]] = {}
        for line in self.lines():
            out[str(line["study"])] = (_epsilon_value(line["epsilon"]), str(line["ledger_sha256"]))
        return out

    def append(self, *, study: str, epsilon: float, ledger_sha256: str) -> None:
        """Append one line (study, ε after the write, ledger checksum) to the record and its copy."""
        with _locked(self.path) as handle:
            lines = self.lines()
            line: dict[str, Any] = {
                "seq": len(lines) + 1,
                "site": self.site,
                "study": study,
                "epsilon": "inf" if math.isinf(epsilon) else float(epsilon),
                "ledger_sha256": ledger_sha256,
                "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "prev": lines[-1]["hash"] if lines else GENESIS,
            }
            line["hash"] = _hash(line)
            main_count = len(_read_chain(self.path, self.site))
            for missing in lines[main_count:]:  # the copy was ahead (a crash between the two appends)
                _append_line(handle, missing)
            _append_line(handle, line)
            if self.copy_path is not None:
                self._append_copy(lines + [line])

    def _append_copy(self, lines: list[dict[str, Any]]) -> None:
        """Bring the copy up to ``lines`` (re-seeding a missing copy, with a warning)."""
        assert self.copy_path is not None
        with _locked(self.copy_path) as handle:
            have = len(_read_chain(self.copy_path, self.site))
            if have == 0 and len(lines) > 1:
                logger.warning("spend record copy %s was missing: re-seeded from %s", self.copy_path, self.path)
            for line in lines[have:]:
                _append_line(handle, line)

    def check(self, epsilon_now: Callable[[str], float | None]) -> None:
        """Refuse ledgers that are missing or hold less ε than the record says was spent.

        Parameters
        ----------
        epsilon_now : callable
            Given a study, returns the ε its ledger file holds now, or None when the file is missing.

        Raises
        ------
        LedgerRollbackError
            Naming the study, its ledger file's state and how to restore it.
        SpendRecordCorruptError
            The record itself is broken.
        """
        for study, (recorded, _) in self.last_by_study().items():
            now = epsilon_now(study)
            if now is None:
                raise LedgerRollbackError(
                    f"the privacy ledger of site {self.site!r}, study {study!r} is missing, but the site's spend "
                    f"record {self.path} shows ε = {_show(recorded)} spent in it. The site refuses to train: "
                    "restore the ledger file from a backup (the latest one; an older copy is refused too). "
                    "Never start the study over with an empty ledger: ε would restart at zero."
                )
            if now < recorded * (1 - _REL_TOL) - 1e-12:
                raise LedgerRollbackError(
                    f"the privacy ledger of site {self.site!r}, study {study!r} holds ε = {_show(now)}, less than "
                    f"the ε = {_show(recorded)} the site's spend record {self.path} shows was spent: an older copy "
                    "was put back (rolled back). The site refuses to train: restore the latest ledger file from a "
                    "backup. Never replace a ledger by an older one."
                )


def _show(epsilon: float) -> str:
    """Format an ε for a message."""
    return "infinite (a model was released without DP)" if math.isinf(epsilon) else f"{epsilon:.4f}"
