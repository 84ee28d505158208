"""Encrypted artefacts at rest (checkpoints, models, reports) with AES-256-GCM.

File format, version 1 (all integers big-endian)::

    offset  size  field
    0       4     magic b"FCAE"
    4       1     format version (1)
    5       4     header length H (1 .. 65536)
    9       H     header: canonical JSON (UTF-8, sorted keys, no spaces)
                  {"alg": "AES-256-GCM", "key_id": "<16 hex>", "metadata": {...}}
    9+H     12    nonce (random per write, ``os.urandom``)
    21+H    ...   ciphertext followed by the 16-byte GCM tag

The associated data is every byte before the nonce (magic, version, length and header), so the
metadata is authenticated with the ciphertext: changing any byte of it, or pairing one file's
header with another file's ciphertext, fails the tag. The key id (first 8 bytes of
``SHA-256("fedcare-artefact-key-id" || key)``) lets a reader tell "wrong key" from "tampered" and
makes key rotation possible (``rotate``). Nothing here is home-made crypto: AES-GCM is
``cryptography``'s ``AESGCM``.

Keys: 32 random bytes, from a file of mode 0600 or stricter (raw 32 bytes, or base64 / hex text)
or from an environment variable (base64 or hex). ``generate_key`` writes a new key file with
mode 0600 from the start (:func:`fedcare.files.write_new`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import Field, StringConstraints, ValidationError

from ..config_base import FiniteFrozenModel
from ..files import atomic_write, write_new

__all__ = [
    "ALGORITHM",
    "DEFAULT_KEY_ENV",
    "FORMAT_VERSION",
    "MAGIC",
    "ArtefactError",
    "ArtefactKey",
    "ArtefactMetadata",
    "ArtefactMismatch",
    "ArtefactTampered",
    "KeyFileError",
    "WrongKey",
    "decrypt_bytes",
    "encrypt_bytes",
    "generate_key",
    "peek_key_id",
    "read_encrypted",
    "read_private_file",
    "rotate",
    "sha256_file",
    "write_encrypted",
    "write_private_file",
]

logger = logging.getLogger(__name__)

MAGIC = b"FCAE"
FORMAT_VERSION = 1
ALGORITHM = "AES-256-GCM"
DEFAULT_KEY_ENV = "FEDCARE_ARTEFACT_KEY"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_HEADER = 65536
_PREFIX = struct.Struct(">4sBI")
_KEY_ID_LABEL = b"fedcare-artefact-key-id"

_Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
_Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ArtefactError(Exception):
    """Base class of the artefact-encryption errors."""


class ArtefactTampered(ArtefactError):
    """Raised when an artefact fails authentication or is not a well-formed artefact file."""


class WrongKey(ArtefactError):
    """Raised when an artefact was encrypted under a different key (key id mismatch)."""


class ArtefactMismatch(ArtefactError):
    """Raised when an authentic artefact's metadata differs from what the reader expected."""


class KeyFileError(ArtefactError):
    """Raised when a key file or key variable is missing, too open (mode), or of the wrong length."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class ArtefactMetadata(FiniteFrozenModel):
    """Run metadata bound to an artefact as associated data (frozen; unknown keys refused).

    Attributes
    ----------
    study : str
        The study the artefact belongs to.
    kind : str
        What it is: ``checkpoint``, ``model``, ``report``…
    round : int or None
        The federated round, where one applies.
    config_sha256 : str
        SHA-256 (hex) of the run configuration.
    run_id : str or None
        The run identifier.
    created_at : datetime
        When it was written (UTC).
    """

    study: _Name
    kind: _Name
    round: int | None = Field(default=None, ge=0)
    config_sha256: _Sha256
    run_id: _Name | None = None
    created_at: dt.datetime = Field(default_factory=_utcnow)


class ArtefactKey:
    """A 32-byte AES-256-GCM key with its key id; the bytes are never shown in ``repr``.

    Parameters
    ----------
    raw : bytes
        Exactly 32 bytes.
    """

    __slots__ = ("_raw", "_key_id")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_BYTES:
            got = len(raw) if isinstance(raw, bytes | bytearray) else type(raw).__name__
            raise KeyFileError(f"an artefact key is {KEY_BYTES} bytes, got {got}; create one with generate_key")
        self._raw = bytes(raw)
        self._key_id = hashlib.sha256(_KEY_ID_LABEL + self._raw).hexdigest()[:16]

    @property
    def key_id(self) -> str:
        """Return the key id: 16 hex digits, safe to log and store."""
        return self._key_id

    def __repr__(self) -> str:
        """Return a representation showing the key id only."""
        return f"ArtefactKey(key_id={self._key_id!r})"

    def __eq__(self, other: object) -> bool:
        """Return whether both keys are the same key."""
        return isinstance(other, ArtefactKey) and other._key_id == self._key_id and other._raw == self._raw

    def __hash__(self) -> int:
        """Return a hash of the key id."""
        return hash(self._key_id)

    @classmethod
    def from_text(cls, text: str) -> ArtefactKey:
        """Decode a key given as 64 hex digits or as base64 of 32 bytes."""
        text = text.strip()
        try:
            if len(text) == 2 * KEY_BYTES:
                raw = bytes.fromhex(text)
            else:
                raw = base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error):
            raise KeyFileError(
                f"an artefact key is {KEY_BYTES} bytes written as 64 hex digits or base64; the "
                "value given is neither"
            ) from None
        return cls(raw)

    @classmethod
    def from_file(cls, path: Path | str) -> ArtefactKey:
        """Load a key file (mode 0600 or stricter): raw 32 bytes, or hex / base64 text."""
        data = read_private_file(path)
        if len(data) == KEY_BYTES:
            return cls(data)
        try:
            return cls.from_text(data.decode("ascii"))
        except (UnicodeDecodeError, KeyFileError):
            raise KeyFileError(
                f"key file {path} holds no {KEY_BYTES}-byte key (raw, hex or base64); create one "
                "with generate_key"
            ) from None

    @classmethod
    def from_env(cls, name: str = DEFAULT_KEY_ENV) -> ArtefactKey:
        """Load a key from the environment variable ``name`` (hex or base64)."""
        value = os.environ.get(name)
        if not value:
            raise KeyFileError(f"environment variable {name} is not set; set it to a base64 or hex key")
        try:
            return cls.from_text(value)
        except KeyFileError as err:
            raise KeyFileError(f"environment variable {name}: {err}") from None

    def _aead(self) -> AESGCM:
        return AESGCM(self._raw)


# ---- private files ----------------------------------------------------------------------------


def read_private_file(path: Path | str) -> bytes:
    """Return the bytes of a secret file, refusing one that group or others may access."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found") from None
    except OSError as err:
        raise KeyFileError(f"cannot open key file {path}: {err.strerror} (symbolic links are refused)") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if os.name == "posix" and info.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}; a secret key must be "
                f"readable by its owner only: run `chmod 600 {path}`"
            )
        return handle.read()


