"""Helpers shared by the loaders: splitting, label encoding, cohort and split checks."""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..dataset import SiteData, Split
from ..errors import (
    CohortTooSmallError,
    EmptySplitError,
    LabelError,
    MalformedFileError,
    MissingFileError,
    SchemaError,
)
from ..manifest import SiteManifest, SplitSpec

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class LoadResult:
    """A loaded site plus what the validation report needs (aggregates only, no patient values).

    Attributes
    ----------
    data : SiteData
        The validated tensors.
    patients : int
        Patients (records for signal windows) after cleaning.
    class_names : list of str
        Name of each class index (empty for regression).
    missing_rates : dict of str to float
        Fraction of missing values per raw feature, measured before imputation.
    notes : list of str
        Things the site's operator should know (rows dropped, derived categories…).
    unit : str
        What ``patients`` counts: ``"patients"``, ``"records"``, ``"images"`` or ``"rows"``.
    example_unit : str
        What one example is: ``"rows"``, ``"images"``, ``"beats"``, ``"windows"``, ``"patients"``.
    """

    data: SiteData
    patients: int
    class_names: list[str] = field(default_factory=list)
    missing_rates: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unit: str = "patients"
    example_unit: str = "examples"


def require_file(path: Path, field_name: str, site: str, *, folder: bool = False) -> Path:
    """Return ``path`` if it exists (as a file, or a folder when ``folder``), else raise."""
    ok = path.is_dir() if folder else path.exists()
    if not ok:
        what = "folder" if folder else "file"
        raise MissingFileError(
            f"site {site!r}: {what} {path} (data.{field_name}) not found; fix data.{field_name} in "
            "the manifest — relative paths resolve against the manifest's folder",
            path=path,
        )
    return path


def read_npz(path: Path, name: str, *, expects: str = "") -> Mapping[str, np.ndarray]:
    """Open an NPZ (no pickles) and return its arrays lazily as a mapping, or raise.

    ``expects`` (which keys the kind needs, what to use instead) is added to the error.
    """
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        what = f" {expects}." if expects else ""
        raise MalformedFileError(
            f"{name} is not a readable NPZ archive ({type(exc).__name__}).{what} Point data.path "
            "at an NPZ file, or save the arrays with numpy.savez / savez_compressed",
            path=path,
        ) from None
    if not isinstance(npz, Mapping):  # a plain .npy array, not an archive of named arrays
        what = f" {expects}." if expects else ""
        raise MalformedFileError(
            f"{name} is a single NumPy array, not an NPZ archive of named arrays.{what} Save "
            "the arrays with numpy.savez",
            path=path,
        )
    return npz


def npz_array(
    npz: Mapping[str, np.ndarray], key: str, name: str, path: Path, hint: str = ""
) -> np.ndarray:
    """Return ``npz[key]``, or raise :class:`SchemaError` listing the keys present and ``hint``."""
    if key not in npz:
        raise SchemaError(
            f"{name} has no key {key!r}; keys in the file: {sorted(npz.keys())}. {hint}".rstrip(),
            path=path,
        )
    try:
        return np.asarray(npz[key])
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise MalformedFileError(
            f"{name}: key {key!r} cannot be read ({type(exc).__name__}; object arrays and "
            "pickles are refused); save it again as a plain numeric array",
            path=path,
        ) from None


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (unlike Python's banker's rounding)."""
    return int(math.floor(x + 0.5 + 1e-9))


def value_key(value: Any) -> float | str:
    """Return a comparable key for a label or category: a float when numeric, else stripped text."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        return text


