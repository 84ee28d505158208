"""The validation report a hospital reads before anything trains: aggregates only, never values.

``check_site_file("site.toml")`` loads the site exactly as training will (so every
:class:`~fedcare.client.errors.DataValidationError` surfaces here first) and summarises it:
examples per split, class balance per split, missingness rate per raw feature, notes and
warnings. :func:`report_renderables` turns the report into rich tables for the CLI.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from .errors import SplitClassError
from .loaders import load_site_result
from .manifest import SiteManifest, load_manifest

logger = logging.getLogger(__name__)

__all__ = [
    "SiteReport",
    "SplitSummary",
    "check_site",
    "check_site_file",
    "class_coverage",
    "report_renderables",
]


@dataclass(frozen=True)
class SplitSummary:
    """Counts for one split.

    Attributes
    ----------
    name : str
        ``train``, ``val`` or ``test``.
    count : int
        Examples in the split.
    class_counts : dict of str to int
        Examples per class name (empty for regression).
    groups : int
        Distinct groups (patients, records, ICU types…) in the split; 0 when ungrouped.
    """

    name: str
    count: int
    class_counts: dict[str, int] = field(default_factory=dict)
    groups: int = 0


@dataclass(frozen=True)
class SiteReport:
    """What ``fedcare node check`` shows: the site's shape, splits, balance and missingness.

    Attributes
    ----------
    site, study, data_kind, task : str
        From the manifest (``study`` may be empty).
    source : str
        The manifest file, or ``"<manifest>"``.
    input_shape : tuple of int
        One example's shape.
    has_mask : bool
        Whether sequences carry a missingness mask.
    patients : int
        Patients after cleaning, counted in ``unit`` (records for signal windows and WFDB,
        images for image sites without patient ids, rows for tables without ``split.by``).
    min_cohort_size : int
        The manifest's threshold.
    class_names : list of str
        Name per class index (empty for regression).
    splits : list of SplitSummary
        Train, val, test.
    missing_rates : dict of str to float
        Fraction missing per raw feature, before imputation.
    notes, warnings : list of str
        Rows dropped, derived categories…; warnings raised while loading, and splits missing a
        class.
    unit : str
        What ``patients`` counts (``"patients"``, ``"records"``, ``"images"``, ``"rows"``).
    example_unit : str
        What one example is (``"rows"``, ``"images"``, ``"beats"``, ``"windows"``…).
    """

    site: str
    study: str
    source: str
    data_kind: str
    task: str
    input_shape: tuple[int, ...]
    has_mask: bool
    patients: int
    min_cohort_size: int
    class_names: list[str]
    splits: list[SplitSummary]
    missing_rates: dict[str, float]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unit: str = "patients"
    example_unit: str = "examples"


def class_coverage(
    manifest: SiteManifest, splits: list[SplitSummary], example_unit: str, source: str
) -> list[str]:
    """Return a warning per non-empty split lacking a class; refuse a binary test split lacking one.

    Raises
    ------
    SplitClassError
        When the test split of a binary task holds no example of one of its two classes, so
        that AUROC (and sensitivity or specificity) cannot be computed there.
    """
    out: list[str] = []
    if manifest.task == "regression":
        return out
    for split in splits:
        absent = [c for c, k in split.class_counts.items() if k == 0]
        if split.count == 0 or not absent:
            continue
        shown = ", ".join(repr(c) for c in absent)
        if manifest.task == "binary" and split.name == "test":
            raise SplitClassError(
                f"site {manifest.site!r}: the test split ({split.count} {example_unit}) holds no "
                f"example of class {shown}, so AUROC, sensitivity or specificity cannot be "
                "measured on it; add data holding that class (more records or patients), "
                "change split.seed or raise split.test",
                path=source if source != "<manifest>" else None,
            )
        consequence = (
            "the model cannot learn it"
            if split.name == "train"
            else "AUROC and per-class metrics are undefined there"
        )
        out.append(
            f"the {split.name} split ({split.count} {example_unit}) holds no example of class "
            f"{shown}: {consequence}; add data holding that class or change split.seed / "
            "the split fractions"
        )
    return out


def check_site(manifest: SiteManifest, *, source: str = "<manifest>") -> SiteReport:
    """Load ``manifest``'s data as training would and summarise it (raises on invalid data)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load_site_result(manifest)
    for w in caught:  # keep them visible: re-issue, and show them in the report
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    data = result.data
    splits = []
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        counts: dict[str, int] = {}
        if data.task != "regression":
            bins = np.bincount(split.targets.numpy(), minlength=len(result.class_names))
            counts = {c: int(bins[i]) for i, c in enumerate(result.class_names)}
        n_groups = 0 if split.groups is None else len(np.unique(split.groups))
        splits.append(
            SplitSummary(name=name, count=len(split), class_counts=counts, groups=n_groups)
        )
    coverage = class_coverage(manifest, splits, result.example_unit, source)
    for msg in coverage:
        warnings.warn(f"site {manifest.site!r}: {msg}", UserWarning, stacklevel=2)
        logger.warning("site %s: %s", manifest.site, msg)
    report = SiteReport(
        site=manifest.site,
        study=manifest.study or "",
        source=source,
        data_kind=manifest.data.kind,
        task=manifest.task,
        input_shape=data.input_shape,
        has_mask=data.has_mask,
        patients=result.patients,
        min_cohort_size=manifest.min_cohort_size,
        class_names=list(result.class_names),
        splits=splits,
        missing_rates=dict(result.missing_rates),
        notes=list(result.notes),
        warnings=[str(w.message) for w in caught] + coverage,
        unit=result.unit,
        example_unit=result.example_unit,
    )
    logger.info("site %s checked: %d %s", report.site, report.patients, report.unit)
    return report


