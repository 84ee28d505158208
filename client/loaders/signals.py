"""Loader for ``kind = "signal_windows"``: 1-D signals cut into windows around annotated events.

Built for the MIT-BIH Arrhythmia NPZ (``ecg_REC``, ``rpeaks_REC``, ``pvc_REC``): one window of
``round(window_seconds * fs)`` samples per R peak, ``round(before * L)`` samples before it; a
window that would run past either end of the signal is dropped; label 1 when the event is one of
the positive events (PVC). Windows are returned as sequences (N, T, 1) with ``lengths`` (all T)
and no mask, so a :class:`~fedcare.models.ClinicalLSTM` reads them as ``model(x, lengths)``.
``Split.groups`` holds the record (patient) of every window.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MalformedFileError, RecordNotFoundError, SchemaError, ShapeError, WindowError
from ..manifest import SignalWindowsData, SiteManifest, WfdbData
from ._common import (
    LoadResult,
    build_site,
    check_cohort,
    npz_array,
    read_npz,
    require_file,
    round_half_up,
    split_indices,
)

logger = logging.getLogger(__name__)


WFDB_HINT = (
    "This folder holds WFDB records (.hea files): describe them with kind = \"wfdb\" and "
    "folder = \"{folder}\" instead of kind = \"signal_windows\""
)


def window_length(spec: SignalWindowsData | WfdbData, fs: float) -> tuple[int, int]:
    """Return ``(samples per window, samples before the event)``."""
    length = round_half_up(spec.window_seconds * fs)
    return length, round_half_up(spec.before * length)


@dataclass(frozen=True)
class Recording:
    """One record's signal and events, as both signal kinds hand them to :func:`cut_windows`.

    Attributes
    ----------
    record : str
        The record (patient) id.
    signal : numpy.ndarray
        The 1-D signal.
    events : numpy.ndarray
        Sample index of every event (int, 1-D).
    positives : numpy.ndarray
        Sample index of the events labelled 1.
    """

    record: str
    signal: np.ndarray
    events: np.ndarray
    positives: np.ndarray


@dataclass(frozen=True)
class Windows:
    """Windows cut from every record: samples, labels, the record of each, and notes."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    steps: int
    notes: list[str]


def cut_windows(
    recordings: Iterable[Recording],
    spec: SignalWindowsData | WfdbData,
    fs: float,
    *,
    site: str,
    source: str,
    path: Path,
    event_name: str,
    positive_name: str,
) -> Windows:
    """Cut one window per event of every record, label it, and decimate.

    A window is ``round(window_seconds * fs)`` samples with ``round(before * L)`` before the
    event; windows running past either end of the signal, or holding a non-finite sample,
    are dropped (and counted in the notes).

    Raises
    ------
    WindowError
        When the window is longer than a signal, decimation leaves no sample, or no window fits.
    """
    length, before = window_length(spec, fs)
    after = length - before
    steps = length // spec.decimate
    if steps < 1:
        raise WindowError(
            f"{source}: a {length}-sample window decimated by {spec.decimate} leaves no sample; "
            "lower data.decimate",
            path=path,
        )
    offsets = np.arange(-before, after)
    windows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    notes: list[str] = []
    records: list[str] = []
    dropped_edge = dropped_bad = 0
    for rec in recordings:
        records.append(rec.record)
        signal, events, positives = rec.signal, rec.events, rec.positives
        if length > len(signal):
            raise WindowError(
                f"{source}: the window of {spec.window_seconds:g} s = {length} samples at "
                f"{fs:g} Hz is longer than record {rec.record}'s signal ({len(signal)} samples); "
                "lower data.window_seconds",
                path=path,
            )
        stray = int((~np.isin(positives, events)).sum())
        if stray:
            msg = (
                f"record {rec.record}: {stray} {positive_name} positions are not among the "
                f"{event_name} events and are ignored"
            )
            notes.append(msg)
            logger.warning("site %s: %s", site, msg)
        inside = (events - before >= 0) & (events + after <= len(signal))
        dropped_edge += int((~inside).sum())
        ev = events[inside]
        w = signal[ev[:, None] + offsets[None, :]].astype(np.float64)
        finite = np.isfinite(w).all(axis=1)
        dropped_bad += int((~finite).sum())
        windows.append(w[finite])
        labels.append(np.isin(ev[finite], positives).astype(np.int64))
        groups.append(np.full(int(finite.sum()), rec.record))
    x = np.concatenate(windows) if windows else np.empty((0, length))
    y = np.concatenate(labels) if labels else np.empty(0, np.int64)
    g = np.concatenate(groups).astype(str) if groups else np.empty(0, str)
    if dropped_edge:
        notes.append(f"{dropped_edge} events too close to a signal edge for a full window dropped")
    if dropped_bad:
        notes.append(f"{dropped_bad} windows with non-finite samples dropped")
    if len(x) == 0:
        raise WindowError(
            f"{source}: no complete window around any event of records {records}; check the "
            f"{event_name} events or lower data.window_seconds",
            path=path,
        )
    if spec.decimate > 1:
        x = x[:, : steps * spec.decimate].reshape(len(x), steps, spec.decimate).mean(axis=2)
    return Windows(x=x, y=y, groups=g, steps=steps, notes=notes)


