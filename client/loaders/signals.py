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

import numpy as np

from ..errors import MalformedFileError, RecordNotFoundError, SchemaError, ShapeError, WindowError
from ..manifest import SignalWindowsData, SiteManifest
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


def window_length(spec: SignalWindowsData, fs: float) -> tuple[int, int]:
    """Return ``(samples per window, samples before the event)``."""
    length = round_half_up(spec.window_seconds * fs)
    return length, round_half_up(spec.before * length)


def load_signal_windows(manifest: SiteManifest) -> LoadResult:
    """Load and validate a signal-window site; inputs are ``(x[N, T, 1], lengths[N])``."""
    spec = manifest.data
    assert isinstance(spec, SignalWindowsData)
    site = manifest.site
    require_file(spec.path, "path", site)
    name = spec.path.name
    npz = read_npz(spec.path, name)
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
    length, before = window_length(spec, fs)
    after = length - before
    steps = length // spec.decimate
    if steps < 1:
        raise WindowError(
            f"{name}: a {length}-sample window decimated by {spec.decimate} leaves no sample; "
            "lower data.decimate",
            path=spec.path,
        )
    offsets = np.arange(-before, after)
    windows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    notes: list[str] = []
    dropped_edge = dropped_bad = 0
    hint = "Fix data.signal_key / event_key / positive_key or the file."
    for rec in records:
        signal = npz_array(npz, f"{spec.signal_key}_{rec}", name, spec.path, hint)
        events = npz_array(npz, f"{spec.event_key}_{rec}", name, spec.path, hint)
        positives = npz_array(npz, f"{spec.positive_key}_{rec}", name, spec.path, hint)
        if signal.ndim != 1:
            raise ShapeError(
                f"{name}: {spec.signal_key}_{rec} has shape {signal.shape}; expected a 1-D signal",
                path=spec.path,
            )
        if length > len(signal):
            raise WindowError(
                f"{name}: the window of {spec.window_seconds:g} s = {length} samples at {fs:g} Hz "
                f"is longer than record {rec}'s signal ({len(signal)} samples); lower "
                "data.window_seconds",
                path=spec.path,
            )
        for key, arr in ((spec.event_key, events), (spec.positive_key, positives)):
            if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
                raise SchemaError(
                    f"{name}: {key}_{rec} must be a 1-D array of integer sample indices "
                    f"(got {arr.dtype} {arr.shape})",
                    path=spec.path,
                )
        stray = int((~np.isin(positives, events)).sum())
        if stray:
            msg = (
                f"record {rec}: {stray} {spec.positive_key} positions are not among the "
                f"{spec.event_key} events and are ignored"
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
        groups.append(np.full(int(finite.sum()), rec))
    x = np.concatenate(windows)
    y = np.concatenate(labels)
    g = np.concatenate(groups).astype(str)
    if dropped_edge:
        notes.append(f"{dropped_edge} events too close to a signal edge for a full window dropped")
    if dropped_bad:
        notes.append(f"{dropped_bad} windows with non-finite samples dropped")
    if len(x) == 0:
        raise WindowError(
            f"{name}: no complete window around any event of records {records}; check the "
            "event keys or lower data.window_seconds",
            path=spec.path,
        )
    if spec.decimate > 1:
        x = x[:, : steps * spec.decimate].reshape(len(x), steps, spec.decimate).mean(axis=2)
    patients = len(np.unique(g))
    check_cohort(patients, manifest, f"{name} records {records}", unit="records (patients)")
    by = manifest.split.by
    if by is not None and by not in ("patient", "record"):
        raise SchemaError(
            f"split.by = {by!r} is not available for signal windows; use 'record' (or "
            "'patient': one record is one patient) or remove split.by",
            path=spec.path,
        )
    splits = split_indices(
        len(x), manifest.split, labels=y, groups=g if by else None, site=site, source=name
    )
    if spec.normalize == "window":
        std = x.std(axis=1, keepdims=True)
        x = (x - x.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
    elif spec.normalize == "train":
        mean, std = x[splits[0]].mean(), x[splits[0]].std()
        x = (x - mean) / (std if std > 0 else 1.0)
    class_names = (
        [str(c) for c in manifest.classes] if manifest.classes else ["other", spec.positive_key]
    )
    data = build_site(
        manifest,
        kind="signal",
        inputs=[x.astype(np.float32)[:, :, None], np.full(len(x), steps, np.int64)],
        targets=y,
        groups=g,
        splits=splits,
        num_classes=2,
        input_shape=(steps, 1),
        feature_names=[spec.signal_key],
    )
    logger.info("site %s: %d windows of %d steps from %d records", site, len(x), steps, patients)
    return LoadResult(data=data, patients=patients, class_names=class_names, notes=notes)


__all__ = ["load_signal_windows", "window_length"]
