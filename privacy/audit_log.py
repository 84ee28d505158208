"""A tamper-evident, append-only audit log of a federated run, signed with Ed25519.

One JSON object per line (UTF-8, canonical: sorted keys, no spaces, ASCII)::

    {"fields":{...},"kind":"round","prev_hash":"<64 hex>","seq":3,"sig":"<base64>","time":"..."}

- ``seq`` counts from 0 with no gaps;
- ``prev_hash`` is the SHA-256 of the previous line's bytes (its canonical JSON, without the
  newline); the first entry has 64 zeros;
- ``sig`` is the Ed25519 signature (``cryptography``) over the canonical JSON of the entry
  without ``sig``, made with the coordinator's audit key;
- ``fields`` are validated per ``kind`` (pydantic, unknown fields refused): only identifiers,
  hashes, numbers and a bounded one-line refusal reason can be logged, never free-form data.

What it detects: any edited, inserted, deleted or reordered entry, a truncated last line, and a
log signed by another key. What it does not: the deletion of whole entries at the end, unless an
entry hash kept elsewhere (the head recorded in the privacy report) is passed as ``anchor``: the
log must then still contain that entry; and a coordinator holding the key can rewrite the whole
log (publish the anchors to the sites).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, StringConstraints, ValidationError

from ..config_base import FiniteFrozenModel
from .artefacts import KeyFileError, read_private_file, write_private_file

__all__ = [
    "GENESIS_HASH",
    "KINDS",
    "AuditError",
    "AuditFieldError",
    "AuditLog",
    "AuditLogBusy",
    "AuditLogCorrupt",
    "Problem",
    "SiteRound",
    "VerifyReport",
    "generate_signing_key",
    "load_signing_key",
    "load_verify_key",
    "verify_log",
]

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
_ENTRY_KEYS = frozenset({"seq", "time", "kind", "fields", "prev_hash", "sig"})

Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
KeyId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=r"^[^\x00-\x1f\x7f]+$")]
FilePath = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f\x7f]+$")]


class AuditError(Exception):
    """Base class of the audit-log errors."""


class AuditFieldError(AuditError):
    """Raised when an entry's kind is unknown or its fields are missing, unknown or invalid."""


class AuditLogCorrupt(AuditError):
    """Raised when an existing log fails verification on opening; nothing is appended to it."""

    def __init__(self, message: str, report: VerifyReport) -> None:
        super().__init__(message)
        self.report = report


class AuditLogBusy(AuditError):
    """Raised when another process holds the log open for appending."""


class _Fields(FiniteFrozenModel):
    """The fields of one kind of audit entry (frozen, no unknown keys, finite numbers)."""


class RunStartFields(_Fields):
    """Fields of a ``run_start`` entry."""

    run_id: Name
    study: Name
    config_sha256: Sha256
    app_hash: Sha256 | None = None  # None: the server could not learn the app (FAB) hash


class SiteRound(_Fields):
    """One participating site in a ``round`` entry: its manifest digest and ε spent so far."""

    site: Name
    manifest_sha256: Sha256
    epsilon_spent: float | None = Field(ge=0)
    delta: float | None = Field(default=None, gt=0, lt=1)


class RoundFields(_Fields):
    """Fields of a ``round`` entry."""

    round: int = Field(ge=1)
    sites: tuple[SiteRound, ...] = Field(min_length=1)
    secure_aggregation: bool
    aggregate_update_norm: float = Field(ge=0)


class RefusalFields(_Fields):
    """Fields of a ``refusal`` entry (a site refused a round)."""

    site: Name
    round: int | None = Field(default=None, ge=1)
    rule: Name
    reason: Reason


class RoundFailedFields(_Fields):
    """Fields of a ``round_failed`` entry (a round failed and the run stops; the model was not updated)."""

    round: int = Field(ge=1)
    stage: Name
    failures: int = Field(ge=0)
    secure_aggregation: bool
    reason: Reason


class CheckpointFields(_Fields):
    """Fields of a ``checkpoint`` entry."""

    round: int = Field(ge=0)
    path: FilePath
    sha256: Sha256
    key_id: KeyId | None = None


class ReleaseFields(_Fields):
    """Fields of a ``release`` entry (a model leaves the federation)."""

    round: int = Field(ge=0)
    model_sha256: Sha256
    report_sha256: Sha256 | None = None
    membership_auc: float | None = Field(default=None, ge=0, le=1)
    gate_passed: bool | None = None
    gate_verdict: Literal["pass", "block", "inconclusive"] | None = None
    override_reason: Reason | None = None  # an inconclusive audit released by an explicit override


