"""Checkpoints of a federated run and the metrics history they carry.

After every round the ServerApp saves one :class:`Checkpoint`: the global model, the
strategy's state (FedAdam's ``m_t`` / ``v_t``), the metrics history, the Python RNG state that
flwr's node sampling draws from, and the run config it was made under. Save and load go
through :func:`save_checkpoint` / :func:`load_checkpoint` only, so encryption at rest can be
added in one place.

File format: one NumPy ``.npz`` (no pickle) holding ``model/<name>`` arrays,
``strategy/<attribute>/<name>`` arrays and ``meta``, a UTF-8 JSON document stored as a uint8
array. Writes are atomic (:func:`fedcare.files.atomic_write`): a temporary file in the same
folder, ``fsync``, ``os.replace``, ``fsync`` of the folder.

Authentication, always. An encrypted checkpoint (``key`` given) is an AES-256-GCM artefact
(``privacy.artefacts``). A plaintext one carries ``mac``: HMAC-SHA256 (``cryptography``) over
every other entry (name, dtype, shape, bytes) under a per-folder key, ``.fedcare-state/
checkpoint-mac.key`` beside the checkpoint, created with mode 0600 on the first save (folder
0700) and never created while loading. A checkpoint whose tag does not verify, that has no tag,
or whose key is gone is refused (:class:`CheckpointTamperedError`, :class:`CheckpointKeyError`).
After each save, ``.fedcare-state/<file>.head.json`` records the round and SHA-256 of the file
(authenticated with the same key); loading refuses a checkpoint of an earlier round than the head
(an older authentic file put back), or of the same round with other content. Trust assumption:
whoever can read the key (the coordinator's account) can forge a checkpoint; the MAC protects
against anyone who can write the checkpoint folder's files but not read the 0600 key, and against
copies restored from elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import os
import struct
import zipfile
from collections.abc import Mapping
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from torch import nn

from .. import __version__
from ..files import atomic_open, atomic_write
from ..models import ModelSpec, build_for_data, set_weights
from ..privacy.artefacts import (
    MAGIC,
    ArtefactKey,
    ArtefactMetadata,
    ArtefactMismatch,
    ArtefactTampered,
    KeyFileError,
    WrongKey,
    decrypt_bytes,
    encrypt_bytes,
    read_private_file,
    write_private_file,
)

__all__ = [
    "CHECKPOINT_FILE",
    "ENCRYPTED_SUFFIX",
    "FINAL_MODEL_FILE",
    "HISTORY_FILE",
    "MAC_KEY_FILE",
    "STATE_DIR",
    "Checkpoint",
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointTamperedError",
    "MetricsHistory",
    "RoundRecord",
    "MODEL_PREPROCESSING",
    "MODEL_THRESHOLD",
    "MODEL_TRAINING_DATA",
    "amend_model_file",
    "load_checkpoint",
    "build_saved_model",
    "load_model_file",
    "save_checkpoint",
    "save_model_file",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE: Final = "checkpoint.npz"
FINAL_MODEL_FILE: Final = "final_model.npz"
HISTORY_FILE: Final = "history.json"
ENCRYPTED_SUFFIX: Final = ".enc"  # checkpoint.npz.enc, final_model.npz.enc: AES-GCM artefacts
_FORMAT: Final = "fedcare-checkpoint/1"
STATE_DIR: Final = ".fedcare-state"  # beside the checkpoint: its MAC key and head records (0700)
MAC_KEY_FILE: Final = "checkpoint-mac.key"  # per-run HMAC-SHA256 key, base64, mode 0600
_MAC_ENTRY: Final = "mac"
_MAC_LABEL: Final = b"fedcare-checkpoint-mac/1\0"
_HEAD_LABEL: Final = b"fedcare-checkpoint-head/1\0"
_HEAD_KIND: Final = "fedcare-checkpoint-head/1"
_MAC_KEY_BYTES: Final = 32
_WHAT_TO_DO: Final = (
    "Do not use it: restore the checkpoint folder (with its .fedcare-state/) from a trusted backup, "
    "or start a new run in another checkpoint-dir (the sites' ledgers keep the ε already spent)"
)
_HISTORY_KIND: Final = "fedcare-metrics-history/1"
MODEL_THRESHOLD: Final = "threshold"
"""Model-file meta key: a binary model's operating threshold on P(class 1), chosen on validation data."""
MODEL_PREPROCESSING: Final = "preprocessing"
"""Model-file meta key: the input preprocessing the model expects (``models.preprocessing``)."""
MODEL_TRAINING_DATA: Final = "training_data"
"""Model-file meta key: digests of the training sites' source files and splits (never record ids)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the run that wants to resume from it."""


