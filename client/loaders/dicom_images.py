"""Loader for ``kind = "dicom"``: a folder of DICOM images (what imaging departments export).

Every file matching ``data.pattern`` under ``data.folder`` is read with ``pydicom``; its label
comes from a CSV keyed by file name, SOP Instance UID or Patient ID. Pixels pass through the
modality LUT (``RescaleSlope`` / ``RescaleIntercept``), the linear VOI window of DICOM PS3.3
C.11.2.1.2 (the manifest's, else the file's first ``WindowCenter`` / ``WindowWidth``, else the
image's own range), ``MONOCHROME1`` inversion, then a bilinear resize to ``data.size``. Images of
one patient stay in one split (``split.by = "image"`` turns that off).

Privacy: patient-identifying tags (PatientName, PatientID, dates…) are never logged, printed or
put in an error message — messages name the file. PatientID is only used in memory to group a
patient's images, as an opaque index (``patient0``, ``patient1``…).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import LabelError, MalformedFileError, MissingFileError, SchemaError, ShapeError
from ..manifest import DicomData, SiteManifest
from ._common import (
    LoadResult,
    build_site,
    check_cohort,
    encode_labels,
    require_file,
    series_keys,
    split_indices,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

_KEY_TAG = {"sop_instance_uid": "SOPInstanceUID", "patient_id": "PatientID"}
_KEY_WORDS = {
    "filename": "file name",
    "sop_instance_uid": "SOP Instance UID",
    "patient_id": "Patient ID",
}


@dataclass(frozen=True)
class _Image:
    """One file's pixels (C, H, W) in [0, 1] and what the loader needs besides (never logged)."""

    pixels: np.ndarray
    key: str
    patient: str | None
    window: str


def _first(value: Any) -> float:
    """Return a DICOM value (possibly multi-valued) as one float."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def voi_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Apply the linear VOI window of DICOM PS3.3 C.11.2.1.2.1, mapped to [0, 1]."""
    if width <= 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (C, H, W) float image to ``size`` (bilinear, channel by channel)."""
    if img.shape[1:] == size:
        return img
    h, w = size
    out = [
        np.asarray(Image.fromarray(c.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
        for c in img
    ]
    return np.clip(np.stack(out), 0.0, 1.0)


def _read_dataset(path: Path, rel: str) -> Dataset:
    """Read one DICOM file, or raise naming the file (never its contents)."""
    import pydicom  # imported on first use: only DICOM sites need it

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # InvalidDicomError, EOFError, struct errors on truncated files…
        raise MalformedFileError(
            f"{rel} is not a readable DICOM file ({type(exc).__name__}); export it again from "
            "the PACS, or narrow data.pattern so that it only matches DICOM files",
            path=path,
        ) from None
    if "PixelData" not in ds:
        raise MalformedFileError(
            f"{rel} holds no pixel data (it may be a DICOMDIR, a report or a presentation "
            "state); remove it from the folder or narrow data.pattern",
            path=path,
        )
    return ds


def _pixels(ds: Dataset, path: Path, rel: str, spec: DicomData) -> np.ndarray:
    """Decode the image (one frame) as stored, or raise."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and spec.frame is None:
        raise ShapeError(
            f"{rel} is a multi-frame image ({frames} frames); set data.frame to the 0-based "
            "frame to use, or export single-frame images",
            path=path,
        )
    if spec.frame is not None and spec.frame >= frames:
        raise ShapeError(
            f"{rel} has {frames} frame(s) but data.frame = {spec.frame}; give a frame below "
            f"{frames}",
            path=path,
        )
    from pydicom.pixels import pixel_array

    try:
        index = spec.frame if frames > 1 else None
        return np.asarray(pixel_array(ds, index=index))
    except Exception as exc:  # missing decoder for a compressed syntax, truncated pixel data…
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise MalformedFileError(
            f"{rel}: its pixel data cannot be decoded ({type(exc).__name__}, {name}); if it is "
            "compressed install the decoder pydicom asks for (pylibjpeg, gdcm) or export it "
            "uncompressed, otherwise export the file again",
            path=path,
        ) from None


