"""Loader for ``kind = "wfdb"``: a folder of native WFDB records (PhysioNet's own format).

Each record is ``NAME.hea`` (the header: sampling rate, leads, signal file names), its signal
file(s) (``NAME.dat``…) and an annotation file ``NAME.<annotation>`` (``NAME.atr`` for the
reference beat labels). They are read with the ``wfdb`` package. The annotations whose symbol is
a beat code become events, those with a positive symbol (``V``, PVC, by default) are labelled
1, and the windows are cut, labelled, split and scaled by the same code as ``signal_windows``
(:func:`~fedcare.client.loaders.signals.cut_windows`), so a WFDB folder and the NPZ converted
from it give the same windows and labels. One record is one patient; the split is by record
unless ``split.by = "beat"``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from ..errors import (
    LabelError,
    MalformedFileError,
    MissingFileError,
    RecordNotFoundError,
    SchemaError,
)
from ..manifest import SiteManifest, WfdbData
from ._common import LoadResult, require_file
from .signals import Recording, cut_windows, windows_site

if TYPE_CHECKING:
    import wfdb

logger = logging.getLogger(__name__)

_RECORD_SPLITS = (None, "record", "patient")


@contextmanager
def _wfdb_deprecations_hidden() -> Iterator[None]:
    """Hide only pandas' ``inplace`` deprecation raised inside wfdb's own code.

    wfdb 4.3 calls ``DataFrame.set_index`` / ``drop`` with ``inplace=True``, which pandas 3
    deprecates; left alone, every record read would put that (irrelevant to the site) in
    ``node check``'s warnings. Nothing else wfdb warns about is hidden.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The inplace keyword", module="wfdb")
        yield


def _wfdb() -> ModuleType:
    """Import ``wfdb`` on first use (it takes a while, and only WFDB sites need it)."""
    with _wfdb_deprecations_hidden():
        import wfdb

    return wfdb


def _discover(spec: WfdbData, site: str) -> list[str]:
    """Return the records of the folder (every ``*.hea``), or raise when there is none."""
    folder = require_file(spec.folder, "folder", site, folder=True)
    available = sorted(p.stem for p in folder.glob("*.hea"))
    if not available:
        npz = sorted(p.name for p in folder.glob("*.npz"))
        also = (
            f"; it holds {npz[0]}: for an NPZ of signals use kind = \"signal_windows\""
            if npz
            else ""
        )
        raise MissingFileError(
            f"site {site!r}: folder {folder} (data.folder) holds no WFDB header (*.hea){also}. "
            "A WFDB record is NAME.hea plus its signal file (NAME.dat) and annotation file "
            f"(NAME.{spec.annotation}); fix data.folder",
            path=folder,
        )
    return available


def _header(spec: WfdbData, rec: str) -> wfdb.Record:
    """Read one record's header, or raise :class:`MalformedFileError` naming the file."""
    path = spec.folder / f"{rec}.hea"
    wfdb = _wfdb()
    try:
        with _wfdb_deprecations_hidden():
            header = wfdb.rdheader(str(spec.folder / rec))
    except Exception as exc:  # wfdb raises bare ValueError / IndexError / AttributeError…
        raise MalformedFileError(
            f"{path.name} is not a readable WFDB header ({type(exc).__name__}); its first line "
            "must be 'NAME NSIGNALS FS NSAMPLES' followed by one line per signal — export the "
            "record again with a WFDB tool (wfdb.wrsamp, rdsamp/wrsamp)",
            path=path,
        ) from None
    if not isinstance(header, wfdb.Record):
        raise MalformedFileError(
            f"{path.name} is a multi-segment WFDB record, which kind = \"wfdb\" does not read; "
            "join the segments into one record (wfdb.rdrecord(...).wrsamp()) and list that",
            path=path,
        )
    if not header.sig_name or not header.fs or header.fs <= 0:
        raise MalformedFileError(
            f"{path.name} declares no signal or no positive sampling rate; export the record "
            "again",
            path=path,
        )
    return header


