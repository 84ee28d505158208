"""Loader for ``kind = "text"``: a CSV or Parquet table of free text with a label per row.

Order of operations: read (UTF-8 CSV with quoted fields that may span lines, or Parquet) ->
check the named columns exist -> refuse (or drop, ``empty_text = "drop_rows"``) rows whose text
is empty or holds no token -> refuse rows without a label -> encode labels against the
manifest's ``classes`` -> check the cohort size (patients with ``split.by``, else records) ->
split (by group with ``split.by``, else stratified by class) -> tokenise every text with the
stateless :class:`~fedcare.models.text.HashingTokenizer` (no vocabulary, nothing fitted).

The examples' inputs are ``(ids, lengths, tags)``: int64 token ids ``(N, max_length)`` padded
with 0, each text's token count, and the tokeniser's tag (see :mod:`fedcare.models.text`).
Messages name rows and columns, never the text.
"""

from __future__ import annotations

import csv
import logging

import numpy as np
import pandas as pd

from ..errors import MalformedFileError, MissingValueError, SchemaError
from ..manifest import SiteManifest, TextData
from ._common import (
    LoadResult,
    build_site,
    check_cohort,
    encode_labels,
    require_file,
    series_keys,
    split_indices,
)

__all__ = ["load_text"]

logger = logging.getLogger(__name__)


def _read(spec: TextData, name: str) -> pd.DataFrame:
    """Read the table as text columns (CSV) or as stored (Parquet); refuse unreadable files."""
    if spec.file_format == "parquet":
        try:
            frame = pd.read_parquet(spec.path)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError
            raise MalformedFileError(
                f"{name} is not a readable Parquet file ({type(exc).__name__}); export it again "
                "or set data.format = 'csv' if it is a CSV",
                path=spec.path,
            ) from None
    else:
        try:
            frame = pd.read_csv(
                spec.path, sep=spec.delimiter, dtype=str, keep_default_na=False,
                encoding="utf-8", quoting=csv.QUOTE_MINIMAL, skip_blank_lines=True,
            )
        except UnicodeDecodeError as exc:
            raise MalformedFileError(
                f"{name} is not UTF-8 text (byte {exc.start} of a block cannot be decoded); export "
                "it as UTF-8 CSV (e.g. iconv -f latin1 -t utf-8)",
                path=spec.path,
            ) from None
        except pd.errors.EmptyDataError:
            raise MalformedFileError(f"{name} is empty; export the table again", path=spec.path) from None
        except (pd.errors.ParserError, csv.Error) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MalformedFileError(
                f"{name} is not a readable CSV ({first}); quote every text field that holds the "
                f"delimiter {spec.delimiter!r} or a line break, or set data.delimiter",
                path=spec.path,
            ) from None
    if len(frame) == 0:
        raise MalformedFileError(f"{name} has no data rows; export the table again", path=spec.path)
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.reset_index(drop=True)


def _check_columns(frame: pd.DataFrame, spec: TextData, manifest: SiteManifest, name: str) -> None:
    """Raise :class:`SchemaError` when a column the manifest names is absent."""
    available = list(frame.columns)
    named = {
        "data.text_column": spec.text_column,
        "data.label_column": spec.label_column,
        "split.by": manifest.split.by,
    }
    for field_name, col in named.items():
        if col is not None and col not in available:
            hint = ""
            if len(available) == 1:
                hint = " The file has one column only: check data.delimiter."
            raise SchemaError(
                f"{name} has no column {col!r} ({field_name}); columns in the file: {available}. "
                f"Set {field_name} to one of them.{hint}",
                path=spec.path,
            )


def _rows(index: np.ndarray, spec: TextData) -> str:
    """Return 1-based data-row numbers (after the header) of the first few of ``index``."""
    shown = ", ".join(str(int(i) + 1) for i in index[:5])
    more = f" and {len(index) - 5} more" if len(index) > 5 else ""
    return f"data row{'s' if len(index) > 1 else ''} {shown}{more}"


