"""Loader for ``kind = "images_npz"``: a MedMNIST-style NPZ with its own train/val/test splits."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..errors import EmptySplitError, LabelError, ShapeError
from ..manifest import ImagesNpzData, SiteManifest
from ._common import (
    SPLIT_NAMES,
    LoadResult,
    build_site,
    check_cohort,
    encode_labels,
    npz_array,
    read_npz,
    require_file,
)
from ._images import expected_chw, to_nchw, to_unit_float

logger = logging.getLogger(__name__)

_HINT = (
    "An images_npz file needs train_images, train_labels, val_images, val_labels, test_images "
    "and test_labels."
)


def load_images_npz(manifest: SiteManifest) -> LoadResult:
    """Load and validate a MedMNIST-style NPZ site; images become float32 (N, C, H, W) in [0, 1]."""
    spec = manifest.data
    assert isinstance(spec, ImagesNpzData)
    require_file(spec.path, "path", manifest.site)
    name = spec.path.name
    npz = read_npz(spec.path, name, expects="An images_npz file holds train_images, "
                   "train_labels, val_images, val_labels, test_images and test_labels")
    expected = expected_chw(spec.expected_shape)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    where_rows: list[tuple[str, int]] = []
    for split in SPLIT_NAMES:
        x = npz_array(npz, f"{split}_images", name, spec.path, _HINT)
        y = npz_array(npz, f"{split}_labels", name, spec.path, _HINT)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ShapeError(
                f"{name}: {split}_labels has shape {y.shape}; expected (N,) or (N, 1) class "
                "labels (multi-label targets are not supported)",
                path=spec.path,
            )
        if len(x) != len(y):
            raise ShapeError(
                f"{name}: {split}_images holds {len(x)} images but {split}_labels {len(y)} "
                "labels; they must match one to one",
                path=spec.path,
            )
        if len(x) == 0:
            raise EmptySplitError(
                f"site {manifest.site!r}: {name} has an empty {split} split ({split}_images has "
                "no image); images_npz uses the file's splits, so add images to it",
                path=spec.path,
            )
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise LabelError(
                f"{name}: {split}_labels has dtype {y.dtype}; labels must be integer class ids",
                path=spec.path,
            )
        if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y) & (y == np.round(y))):
            bad = int(np.flatnonzero(~(np.isfinite(y) & (y == np.round(y))))[0])
            raise LabelError(
                f"{name}: {split}_labels[{bad}] is not a whole number; labels must be class ids",
                path=spec.path,
            )
        x = to_nchw(x, expected, f"{name} key {split}_images")
        expected = expected or tuple(x.shape[1:])
        images.append(to_unit_float(x, f"{name} key {split}_images"))
        labels.append(y.astype(np.int64))
        where_rows.extend((split, i) for i in range(len(y)))
    sizes = [len(y) for y in labels]
    all_labels = np.concatenate(labels)

    def where(i: int) -> str:
        split, j = where_rows[i]
        return f"{split}_labels[{j}]"

    codes, class_names = encode_labels(
        pd.Series(all_labels.astype(np.float64)).astype(object),
        manifest=manifest,
        source=name,
        column="*_labels",
        where=where,
    )
    check_cohort(int(sum(sizes)), manifest, name, unit="images")
    x_all = np.concatenate(images)
    bounds = np.cumsum([0, *sizes])
    splits = tuple(np.arange(bounds[i], bounds[i + 1]) for i in range(3))
    data = build_site(
        manifest,
        kind="image",
        inputs=[x_all],
        targets=codes,
        groups=None,
        splits=splits,  # type: ignore[arg-type]
        num_classes=len(class_names),
        input_shape=tuple(int(s) for s in x_all.shape[1:]),
        feature_names=[f"channel{c}" for c in range(x_all.shape[1])],
    )
    return LoadResult(
        data=data,
        patients=int(sum(sizes)),
        class_names=class_names,
        unit="images",
        example_unit="images",
    )


__all__ = ["load_images_npz"]
