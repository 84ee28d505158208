"""Loader for ``kind = "timeseries_long"``: PhysioNet-2012-style files, one per patient.

Each patient file is a CSV ``Time,Parameter,Value`` with ``Time`` as ``hh:mm`` since admission;
descriptors (RecordID, Age, …) are the rows at 00:00 naming a descriptor. The files come from a
folder or a ``.tar.gz`` read as a stream (never extracted to disk). All files are concatenated
in memory and parsed by one pandas call, binned with ``numpy.bincount``: loading the 4000
patients of PhysioNet 2012 set A takes about two seconds.

Processing, in order:

1. values in ``unknown_values`` (PhysioNet: -1) become missing;
2. observations are binned into ``steps`` bins of ``step_minutes`` (mean per bin); one exactly
   at the end of the horizon (48:00) goes to the last bin, later ones are dropped;
3. the mask is 1 where a bin holds an observation, 0 elsewhere;
4. missing bins are forward-filled within the patient; bins before a feature's first
   observation take the train split's mean of that feature;
5. every feature is standardised with the train split's mean and standard deviation of
   observed values, so a mean-filled bin is exactly 0.

Static descriptors listed in ``static`` are appended as features constant over time (mask 1
when known).
"""

from __future__ import annotations

import io
import logging
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import (
    LabelError,
    MalformedFileError,
    OutcomeMismatchError,
    SchemaError,
    TimestampError,
)
from ..manifest import PHYSIONET2012_PARAMETERS, SiteManifest, TimeseriesLongData
from ._common import (
    LoadResult,
    build_site,
    check_cohort,
    encode_labels,
    key_name,
    require_file,
    series_keys,
    split_indices,
    value_key,
)

logger = logging.getLogger(__name__)

HEADER = b"Time,Parameter,Value"
_TIME = re.compile(r"^\d{1,3}:[0-5]\d$")