def _to_unit(
    ds: Dataset, arr: np.ndarray, path: Path, rel: str, spec: DicomData
) -> tuple[np.ndarray, str]:
    """Return the image as (C, H, W) float in [0, 1] and which window was used."""
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if spp != spec.channels:
        layout = "grey" if spp == 1 else f"{spp}-sample ({photometric})"
        raise ShapeError(
            f"{rel} is a {layout} image but data.channels = {spec.channels}; set data.channels "
            f"= {spp if spp in (1, 3) else 1}, or export the images as "
            f"{'grey' if spec.channels == 1 else 'RGB'}",
            path=path,
        )
    if spp == 3:
        bits = int(ds.get("BitsStored", 8) or 8)
        rgb = arr.astype(np.float64) / float(2**bits - 1)
        return np.clip(np.moveaxis(rgb, -1, 0), 0.0, 1.0), "rgb"
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ShapeError(
            f"{rel} has PhotometricInterpretation {photometric}, which kind = \"dicom\" does not "
            "read for grey images; export it as MONOCHROME2",
            path=path,
        )
    if arr.ndim != 2:
        raise ShapeError(
            f"{rel} decodes to shape {arr.shape}; expected one 2-D grey frame",
            path=path,
        )
    from pydicom.pixels import apply_modality_lut

    x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if spec.window_center is not None and spec.window_width is not None:
        img, used = voi_window(x, spec.window_center, spec.window_width), "manifest"
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            raise MalformedFileError(
                f"{rel}: WindowCenter / WindowWidth are not numbers; set data.window_center and "
                "data.window_width in the manifest",
                path=path,
            ) from None
        img, used = voi_window(x, center, width), "file"
    else:
        lo, hi = float(x.min()), float(x.max())
        img = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        used = "range"
    if photometric == "MONOCHROME1":
        img = 1.0 - img
    return img[None], used


def _read_image(path: Path, rel: str, spec: DicomData, group_by_patient: bool) -> _Image:
    """Read one file into an :class:`_Image` (pixels in [0, 1], resized)."""
    ds = _read_dataset(path, rel)
    if spec.key == "filename":
        key = rel
    else:
        tag = _KEY_TAG[spec.key]
        value = ds.get(tag)
        if value is None or not str(value).strip():
            raise SchemaError(
                f"{rel} has no {tag}, so data.key = {spec.key!r} cannot find its label; key the "
                "labels CSV by file name (data.key = 'filename') or fix the export",
                path=path,
            )
        key = str(value).strip()
    patient_value = ds.get("PatientID")
    patient = str(patient_value).strip() if patient_value is not None else ""
    if group_by_patient and not patient:
        raise SchemaError(
            f"{rel} has no PatientID, so its images cannot be kept in one split; fix the export "
            "or set split.by = 'image' (images of one patient may then land in several splits)",
            path=path,
        )
    arr = _pixels(ds, path, rel, spec)
    img, used = _to_unit(ds, arr, path, rel, spec)
    size = (int(spec.size[0]), int(spec.size[1]))
    return _Image(_resize(img, size).astype(np.float32), key, patient or None, used)