def windows_site(
    manifest: SiteManifest,
    windows: Windows,
    *,
    source: str,
    path: Path,
    split_groups: bool,
    positive_name: str,
    feature_name: str,
    example_unit: str,
) -> LoadResult:
    """Check the cohort, split (by record when ``split_groups``), normalise and build the site."""
    spec = manifest.data
    assert isinstance(spec, (SignalWindowsData, WfdbData))
    x, y, g = windows.x, windows.y, windows.groups
    patients = len(np.unique(g))
    check_cohort(patients, manifest, source, unit="records (patients)")
    splits = split_indices(
        len(x),
        manifest.split,
        labels=y,
        groups=g if split_groups else None,
        site=manifest.site,
        source=source,
    )
    if spec.normalize == "window":
        std = x.std(axis=1, keepdims=True)
        x = (x - x.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
    elif spec.normalize == "train":
        mean, std = x[splits[0]].mean(), x[splits[0]].std()
        x = (x - mean) / (std if std > 0 else 1.0)
    class_names = (
        [str(c) for c in manifest.classes] if manifest.classes else ["other", positive_name]
    )
    steps = windows.steps
    data = build_site(
        manifest,
        kind="signal",
        inputs=[x.astype(np.float32)[:, :, None], np.full(len(x), steps, np.int64)],
        targets=y,
        groups=g,
        splits=splits,
        num_classes=2,
        input_shape=(steps, 1),
        feature_names=[feature_name],
    )
    logger.info(
        "site %s: %d windows of %d steps from %d records", manifest.site, len(x), steps, patients
    )
    return LoadResult(
        data=data,
        patients=patients,
        class_names=class_names,
        notes=list(windows.notes),
        unit="records",
        example_unit=example_unit,
    )


def _npz_hint(path: Path) -> str:
    """Say which keys a signal_windows NPZ holds, and point at kind = "wfdb" for WFDB folders."""
    hint = (
        "A signal_windows NPZ holds the keys records, fs and, per record REC, ecg_REC, "
        "rpeaks_REC and pvc_REC (names set by data.signal_key / event_key / positive_key)"
    )
    folder = path if path.is_dir() else path.parent
    if any(folder.glob("*.hea")):
        hint += ". " + WFDB_HINT.format(folder=folder)
    return hint


def load_signal_windows(manifest: SiteManifest) -> LoadResult:
    """Load and validate a signal-window site; inputs are ``(x[N, T, 1], lengths[N])``."""
    spec = manifest.data
    assert isinstance(spec, SignalWindowsData)
    site = manifest.site
    require_file(spec.path, "path", site)
    name = spec.path.name
    npz = read_npz(spec.path, name, expects=_npz_hint(spec.path))
    available = [str(r) for r in np.atleast_1d(npz_array(npz, "records", name, spec.path))]
    fs_arr = npz_array(npz, "fs", name, spec.path)
    if fs_arr.size != 1 or not np.issubdtype(fs_arr.dtype, np.number) or float(fs_arr) <= 0:
        raise MalformedFileError(
            f"{name}: key 'fs' must hold one positive sampling rate in Hz", path=spec.path
        )
    fs = float(fs_arr)
    records = list(spec.records) if spec.records is not None else available
    missing = [r for r in records if r not in available]
    if missing:
        raise RecordNotFoundError(
            f"{name} has no record(s) {missing}; records in the file: {available}. Fix "
            "data.records in the manifest",
            path=spec.path,
        )
    if len(set(records)) != len(records):
        raise SchemaError(f"data.records lists a record twice: {records}", path=spec.path)
    hint = "Fix data.signal_key / event_key / positive_key or the file."

    def recordings() -> Iterable[Recording]:
        for rec in records:
            signal = npz_array(npz, f"{spec.signal_key}_{rec}", name, spec.path, hint)
            events = npz_array(npz, f"{spec.event_key}_{rec}", name, spec.path, hint)
            positives = npz_array(npz, f"{spec.positive_key}_{rec}", name, spec.path, hint)
            if signal.ndim != 1:
                raise ShapeError(
                    f"{name}: {spec.signal_key}_{rec} has shape {signal.shape}; expected a 1-D "
                    "signal",
                    path=spec.path,
                )
            for key, arr in ((spec.event_key, events), (spec.positive_key, positives)):
                if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
                    raise SchemaError(
                        f"{name}: {key}_{rec} must be a 1-D array of integer sample indices "
                        f"(got {arr.dtype} {arr.shape})",
                        path=spec.path,
                    )
            yield Recording(rec, signal, events, positives)

    by = manifest.split.by
    if by is not None and by not in ("patient", "record"):
        raise SchemaError(
            f"split.by = {by!r} is not available for signal windows; use 'record' (or "
            "'patient': one record is one patient) or remove split.by",
            path=spec.path,
        )
    windows = cut_windows(
        recordings(),
        spec,
        fs,
        site=site,
        source=name,
        path=spec.path,
        event_name=spec.event_key,
        positive_name=spec.positive_key,
    )
    return windows_site(
        manifest,
        windows,
        source=f"{name} records {records}",
        path=spec.path,
        split_groups=by is not None,
        positive_name=spec.positive_key,
        feature_name=spec.signal_key,
        example_unit="windows",
    )


__all__ = [
    "Recording",
    "Windows",
    "cut_windows",
    "load_signal_windows",
    "window_length",
    "windows_site",
]