def _iter_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, content)`` of every ``*.txt`` patient file in a folder or tar archive."""
    if path.is_dir():
        for p in sorted(path.glob("*.txt")):
            yield p.name, p.read_bytes()
        return
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if not member.isfile() or not member.name.endswith(".txt"):
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                yield f"{path.name}:{member.name}", handle.read()
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise MalformedFileError(
            f"{path.name} is not a readable tar archive ({type(exc).__name__}: {exc}); pass a "
            "folder of per-patient .txt files or a .tar.gz of them",
            path=path,
        ) from None


def _find_bad_line(names: list[str], bodies: list[bytes]) -> None:
    """Scan the files line by line and raise on the first malformed line (slow path)."""
    for name, body in zip(names, bodies):
        for offset, raw in enumerate(body.split(b"\n")):
            line = offset + 2  # the header is line 1
            text = raw.decode("utf-8", errors="replace").strip()
            fields = text.split(",")
            if len(fields) != 3:
                raise MalformedFileError(
                    f"{name} line {line}: {len(fields)} fields, expected 3 (Time,Parameter,Value); "
                    "fix or remove that line",
                    path=name,
                )
            if not _TIME.match(fields[0].strip()):
                raise TimestampError(
                    f"{name} line {line}: time stamp is not hh:mm (hours since admission, "
                    "minutes 00-59); fix that line's Time field",
                    path=name,
                )
            if not fields[1].strip():
                raise MalformedFileError(
                    f"{name} line {line}: the Parameter field is empty; fix or remove that line",
                    path=name,
                )
            try:
                float(fields[2])
            except ValueError:
                raise MalformedFileError(
                    f"{name} line {line}: the Value of parameter {fields[1].strip()!r} is not a "
                    "number; fix it or remove the line (missing values are absent rows)",
                    path=name,
                ) from None


def _read_observations(spec: TimeseriesLongData) -> tuple[list[str], pd.DataFrame]:
    """Read every patient file; return record ids and a frame (pid, minutes, Parameter, Value)."""
    names: list[str] = []
    records: list[str] = []
    bodies: list[bytes] = []
    parts: list[bytes] = []
    for name, content in _iter_files(spec.path):
        content = content.replace(b"\r\n", b"\n")
        head, _, body = content.partition(b"\n")
        if head.strip() != HEADER:
            raise MalformedFileError(
                f"{name}: first line must be the header 'Time,Parameter,Value'; fix the file",
                path=name,
            )
        body = body.rstrip(b"\n")
        k = len(names)
        names.append(name)
        records.append(Path(name.rsplit(":", 1)[-1]).stem)
        bodies.append(body)
        if body:
            prefix = b"%d," % k
            parts.append(prefix + body.replace(b"\n", b"\n" + prefix))
    if not names:
        raise MalformedFileError(
            f"{spec.path.name} holds no patient file (*.txt); point data.path at the folder or "
            "archive of per-patient files",
            path=spec.path,
        )
    dupes = pd.Index(records)[pd.Index(records).duplicated()]
    if len(dupes):
        raise SchemaError(
            f"{spec.path.name}: record {dupes[0]} appears in more than one file; keep one file "
            "per patient",
            path=spec.path,
        )
    # fast path: one parse of everything, "hh:mm" split into two integer columns
    buffer = b"\n".join(parts).replace(b":", b",")
    try:
        frame = pd.read_csv(
            io.BytesIO(buffer),
            header=None,
            names=["pid", "h", "m", "Parameter", "Value"],
            dtype={"pid": "int64", "h": "int64", "m": "int64", "Parameter": "category",
                   "Value": "float64"},
        )  # fmt: skip
        in_range = bool(((frame["m"] < 60) & (frame["h"] >= 0)).all())
        ok = in_range and not frame.isna().to_numpy().any()
    except (ValueError, pd.errors.ParserError):
        ok = False
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame({"pid": [], "h": [], "m": [], "Parameter": [], "Value": []})
        ok = True
    if not ok:
        _find_bad_line(names, bodies)
        raise MalformedFileError(  # pragma: no cover - the slow path names the line
            f"{spec.path.name}: a patient file is malformed; check the Time,Parameter,Value lines",
            path=spec.path,
        )
    frame["minutes"] = frame["h"].to_numpy() * 60 + frame["m"].to_numpy()
    return records, frame.drop(columns=["h", "m"])


def _read_outcomes(spec: TimeseriesLongData) -> pd.DataFrame:
    """Read the outcomes CSV, indexed by patient id (text)."""
    name = spec.outcomes.name
    try:
        table = pd.read_csv(spec.outcomes, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MalformedFileError(
            f"{name} is not a readable CSV ({str(exc).strip()}); fix that line",
            path=spec.outcomes,
        ) from None
    table.columns = [c.strip() for c in table.columns]
    for field_name, col in (("id_column", spec.id_column), ("target", spec.target)):
        if col not in table.columns:
            raise SchemaError(
                f"{name} has no column {col!r} (data.{field_name}); columns in the file: "
                f"{list(table.columns)}. Fix data.{field_name} in the manifest",
                path=spec.outcomes,
            )
    ids = table[spec.id_column].str.strip()
    dupes = ids[ids.duplicated()]
    if len(dupes):
        raise SchemaError(
            f"{name}: patient {dupes.iloc[0]} has more than one row; keep one outcome per patient",
            path=spec.outcomes,
        )
    table.index = pd.Index(ids, name="id")
    return table


@dataclass(frozen=True)
class _Observations:
    """Every observation of every file as flat arrays (parameter names as integer codes: fast on 1.7M rows).

    ``categories[pcode[i]]`` is row ``i``'s parameter, ``pid[i]`` the index of its file in
    ``records``; ``unknown[i]`` marks a value listed in ``unknown_values``.
    """

    records: list[str]
    categories: list[str]
    pcode: np.ndarray
    minutes: np.ndarray
    values: np.ndarray
    pid: np.ndarray
    unknown: np.ndarray

    @classmethod
    def read(cls, spec: TimeseriesLongData) -> _Observations:
        """Read the patient files of ``spec``."""
        records, obs = _read_observations(spec)
        values = obs["Value"].to_numpy()
        return cls(
            records=records,
            categories=[str(c) for c in obs["Parameter"].cat.categories],
            pcode=obs["Parameter"].cat.codes.to_numpy(),
            minutes=obs["minutes"].to_numpy(),
            values=values,
            pid=obs["pid"].to_numpy(),
            unknown=np.isin(values, spec.unknown_values),
        )


def load_timeseries(manifest: SiteManifest) -> LoadResult:
    """Load and validate a long-format time-series site (see the module docstring for the steps)."""
    spec = manifest.data
    assert isinstance(spec, TimeseriesLongData)
    site = manifest.site
    require_file(spec.path, "path", site)
    require_file(spec.outcomes, "outcomes", site)
    source = spec.path.name
    obs = _Observations.read(spec)
    desc, is_desc = _descriptors(spec, obs)
    selected = _select_patients(spec, desc, site)
    ids = [obs.records[i] for i in selected]
    filtered = f" matching where = {dict(spec.where)}" if spec.where else ""
    check_cohort(len(selected), manifest, f"{source}{filtered}")
    y, class_names = _labels(manifest, spec, ids)
    parameters = _parameters(spec, obs, is_desc, source)
    n, t = len(selected), spec.steps
    series, mask, n_late = _bin(spec, obs, parameters, selected)
    notes = []
    if n_late:
        notes.append(
            f"{n_late} observations after the {spec.horizon_minutes} min horizon dropped"
        )

    # static descriptors as constant features
    names = list(parameters)
    if spec.static:
        static = desc.iloc[selected][spec.static].to_numpy(dtype=np.float64)
        series = np.concatenate([series, np.repeat(static[:, None, :], t, axis=1)], axis=2)
        mask = np.concatenate([mask, np.repeat(~np.isnan(static)[:, None, :], t, axis=1)], axis=2)
        names += list(spec.static)
    missing_rates = {nm: float(1.0 - mask[:, :, j].mean()) for j, nm in enumerate(names)}

    groups, split_groups = _groups(manifest, spec, desc, selected, ids, source)
    splits = split_indices(
        n, manifest.split, labels=None if manifest.task == "regression" else y,
        groups=split_groups, site=site, source=source,
    )  # fmt: skip
    x = _fill_and_standardise(series, mask, train=splits[0], names=names, site=site, notes=notes)
    lengths = np.full(n, t, np.int64)
    data = build_site(
        manifest,
        kind="sequence",
        inputs=[x, lengths, mask.astype(np.float32)],
        targets=y,
        groups=groups,
        splits=splits,
        num_classes=len(class_names),
        input_shape=(t, len(names)),
        feature_names=names,
        has_mask=True,
    )
    logger.info(
        "site %s: %d patients, %d steps x %d features from %s", site, n, t, len(names), source
    )
    return LoadResult(
        data=data,
        patients=n,
        class_names=class_names,
        missing_rates=missing_rates,
        notes=notes,
        unit="patients",
        example_unit="patients",
    )


def _descriptors(spec: TimeseriesLongData, obs: _Observations) -> tuple[pd.DataFrame, np.ndarray]:
    """Return each file's descriptors (first known value at 00:00; NaN if none) and which rows are descriptors."""
    desc_of = np.array([spec.descriptors.index(c) if c in spec.descriptors else -1
                        for c in obs.categories], dtype=np.int64)  # fmt: skip
    pcode = obs.pcode
    is_desc = (desc_of[pcode] >= 0) & (obs.minutes == 0) if len(pcode) else np.zeros(0, bool)
    rows = is_desc & ~obs.unknown
    first = pd.DataFrame({"pid": obs.pid[rows], "d": desc_of[pcode[rows]], "v": obs.values[rows]})
    first = first.drop_duplicates(["pid", "d"], keep="first")
    desc_values = np.full((len(obs.records), len(spec.descriptors)), np.nan)
    desc_values[first["pid"].to_numpy(), first["d"].to_numpy()] = first["v"].to_numpy()
    return pd.DataFrame(desc_values, columns=list(spec.descriptors)), is_desc