def _channel_index(spec: WfdbData, rec: str, header: wfdb.Record, first: str) -> int:
    """Return the index of the configured lead in ``header``, or raise naming the leads there."""
    names = list(header.sig_name)
    if spec.channel is None:
        if names[0] != first:
            raise SchemaError(
                f"{rec}.hea: the first lead is {names[0]!r} but it is {first!r} in the first "
                f"record; choose one lead for every record with data.channel (leads of record "
                f"{rec}: {names})",
                path=spec.folder / f"{rec}.hea",
            )
        return 0
    if isinstance(spec.channel, int):
        if spec.channel >= len(names):
            raise SchemaError(
                f"{rec}.hea has {len(names)} signals {names}; data.channel = {spec.channel} is "
                "out of range (0-based); give a lead name or a smaller index",
                path=spec.folder / f"{rec}.hea",
            )
        return spec.channel
    if spec.channel not in names:
        raise SchemaError(
            f"{rec}.hea has no lead {spec.channel!r}; leads in this record: {names}. Fix "
            "data.channel, or leave this record out of data.records",
            path=spec.folder / f"{rec}.hea",
        )
    return names.index(spec.channel)


def _annotation_path(spec: WfdbData, rec: str, header: wfdb.Record) -> Path:
    """Return the annotation file of ``rec``, or raise naming the candidates beside it."""
    path = spec.folder / f"{rec}.{spec.annotation}"
    if path.is_file():
        return path
    signal_files = {str(f) for f in (header.file_name or [])}
    others = sorted(
        p.suffix.lstrip(".")
        for p in spec.folder.glob(f"{rec}.*")
        if p.suffix not in (".hea", "") and p.name not in signal_files
    )
    hint = (
        f"files of record {rec} with other extensions: {others}; set data.annotation to the "
        "one holding the beat labels"
        if others
        else "add the annotation file (e.g. the .atr file from PhysioNet)"
    )
    raise MissingFileError(
        f"annotation file {path.name} of record {rec} not found in {spec.folder} "
        f"(data.annotation = {spec.annotation!r}); {hint}",
        path=path,
    )


def _read(spec: WfdbData, rec: str, header: wfdb.Record, channel: int) -> Recording:
    """Read one record's lead and annotations as a :class:`Recording`."""
    hea = f"{rec}.hea"
    wfdb = _wfdb()
    try:
        with _wfdb_deprecations_hidden():
            record = wfdb.rdrecord(str(spec.folder / rec), channels=[channel], physical=True)
    except FileNotFoundError:
        files = sorted({str(f) for f in (header.file_name or [])})
        raise MissingFileError(
            f"signal file {files} of record {rec} (named in {hea}) not found in {spec.folder}; "
            "copy it beside the header",
            path=spec.folder / (files[0] if files else hea),
        ) from None
    except Exception as exc:
        raise MalformedFileError(
            f"the signal of record {rec} cannot be read ({type(exc).__name__}); its signal file "
            f"is truncated or does not match the format {hea} declares — export the record again",
            path=spec.folder / hea,
        ) from None
    if record.p_signal is None or record.p_signal.ndim != 2 or record.p_signal.shape[0] == 0:
        raise MalformedFileError(
            f"record {rec} holds no sample of lead {header.sig_name[channel]!r}; export it again",
            path=spec.folder / hea,
        )
    ann_path = _annotation_path(spec, rec, header)
    try:
        with _wfdb_deprecations_hidden():
            ann = wfdb.rdann(str(spec.folder / rec), spec.annotation)
    except Exception as exc:
        raise MalformedFileError(
            f"{ann_path.name} is not a readable WFDB annotation file ({type(exc).__name__}); "
            "check data.annotation names the beat annotations, or export them again",
            path=ann_path,
        ) from None
    symbols = np.asarray(ann.symbol if ann.symbol is not None else [], dtype=str)
    samples = np.asarray(ann.sample, dtype=np.int64)
    is_beat = np.isin(symbols, spec.beat_symbols)
    if not is_beat.any():
        found = sorted(set(symbols.tolist()))
        raise LabelError(
            f"{ann_path.name} holds no beat annotation (symbols found: {found or 'none'}; beat "
            f"symbols: {spec.beat_symbols}); use the beat annotation file (data.annotation) or "
            "fix data.beat_symbols",
            path=ann_path,
        )
    positives = samples[np.isin(symbols, spec.positive_symbols)]
    return Recording(rec, record.p_signal[:, 0], samples[is_beat], positives)