def write_private_file(path: Path | str, data: bytes, *, force: bool = False) -> Path:
    """Write ``data`` to a new file created with mode 0600 (:func:`fedcare.files.write_new`); refuse to overwrite."""
    path = Path(path)
    if force and path.exists():
        path.unlink()
    try:
        return write_new(path, data, mode=0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists; refusing to overwrite a key (remove it or pass force=True)") from None


def generate_key(path: Path | str, *, force: bool = False) -> ArtefactKey:
    """Create a random artefact key, write it base64-encoded to ``path`` with mode 0600, return it."""
    key = ArtefactKey(os.urandom(KEY_BYTES))
    write_private_file(path, base64.b64encode(key._raw) + b"\n", force=force)
    logger.info("wrote artefact key %s (key id %s)", path, key.key_id)
    return key


def sha256_file(path: Path | str) -> str:
    """Return the SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the format ---------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _parse(blob: bytes) -> tuple[bytes, dict[str, Any], bytes, bytes]:
    """Split a blob into (associated data, header, nonce, ciphertext); raise if malformed."""
    if not isinstance(blob, bytes | bytearray):
        raise TypeError("an artefact is bytes")
    blob = bytes(blob)
    if len(blob) < _PREFIX.size:
        raise ArtefactTampered("not a fedcare encrypted artefact: too short (truncated?)")
    magic, version, header_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise ArtefactTampered("not a fedcare encrypted artefact (bad magic); the file is corrupt or unencrypted")
    if version != FORMAT_VERSION:
        raise ArtefactTampered(
            f"artefact format version {version} is not supported (this fedcare reads {FORMAT_VERSION}); "
            "the file is corrupt or from a newer fedcare"
        )
    if not 1 <= header_len <= MAX_HEADER:
        raise ArtefactTampered(f"artefact header length {header_len} is out of range; the file is corrupt")
    end = _PREFIX.size + header_len
    if len(blob) < end + NONCE_BYTES + TAG_BYTES:
        raise ArtefactTampered("artefact is truncated: header, nonce or tag missing")
    aad = blob[:end]
    try:
        header = json.loads(blob[_PREFIX.size : end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ArtefactTampered("artefact header is not valid JSON; the file was modified") from None
    if (
        not isinstance(header, dict)
        or set(header) != {"alg", "key_id", "metadata"}
        or header["alg"] != ALGORITHM
        or not isinstance(header["key_id"], str)
        or not isinstance(header["metadata"], dict)
    ):
        raise ArtefactTampered("artefact header has unexpected fields; the file was modified")
    return aad, header, blob[end : end + NONCE_BYTES], blob[end + NONCE_BYTES :]


def encrypt_bytes(data: bytes, *, key: ArtefactKey, metadata: ArtefactMetadata) -> bytes:
    """Encrypt ``data`` with AES-256-GCM under ``key``, binding ``metadata``; return the blob."""
    if not isinstance(key, ArtefactKey):
        raise TypeError("key must be an ArtefactKey (ArtefactKey.from_file / from_env)")
    if not isinstance(metadata, ArtefactMetadata):
        raise TypeError("metadata must be an ArtefactMetadata")
    header = _canonical({"alg": ALGORITHM, "key_id": key.key_id, "metadata": metadata.model_dump(mode="json")})
    if len(header) > MAX_HEADER:
        raise ValueError(f"artefact metadata too large ({len(header)} bytes > {MAX_HEADER})")
    aad = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header
    nonce = os.urandom(NONCE_BYTES)
    return aad + nonce + key._aead().encrypt(nonce, bytes(data), aad)


def _check_expected(metadata: ArtefactMetadata, expected: Mapping[str, Any] | None) -> None:
    if not expected:
        return
    actual = metadata.model_dump()
    unknown = set(expected) - set(actual)
    if unknown:
        raise ValueError(f"expected metadata names unknown fields {sorted(unknown)}; known: {sorted(actual)}")
    wrong = {k: (v, actual[k]) for k, v in expected.items() if actual[k] != v}
    if wrong:
        detail = ", ".join(f"{k}: expected {want!r}, found {got!r}" for k, (want, got) in wrong.items())
        raise ArtefactMismatch(
            f"artefact is authentic but not the one expected ({detail}); a file was swapped or the "
            "wrong path given"
        )


def decrypt_bytes(
    blob: bytes, *, key: ArtefactKey, expected: Mapping[str, Any] | None = None
) -> tuple[bytes, ArtefactMetadata]:
    """Authenticate and decrypt ``blob``; return ``(data, metadata)``.

    Parameters
    ----------
    blob : bytes
        An artefact written by ``encrypt_bytes``.
    key : ArtefactKey
        The key it was encrypted under.
    expected : mapping, optional
        Metadata fields that must hold these values (e.g. ``{"study": "s", "round": 3}``).

    Raises
    ------
    ArtefactTampered
        Any byte changed, or a header paired with another file's ciphertext.
    WrongKey
        Encrypted under another key.
    ArtefactMismatch
        Authentic, but its metadata differs from ``expected``.
    """
    if not isinstance(key, ArtefactKey):
        raise TypeError("key must be an ArtefactKey (ArtefactKey.from_file / from_env)")
    aad, header, nonce, ciphertext = _parse(blob)
    if header["key_id"] != key.key_id:
        raise WrongKey(
            f"artefact was encrypted under key id {header['key_id']}, not {key.key_id}; load that "
            "key (or rotate the artefact to the current key)"
        )
    try:
        data = key._aead().decrypt(nonce, ciphertext, aad)
    except InvalidTag as err:
        raise ArtefactTampered(
            "artefact failed authentication (AES-GCM tag): its content or metadata was modified; do "
            "not use it, restore it from a trusted copy"
        ) from err
    try:
        metadata = ArtefactMetadata.model_validate(header["metadata"])
    except ValidationError as err:  # authentic but unreadable: written by an incompatible version
        raise ArtefactTampered(f"artefact metadata is authentic but invalid: {err}") from None
    _check_expected(metadata, expected)
    return data, metadata


def write_encrypted(path: Path | str, data: bytes, *, key: ArtefactKey, metadata: ArtefactMetadata) -> Path:
    """Encrypt ``data`` and write it to ``path`` atomically (mode 0600); return the path."""
    return atomic_write(path, encrypt_bytes(data, key=key, metadata=metadata))


def read_encrypted(
    path: Path | str, *, key: ArtefactKey, expected_metadata: Mapping[str, Any] | None = None
) -> tuple[bytes, ArtefactMetadata]:
    """Read, authenticate and decrypt the artefact at ``path``; return ``(data, metadata)``."""
    blob = Path(path).read_bytes()
    try:
        return decrypt_bytes(blob, key=key, expected=expected_metadata)
    except ArtefactError as err:
        raise type(err)(f"{path}: {err}") from err.__cause__


def peek_key_id(blob: bytes) -> str:
    """Return the key id in an artefact's header (unauthenticated: for routing only)."""
    return str(_parse(blob)[1]["key_id"])


def rotate(paths: Iterable[Path | str], old_key: ArtefactKey, new_key: ArtefactKey) -> list[Path]:
    """Re-encrypt artefacts from ``old_key`` to ``new_key``, each file replaced atomically.

    Every file is authenticated first (nothing is written if one fails); files already under
    ``new_key`` are skipped, so an interrupted rotation can simply be run again. Returns the
    paths that were rewritten.
    """
    paths = [Path(p) for p in paths]
    todo: list[Path] = []
    for path in paths:  # phase 1: authenticate everything, write nothing
        blob = path.read_bytes()
        if peek_key_id(blob) == new_key.key_id:
            read_encrypted(path, key=new_key)
            continue
        read_encrypted(path, key=old_key)
        todo.append(path)
    for path in todo:  # phase 2: rewrite one by one, each atomically
        data, metadata = read_encrypted(path, key=old_key)
        write_encrypted(path, data, key=new_key, metadata=metadata)
        logger.info("rotated %s from key %s to %s", path, old_key.key_id, new_key.key_id)
    return todo