def _select_patients(spec: TimeseriesLongData, desc: pd.DataFrame, site: str) -> np.ndarray:
    """Return the indices of the files whose descriptors match ``data.where`` (all of them without it)."""
    n_files = len(desc)
    keep = np.ones(n_files, bool)
    for key, wanted in spec.where.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        wanted_keys = {value_key(v) for v in options}
        keep &= desc[key].isin([k for k in wanted_keys if isinstance(k, float)]).to_numpy()
    selected = np.flatnonzero(keep)
    if spec.where:
        logger.info("site %s: %d of %d patients match where=%s", site, len(selected), n_files,
                    dict(spec.where))  # fmt: skip
    return selected


def _labels(manifest: SiteManifest, spec: TimeseriesLongData, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """Return the patients' targets from the outcomes file and the class names (none for regression)."""
    source = spec.path.name
    outcomes = _read_outcomes(spec)
    absent = [r for r in ids if r not in outcomes.index]
    if absent:
        raise OutcomeMismatchError(
            f"{spec.outcomes.name} has no row for {len(absent)} of the {len(ids)} patients with "
            f"time series in {source} (record(s) {', '.join(absent[:5])}"
            f"{', …' if len(absent) > 5 else ''}); add their outcomes, or remove their files",
            path=spec.outcomes,
        )
    raw_target = outcomes.loc[ids, spec.target].str.strip().reset_index(drop=True)
    empty = (raw_target == "").to_numpy()
    if empty.any():
        first = int(np.flatnonzero(empty)[0])
        raise LabelError(
            f"{spec.outcomes.name}: column {spec.target!r} is empty for record {ids[first]} "
            f"({int(empty.sum())} patients); fill the outcome or remove the patient's file",
            path=spec.outcomes,
        )

    def where(i: int) -> str:
        return f"record {ids[i]}"

    if manifest.task != "regression":
        return encode_labels(
            series_keys(raw_target), manifest=manifest, source=spec.outcomes.name,
            column=spec.target, where=where,
        )  # fmt: skip
    y_num = pd.to_numeric(raw_target, errors="coerce")
    if y_num.isna().any():
        first = int(np.flatnonzero(y_num.isna().to_numpy())[0])
        raise LabelError(
            f"{spec.outcomes.name}: column {spec.target!r} is not a number for {where(first)}; "
            "a regression target must be numeric",
            path=spec.outcomes,
        )
    return y_num.to_numpy(dtype=np.float32), []


def _parameters(spec: TimeseriesLongData, obs: _Observations, is_desc: np.ndarray, source: str) -> list[str]:
    """Return the time-varying parameters to use, in feature order (``data.parameters``)."""
    pcode = obs.pcode
    seen = np.unique(pcode[~is_desc]) if len(pcode) else np.zeros(0, np.int64)
    found = sorted({obs.categories[c] for c in seen} - set(spec.descriptors))
    if spec.parameters == "physionet2012":
        parameters = list(PHYSIONET2012_PARAMETERS)
        if not set(parameters) & set(found):
            raise SchemaError(
                f"{source}: none of the 36 PhysioNet 2012 parameters appear; parameters in the "
                f"files: {found}. List yours in data.parameters (or use 'from_data')",
                path=spec.path,
            )
        return parameters
    if spec.parameters == "from_data":
        return found
    parameters = list(spec.parameters)
    absent_params = [p for p in parameters if p not in found]
    if absent_params:
        raise SchemaError(
            f"{source}: data.parameters names {absent_params}, which appear in no patient "
            f"file; parameters in the files: {found}. Fix data.parameters",
            path=spec.path,
        )
    return parameters


def _bin(
    spec: TimeseriesLongData, obs: _Observations, parameters: list[str], selected: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Bin the selected patients' observations: mean per (patient, step, parameter).

    Returns the series (NaN where a bin is empty), the mask of observed bins, and how many
    observations fell after the horizon (dropped).
    """
    n, t, f = len(selected), spec.steps, len(parameters)
    feature_of = np.array([parameters.index(c) if c in parameters else -1 for c in obs.categories],
                          dtype=np.int64)  # fmt: skip
    codes = feature_of[obs.pcode]
    position = np.full(len(obs.records), -1, np.int64)
    position[selected] = np.arange(n)
    pos = position[obs.pid]
    minutes, values = obs.minutes, obs.values
    late = minutes > spec.horizon_minutes
    use = (codes >= 0) & (pos >= 0) & ~obs.unknown & ~late & np.isfinite(values)
    step = np.minimum(minutes[use] // spec.step_minutes, t - 1)
    flat = (pos[use] * t + step) * f + codes[use]
    sums = np.bincount(flat, weights=values[use], minlength=n * t * f).reshape(n, t, f)
    counts = np.bincount(flat, minlength=n * t * f).reshape(n, t, f)
    mask = counts > 0
    series = np.where(mask, sums / np.maximum(counts, 1), np.nan)
    n_late = int((late & (codes >= 0) & (pos >= 0)).sum())
    return series, mask, n_late


def _groups(
    manifest: SiteManifest,
    spec: TimeseriesLongData,
    desc: pd.DataFrame,
    selected: np.ndarray,
    ids: list[str],
    source: str,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return each patient's group (``data.group_by``) and the groups the split keeps together (``split.by``)."""
    group_values = desc.iloc[selected][spec.group_by].to_numpy()
    if spec.group_by == "RecordID":
        groups = np.asarray(ids, dtype=str)
    else:
        groups = np.asarray(
            ["unknown" if np.isnan(v) else key_name(float(v)) for v in group_values], dtype=str
        )
    by = manifest.split.by
    split_groups = None
    if by is not None:
        if by in ("patient", "RecordID"):
            split_groups = np.asarray(ids, dtype=str)
        elif by in spec.descriptors:
            split_groups = desc.iloc[selected][by].astype(str).to_numpy()
        else:
            raise SchemaError(
                f"{source}: split.by = {by!r} is neither 'patient' nor a descriptor "
                f"({spec.descriptors}); fix split.by in the manifest",
                path=spec.path,
            )
    return groups, split_groups


def _fill_and_standardise(
    series: np.ndarray, mask: np.ndarray, *, train: np.ndarray, names: list[str], site: str, notes: list[str]
) -> np.ndarray:
    """Forward-fill each patient's series, fill the rest with the train mean, standardise with train statistics."""
    t = series.shape[1]
    train_obs = np.where(mask[train], series[train], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        counted = (~np.isnan(train_obs)).sum(axis=(0, 1))
        mean = np.nansum(train_obs, axis=(0, 1)) / np.maximum(counted, 1)
        var = np.nansum((train_obs - mean) ** 2, axis=(0, 1)) / np.maximum(counted, 1)
    std = np.sqrt(var)
    never = counted == 0
    if never.any():
        unseen = [names[j] for j in np.flatnonzero(never)]
        msg = (f"{len(unseen)} feature(s) never observed in the train split: {unseen}; they are "
               "all zero with mask 0 at this site")  # fmt: skip
        notes.append(msg)
        logger.warning("site %s: %s", site, msg)
    mean = np.where(never, 0.0, mean)
    std = np.where((std > 0) & ~never, std, 1.0)
    filled = series.astype(np.float32)  # NaN where missing
    for s in range(1, t):  # forward fill, one vectorised step per time bin
        now = filled[:, s]
        np.copyto(now, filled[:, s - 1], where=np.isnan(now))
    np.copyto(filled, mean.astype(np.float32)[None, None, :], where=np.isnan(filled))
    filled -= mean.astype(np.float32)
    filled /= std.astype(np.float32)
    return filled


__all__ = ["load_timeseries"]
