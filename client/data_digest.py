"""A digest of the files a site manifest names, so a node notices data that changed after it started.

``fedcare node start`` checks the site's data (:func:`fedcare.client.check.check_site_file`) and
records :func:`data_digest` of the manifest in the node config (``data-digest``); the ClientApp
recomputes it before every task and refuses to train while it differs (``client.app``).

The digest is the SHA-256 of the manifest file's bytes and, for every file the manifest's
``[data]`` section names (every file under a named folder), its path, its size and the SHA-256
of its bytes; a missing file enters as missing. Nothing of the data itself is kept or logged,
only hashes. Files up to :data:`FAST_PATH_BYTES` are hashed on every call; larger ones are hashed
once per (path, size, mtime, inode) per process, so a big image folder costs a ``stat`` per file
per round unless it changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Final

from .manifest import SiteManifest, load_manifest

__all__ = ["DATA_DIGEST_KEY", "FAST_PATH_BYTES", "data_digest", "data_files"]

logger = logging.getLogger(__name__)

DATA_DIGEST_KEY: Final = "data-digest"
"""The node-config key ``fedcare node start`` records the digest under (``client.app`` reads it)."""

FAST_PATH_BYTES: Final = 8 * 1024 * 1024
"""Files larger than this are re-hashed only when their size, mtime or inode changed."""

_CHUNK: Final = 1024 * 1024
_large_hashes: dict[tuple[str, int, int, int], str] = {}


def data_files(manifest: SiteManifest) -> list[Path]:
    """Return every path the manifest's ``[data]`` section names (files and folders), resolved and sorted."""
    paths = {
        Path(value).expanduser().resolve()
        for value in dict(manifest.data).values()
        if isinstance(value, Path)
    }
    return sorted(paths)


def _expand(path: Path) -> list[Path]:
    """Return ``path`` itself, or every regular file below it when it is a folder (sorted)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def _file_sha256(path: Path, size: int, mtime_ns: int, inode: int) -> str:
    """Return the SHA-256 of ``path``; large files once per (path, size, mtime, inode) in this process."""
    key = (str(path), size, mtime_ns, inode)
    if size > FAST_PATH_BYTES and key in _large_hashes:
        return _large_hashes[key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    hexdigest = digest.hexdigest()
    if size > FAST_PATH_BYTES:
        _large_hashes[key] = hexdigest
    return hexdigest


def data_digest(manifest_path: Path | str) -> str:
    """Return the SHA-256 (hex) of the manifest's bytes and of the size and content of every data file it names.

    Raises
    ------
    fedcare.client.errors.ManifestError
        When the manifest cannot be read (``load_manifest``).
    """
    path = Path(manifest_path).expanduser().resolve()
    manifest = load_manifest(path)
    entries: list[list[str | int]] = [["manifest", str(path), hashlib.sha256(path.read_bytes()).hexdigest()]]
    for named in data_files(manifest):
        if not named.exists():
            entries.append(["missing", str(named)])
            continue
        for file in _expand(named):
            try:
                st = file.stat()
                entries.append(["file", str(file), st.st_size, _file_sha256(file, st.st_size, st.st_mtime_ns, st.st_ino)])
            except OSError:  # vanished or unreadable between listing and reading
                entries.append(["unreadable", str(file)])
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode("utf-8")).hexdigest()