class CheckpointTamperedError(CheckpointError):
    """A checkpoint or model failed authentication (AES-GCM tag, or HMAC of a plaintext checkpoint),
    has no tag, is another run's file (swapped), or is older than the round last checkpointed."""


class CheckpointKeyError(CheckpointError):
    """An encrypted file was given without its key (or under another key), or a plaintext one where
    the run encrypts."""


def _clean(value: Any) -> Any:
    """Return ``value`` with NaN / infinity replaced by None, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class RoundRecord:
    """What one round produced: global and per-site metrics, the worst site, refusals.

    Attributes
    ----------
    round : int
        The round number (1-based, counted over the whole run including resumed parts).
    train, evaluate : dict of str to float
        Aggregated metrics (flwr's example-weighted average; ``epsilon`` / ``delta`` in
        ``train`` are the maximum over sites).
    site_train, site_evaluate : dict of str to dict
        Each site's own metrics, keyed by the site name the site reported.
    worst_site : dict, optional
        ``{"site", "metric", "value"}``: lowest AUROC (or accuracy), or highest RMSE.
    refusals : list of dict
        ``{"stage", "node_id", "site", "code", "reason"}`` for every error reply.
    site_info : dict of str to dict
        What each training site said about itself besides metrics: ``manifest_sha256`` (digest of
        its manifest / data description, never data), ``accountant`` and ``max_grad_norm`` (DP).
    complete : bool
        Whether the round finished (its checkpoint was written).
    """

    round: int
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    site_train: dict[str, dict[str, float]] = field(default_factory=dict)
    site_evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    worst_site: dict[str, Any] | None = None
    refusals: list[dict[str, Any]] = field(default_factory=list)
    site_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return _clean(
            {
                "round": self.round,
                "train": self.train,
                "evaluate": self.evaluate,
                "site_train": self.site_train,
                "site_evaluate": self.site_evaluate,
                "worst_site": self.worst_site,
                "refusals": self.refusals,
                "site_info": self.site_info,
                "complete": self.complete,
            }
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundRecord:
        """Rebuild a record from :meth:`to_dict` output."""
        nan = float("nan")

        def metrics(d: dict[str, Any]) -> dict[str, float]:
            return {k: nan if v is None else v for k, v in d.items()}

        return cls(
            round=int(raw["round"]),
            train=metrics(raw.get("train", {})),
            evaluate=metrics(raw.get("evaluate", {})),
            site_train={s: metrics(m) for s, m in raw.get("site_train", {}).items()},
            site_evaluate={s: metrics(m) for s, m in raw.get("site_evaluate", {}).items()},
            worst_site=raw.get("worst_site"),
            refusals=list(raw.get("refusals", [])),
            site_info={s: dict(v) for s, v in raw.get("site_info", {}).items()},
            complete=bool(raw.get("complete", False)),
        )


class MetricsHistory:
    """The per-round record of a run; written by the strategy wrapper, saved in checkpoints."""

    def __init__(self) -> None:
        self._rounds: dict[int, RoundRecord] = {}
        self.node_sites: dict[int, str] = {}

    def round(self, server_round: int) -> RoundRecord:
        """Return the record of ``server_round``, creating it when new."""
        if server_round not in self._rounds:
            self._rounds[server_round] = RoundRecord(round=server_round)
        return self._rounds[server_round]

    @property
    def rounds(self) -> list[RoundRecord]:
        """Return every record, in round order."""
        return [self._rounds[r] for r in sorted(self._rounds)]

    @property
    def completed(self) -> list[RoundRecord]:
        """Return the complete rounds, in order."""
        return [r for r in self.rounds if r.complete]

    @property
    def last_complete(self) -> int:
        """Return the number of the last complete round (0 when none)."""
        done = self.completed
        return done[-1].round if done else 0

    def drop_incomplete(self) -> None:
        """Forget rounds that never finished (a resumed run redoes them)."""
        self._rounds = {r: rec for r, rec in self._rounds.items() if rec.complete}

    def state_dict(self) -> dict[str, Any]:
        """Return a JSON-ready state."""
        return {
            "kind": _HISTORY_KIND,
            "rounds": [r.to_dict() for r in self.rounds],
            "node_sites": {str(k): v for k, v in self.node_sites.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, refusing other kinds."""
        if not isinstance(state, dict) or state.get("kind") != _HISTORY_KIND:
            raise CheckpointError(
                f"not a metrics history (kind {state.get('kind') if isinstance(state, dict) else None!r}, "
                f"expected {_HISTORY_KIND!r}); the checkpoint is from another tool or version"
            )
        self._rounds = {int(r["round"]): RoundRecord.from_dict(r) for r in state["rounds"]}
        self.node_sites = {int(k): str(v) for k, v in state.get("node_sites", {}).items()}


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after a complete round.

    Attributes
    ----------
    round : int
        The last complete round.
    arrays : OrderedDict of str to numpy.ndarray
        The global model's exchanged tensors, by name.
    strategy_state : dict
        ``FedcareStrategy.state_dict()``: JSON-ready scalars plus ``"arrays"``, a dict of
        attribute name to dict of array name to NumPy array.
    history : dict
        ``MetricsHistory.state_dict()``.
    run_config : dict
        ``RunConfig.to_run_config()`` of the run that wrote it.
    rng_state : list, optional
        ``random.getstate()`` (flwr samples nodes with the ``random`` module), JSON-ready.
    """

    round: int
    arrays: OrderedDict[str, np.ndarray]
    strategy_state: dict[str, Any]
    history: dict[str, Any]
    run_config: dict[str, Any]
    rng_state: list[Any] | None = None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (NaN written as null)."""
    text = json.dumps(_clean(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write(path, text.encode("utf-8"), make_parents=True)


def _check_key(name: str) -> str:
    """Refuse array names that cannot be stored unambiguously."""
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"cannot store an array named {name!r} in a checkpoint")
    return name


def _write_npz(
    path: Path, payload: dict[str, np.ndarray], key: ArtefactKey | None, metadata: ArtefactMetadata | None
) -> None:
    """Write ``payload`` as one npz atomically; encrypted (AES-GCM, ``metadata`` bound) with a key."""
    if key is None:
        with atomic_open(path, make_parents=True) as handle:
            np.savez(handle, **payload)
        return
    if metadata is None:
        raise ValueError("an encrypted artefact needs its ArtefactMetadata (study, kind, round, config hash)")
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    blob = encrypt_bytes(buffer.getvalue(), key=key, metadata=metadata)
    atomic_write(path, blob, make_parents=True)


def _read_npz_bytes(
    path: Path, key: ArtefactKey | None, expected: Mapping[str, Any] | None, what: str
) -> io.BytesIO | Path:
    """Return what ``np.load`` should open: the decrypted bytes of an encrypted file, else ``path``.

    Raises
    ------
    CheckpointTamperedError
        The file fails authentication, or is authentic but another study's / kind's / round's.
    CheckpointKeyError
        An encrypted file without a key or under another key, or a plaintext file given a key.
    """
    with open(path, "rb") as fh:
        head = fh.read(len(MAGIC))
    encrypted = head == MAGIC
    if key is None:
        if encrypted:
            raise CheckpointKeyError(
                f"{path} is an encrypted {what}; give its artefact key (run config artefact-key, "
                "the scenario's [artefacts] key, or --key FILE / --key env)"
            )
        return path
    if not encrypted:
        raise CheckpointKeyError(
            f"{path} is a plaintext {what} but this run encrypts its artefacts: a plaintext file "
            "must not stand in for an encrypted one. Restore the encrypted file from a trusted "
            "backup, or start a new run in another checkpoint-dir"
        )
    try:
        data, _ = decrypt_bytes(path.read_bytes(), key=key, expected=expected)
    except WrongKey as exc:
        raise CheckpointKeyError(f"{path}: {exc}") from None
    except (ArtefactTampered, ArtefactMismatch) as exc:
        raise CheckpointTamperedError(
            f"{what} {path} is not trustworthy: {exc}. Do not use it: restore it from a trusted "
            "backup, or start a new run in another checkpoint-dir (the sites' ledgers keep the ε "
            "already spent)"
        ) from None
    return io.BytesIO(data)


def _state_dir(checkpoint: Path) -> Path:
    """Return the folder holding ``checkpoint``'s MAC key and head record."""
    return checkpoint.parent / STATE_DIR


def checkpoint_mac_key(checkpoint: Path | str, *, create: bool) -> bytes:
    """Return the HMAC key authenticating plaintext checkpoints in ``checkpoint``'s folder.

    With ``create`` a missing key is made (32 random bytes, base64, a new file of mode 0600 in a
    0700 folder); without it a missing key raises :class:`CheckpointKeyError`. A key file that
    group or others may read is refused.
    """
    checkpoint = Path(checkpoint)
    folder = _state_dir(checkpoint)
    path = folder / MAC_KEY_FILE
    if not path.exists():
        if not create:
            raise CheckpointKeyError(
                f"the key that authenticates {checkpoint} ({path}) is missing, so the checkpoint cannot "
                f"be trusted. {_WHAT_TO_DO}"
            )
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            write_private_file(path, base64.b64encode(os.urandom(_MAC_KEY_BYTES)) + b"\n")
        except KeyFileError:  # another process created it first: use theirs
            pass
        else:
            logger.info("created the checkpoint authentication key %s (mode 0600)", path)
    try:
        raw = base64.b64decode(read_private_file(path).strip(), validate=True)
    except KeyFileError as exc:
        raise CheckpointKeyError(f"{exc}; it authenticates {checkpoint}") from None
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != _MAC_KEY_BYTES:
        raise CheckpointKeyError(
            f"{path} holds no {_MAC_KEY_BYTES}-byte checkpoint key (base64). {_WHAT_TO_DO}"
        )
    return raw


def _hmac(key: bytes, label: bytes, entries: Mapping[str, np.ndarray]) -> crypto_hmac.HMAC:
    """Return HMAC-SHA256 under ``key`` fed with ``label`` and every entry's name, dtype, shape and bytes."""
    mac = crypto_hmac.HMAC(key, hashes.SHA256())
    mac.update(label)
    for name in sorted(entries):
        value = np.ascontiguousarray(entries[name])
        header = json.dumps([name, value.dtype.str, list(value.shape)], separators=(",", ":")).encode("utf-8")
        data = value.tobytes()
        mac.update(struct.pack(">Q", len(header)) + header + struct.pack(">Q", len(data)))
        mac.update(data)
    return mac


def _mac(key: bytes, label: bytes, entries: Mapping[str, np.ndarray]) -> bytes:
    """Return the HMAC-SHA256 tag of ``entries`` (see :func:`_hmac`)."""
    return _hmac(key, label, entries).finalize()


def _verify_mac(key: bytes, label: bytes, entries: Mapping[str, np.ndarray], tag: bytes) -> bool:
    """Return whether ``tag`` is the HMAC of ``entries`` (constant-time comparison by cryptography)."""
    try:
        _hmac(key, label, entries).verify(tag)
    except InvalidSignature:
        return False
    return True


def _head_path(checkpoint: Path) -> Path:
    """Return the head record of ``checkpoint`` (round and digest of the file last saved there)."""
    return _state_dir(checkpoint) / f"{checkpoint.name}.head.json"


def _head_entries(round_: int, sha256: str) -> dict[str, np.ndarray]:
    """Return the head's fields as the entries its MAC covers."""
    return {"round": np.asarray([round_], dtype=np.int64), "sha256": np.frombuffer(sha256.encode(), dtype=np.uint8)}


def _write_head(checkpoint: Path, round_: int, mac_key: bytes) -> None:
    """Record, after a save, the round and SHA-256 of ``checkpoint`` (HMAC-authenticated)."""
    digest = _sha256(checkpoint)
    tag = _mac(mac_key, _HEAD_LABEL, _head_entries(round_, digest))
    write_json_atomic(_head_path(checkpoint), {"kind": _HEAD_KIND, "round": int(round_), "sha256": digest,
                                                "mac": tag.hex()})


def _sha256(path: Path) -> str:
    """Return the SHA-256 (hex) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_head(checkpoint: Path, round_: int) -> None:
    """Refuse a checkpoint older than (or different from) the one last saved at this path.

    Without a head record (a run written before heads existed, or a folder restored without it)
    nothing is checked: the checkpoint's own authentication still applies.
    """
    head_path = _head_path(checkpoint)
    if not head_path.is_file():
        logger.warning("no head record %s: cannot tell whether %s is the latest checkpoint", head_path, checkpoint)
        return
    mac_key = checkpoint_mac_key(checkpoint, create=False)
    try:
        head = json.loads(head_path.read_text(encoding="utf-8"))
        head_round, head_sha = int(head["round"]), str(head["sha256"])
        tag = bytes.fromhex(str(head["mac"]))
        ok = head.get("kind") == _HEAD_KIND and _verify_mac(mac_key, _HEAD_LABEL, _head_entries(head_round, head_sha), tag)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise CheckpointTamperedError(
            f"the head record {head_path} of {checkpoint} failed authentication: it was modified. {_WHAT_TO_DO}"
        )
    if round_ < head_round or (round_ == head_round and _sha256(checkpoint) != head_sha):
        raise CheckpointTamperedError(
            f"checkpoint {checkpoint} is authentic but not the latest: it holds round {round_}, and round "
            f"{head_round} was checkpointed here (an older or other checkpoint was put in its place). "
            f"{_WHAT_TO_DO}. If you restored it on purpose from a trusted backup, also restore "
            f"{head_path} from that backup"
        )


def save_checkpoint(
    path: Path | str,
    ckpt: Checkpoint,
    *,
    key: ArtefactKey | None = None,
    metadata: ArtefactMetadata | None = None,
) -> None:
    """Write ``ckpt`` to ``path`` atomically (a reader sees the old or the new file, never half).

    With ``key`` the file is an AES-256-GCM artefact (``privacy.artefacts``) binding ``metadata``.
    """
    strategy_state = dict(ckpt.strategy_state)
    strategy_arrays: dict[str, dict[str, np.ndarray]] = strategy_state.pop("arrays", {}) or {}
    payload: dict[str, np.ndarray] = {}
    for name, value in ckpt.arrays.items():
        payload[f"model/{_check_key(name)}"] = np.asarray(value)
    for attr, arrays in strategy_arrays.items():
        for name, value in arrays.items():
            payload[f"strategy/{_check_key(attr)}/{_check_key(name)}"] = np.asarray(value)
    meta = {
        "format": _FORMAT,
        "fedcare_version": __version__,
        "round": int(ckpt.round),
        "model_names": list(ckpt.arrays),
        "strategy_state": strategy_state,
        "strategy_arrays": {attr: list(arrays) for attr, arrays in strategy_arrays.items()},
        "history": ckpt.history,
        "run_config": ckpt.run_config,
        "rng_state": ckpt.rng_state,
    }
    blob = json.dumps(_clean(meta), allow_nan=False).encode("utf-8")
    payload["meta"] = np.frombuffer(blob, dtype=np.uint8)
    path = Path(path)
    mac_key = checkpoint_mac_key(path, create=True)  # also keys the head record of encrypted runs
    if key is None:  # plaintext: authenticated with the run's HMAC key
        payload[_MAC_ENTRY] = np.frombuffer(_mac(mac_key, _MAC_LABEL, payload), dtype=np.uint8)
    _write_npz(path, payload, key, metadata)
    _write_head(path, int(ckpt.round), mac_key)  # after the file: a crash between leaves an older head
    logger.debug("checkpoint of round %d written to %s", ckpt.round, path)


def load_checkpoint(
    path: Path | str, *, key: ArtefactKey | None = None, expected: Mapping[str, Any] | None = None
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (decrypted and authenticated with ``key``).

    Raises
    ------
    CheckpointError
        When the file is missing, unreadable or not a fedcare checkpoint.
    CheckpointTamperedError
        When the checkpoint fails authentication (AES-GCM tag, or the HMAC of a plaintext one), has
        no tag, its metadata differs from ``expected``, or it is older than the head record.
    CheckpointKeyError
        When the key is missing or wrong (the artefact key, or the plaintext checkpoint's HMAC
        key), or a plaintext file is given with a key.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; start without resume or fix the path")
    source = _read_npz_bytes(path, key, expected, "checkpoint")
    try:
        with np.load(source, allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta"]).decode("utf-8"))
            if meta.get("format") != _FORMAT:
                raise CheckpointError(
                    f"{path} is not a {_FORMAT} checkpoint (format {meta.get('format')!r})"
                )
            if key is None:
                _authenticate_plaintext(path, {name: npz[name] for name in npz.files})
            arrays = OrderedDict(
                (name, np.array(npz[f"model/{name}"])) for name in meta["model_names"]
            )
            strategy_arrays = {
                attr: OrderedDict((n, np.array(npz[f"strategy/{attr}/{n}"])) for n in names)
                for attr, names in meta["strategy_arrays"].items()
            }
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); it is damaged: "
            "restore a backup or start the run again without resume"
        ) from None
    _check_head(path, int(meta["round"]))
    strategy_state = dict(meta["strategy_state"])
    strategy_state["arrays"] = strategy_arrays
    return Checkpoint(
        round=int(meta["round"]),
        arrays=arrays,
        strategy_state=strategy_state,
        history=meta["history"],
        run_config=meta["run_config"],
        rng_state=meta.get("rng_state"),
    )


def _authenticate_plaintext(path: Path, entries: dict[str, np.ndarray]) -> None:
    """Verify a plaintext checkpoint's HMAC tag with its folder's key; raise when it does not verify."""
    tag = entries.pop(_MAC_ENTRY, None)
    if tag is None:
        raise CheckpointTamperedError(
            f"checkpoint {path} carries no authentication tag (it was stripped, or the file was written "
            f"outside fedcare or by an older version). {_WHAT_TO_DO}"
        )
    if not _verify_mac(checkpoint_mac_key(path, create=False), _MAC_LABEL, entries, bytes(np.asarray(tag, np.uint8))):
        raise CheckpointTamperedError(
            f"checkpoint {path} is not trustworthy: it failed authentication (HMAC-SHA256), so its model, "
            f"round or state was modified after it was written, or it comes from another run. {_WHAT_TO_DO}"
        )


def save_model_file(
    path: Path | str,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    *,
    key: ArtefactKey | None = None,
    metadata: ArtefactMetadata | None = None,
) -> None:
    """Write a model (named arrays) plus a JSON ``meta`` (model spec, task, shape) as one npz.

    With ``key`` the file is an AES-256-GCM artefact binding ``metadata``.
    """
    payload = {f"model/{_check_key(k)}": np.asarray(v) for k, v in arrays.items()}
    blob = json.dumps(_clean({"format": "fedcare-model/1", "names": list(arrays), **meta}))
    payload["meta"] = np.frombuffer(blob.encode("utf-8"), dtype=np.uint8)
    _write_npz(Path(path), payload, key, metadata)


def load_model_file(
    path: Path | str, *, key: ArtefactKey | None = None, expected: Mapping[str, Any] | None = None
) -> tuple[OrderedDict[str, np.ndarray], dict[str, Any]]:
    """Read a model written by :func:`save_model_file` (decrypted with ``key``): (named arrays, meta).

    A stored operating threshold (``meta["threshold"]``) outside [0, 1] is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no model file at {path}; pass the final_model.npz of a run")
    source = _read_npz_bytes(path, key, expected, "model file")
    arrays, meta = _read_model_npz(path, source)
    threshold = meta.get(MODEL_THRESHOLD)
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0):
        raise CheckpointError(
            f"model file {path} stores the operating threshold {threshold!r}, not a probability in [0, 1]; "
            "the file is damaged or was edited: use the model file the run wrote"
        )
    return arrays, meta