def check_site_file(path: Path | str) -> SiteReport:
    """Read the manifest at ``path`` and check its site (raises ``DataValidationError``)."""
    return check_site(load_manifest(path), source=str(path))


def report_renderables(report: SiteReport) -> list[RenderableType]:
    """Return rich tables for ``report``: overview, splits with class balance, missingness."""
    overview = Table(title=f"Site {report.site}", show_header=False, title_justify="left")
    overview.add_column("field", style="bold")
    overview.add_column("value")
    rows = [
        ("manifest", report.source),
        ("study", report.study or "-"),
        ("data kind", report.data_kind),
        ("task", report.task),
        ("classes", ", ".join(report.class_names) or "-"),
        ("input shape", str(report.input_shape) + (" + mask" if report.has_mask else "")),
        (report.unit, f"{report.patients} (min_cohort_size {report.min_cohort_size})"),
        ("examples", f"{sum(s.count for s in report.splits)} {report.example_unit}"),
    ]
    for key, value in rows:
        overview.add_row(key, value)

    splits = Table(title="Splits and classes", title_justify="left")
    splits.add_column("split")
    splits.add_column(report.example_unit, justify="right")
    if any(s.groups for s in report.splits):
        splits.add_column("groups", justify="right")
    for name in report.class_names:
        splits.add_column(f"class {name}", justify="right")
    total = sum(s.count for s in report.splits)
    for s in report.splits:
        cells = [s.name, f"{s.count} ({s.count / max(total, 1):.0%})"]
        if any(x.groups for x in report.splits):
            cells.append(str(s.groups))
        for name in report.class_names:
            k = s.class_counts.get(name, 0)
            text = f"{k} ({k / max(s.count, 1):.1%})"
            cells.append(Text(text, style="bold red") if k == 0 and s.count else text)
        splits.add_row(*cells)

    out: list[RenderableType] = [overview, splits]
    if report.missing_rates:
        missing = Table(title="Missingness per feature (rate)", title_justify="left")
        missing.add_column("feature")
        missing.add_column("missing", justify="right")
        for name, rate in report.missing_rates.items():
            style = "red" if rate >= 0.5 else ("yellow" if rate > 0 else "")
            missing.add_row(name, Text(f"{rate:.1%}", style=style))
        out.append(missing)
    for note in report.notes:
        out.append(Text(f"note: {note}"))
    for warning in report.warnings:
        out.append(Text(f"warning: {warning}", style="yellow"))
    return out
