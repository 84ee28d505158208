"""Loader for ``kind = "table"``: a CSV or Parquet file with one row per patient.

Order of operations: read (every CSV line must have the expected number of fields) ->
check the named columns exist -> drop ``drop_columns`` -> mark missing values (empty fields and
``missing_marker``) -> check numeric columns are numeric -> refuse all-empty columns -> handle
missing targets and features per ``missing`` -> encode labels -> check the cohort size -> split
-> impute (train statistics) -> one-hot encode categoricals -> standardise numeric features with
the train split's mean and standard deviation.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import (
    DtypeError,
    LabelError,
    MalformedFileError,
    MissingValueError,
    SchemaError,
)
from ..manifest import SiteManifest, TableData
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


_CANDIDATE_DELIMITERS = (",", ";", "\t", "|", "whitespace")
"""Delimiters tried, in this order, when the declared one splits no line as expected."""


def _toml_delimiter(delimiter: str) -> str:
    """Return how the file looks separated and how to say so in a manifest."""
    if delimiter == "whitespace":
        return 'the file looks aligned with runs of spaces: set delimiter = "whitespace"'
    written = "\\t" if delimiter == "\t" else delimiter
    return f"the file looks separated by {delimiter!r}: set delimiter = \"{written}\""


def _split_lines(lines: list[str], delimiter: str) -> list[list[str]]:
    """Split text lines into fields: runs of spaces / tabs for ``"whitespace"``, else csv rules."""
    if delimiter == "whitespace":
        return [line.split() for line in lines]
    return list(csv.reader(lines, delimiter=delimiter))


def _sniff_delimiter(path: Path, current: str, width: int | None) -> str | None:
    """Return the candidate delimiter giving the same field count on the first lines, if any.

    With ``width`` (the column count declared by ``data.columns``) that count must match it;
    otherwise (the header names the columns) it must be above 1.
    """
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            head = [line for _, line in zip(range(200), fh) if line.strip()]
    except (OSError, UnicodeDecodeError):
        return None
    for candidate in _CANDIDATE_DELIMITERS:
        if candidate == current or not head:
            continue
        try:
            counts = {len(row) for row in _split_lines(head, candidate)}
        except csv.Error:
            continue
        if len(counts) == 1:
            count = counts.pop()
            if (width is not None and count == width) or (width is None and count > 1):
                return candidate
    return None


def _rows(spec: TableData, fh: Any) -> Iterator[tuple[list[str], int]]:
    """Yield each line's fields and its line number (csv rules, or split on whitespace)."""
    if spec.delimiter == "whitespace":
        for number, line in enumerate(fh, start=1):
            yield line.split(), number
        return
    reader = csv.reader(fh, delimiter=spec.delimiter)
    for row in reader:
        yield row, reader.line_num