def amend_model_file(
    path: Path | str,
    updates: Mapping[str, Any],
    *,
    key: ArtefactKey | None = None,
    expected: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge ``updates`` (threshold, preprocessing, training data) into a model file's meta; return the new meta.

    The arrays are unchanged. An encrypted file is authenticated and decrypted with ``key``, then
    encrypted again under the same key and the same bound metadata (AES-GCM, a fresh nonce); the
    write is atomic. ``format`` and ``names`` cannot be changed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no model file at {path}; pass the final_model.npz of a run")
    bound: ArtefactMetadata | None = None
    if key is not None:
        _read_npz_bytes(path, key, expected, "model file")  # refuses plaintext / wrong key / tampered
        data, bound = decrypt_bytes(path.read_bytes(), key=key, expected=expected)
        arrays, meta = _read_model_npz(path, io.BytesIO(data))
    else:
        arrays, meta = _read_model_npz(path, _read_npz_bytes(path, None, expected, "model file"))
    fixed = {"format", "names"} & set(updates)
    if fixed:
        raise ValueError(f"cannot change {sorted(fixed)} of a model file; pass only new meta keys")
    meta = {k: v for k, v in meta.items() if k not in ("format", "names")} | dict(updates)
    save_model_file(path, arrays, meta, key=key, metadata=bound)
    return meta


def _read_model_npz(path: Path, source: io.BytesIO | Path) -> tuple[OrderedDict[str, np.ndarray], dict[str, Any]]:
    """Return (named arrays, meta) of a model npz opened from ``source``."""
    try:
        with np.load(source, allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta"]).decode("utf-8"))
            if meta.get("format") != "fedcare-model/1":
                raise CheckpointError(f"{path} is not a fedcare model file")
            arrays = OrderedDict((n, np.array(npz[f"model/{n}"])) for n in meta["names"])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read model file {path} ({type(exc).__name__}: {exc})") from None
    return arrays, meta


def build_saved_model(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> nn.Module:
    """Return the model a saved file describes (``meta`` of :func:`load_model_file`), with its weights, in eval mode."""
    model = build_for_data(
        ModelSpec.model_validate(meta["model_spec"]),
        task=meta["task"],
        num_classes=int(meta["num_classes"]),
        input_shape=tuple(meta["input_shape"]),
        has_mask=bool(meta["has_mask"]),
    )
    set_weights(model, OrderedDict(arrays))
    return model.eval()