def load_wfdb(manifest: SiteManifest) -> LoadResult:
    """Load and validate a WFDB-folder site; inputs are ``(x[N, T, 1], lengths[N])``."""
    spec = manifest.data
    assert isinstance(spec, WfdbData)
    site = manifest.site
    available = _discover(spec, site)
    records = list(spec.records) if spec.records is not None else available
    missing = [r for r in records if r not in available]
    if missing:
        raise RecordNotFoundError(
            f"folder {spec.folder} has no WFDB record(s) {missing} (no {missing[0]}.hea); "
            f"records there: {available}. Fix data.records in the manifest",
            path=spec.folder,
        )
    if len(set(records)) != len(records):
        raise SchemaError(f"data.records lists a record twice: {records}", path=spec.folder)
    by = manifest.split.by
    if by not in (*_RECORD_SPLITS, "beat"):
        raise SchemaError(
            f"split.by = {by!r} is not available for WFDB records; leave it out (split by "
            "record: one record is one patient) or set 'beat' to spread a record's beats "
            "over the splits",
            path=spec.folder,
        )
    headers = {rec: _header(spec, rec) for rec in records}
    rates = {rec: float(h.fs) for rec, h in headers.items()}
    if spec.fs is not None:
        wrong = {rec: fs for rec, fs in rates.items() if fs != spec.fs}
        if wrong:
            raise SchemaError(
                f"record(s) {sorted(wrong)} are sampled at {sorted(set(wrong.values()))} Hz but "
                f"data.fs = {spec.fs:g}; resample them to {spec.fs:g} Hz, or leave them out of "
                "data.records",
                path=spec.folder / f"{min(wrong)}.hea",
            )
    elif len(set(rates.values())) > 1:
        shown = {rec: f"{fs:g}" for rec, fs in rates.items()}
        raise SchemaError(
            f"the records of {spec.folder} have different sampling rates (Hz): {shown}; windows "
            "must have one length — resample them to one rate, or list only records of one rate "
            "(and set data.fs to it)",
            path=spec.folder,
        )
    fs = next(iter(rates.values()))
    first = headers[records[0]].sig_name[0]
    channels = {rec: _channel_index(spec, rec, h, first) for rec, h in headers.items()}
    lead = headers[records[0]].sig_name[channels[records[0]]]

    def recordings() -> Iterator[Recording]:
        for rec in records:
            yield _read(spec, rec, headers[rec], channels[rec])

    windows = cut_windows(
        recordings(),
        spec,
        fs,
        site=site,
        source=spec.folder.name,
        path=spec.folder,
        event_name="beat",
        positive_name="/".join(spec.positive_symbols),
    )
    if by == "beat":
        msg = (
            "split.by = 'beat': beats of one patient land in several splits, so validation and "
            "test scores are optimistic; leave split.by out to split by record"
        )
        windows.notes.append(msg)
        logger.warning("site %s: %s", site, msg)
    return windows_site(
        manifest,
        windows,
        source=f"{spec.folder.name} records {records}",
        path=spec.folder,
        split_groups=by != "beat",
        positive_name="/".join(spec.positive_symbols),
        feature_name=str(lead),
        example_unit="beats",
    )


__all__ = ["load_wfdb"]