def _text_rows(frame: pd.DataFrame, spec: TextData, name: str) -> tuple[pd.DataFrame, list[str]]:
    """Apply ``empty_text`` to rows without a token; return the kept rows and notes."""
    tokenizer = spec.tokenizer()
    raw = frame[spec.text_column]
    is_text = raw.map(lambda v: isinstance(v, str)).to_numpy()
    empty = ~is_text | np.array(
        [not (isinstance(v, str) and tokenizer.tokens(v)) for v in raw], dtype=bool
    )
    notes: list[str] = []
    if empty.any():
        where = np.flatnonzero(empty)
        if spec.empty_text == "error":
            raise MissingValueError(
                f"{name}: column {spec.text_column!r} is empty or holds no word at "
                f"{_rows(where, spec)} ({len(where)} rows); fill those texts, remove the rows, or "
                "set data.empty_text = \"drop_rows\"",
                path=spec.path,
            )
        notes.append(f"{len(where)} rows with an empty text dropped (empty_text = drop_rows)")
        frame = frame.loc[~empty].reset_index(drop=True)
    return frame, notes


def load_text(manifest: SiteManifest) -> LoadResult:
    """Load and validate a text site (see the module docstring for the order of operations)."""
    spec = manifest.data
    assert isinstance(spec, TextData)
    require_file(spec.path, "path", manifest.site)
    name = spec.path.name
    frame = _read(spec, name)
    _check_columns(frame, spec, manifest, name)
    frame, notes = _text_rows(frame, spec, name)
    if len(frame) == 0:
        raise MissingValueError(f"{name}: no row has a text; fill the text column", path=spec.path)
    labels = frame[spec.label_column]
    no_label = (labels.isna() | (labels.astype(str).str.strip() == "")).to_numpy()
    if no_label.any():
        where = np.flatnonzero(no_label)
        raise MissingValueError(
            f"{name}: column {spec.label_column!r} is empty at {_rows(where, spec)} "
            f"({len(where)} rows); label every text or remove those rows",
            path=spec.path,
        )
    codes, class_names = encode_labels(
        series_keys(labels).reset_index(drop=True), manifest=manifest, source=name,
        column=spec.label_column, where=lambda i: f"data row {i + 1}",
    )
    groups = None
    unit = "records"
    if manifest.split.by is not None:
        groups = frame[manifest.split.by].astype(str).str.strip().to_numpy()
        unit = "patients"
        if (groups == "").any():
            where = np.flatnonzero(groups == "")
            raise MissingValueError(
                f"{name}: column {manifest.split.by!r} (split.by) is empty at {_rows(where, spec)}; "
                "give every row its patient or record id",
                path=spec.path,
            )
    patients = len(np.unique(groups)) if groups is not None else len(frame)
    check_cohort(patients, manifest, name, unit)
    splits = split_indices(
        len(frame), manifest.split, labels=codes, groups=groups, site=manifest.site, source=name
    )
    tokenizer = spec.tokenizer()
    ids, lengths = tokenizer.encode(frame[spec.text_column].tolist())
    cut = int((ids[:, -1] != 0).sum())
    if cut:
        notes.append(
            f"{cut} of {len(frame)} texts reach max_length = {spec.max_length} tokens and may be "
            "cut (raise max_length in [data] and [model] to keep more)"
        )
    data = build_site(
        manifest,
        kind="text",
        inputs=[ids, lengths, tokenizer.tags(len(frame))],
        targets=codes,
        groups=groups,
        splits=splits,
        num_classes=len(class_names),
        input_shape=(spec.max_length,),
        feature_names=[f"text ({tokenizer.describe()})"],
    )
    logger.info(
        "site %s: %d texts, median %d tokens kept, %d classes",
        manifest.site, len(frame), int(np.median(lengths)), len(class_names),
    )
    return LoadResult(
        data=data, patients=patients, class_names=class_names, notes=notes, unit=unit,
        example_unit="texts",
    )
