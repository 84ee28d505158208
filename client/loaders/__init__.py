"""Loaders, one per kind of site data, and the dispatch from a manifest to validated data.

>>> data = load_site_file("simulations/sites/heart_cleveland.toml")  # doctest: +SKIP
>>> data.num_train, data.input_shape  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

from ...models import Registry
from ..dataset import SiteData
from ..manifest import DEFAULT_MIN_COHORT_SIZE, SiteManifest, load_manifest
from ._common import LoadResult
from .dicom_images import load_dicom
from .images_npz import load_images_npz
from .images_png import load_images_png
from .signals import load_signal_windows
from .table import load_table
from .text import load_text
from .timeseries import load_timeseries
from .wfdb_records import load_wfdb

logger = logging.getLogger(__name__)

LOADERS: Registry[Callable[[SiteManifest], LoadResult]] = Registry("data kind")
LOADERS.register("table")(load_table)
LOADERS.register("images_npz")(load_images_npz)
LOADERS.register("images_png")(load_images_png)
LOADERS.register("timeseries_long")(load_timeseries)
LOADERS.register("signal_windows")(load_signal_windows)
LOADERS.register("wfdb")(load_wfdb)
LOADERS.register("dicom")(load_dicom)
LOADERS.register("text")(load_text)


def load_site_result(manifest: SiteManifest) -> LoadResult:
    """Load a site and keep what the validation report needs (missingness rates, notes).

    Raises
    ------
    DataValidationError
        One subclass per failure, naming the file and what to change.
    """
    if manifest.min_cohort_size < DEFAULT_MIN_COHORT_SIZE:
        msg = (
            f"site {manifest.site!r}: min_cohort_size = {manifest.min_cohort_size} is below the "
            f"default {DEFAULT_MIN_COHORT_SIZE}; small cohorts are easier to re-identify"
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        logger.warning(msg)
    result = LOADERS.get(manifest.data.kind)(manifest)
    data = result.data
    logger.info(
        "site %s loaded (%s): train %d, val %d, test %d, input %s",
        data.name, manifest.data.kind, len(data.train), len(data.val), len(data.test),
        data.input_shape,
    )  # fmt: skip
    return result


def load_site(manifest: SiteManifest) -> SiteData:
    """Load and validate the data a manifest describes; return it split and ready to train."""
    return load_site_result(manifest).data


def load_site_file(path: Path | str) -> SiteData:
    """Read the manifest at ``path`` and load its site (data paths resolve against its folder)."""
    return load_site(load_manifest(path))


__all__ = ["LOADERS", "LoadResult", "load_site", "load_site_file", "load_site_result"]