KINDS: dict[str, type[_Fields]] = {
    "run_start": RunStartFields,
    "round": RoundFields,
    "refusal": RefusalFields,
    "round_failed": RoundFailedFields,
    "checkpoint": CheckpointFields,
    "release": ReleaseFields,
}

Problem = Literal["truncated", "bad_json", "bad_entry", "bad_signature", "seq_gap", "broken_chain", "anchor_missing"]


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The result of verifying a log.

    Attributes
    ----------
    ok : bool
        Whether every entry verified.
    entries : int
        Entries verified before the first bad one (all of them when ``ok``).
    head_hash : str
        Hash of the last good entry (``GENESIS_HASH`` for an empty log).
    first_bad_line : int or None
        1-based line number of the first bad entry.
    problem : str or None
        ``truncated``, ``bad_json``, ``bad_entry``, ``bad_signature``, ``seq_gap``,
        ``broken_chain`` or ``anchor_missing``.
    reason : str or None
        A sentence saying what is wrong.
    """

    ok: bool
    entries: int
    head_hash: str
    first_bad_line: int | None = None
    problem: Problem | None = None
    reason: str | None = None

    def describe(self) -> str:
        """Return one line describing the result."""
        if self.ok:
            return f"ok: {self.entries} entries, head {self.head_hash}"
        return f"line {self.first_bad_line}: {self.problem}: {self.reason}"


# ---- keys ---------------------------------------------------------------------------------------


def generate_signing_key(path: Path | str, *, force: bool = False) -> tuple[Path, Path]:
    """Create an Ed25519 audit key: private PEM at ``path`` (0600), public PEM beside it (.pub)."""
    path = Path(path)
    public_path = path.with_suffix(".pub")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public_path.exists() and not force:
        raise KeyFileError(f"{public_path} exists; refusing to overwrite a key (remove it or pass force=True)")
    write_private_file(path, private_pem, force=force)
    public_path.write_bytes(public_pem)
    logger.info("wrote audit signing key %s and public key %s", path, public_path)
    return path, public_path


def load_signing_key(path: Path | str) -> Ed25519PrivateKey:
    """Load the Ed25519 audit signing key (PEM, mode 0600 or stricter)."""
    data = read_private_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key; create one with generate_signing_key")
    return key


def load_verify_key(path: Path | str) -> Ed25519PublicKey:
    """Load the Ed25519 audit public key (PEM)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"public key {path} not found") from None
    except ValueError as err:
        raise KeyFileError(f"{path} is not a PEM public key: {err}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


# ---- verification -------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _verify_bytes(data: bytes, public_key: Ed25519PublicKey, anchor: str | None = None) -> VerifyReport:
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    prev = GENESIS_HASH
    count = 0
    anchor_found = anchor is None or anchor == GENESIS_HASH

    def bad(line_no: int, problem: Problem, reason: str) -> VerifyReport:
        return VerifyReport(False, count, prev, line_no, problem, reason)

    for index, line in enumerate(complete, start=1):
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return bad(index, "bad_json", "not a JSON object (edited, or an empty line)")
        if (
            not isinstance(entry, dict)
            or set(entry) != _ENTRY_KEYS
            or not all(isinstance(entry[k], str) for k in ("sig", "time", "kind", "prev_hash"))
            or not isinstance(entry["seq"], int)
            or isinstance(entry["seq"], bool)
            or not isinstance(entry["fields"], dict)
        ):
            return bad(index, "bad_entry", f"entry must have exactly the keys {sorted(_ENTRY_KEYS)}")
        signed = {k: v for k, v in entry.items() if k != "sig"}
        try:
            signature = base64.b64decode(entry["sig"], validate=True)
            public_key.verify(signature, _canonical(signed))
        except (binascii.Error, ValueError, InvalidSignature):
            return bad(index, "bad_signature", f"signature of entry seq {entry['seq']} does not verify "
                       "(entry edited, or signed by another key)")  # fmt: skip
        if line != _canonical(entry):
            return bad(index, "bad_entry", "entry is not in canonical form (edited by hand)")
        if entry["seq"] != count:
            return bad(index, "seq_gap", f"expected seq {count}, found {entry['seq']} (an entry was "
                       "deleted, inserted or reordered)")  # fmt: skip
        if entry["prev_hash"] != prev:
            return bad(index, "broken_chain", f"prev_hash does not match the hash of entry seq {count - 1} "
                       "(entries from another log spliced in)")  # fmt: skip
        model = KINDS.get(entry["kind"])
        if model is None:
            return bad(index, "bad_entry", f"unknown kind {entry['kind']!r}")
        try:
            model.model_validate(entry["fields"])
        except ValidationError as err:
            return bad(index, "bad_entry", f"invalid fields for {entry['kind']}: {err.error_count()} error(s)")
        prev = hashlib.sha256(line).hexdigest()
        anchor_found = anchor_found or prev == anchor
        count += 1
    if tail:
        return bad(len(complete) + 1, "truncated", "last line is incomplete (no newline): the log was "
                   "truncated or a write was interrupted")  # fmt: skip
    if not anchor_found:
        return VerifyReport(False, count, prev, count + 1, "anchor_missing",
                            f"no entry has the anchor hash {anchor}: entries at the end were removed (or the "
                            "anchor is from another log)")  # fmt: skip
    return VerifyReport(True, count, prev)


def verify_log(path: Path | str, public_key: Ed25519PublicKey, *, anchor: str | None = None) -> VerifyReport:
    """Verify a whole audit log; the report names the first bad entry (1-based line number).

    ``anchor``, an entry hash recorded elsewhere (e.g. ``PrivacyReport.audit_log_head``), must be
    the hash of one of the log's entries: this catches entries removed from the end.
    """
    if not isinstance(public_key, Ed25519PublicKey):
        raise TypeError("public_key must be an Ed25519PublicKey (load_verify_key)")
    return _verify_bytes(Path(path).read_bytes(), public_key, anchor)


# ---- appending ----------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class AuditLog:
    """An append-only signed log; opening verifies what is there, and holds an exclusive lock.

    Parameters
    ----------
    path : Path
        The log file (created with mode 0600 if absent).
    signing_key : Ed25519PrivateKey
        The coordinator's audit key (``load_signing_key``).
    clock : callable, optional
        Returns the current UTC time (tests).
    """

    def __init__(
        self,
        path: Path | str,
        signing_key: Ed25519PrivateKey,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError("signing_key must be an Ed25519PrivateKey (load_signing_key)")
        self.path = Path(path)
        self._key = signing_key
        self._clock = clock
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AuditLogBusy(f"audit log {self.path} is open in another process; one writer at a time") from None
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size else b""
            report = _verify_bytes(data, signing_key.public_key())
            if not report.ok:
                raise AuditLogCorrupt(
                    f"audit log {self.path} fails verification ({report.describe()}); nothing was "
                    "appended. Keep the file as evidence, run `fedcare audit verify`, and start a new log",
                    report,
                )
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._seq = report.entries
        self._prev = report.head_hash

    @property
    def head_hash(self) -> str:
        """Return the hash of the last entry (``GENESIS_HASH`` when empty)."""
        return self._prev

    @property
    def entries(self) -> int:
        """Return the number of entries in the log."""
        return self._seq

    def append(self, kind: str, **fields: Any) -> str:
        """Validate, sign and append one entry of ``kind``; return its hash."""
        if self._fd is None:
            raise AuditError(f"audit log {self.path} is closed; open a new AuditLog")
        model = KINDS.get(kind)
        if model is None:
            raise AuditFieldError(f"unknown audit entry kind {kind!r}; known kinds: {', '.join(KINDS)}")
        try:
            validated = model.model_validate(fields)
        except ValidationError as err:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(fields)'}: {e['msg']}" for e in err.errors())
            raise AuditFieldError(
                f"audit entry {kind!r} refused: {detail} (allowed fields: {', '.join(model.model_fields)})"
            ) from None
        entry: dict[str, Any] = {
            "seq": self._seq,
            "time": self._clock().astimezone(dt.timezone.utc).isoformat(),
            "kind": kind,
            "fields": validated.model_dump(mode="json"),
            "prev_hash": self._prev,
        }
        entry["sig"] = base64.b64encode(self._key.sign(_canonical(entry))).decode("ascii")
        line = _canonical(entry)
        view = memoryview(line + b"\n")
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self._prev = hashlib.sha256(line).hexdigest()
        self._seq += 1
        return self._prev

    def close(self) -> None:
        """Release the lock and close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> AuditLog:
        """Return the log."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the log."""
        self.close()

    def __del__(self) -> None:
        """Close the file if still open."""
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
