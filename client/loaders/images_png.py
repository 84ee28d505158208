"""Loader for ``kind = "images_png"``: a folder of PNG files plus a labels CSV."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..errors import MalformedFileError, MissingFileError, SchemaError, ShapeError
from ..manifest import ImagesPngData, SiteManifest
from ._common import (
    LoadResult,
    build_site,
    check_cohort,
    encode_labels,
    key_name,
    require_file,
    series_keys,
    split_indices,
)
from ._images import expected_chw, to_nchw, to_unit_float

logger = logging.getLogger(__name__)

_CONVERT = {"P": "RGB", "PA": "RGB", "RGBA": "RGB", "LA": "L", "1": "L", "CMYK": "RGB"}


def _read_png(path: Path, expected: tuple[int, ...], name: str) -> np.ndarray:
    """Read one PNG as (C, H, W) in its stored dtype, checking its shape."""
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise MalformedFileError(
                    f"{name} is a {img.format} file, not a PNG; convert it to PNG", path=path
                )
            mode = _CONVERT.get(img.mode)
            arr = np.asarray(img.convert(mode) if mode else img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise MalformedFileError(
            f"{name} is not a readable PNG image ({type(exc).__name__}); export it again",
            path=path,
        ) from None
    batch = to_nchw(arr[None], None, name)
    if tuple(batch.shape[1:]) != expected:
        raise ShapeError(
            f"{name} is {tuple(batch.shape[1:])} (C, H, W) but data.expected_shape declares "
            f"{expected}; resize the image or fix data.expected_shape",
            path=path,
        )
    return batch[0]


def load_images_png(manifest: SiteManifest) -> LoadResult:
    """Load and validate a PNG-folder site; images become float32 (N, C, H, W) in [0, 1]."""
    spec = manifest.data
    assert isinstance(spec, ImagesPngData)
    require_file(spec.folder, "folder", manifest.site, folder=True)
    require_file(spec.labels, "labels", manifest.site)
    name = spec.labels.name
    try:
        table = pd.read_csv(spec.labels, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MalformedFileError(
            f"{name} is not a readable CSV ({str(exc).strip()}); fix that line",
            path=spec.labels,
        ) from None
    by = manifest.split.by
    for field_name, col in (
        ("filename_column", spec.filename_column),
        ("label_column", spec.label_column),
        ("split.by", by),
    ):
        if col is not None and col not in table.columns:
            raise SchemaError(
                f"{name} has no column {col!r} ({field_name}); columns in the file: "
                f"{list(table.columns)}. Fix {field_name} in the manifest",
                path=spec.labels,
            )
    if len(table) == 0:
        raise MalformedFileError(f"{name} lists no image; add one row per image", path=spec.labels)
    expected = expected_chw(spec.expected_shape)
    assert expected is not None

    def where(i: int) -> str:
        return f"line {i + 2}"

    files = table[spec.filename_column].str.strip()
    labels = table[spec.label_column].str.strip()
    empty = (labels == "").to_numpy()
    if empty.any():
        first = int(np.flatnonzero(empty)[0])
        raise SchemaError(
            f"{name}: column {spec.label_column!r} is empty at {where(first)}; every image "
            "needs a label",
            path=spec.labels,
        )
    images = []
    for i, fname in enumerate(files):
        path = spec.folder / fname
        if not fname or not path.is_file():
            raise MissingFileError(
                f"{name} {where(i)} names image {fname!r}, which is not in {spec.folder}; "
                "add the file or remove that row",
                path=path,
            )
        images.append(_read_png(path, expected, fname))
    x = to_unit_float(np.stack(images), spec.folder.name)
    codes, class_names = encode_labels(
        series_keys(labels), manifest=manifest, source=name, column=spec.label_column, where=where
    )
    groups = None
    if by:
        groups = series_keys(table[by]).map(key_name).to_numpy(dtype=str)
    patients = len(np.unique(groups)) if groups is not None else len(x)
    check_cohort(patients, manifest, name, unit="patients" if by else "images")
    splits = split_indices(
        len(x), manifest.split, labels=codes, groups=groups, site=manifest.site, source=name
    )
    data = build_site(
        manifest,
        kind="image",
        inputs=[x],
        targets=codes,
        groups=groups,
        splits=splits,
        num_classes=len(class_names),
        input_shape=tuple(int(s) for s in x.shape[1:]),
        feature_names=[f"channel{c}" for c in range(x.shape[1])],
    )
    return LoadResult(
        data=data,
        patients=patients,
        class_names=class_names,
        unit="patients" if by else "images",
        example_unit="images",
    )


__all__ = ["load_images_png"]