def _labels(spec: DicomData) -> pd.DataFrame:
    """Read and check the labels CSV (columns present, no empty label, no duplicate key)."""
    name = spec.labels.name
    try:
        table = pd.read_csv(spec.labels, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MalformedFileError(
            f"{name} is not a readable CSV ({type(exc).__name__}); export it again as UTF-8 CSV "
            f"with the columns {spec.key_column!r} and {spec.label_column!r}",
            path=spec.labels,
        ) from None
    for field_name, col in (("key_column", spec.key_column), ("label_column", spec.label_column)):
        if col not in table.columns:
            raise SchemaError(
                f"{name} has no column {col!r} ({field_name}); columns in the file: "
                f"{list(table.columns)}. Fix data.{field_name} in the manifest",
                path=spec.labels,
            )
    keys = table[spec.key_column].str.strip()
    labels = table[spec.label_column].str.strip()
    for what, bad in (("key", keys == ""), ("label", labels == "")):
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            col = spec.key_column if what == "key" else spec.label_column
            raise SchemaError(
                f"{name}: column {col!r} is empty at line {first + 2}; every row needs a "
                f"{_KEY_WORDS[spec.key] if what == 'key' else 'label'}",
                path=spec.labels,
            )
    dupes = keys.duplicated(keep=False).to_numpy()
    if dupes.any():
        lines = [int(i) + 2 for i in np.flatnonzero(dupes)[:4]]
        raise SchemaError(
            f"{name}: lines {lines} give the same {_KEY_WORDS[spec.key]} twice; keep one row "
            f"per {'patient' if spec.key == 'patient_id' else 'image'}",
            path=spec.labels,
        )
    if len(table) == 0:
        raise MalformedFileError(f"{name} has no row; add one row per image", path=spec.labels)
    return pd.DataFrame({"key": keys, "label": labels})


def load_dicom(manifest: SiteManifest) -> LoadResult:
    """Load and validate a DICOM-folder site; images become float32 (N, C, H, W) in [0, 1]."""
    spec = manifest.data
    assert isinstance(spec, DicomData)
    site = manifest.site
    folder = require_file(spec.folder, "folder", site, folder=True)
    require_file(spec.labels, "labels", site)
    by = manifest.split.by
    if by not in (None, "patient", "image"):
        raise SchemaError(
            f"split.by = {by!r} is not available for DICOM images; leave it out (split by "
            "patient, from each file's PatientID) or set 'image'",
            path=spec.labels,
        )
    group_by_patient = by != "image"
    table = _labels(spec)
    files = sorted(
        p for p in folder.rglob(spec.pattern) if p.is_file() and not p.name.startswith(".")
    )
    if not files:
        raise MissingFileError(
            f"site {site!r}: no file matching data.pattern = {spec.pattern!r} in {folder}; "
            "fix data.folder, or data.pattern (\"*\" for DICOM files without an extension)",
            path=folder,
        )
    label_of = dict(zip(table["key"], table["label"]))
    rels = [p.relative_to(folder).as_posix() for p in files]
    if spec.key == "filename":
        absent = [k for k in table["key"] if k not in set(rels)]
        if absent:
            raise MissingFileError(
                f"{spec.labels.name} names {len(absent)} image(s) not in {folder} matching "
                f"{spec.pattern!r}, e.g. {absent[0]!r}; add the files or remove those rows",
                path=folder / absent[0],
            )
    images = [_read_image(p, rel, spec, group_by_patient) for p, rel in zip(files, rels)]
    unlabelled = [rel for rel, img in zip(rels, images) if img.key not in label_of]
    if unlabelled:
        raise LabelError(
            f"{len(unlabelled)} DICOM file(s) have no label in {spec.labels.name}, e.g. "
            f"{unlabelled[0]} (no row whose {spec.key_column!r} is its "
            f"{_KEY_WORDS[spec.key]}); add their rows or remove the files",
            path=folder / unlabelled[0],
        )
    notes: list[str] = []
    used = {img.key for img in images}
    unused = int((~table["key"].isin(used)).sum())
    if unused and spec.key != "patient_id":
        notes.append(f"{unused} rows of {spec.labels.name} match no DICOM file and are ignored")
    ranged = sum(img.window == "range" for img in images)
    if ranged:
        msg = (
            f"{ranged} of {len(images)} images have no window (WindowCenter / WindowWidth) and "
            "were scaled by their own range; set data.window_center / window_width for "
            "consistent intensities"
        )
        notes.append(msg)
        logger.warning("site %s: %s", site, msg)
    x = np.stack([img.pixels for img in images])
    labels = pd.Series([label_of[img.key] for img in images])
    codes, class_names = encode_labels(
        series_keys(labels),
        manifest=manifest,
        source=spec.labels.name,
        column=spec.label_column,
        where=lambda i: f"the row for {rels[i]}",
    )
    groups = None
    patients_known = all(img.patient for img in images)
    if patients_known:
        opaque: dict[str, str] = {}
        for img in images:
            opaque.setdefault(str(img.patient), f"patient{len(opaque)}")
        patient_groups = np.asarray([opaque[str(img.patient)] for img in images], dtype=str)
        patients, unit = len(opaque), "patients"
        if group_by_patient:
            groups = patient_groups
    else:
        patients, unit = len(images), "images"
    check_cohort(patients, manifest, f"{folder.name} ({len(images)} DICOM files)", unit=unit)
    splits = split_indices(
        len(x), manifest.split, labels=codes, groups=groups, site=site, source=folder.name
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
    logger.info("site %s: %d DICOM images, %d %s", site, len(x), patients, unit)
    return LoadResult(
        data=data,
        patients=patients,
        class_names=class_names,
        notes=notes,
        unit=unit,
        example_unit="images",
    )


__all__ = ["load_dicom", "voi_window"]