def series_keys(values: pd.Series) -> pd.Series:
    """Vectorised :func:`value_key` over a series (numeric where parseable, else text)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.astype("float64").astype(object)
    text = values.astype(str).str.strip()
    numbers = pd.to_numeric(text, errors="coerce").astype("float64")
    return numbers.astype(object).where(numbers.notna(), text)


def key_name(key: float | str) -> str:
    """Return a label key as text: ``1.0`` becomes ``"1"``."""
    if isinstance(key, float) and key.is_integer():
        return str(int(key))
    return str(key)


def _sort_keys(keys: Sequence[float | str]) -> list[float | str]:
    """Sort keys: numbers first (numerically), then text."""
    nums = sorted(k for k in keys if isinstance(k, float))
    texts = sorted(k for k in keys if isinstance(k, str))
    return [*nums, *texts]


def encode_labels(
    keys: pd.Series,
    *,
    manifest: SiteManifest,
    source: str,
    column: str,
    where: Callable[[int], str],
    check_task: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """Map label keys to class indices following ``manifest.classes`` (or the sorted data).

    Parameters
    ----------
    keys : pandas.Series
        One key per example (see :func:`series_keys`); positional order.
    manifest : SiteManifest
        Gives the task and the declared classes.
    source, column : str
        File and column named in error messages.
    where : callable
        Maps a positional row to a human location (``"line 12"``).
    check_task : bool
        Also check the class count fits the task (off when only validating raw labels).

    Raises
    ------
    LabelError
        For a label outside the declared classes, or a binary task without exactly two classes.
    """
    present = _sort_keys(pd.unique(keys).tolist())
    if manifest.classes is not None:
        declared = [value_key(c) for c in manifest.classes]
    else:
        declared = present
        logger.warning(
            "site %s: classes derived from the data (%d classes); declare classes = [...] in "
            "the manifest so every site of a federation uses the same class indices",
            manifest.site,
            len(declared),
        )
    index = {k: i for i, k in enumerate(declared)}
    codes = keys.map(index)
    bad = codes.isna().to_numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        outside = _sort_keys(pd.unique(keys[bad]).tolist())
        shown = ", ".join(key_name(k) for k in outside[:5])
        raise LabelError(
            f"{source}: column {column!r} holds labels outside the declared classes "
            f"[{', '.join(key_name(k) for k in declared)}]: {shown} "
            f"({int(bad.sum())} rows, first at {where(first)}); fix those labels or add them "
            "to classes in the manifest",
            path=source,
        )
    if check_task and manifest.task == "binary" and len(declared) != 2:
        raise LabelError(
            f"{source}: task 'binary' needs exactly 2 classes but column {column!r} has "
            f"{len(declared)} distinct labels; declare classes = [negative, positive], use "
            "task = 'multiclass', or binarise with positive_values / positive_above",
            path=source,
        )
    if check_task and manifest.task == "multiclass" and len(declared) < 2:
        raise LabelError(
            f"{source}: task 'multiclass' needs at least 2 classes; declare classes in the "
            "manifest",
            path=source,
        )
    return codes.to_numpy(dtype=np.int64), [key_name(k) for k in declared]


def check_cohort(
    patients: int, manifest: SiteManifest, source: str, unit: str = "patients"
) -> None:
    """Raise :class:`CohortTooSmallError` when fewer than ``min_cohort_size`` patients remain."""
    if patients < manifest.min_cohort_size:
        raise CohortTooSmallError(
            f"site {manifest.site!r}: {source} holds {patients} {unit} after cleaning, fewer than "
            f"min_cohort_size = {manifest.min_cohort_size}; a cohort this small cannot be "
            "trained on safely — pool with another site's data, or (if your governance allows "
            "it) lower min_cohort_size in the manifest",
            path=source,
        )


def _allocate(n: int, val: float, test: float) -> tuple[int, int]:
    """Return (n_val, n_test) for ``n`` examples."""
    return round_half_up(val * n), round_half_up(test * n)


def split_indices(
    n: int,
    spec: SplitSpec,
    *,
    labels: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    site: str,
    source: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Divide ``n`` examples into sorted train / val / test index arrays.

    With ``groups`` whole groups are assigned (shuffled with ``spec.seed``, taken until each
    fraction of examples is reached); otherwise examples are shuffled, per class when ``labels``
    are given and ``spec.stratify``.

    Raises
    ------
    EmptySplitError
        When train is empty, or a split with a positive fraction gets no example.
    """
    rng = np.random.default_rng(spec.seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    if groups is not None:
        uniq, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
        order = rng.permutation(len(uniq))
        n_val, n_test = _allocate(n, spec.val, spec.test)
        cum = np.cumsum(sizes[order])
        start = cum - sizes[order]
        in_test = (start < n_test) if spec.test > 0 else np.zeros(len(order), bool)
        taken = np.where(in_test, 0, sizes[order])
        cum_rest = np.cumsum(taken)
        start_rest = cum_rest - taken
        in_val = (~in_test) & (start_rest < n_val) if spec.val > 0 else np.zeros(len(order), bool)
        which = np.empty(len(uniq), dtype=np.int8)
        which[order] = np.where(in_test, 2, np.where(in_val, 1, 0))
        assigned = which[inverse]
        for code, name in enumerate(SPLIT_NAMES):
            parts[name].append(np.flatnonzero(assigned == code))
    else:
        if labels is not None and spec.stratify:
            strata = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        else:
            strata = [np.arange(n)]
        for members in strata:
            shuffled = rng.permutation(members)
            n_val, n_test = _allocate(len(shuffled), spec.val, spec.test)
            parts["test"].append(shuffled[:n_test])
            parts["val"].append(shuffled[n_test : n_test + n_val])
            parts["train"].append(shuffled[n_test + n_val :])
    out = {k: np.sort(np.concatenate(v)) if v else np.array([], int) for k, v in parts.items()}
    fractions = {"train": 1.0, "val": spec.val, "test": spec.test}
    for name in SPLIT_NAMES:
        if fractions[name] > 0 and len(out[name]) == 0:
            by = ""
            if groups is not None:
                by = f" (split by {spec.by!r}: {len(np.unique(groups))} groups)"
            fix = (
                "lower split.val / split.test"
                if name == "train"
                else f"raise split.{name}, or set it to 0 to have no {name} split on purpose"
            )
            raise EmptySplitError(
                f"site {site!r}: the {name} split of {source} is empty ({n} examples{by}); {fix}",
                path=source,
            )
    return out["train"], out["val"], out["test"]


def make_split(
    inputs: Sequence[np.ndarray],
    targets: np.ndarray,
    index: np.ndarray,
    groups: np.ndarray | None,
    *,
    regression: bool,
) -> Split:
    """Build a :class:`Split` of the rows ``index`` (float32 inputs except int64 lengths)."""
    tensors = []
    for arr in inputs:
        part = arr[index]
        dtype = torch.int64 if np.issubdtype(part.dtype, np.integer) else torch.float32
        tensors.append(torch.as_tensor(np.ascontiguousarray(part), dtype=dtype))
    y = targets[index]
    target = torch.as_tensor(y, dtype=torch.float32 if regression else torch.int64)
    return Split(
        inputs=tuple(tensors),
        targets=target,
        groups=None if groups is None else groups[index],
    )


def build_site(
    manifest: SiteManifest,
    *,
    kind: str,
    inputs: Sequence[np.ndarray],
    targets: np.ndarray,
    groups: np.ndarray | None,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    num_classes: int,
    input_shape: tuple[int, ...],
    feature_names: list[str],
    has_mask: bool = False,
) -> SiteData:
    """Assemble :class:`SiteData` from full arrays and the three index arrays."""
    regression = manifest.task == "regression"
    train, val, test = (
        make_split(inputs, targets, idx, groups, regression=regression) for idx in splits
    )
    return SiteData(
        name=manifest.site,
        kind=kind,  # type: ignore[arg-type]
        task=manifest.task,
        num_classes=1 if regression else num_classes,
        input_shape=input_shape,
        train=train,
        val=val,
        test=test,
        has_mask=has_mask,
        feature_names=feature_names,
    )