def _read_csv(spec: TableData, name: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a CSV as text; return the frame and each row's line number in the file."""
    try:
        with spec.path.open(newline="", encoding="utf-8") as fh:
            rows: list[list[str]] = []
            lines: list[int] = []
            header: list[str] | None = None
            for row, number in _rows(spec, fh):
                if not row or all(not f.strip() for f in row):
                    continue  # blank line
                if spec.has_header and header is None:
                    header = [h.strip() for h in row]
                    continue
                rows.append(row)
                lines.append(number)
    except UnicodeDecodeError as exc:
        raise MalformedFileError(
            f"{name} is not UTF-8 text (byte {exc.start}); export it as UTF-8 CSV",
            path=spec.path,
        ) from None
    except csv.Error as exc:
        raise MalformedFileError(
            f"{name} is not a readable CSV ({exc}); fix the quoting near that line",
            path=spec.path,
        ) from None
    if spec.has_header:
        if header is None:
            raise MalformedFileError(f"{name} is empty; export the table again", path=spec.path)
        names, named_by = header, "the header line"
        if spec.columns is not None and list(spec.columns) != header:
            raise SchemaError(
                f"{name}: data.columns does not match the file's header {header}; remove "
                "data.columns (the header names the columns) or set has_header = false",
                path=spec.path,
            )
    else:
        names, named_by = list(spec.columns or []), "data.columns"
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise SchemaError(
            f"{name}: column names {dupes} appear more than once in {named_by}; rename them",
            path=spec.path,
        )
    if not rows:
        raise MalformedFileError(f"{name} has no data rows; export the table again", path=spec.path)
    width = len(names)
    wrong = [i for i, row in enumerate(rows) if len(row) != width]
    if wrong:
        row, line = rows[wrong[0]], lines[wrong[0]]
        if len(wrong) < len(rows):
            raise MalformedFileError(
                f"{name} line {line}: {len(row)} fields, expected {width} as {named_by} names "
                f"(delimiter {spec.delimiter!r}); fix or remove that line",
                path=spec.path,
            )
        guess = _sniff_delimiter(spec.path, spec.delimiter, None if spec.has_header else width)
        fix = (
            f"{_toml_delimiter(guess)} in [data]"
            if guess
            else "set data.delimiter to the file's separator (one character, or \"whitespace\" "
            "for columns aligned with spaces)"
        )
        raise MalformedFileError(
            f"{name}: every line has a field count other than the {width} columns {named_by} "
            f"names (line {line}: {len(row)} fields with delimiter {spec.delimiter!r}), so the "
            f"delimiter is wrong; {fix}",
            path=spec.path,
        )
    frame = pd.DataFrame(rows, columns=names, dtype=object)
    return frame, np.asarray(lines)


def _read_parquet(spec: TableData, name: str) -> pd.DataFrame:
    """Read a Parquet table."""
    try:
        frame = pd.read_parquet(spec.path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError
        raise MalformedFileError(
            f"{name} is not a readable Parquet file ({type(exc).__name__}); export it again "
            "or set data.format = 'csv' if it is a CSV",
            path=spec.path,
        ) from None
    if len(frame) == 0:
        raise MalformedFileError(f"{name} has no rows; export the table again", path=spec.path)
    return frame.reset_index(drop=True)


def _missing(frame: pd.DataFrame, markers: list[str]) -> pd.DataFrame:
    """Return a boolean frame: empty field, missing marker, or null."""
    out = {}
    for col in frame.columns:
        s = frame[col]
        miss = s.isna()
        if s.dtype == object or pd.api.types.is_string_dtype(s):
            text = s.astype(str).str.strip()
            miss = miss | (text == "") | text.isin(markers)
        out[col] = miss.to_numpy()
    return pd.DataFrame(out, index=frame.index)


def _numeric(
    frame: pd.DataFrame,
    col: str,
    miss: pd.Series,
    name: str,
    where: Callable[[int], str],
) -> pd.Series:
    """Convert a column to float64, raising on the first non-numeric, non-missing value."""
    s = frame[col]
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        return s.astype("float64").where(~miss)
    values = pd.to_numeric(s.astype(str).str.strip().where(~miss), errors="coerce")
    bad = (values.isna() & ~miss).to_numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DtypeError(
            f"{name}: column {col!r} must be numeric but {where(first)} holds a value that is "
            f"not a number ({int(bad.sum())} such rows); correct it, declare the column in "
            "data.categorical, or — if it marks a missing value — add it to "
            "data.missing_marker",
            path=name,
        )
    return values.astype("float64")


def load_table(manifest: SiteManifest) -> LoadResult:
    """Load and validate a table site (see the module docstring for the order of operations)."""
    spec = manifest.data
    assert isinstance(spec, TableData)
    require_file(spec.path, "path", manifest.site)
    name = spec.path.name
    by = manifest.split.by
    frame, where = _read_table(spec, name)
    frame, features = _select_columns(spec, frame, name, by)

    miss = _missing(frame, spec.missing_marker)
    missing_rates = {c: float(miss[c].mean()) for c in features}
    values = {c: _numeric(frame, c, miss[c], name, where) for c in features if c not in spec.categorical}
    for c in features:
        if miss[c].all():
            raise MissingValueError(
                f"{name}: column {c!r} has no value in any row (all missing); add it to "
                "data.drop_columns or export the column again",
                path=spec.path,
            )
    notes: list[str] = []
    rows = _kept_rows(spec, miss, features, name, where, site=manifest.site, notes=notes)

    def kept_where(i: int) -> str:
        return where(int(rows[i]))

    y, class_names = _targets(manifest, spec, frame, miss[spec.target], rows, name, where, kept_where)
    groups = None
    if by:
        groups = series_keys(frame[by].iloc[rows]).map(key_name).to_numpy(dtype=str)
        patients = len(np.unique(groups))
    else:
        patients = len(rows)
    check_cohort(patients, manifest, name)

    splits = split_indices(
        len(rows),
        manifest.split,
        labels=None if manifest.task == "regression" else y,
        groups=groups,
        site=manifest.site,
        source=name,
    )
    x, names = _feature_matrix(
        spec, frame, miss, values, features, rows, train=splits[0], name=name, where=kept_where,
        site=manifest.site, notes=notes,
    )  # fmt: skip
    data = build_site(
        manifest,
        kind="table",
        inputs=[x],
        targets=y,
        groups=groups,
        splits=splits,
        num_classes=len(class_names),
        input_shape=(x.shape[1],),
        feature_names=names,
    )
    return LoadResult(
        data=data,
        patients=patients,
        class_names=class_names,
        missing_rates=missing_rates,
        notes=notes,
        unit="patients" if by else "rows",
        example_unit="rows",
    )


def _read_table(spec: TableData, name: str) -> tuple[pd.DataFrame, Callable[[int], str]]:
    """Read the file; return it and ``where(i)``, how messages name row ``i`` (CSV line or Parquet row)."""
    if spec.file_format == "csv":
        frame, lines = _read_csv(spec, name)

        def where(i: int) -> str:
            return f"line {int(lines[i])}"

    else:
        frame = _read_parquet(spec, name)
        lines = np.arange(1, len(frame) + 1)

        def where(i: int) -> str:
            return f"row {int(lines[i])}"

    return frame, where


def _select_columns(spec: TableData, frame: pd.DataFrame, name: str, by: str | None) -> tuple[pd.DataFrame, list[str]]:
    """Check the named columns exist, drop ``drop_columns``; return the frame and the feature columns."""
    available = list(frame.columns)
    named = {
        "target": [spec.target],
        "features": list(spec.features or []),
        "categorical": spec.categorical,
        "drop_columns": spec.drop_columns,
        "split.by": [by] if by else [],
    }
    for field_name, cols in named.items():
        absent = [c for c in cols if c not in available]
        if absent:
            guess = None
            if spec.file_format == "csv" and len(available) == 1:
                guess = _sniff_delimiter(spec.path, spec.delimiter, None)
            also = (
                f". The file has one column only: {_toml_delimiter(guess)} in [data]"
                if guess
                else ""
            )
            raise SchemaError(
                f"{name}: {field_name} names column(s) {absent} which the file does not have; "
                f"columns in the file: {available}. Fix {field_name} in the manifest"
                + ("" if spec.has_header else " (or data.columns)")
                + also,
                path=spec.path,
            )
    frame = frame.drop(columns=spec.drop_columns)
    excluded = {spec.target, *spec.drop_columns, *([by] if by else [])}
    features = list(spec.features) if spec.features is not None else [
        c for c in frame.columns if c not in excluded
    ]
    if by in features:
        raise SchemaError(
            f"{name}: the split.by column {by!r} is also a feature; remove it from data.features "
            "(a group id must not be learnt from)",
            path=spec.path,
        )
    if not features:
        raise SchemaError(f"{name}: no feature column left; list data.features", path=spec.path)
    bad_cat = [c for c in spec.categorical if c not in features]
    if bad_cat:
        raise SchemaError(
            f"{name}: categorical names {bad_cat} which are not features ({features})",
            path=spec.path,
        )
    return frame, features


def _kept_rows(
    spec: TableData,
    miss: pd.DataFrame,
    features: list[str],
    name: str,
    where: Callable[[int], str],
    *,
    site: str,
    notes: list[str],
) -> np.ndarray:
    """Return the rows kept after ``data.missing`` handles missing targets and features (a note when rows go)."""
    keep = np.ones(len(miss), bool)
    target_missing = miss[spec.target].to_numpy()
    if target_missing.any():
        if spec.missing != "drop_rows":
            first = int(np.flatnonzero(target_missing)[0])
            raise LabelError(
                f"{name}: the target column {spec.target!r} is empty at {where(first)} "
                f"({int(target_missing.sum())} rows); fill it, remove those rows, or set "
                "data.missing = 'drop_rows'",
                path=spec.path,
            )
        keep &= ~target_missing
    feat_missing = miss[features].to_numpy()
    if feat_missing.any():
        if spec.missing == "error":
            col_idx = int(np.flatnonzero(feat_missing.any(axis=0))[0])
            col = features[col_idx]
            first = int(np.flatnonzero(feat_missing[:, col_idx])[0])
            raise MissingValueError(
                f"{name}: column {col!r} is missing at {where(first)} "
                f"({int(feat_missing.any(axis=1).sum())} rows have a missing feature); set "
                "data.missing to 'drop_rows', 'mean' or 'median', or fix the data",
                path=spec.path,
            )
        if spec.missing == "drop_rows":
            keep &= ~feat_missing.any(axis=1)
    dropped = int((~keep).sum())
    if dropped:
        notes.append(f"{dropped} of {len(miss)} rows dropped for missing values")
        logger.info("site %s: dropped %d of %d rows with missing values", site, dropped, len(miss))
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise MissingValueError(
            f"{name}: every row has a missing value, nothing is left; use data.missing = "
            "'mean' or 'median', or drop the emptiest columns with data.drop_columns",
            path=spec.path,
        )
    return rows


def _targets(
    manifest: SiteManifest,
    spec: TableData,
    frame: pd.DataFrame,
    target_miss: pd.Series,
    rows: np.ndarray,
    name: str,
    where: Callable[[int], str],
    kept_where: Callable[[int], str],
) -> tuple[np.ndarray, list[str]]:
    """Return the kept rows' targets (float32 for regression, class indices otherwise) and the class names."""
    if manifest.task == "regression":
        y = _numeric(frame, spec.target, target_miss, name, where).to_numpy()[rows]
        return y.astype(np.float32), []
    raw = frame[spec.target].iloc[rows].reset_index(drop=True)
    if spec.positive_above is not None:
        raw = _numeric(frame, spec.target, target_miss, name, where).iloc[rows]
        raw = raw.reset_index(drop=True)
    keys = series_keys(raw)
    if spec.positive_values is None and spec.positive_above is None:
        return encode_labels(keys, manifest=manifest, source=name, column=spec.target, where=kept_where)
    if manifest.classes is not None:  # validate raw labels against the declared ones
        encode_labels(keys, manifest=manifest, source=name, column=spec.target, where=kept_where, check_task=False)
    if spec.positive_above is not None:
        y = (raw.to_numpy(dtype=float) > spec.positive_above).astype(np.int64)
        rule = f"{spec.target} > {spec.positive_above:g}"
    else:
        positives = {value_key(v) for v in spec.positive_values or []}
        y = keys.isin(positives).to_numpy().astype(np.int64)
        shown = [key_name(value_key(v)) for v in spec.positive_values or []]
        rule = f"{spec.target} in {shown}"
    return y, [f"not ({rule})", rule]


def _feature_matrix(
    spec: TableData,
    frame: pd.DataFrame,
    miss: pd.DataFrame,
    values: dict[str, pd.Series],
    features: list[str],
    rows: np.ndarray,
    *,
    train: np.ndarray,
    name: str,
    where: Callable[[int], str],
    site: str,
    notes: list[str],
) -> tuple[np.ndarray, list[str]]:
    """Return the kept rows' float32 feature matrix and its column names, in ``features`` order."""
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for c in features:
        if c in spec.categorical:
            onehot, cats = _one_hot(spec, frame[c], miss[c], c, rows, name=name, where=where, site=site, notes=notes)
            blocks.append(onehot)
            names.extend(f"{c}={key_name(k)}" for k in cats)
        else:
            blocks.append(_numeric_feature(spec, values[c], c, rows, train=train, name=name)[:, None])
            names.append(c)
    return np.concatenate(blocks, axis=1).astype(np.float32), names


def _one_hot(
    spec: TableData,
    column: pd.Series,
    column_miss: pd.Series,
    c: str,
    rows: np.ndarray,
    *,
    name: str,
    where: Callable[[int], str],
    site: str,
    notes: list[str],
) -> tuple[np.ndarray, list[Any]]:
    """One-hot encode categorical column ``c`` over the kept rows (missing: all zeros); return it and the categories."""
    raw_c = column.iloc[rows].where(~column_miss.iloc[rows])
    keys_c = series_keys(raw_c).reset_index(drop=True)
    present_mask = ~column_miss.iloc[rows].to_numpy()
    if c in spec.categories:
        cats = [value_key(v) for v in spec.categories[c]]
    else:
        cats = sorted(set(keys_c[present_mask]), key=lambda k: (isinstance(k, str), k))
        msg = (f"categories of {c!r} derived from this site's data ({len(cats)}); declare "
               f"data.categories.{c} so every site one-hot encodes identically")
        notes.append(msg)
        logger.warning("site %s: %s", site, msg)
    index = {k: i for i, k in enumerate(cats)}
    codes = keys_c.map(index)
    unknown = (codes.isna().to_numpy() & present_mask)
    if unknown.any():
        first = int(np.flatnonzero(unknown)[0])
        raise SchemaError(
            f"{name}: column {c!r} at {where(first)} holds a category not in "
            f"data.categories.{c} = [{', '.join(key_name(k) for k in cats)}] "
            f"({int(unknown.sum())} rows); add it to the declared categories or fix "
            "the data",
            path=spec.path,
        )
    onehot = np.zeros((len(rows), len(cats)), np.float32)
    ok = np.flatnonzero(present_mask)
    onehot[ok, codes.to_numpy()[ok].astype(int)] = 1.0
    return onehot, cats


def _numeric_feature(
    spec: TableData, values: pd.Series, c: str, rows: np.ndarray, *, train: np.ndarray, name: str
) -> np.ndarray:
    """Return numeric column ``c`` over the kept rows, imputed and standardised with train-split statistics."""
    col = values.to_numpy()[rows].copy()
    observed_train = col[train][~np.isnan(col[train])]
    if np.isnan(col).any():
        if observed_train.size == 0:
            raise MissingValueError(
                f"{name}: column {c!r} has no value in the train split, so it cannot be "
                "imputed; drop it with data.drop_columns",
                path=spec.path,
            )
        median = spec.missing == "median"
        fill = np.median(observed_train) if median else observed_train.mean()
        col[np.isnan(col)] = fill
    if spec.standardize:
        mean, std = col[train].mean(), col[train].std()
        col = (col - mean) / (std if std > 0 else 1.0)
    return col.astype(np.float32)


__all__ = ["load_table"]
