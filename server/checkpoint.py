"""Checkpoints of a federated run and the metrics history they carry.

After every round the ServerApp saves one :class:`Checkpoint`: the global model, the
strategy's state (FedAdam's ``m_t`` / ``v_t``), the metrics history, the Python RNG state that
flwr's node sampling draws from, and the run config it was made under. Save and load go
through :func:`save_checkpoint` / :func:`load_checkpoint` only, so encryption at rest can be
added in one place.

File format: one NumPy ``.npz`` (no pickle) holding ``model/<name>`` arrays,
``strategy/<attribute>/<name>`` arrays and ``meta``, a UTF-8 JSON document stored as a uint8
array. Writes are atomic: a temporary file in the same folder, ``fsync``, ``os.replace``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from torch import nn

from .. import __version__
from ..models import ModelSpec, build_for_data, set_weights
from ..privacy.artefacts import (
    MAGIC,
    ArtefactKey,
    ArtefactMetadata,
    ArtefactMismatch,
    ArtefactTampered,
    WrongKey,
    decrypt_bytes,
    encrypt_bytes,
)

__all__ = [
    "CHECKPOINT_FILE",
    "ENCRYPTED_SUFFIX",
    "FINAL_MODEL_FILE",
    "HISTORY_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointTamperedError",
    "MetricsHistory",
    "RoundRecord",
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
_HISTORY_KIND: Final = "fedcare-metrics-history/1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the run that wants to resume from it."""


class CheckpointTamperedError(CheckpointError):
    """An encrypted checkpoint or model failed authentication, or is another run's file (swapped)."""


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


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entry table (so a rename survives a crash); best effort off POSIX."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - not POSIX
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it and rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (NaN written as null)."""
    text = json.dumps(_clean(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    _write_atomic(Path(path), lambda fh: fh.write(text.encode("utf-8")))


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
        _write_atomic(path, lambda fh: np.savez(fh, **payload))
        return
    if metadata is None:
        raise ValueError("an encrypted artefact needs its ArtefactMetadata (study, kind, round, config hash)")
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    blob = encrypt_bytes(buffer.getvalue(), key=key, metadata=metadata)
    _write_atomic(path, lambda fh: fh.write(blob))


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
    _write_npz(Path(path), payload, key, metadata)
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
        When an encrypted checkpoint fails authentication or its metadata differs from ``expected``.
    CheckpointKeyError
        When the key is missing or wrong, or a plaintext file is given with a key.
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
    """Read a model written by :func:`save_model_file` (decrypted with ``key``): (named arrays, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no model file at {path}; pass the final_model.npz of a run")
    source = _read_npz_bytes(path, key, expected, "model file")
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
