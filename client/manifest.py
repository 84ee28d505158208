"""The site manifest: a hospital's TOML description of its data, validated by frozen pydantic.

A manifest has top-level fields ``site``, ``study``, ``task``, ``classes`` and
``min_cohort_size``, a ``[split]`` table and a ``[data]`` table whose ``kind`` picks the loader::

    site = "cleveland"
    task = "binary"
    classes = [0, 1, 2, 3, 4]          # allowed values of the raw target column

    [split]
    val = 0.15
    test = 0.2
    seed = 0

    [data]
    kind = "table"
    path = "../../../shared/data/heart_disease/processed.cleveland.data"
    ...

Relative paths in ``[data]`` resolve against the folder holding the manifest file (not the
working directory), so a manifest and its data can move together. A path that starts with
``${FEDCARE_DATA_ROOT}/`` is read under the folder that environment variable names (the one
data-root variable; the shipped example manifests use it), and no other variable is expanded.
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Union

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..config_base import FrozenModel
from ..models import Task
from ..models.text import MAX_BUCKETS, MAX_TEXT_LENGTH, HashingTokenizer
from .errors import ManifestError, MissingFileError

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_KINDS",
    "DEFAULT_MIN_COHORT_SIZE",
    "WFDB_BEAT_SYMBOLS",
    "PHYSIONET2012_DESCRIPTORS",
    "PHYSIONET2012_PARAMETERS",
    "DataSpec",
    "DicomData",
    "ImagesNpzData",
    "ImagesPngData",
    "SignalWindowsData",
    "SiteManifest",
    "SplitSpec",
    "TableData",
    "TextData",
    "TimeseriesLongData",
    "WfdbData",
    "load_manifest",
    "parse_manifest",
]

DEFAULT_MIN_COHORT_SIZE = 20
"""Sites with fewer patients refuse to load unless their manifest lowers ``min_cohort_size``."""

PHYSIONET2012_DESCRIPTORS: tuple[str, ...] = (
    "RecordID",
    "Age",
    "Gender",
    "Height",
    "ICUType",
    "Weight",
)
"""The general descriptors recorded once at 00:00 in each PhysioNet 2012 patient file."""

PHYSIONET2012_PARAMETERS: tuple[str, ...] = (
    "ALP", "ALT", "AST", "Albumin", "BUN", "Bilirubin", "Cholesterol", "Creatinine", "DiasABP",
    "FiO2", "GCS", "Glucose", "HCO3", "HCT", "HR", "K", "Lactate", "MAP", "MechVent", "Mg",
    "NIDiasABP", "NIMAP", "NISysABP", "Na", "PaCO2", "PaO2", "Platelets", "RespRate", "SaO2",
    "SysABP", "Temp", "TroponinI", "TroponinT", "Urine", "WBC", "pH",
)  # fmt: skip
"""The 36 time series of PhysioNet/CinC 2012, in a fixed (alphabetical, case-sensitive) order."""

Scalar = Union[int, float, str]
"""A label or category value as written in TOML."""


DATA_ROOT_ENV: Final = "FEDCARE_DATA_ROOT"
"""The one data-root variable: a manifest path starting ``${FEDCARE_DATA_ROOT}/`` is read under it."""

_DATA_ROOT_PREFIX: Final = "${" + DATA_ROOT_ENV + "}"


def expand_data_root(value: Path) -> Path:
    """Replace a leading ``${FEDCARE_DATA_ROOT}`` by that variable's value (no other variable is expanded).

    Raises ``ValueError`` (naming the variable and what to set) when the path uses it and it is unset.
    """
    text = str(value)
    if not text.startswith(_DATA_ROOT_PREFIX):
        if "${" in text:
            raise ValueError(
                f"path {text!r} uses a variable; only a leading ${{{DATA_ROOT_ENV}}} is expanded "
                "(write the path in full or relative to the manifest)"
            )
        return value
    root = os.environ.get(DATA_ROOT_ENV, "").strip()
    if not root:
        raise ValueError(
            f"path {text!r} starts with ${{{DATA_ROOT_ENV}}} but {DATA_ROOT_ENV} is not set: "
            f"export {DATA_ROOT_ENV}=/path/to/the/data/folder (the folder holding the data sets)"
        )
    rest = text[len(_DATA_ROOT_PREFIX):].lstrip("/")
    return Path(root).expanduser() / rest


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    """Resolve a path: a leading ``${FEDCARE_DATA_ROOT}`` is expanded, another relative path is
    read against ``context["base_dir"]`` (the manifest's folder)."""
    if value is None:
        return None
    value = expand_data_root(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


def _as_list(value: Any) -> Any:
    """Accept a single string where a list of strings is expected."""
    return [value] if isinstance(value, str) else value


class SplitSpec(FrozenModel):
    """How a site's examples are divided into train / validation / test.

    Attributes
    ----------
    val, test : float
        Fractions of the site's examples (or groups, with ``by``) in [0, 1); ``val + test < 1``.
        A fraction of 0 gives an empty split on purpose; a positive fraction that rounds to no
        example is an error.
    seed : int
        Seed of the shuffle, so a site's split is reproducible.
    by : str, optional
        Split by group so that one group never lands in two splits: a column of the table (or
        of the PNG labels CSV), ``"patient"`` / ``"record"`` for signal windows, ``"patient"``
        or a descriptor for time series. Group splits are not stratified.
    stratify : bool
        Keep class proportions in every split (classification without ``by`` only).
    """

    val: float = Field(default=0.15, ge=0.0, lt=1.0)
    test: float = Field(default=0.15, ge=0.0, lt=1.0)
    seed: int = 0
    by: str | None = None
    stratify: bool = True

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitSpec:
        """Refuse fractions that leave nothing to train on."""
        if self.val + self.test >= 1.0:
            raise ValueError(
                f"split.val + split.test = {self.val + self.test:g} leaves nothing to train on; "
                "make their sum smaller than 1 (e.g. val = 0.15, test = 0.15)"
            )
        return self


class TableData(FrozenModel):
    """A CSV or Parquet table: one row per patient.

    Attributes
    ----------
    path : pathlib.Path
        The table, relative to the manifest's folder.
    format : {"csv", "parquet"}, optional
        Taken from the suffix when omitted (``.parquet`` / ``.pq`` is Parquet, anything else CSV).
    has_header : bool
        Whether the CSV's first line names the columns; when false, ``columns`` must name them.
    columns : list of str, optional
        Column names for a header-less CSV, in file order.
    delimiter : str
        CSV field separator: one character (``","``, ``";"``, ``"\t"``…), or ``"whitespace"``
        for columns separated by runs of spaces / tabs (UCR-style text files; no quoting).
        ``"\\s+"`` is accepted as a synonym of ``"whitespace"``.
    features : list of str, optional
        Feature columns, in this order; default every column except the target, ``split.by``
        and ``drop_columns``.
    target : str
        The column predicted.
    drop_columns : list of str
        Columns removed before anything else (before missing-value handling).
    categorical : list of str
        Feature columns one-hot encoded (a missing value encodes as all zeros).
    categories : dict of str to list
        Declared categories per categorical column, e.g. ``{cp = [1, 2, 3, 4]}``. Declare them:
        categories derived from one hospital's data need not match another's, and the one-hot
        columns of every site in a federation must be identical. A value outside the declared
        categories is an error.
    missing_marker : list of str
        Strings meaning "missing" besides the empty field (e.g. ``"?"``).
    missing : {"drop_rows", "mean", "median", "error"}
        Policy for missing feature values: drop the row, impute the train-split mean / median,
        or refuse. Rows whose target is missing are dropped under ``drop_rows`` and refused
        otherwise.
    positive_values, positive_above :
        Binary tasks only: label 1 when the raw target is one of ``positive_values`` or is
        strictly greater than ``positive_above``, else 0. ``classes`` then lists the allowed
        raw target values (e.g. ``[0, 1, 2, 3, 4]``).
    standardize : bool
        Scale numeric (non-one-hot) features with the train split's mean and standard deviation.
    """

    kind: Literal["table"]
    path: Path
    format: Literal["csv", "parquet"] | None = None
    has_header: bool = True
    columns: list[str] | None = None
    delimiter: str = ","
    features: list[str] | None = None
    target: str
    drop_columns: list[str] = []
    categorical: list[str] = []
    categories: dict[str, list[Scalar]] = {}
    missing_marker: list[str] = []
    missing: Literal["drop_rows", "mean", "median", "error"] = "error"
    positive_values: list[Scalar] | None = None
    positive_above: float | None = None
    standardize: bool = True

    _resolve_path = field_validator("path")(_resolve)
    _marker_list = field_validator("missing_marker", mode="before")(_as_list)

    @field_validator("delimiter")
    @classmethod
    def _one_character_or_whitespace(cls, value: str) -> str:
        """Accept one character, or ``"whitespace"`` (``"\\s+"`` as a synonym)."""
        if value.strip() in (r"\s+", r"\s", "whitespace"):
            return "whitespace"
        if len(value) != 1:
            raise ValueError(
                "delimiter must be one character (e.g. \",\", \";\", \"\\t\") or \"whitespace\" "
                "for columns separated by runs of spaces or tabs"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TableData:
        """Check the table settings against each other."""
        if not self.has_header and self.columns is None and self.file_format == "csv":
            raise ValueError(
                "has_header = false needs columns = [...] naming every column in file order"
            )
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError("columns names a column twice; give every column a distinct name")
        unknown = sorted(set(self.categories) - set(self.categorical))
        if unknown:
            raise ValueError(
                f"categories declared for {unknown} which are not in categorical; "
                "add them to categorical or remove them from categories"
            )
        if self.positive_values is not None and self.positive_above is not None:
            raise ValueError("give either positive_values or positive_above, not both")
        if self.target in self.drop_columns:
            raise ValueError(f"the target {self.target!r} is also in drop_columns")
        if self.features is not None and self.target in self.features:
            raise ValueError(f"the target {self.target!r} is also listed in features")
        return self

    @property
    def file_format(self) -> Literal["csv", "parquet"]:
        """Return the explicit format, else the one the suffix implies."""
        if self.format is not None:
            return self.format
        return "parquet" if self.path.suffix.lower() in (".parquet", ".pq") else "csv"


class ImagesNpzData(FrozenModel):
    """A MedMNIST-style NPZ with ``train_images``, ``train_labels``, ``val_*`` and ``test_*``.

    The file's own train / validation / test splits are used (a manifest with ``[split]`` is
    refused). Images become float32 in [0, 1] shaped (N, C, H, W).

    Attributes
    ----------
    path : pathlib.Path
        The NPZ file.
    expected_shape : list of int, optional
        ``[H, W]`` (one grey channel) or ``[C, H, W]``; every image must have it. Declare it:
        the model's input size must agree across the federation.
    """

    kind: Literal["images_npz"]
    path: Path
    expected_shape: list[int] | None = Field(default=None, min_length=2, max_length=3)

    _resolve_path = field_validator("path")(_resolve)


class ImagesPngData(FrozenModel):
    """A folder of PNG images plus a labels CSV naming each file and its label.

    Attributes
    ----------
    folder : pathlib.Path
        Folder holding the PNG files.
    labels : pathlib.Path
        CSV with a header; one row per image.
    filename_column, label_column : str
        Columns of the labels CSV holding the file name (relative to ``folder``) and the label.
    expected_shape : list of int
        ``[H, W]`` or ``[C, H, W]``; every image must have it.
    """

    kind: Literal["images_png"]
    folder: Path
    labels: Path
    filename_column: str = "filename"
    label_column: str = "label"
    expected_shape: list[int] = Field(min_length=2, max_length=3)

    _resolve_paths = field_validator("folder", "labels")(_resolve)


class TimeseriesLongData(FrozenModel):
    """PhysioNet-2012-style long files (``Time,Parameter,Value``), one per patient.

    Observations are binned into ``steps`` bins of ``step_minutes`` (mean per bin; an observation
    exactly at the end of the horizon goes to the last bin, later ones are dropped), with a
    mask (1 observed, 0 missing). Missing bins are forward-filled within the patient, bins before
    a feature's first observation take the train-split mean, then every feature is standardised
    with the train split's mean and standard deviation of observed values.

    Attributes
    ----------
    path : pathlib.Path
        A folder of ``*.txt`` files or a ``.tar.gz`` of them (read streaming, never extracted).
    outcomes : pathlib.Path
        CSV with one row per patient: ``id_column`` and ``target``.
    id_column, target : str
        Patient id column (matched to the file names' stem) and outcome column of ``outcomes``.
    steps, step_minutes : int
        Number of bins and their width.
    parameters : list of str or "physionet2012" or "from_data"
        The time series used as features, in this order; ``"physionet2012"`` is the challenge's
        36, ``"from_data"`` every non-descriptor parameter found, sorted.
    descriptors : list of str
        Parameters recorded once at 00:00 (not time series).
    static : list of str
        Descriptors appended as constant features over time (e.g. ``["Age", "Gender"]``).
    unknown_values : list of float
        Values meaning "unknown", treated as missing (PhysioNet uses -1).
    where : dict
        Keep only patients whose descriptors match, e.g. ``where = {ICUType = 2}`` (a list means
        any of its values): a natural site of PhysioNet is one ICU type.
    group_by : str
        Descriptor used as ``Split.groups`` (``"ICUType"`` gives partitioners the natural sites,
        ``"RecordID"`` one group per patient).
    """

    kind: Literal["timeseries_long"]
    path: Path
    outcomes: Path
    id_column: str = "RecordID"
    target: str = "In-hospital_death"
    steps: int = Field(default=48, ge=1)
    step_minutes: int = Field(default=60, ge=1)
    parameters: list[str] | Literal["physionet2012", "from_data"] = "physionet2012"
    descriptors: list[str] = list(PHYSIONET2012_DESCRIPTORS)
    static: list[str] = []
    unknown_values: list[float] = [-1.0]
    where: dict[str, Scalar | list[Scalar]] = {}
    group_by: str = "ICUType"

    _resolve_paths = field_validator("path", "outcomes")(_resolve)

    @model_validator(mode="after")
    def _consistent(self) -> TimeseriesLongData:
        """Check that static features, filters and groups name descriptors."""
        for name, values in (
            ("static", self.static),
            ("where", list(self.where)),
            ("group_by", [self.group_by]),
        ):
            unknown = [v for v in values if v not in self.descriptors]
            if unknown:
                raise ValueError(
                    f"{name} names {unknown}, which are not descriptors; "
                    f"known descriptors: {self.descriptors}"
                )
        if isinstance(self.parameters, list):
            if not self.parameters:
                raise ValueError("parameters is empty; list at least one time series")
            both = sorted(set(self.parameters) & set(self.static))
            if both:
                raise ValueError(f"{both} are both in parameters and static; keep one")
            if len(set(self.parameters)) != len(self.parameters):
                raise ValueError("parameters names a time series twice")
        return self

    @property
    def horizon_minutes(self) -> int:
        """Return the covered time span, ``steps * step_minutes``."""
        return self.steps * self.step_minutes


class _Windowing(FrozenModel):
    """Settings shared by the signal kinds: how windows are cut around events and scaled."""

    window_seconds: float = Field(default=0.7, gt=0)
    before: float = Field(default=0.5, ge=0.0, le=1.0)
    decimate: int = Field(default=1, ge=1)
    normalize: Literal["window", "train", "none"] = "window"

    @field_validator("records", mode="before", check_fields=False)
    @classmethod
    def _records_as_text(cls, value: Any) -> Any:
        """Accept record ids written as TOML integers."""
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value


class SignalWindowsData(_Windowing):
    """An NPZ of 1-D signals with event positions, cut into windows centred on the events.

    Keys per record ``REC``: ``{signal_key}_REC`` (the signal), ``{event_key}_REC`` (sample index
    of every event) and ``{positive_key}_REC`` (the events labelled 1); plus ``records`` and
    ``fs`` (sampling rate, Hz). Windows running past either end of the signal are dropped.

    Attributes
    ----------
    path : pathlib.Path
        The NPZ file.
    records : list of str, optional
        Records (patients) of this site; default all. Integers are accepted (``[100, 102]``).
    window_seconds : float
        Window length; ``round(window_seconds * fs)`` samples (0.7 s at 360 Hz = 252).
    before : float
        Fraction of the window before the event (0.5 centres it).
    decimate : int
        Keep every window's mean over blocks of this many samples (2: 252 -> 126 steps),
        a cheap low-pass + downsample that keeps LSTM training affordable on CPUs.
    normalize : {"window", "train", "none"}
        Standardise each window by its own mean / std, by the train split's, or not at all.
    """

    kind: Literal["signal_windows"]
    path: Path
    records: list[str] | None = None
    signal_key: str = "ecg"
    event_key: str = "rpeaks"
    positive_key: str = "pvc"

    _resolve_path = field_validator("path")(_resolve)


WFDB_BEAT_SYMBOLS: tuple[str, ...] = (
    "N", "L", "R", "B", "A", "a", "J", "S", "V", "r", "F", "e", "j", "n", "E", "/", "f", "Q", "?",
)  # fmt: skip
"""PhysioNet's beat annotation codes (every other code marks rhythm, noise or a comment)."""


class WfdbData(_Windowing):
    """A folder of native WFDB records (``.hea``, signal and annotation files) read with ``wfdb``.

    Every annotation whose symbol is in ``beat_symbols`` is an event (a window is cut around it,
    exactly as ``signal_windows`` does); events whose symbol is in ``positive_symbols`` are
    labelled 1. One record is one patient, and the split is by record unless ``split.by =
    "beat"`` asks for beats of one record in several splits.

    Attributes
    ----------
    folder : pathlib.Path
        Folder holding the records (``100.hea``, ``100.dat``, ``100.atr``…).
    records : list of str, optional
        Records of this site; default every ``*.hea`` in the folder. Integers are accepted.
    annotation : str
        Extension of the annotation files (``"atr"`` for the reference annotations).
    channel : str or int, optional
        The lead used: its name in the header (``"MLII"``) or its 0-based index. Default: the
        first channel, which must then have the same name in every record.
    fs : float, optional
        Expected sampling rate (Hz); a record with another rate is refused. Default: the
        records' own rate, which must be the same for all.
    beat_symbols : list of str
        Annotation symbols that are beats (default: PhysioNet's beat codes).
    positive_symbols : list of str
        Beat symbols labelled 1 (default ``["V"]``, premature ventricular contraction).
    window_seconds, before, decimate, normalize :
        As for ``signal_windows``.
    """

    kind: Literal["wfdb"]
    folder: Path
    records: list[str] | None = None
    annotation: str = Field(default="atr", pattern=r"^[A-Za-z0-9_]+$")
    channel: str | int | None = None
    fs: float | None = Field(default=None, gt=0)
    beat_symbols: list[str] = Field(default=list(WFDB_BEAT_SYMBOLS), min_length=1)
    positive_symbols: list[str] = Field(default=["V"], min_length=1)

    _resolve_path = field_validator("folder")(_resolve)

    @field_validator("annotation", mode="before")
    @classmethod
    def _no_dot(cls, value: Any) -> Any:
        """Accept ``".atr"`` for ``"atr"``."""
        return value.removeprefix(".") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _positives_are_beats(self) -> WfdbData:
        """Check that every positive symbol is a beat symbol."""
        stray = [s for s in self.positive_symbols if s not in self.beat_symbols]
        if stray:
            raise ValueError(
                f"positive_symbols {stray} are not in beat_symbols; add them to beat_symbols "
                "(a window is only cut around a beat)"
            )
        if isinstance(self.channel, int) and self.channel < 0:
            raise ValueError("channel is a 0-based index or a lead name such as 'MLII'")
        return self


class DicomData(FrozenModel):
    """A folder of DICOM images read with ``pydicom``, labelled by a CSV.

    Pixels go through the modality LUT (``RescaleSlope`` / ``RescaleIntercept``, e.g. CT
    Hounsfield units), then the linear VOI window of DICOM PS3.3 C.11.2.1.2 to [0, 1]
    (``window_center`` / ``window_width`` from the manifest, else the file's first
    ``WindowCenter`` / ``WindowWidth``, else the image's own min..max); ``MONOCHROME1`` is
    inverted so that bright always means dense; the image is resized (bilinear) to ``size``.
    Patient-identifying tags are only used to group a patient's images into one split (as
    opaque indices) and never appear in logs or messages: errors name the file.

    Attributes
    ----------
    folder : pathlib.Path
        Folder searched (recursively) for DICOM files.
    pattern : str
        Glob of the files read under ``folder`` (``"*"`` for files without an extension).
    labels : pathlib.Path
        CSV with a header: ``key_column`` and ``label_column``.
    key : {"filename", "sop_instance_uid", "patient_id"}
        What ``key_column`` holds: the file's path relative to ``folder``, its SOP Instance
        UID, or its Patient ID (every image of the patient gets that label).
    key_column, label_column : str
        Columns of the labels CSV.
    size : list of int
        ``[H, W]`` every image is resized to (the model's input size, the same at every site).
    channels : {1, 3}
        1 for grey (MONOCHROME1/2) images, 3 for RGB; a file with the other layout is refused.
    window_center, window_width : float, optional
        A fixed VOI window for every image (give both; e.g. CT lung ``-600`` / ``1500``, soft
        tissue ``40`` / ``400``).
    frame : int, optional
        0-based frame taken from multi-frame files; without it multi-frame files are refused.
    """

    kind: Literal["dicom"]
    folder: Path
    pattern: str = "*.dcm"
    labels: Path
    key: Literal["filename", "sop_instance_uid", "patient_id"] = "filename"
    key_column: str = "filename"
    label_column: str = "label"
    size: list[int] = Field(min_length=2, max_length=2)
    channels: Literal[1, 3] = 1
    window_center: float | None = None
    window_width: float | None = Field(default=None, ge=1.0)
    frame: int | None = Field(default=None, ge=0)

    _resolve_paths = field_validator("folder", "labels")(_resolve)

    @model_validator(mode="after")
    def _consistent(self) -> DicomData:
        """Check the window is given whole and the size is positive."""
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("give both window_center and window_width, or neither")
        if min(self.size) < 1:
            raise ValueError(f"size must be two positive integers [H, W], got {self.size}")
        return self


class TextData(FrozenModel):
    """A CSV or Parquet table of free text: one row per record, a text column and a label column.

    The text is tokenised at the site by :class:`fedcare.models.text.HashingTokenizer` (NFKC,
    lower-cased, ``\\w+`` tokens, BLAKE2b-hashed into ``buckets``, cut to ``max_length``): no
    vocabulary is built from the site's text, so none can leave it. The three settings must
    equal the study's ``[model]`` ones (``buckets``, ``max_length``, ``lowercase``); the model
    refuses ids made otherwise. Split by patient or record with ``split.by = "<id column>"``.

    Attributes
    ----------
    path : pathlib.Path
        The table, relative to the manifest's folder.
    format : {"csv", "parquet"}, optional
        Taken from the suffix when omitted (``.parquet`` / ``.pq`` is Parquet, anything else CSV).
    delimiter : str
        CSV field separator (one character); fields may be quoted and span lines.
    text_column, label_column : str
        Columns holding the text and its label (the header names them).
    buckets, max_length, lowercase :
        The hashing tokeniser's settings (defaults: fedcare's, the same as ``ModelSpec``'s).
    empty_text : {"error", "drop_rows"}
        A row whose text is empty or holds no token: refuse the file, or drop the row.
    """

    kind: Literal["text"]
    path: Path
    format: Literal["csv", "parquet"] | None = None
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    text_column: str = "text"
    label_column: str = "label"
    buckets: int = Field(default=HashingTokenizer.model_fields["buckets"].default, ge=2, le=MAX_BUCKETS)
    max_length: int = Field(
        default=HashingTokenizer.model_fields["max_length"].default, ge=1, le=MAX_TEXT_LENGTH
    )
    lowercase: bool = True
    empty_text: Literal["error", "drop_rows"] = "error"

    _resolve_path = field_validator("path")(_resolve)

    @model_validator(mode="after")
    def _distinct_columns(self) -> TextData:
        """Refuse one column named as both text and label."""
        if self.text_column == self.label_column:
            raise ValueError("text_column and label_column name the same column; name two columns")
        return self

    @property
    def file_format(self) -> Literal["csv", "parquet"]:
        """Return the explicit format, else the one the suffix implies."""
        if self.format is not None:
            return self.format
        return "parquet" if self.path.suffix.lower() in (".parquet", ".pq") else "csv"

    def tokenizer(self) -> HashingTokenizer:
        """Return the hashing tokeniser these settings describe."""
        return HashingTokenizer(buckets=self.buckets, max_length=self.max_length, lowercase=self.lowercase)


DataSpec = Annotated[
    Union[
        TableData,
        ImagesNpzData,
        ImagesPngData,
        TimeseriesLongData,
        SignalWindowsData,
        WfdbData,
        DicomData,
        TextData,
    ],
    Field(discriminator="kind"),
]

DATA_KINDS: dict[str, type[BaseModel]] = {
    "table": TableData,
    "images_npz": ImagesNpzData,
    "images_png": ImagesPngData,
    "timeseries_long": TimeseriesLongData,
    "signal_windows": SignalWindowsData,
    "wfdb": WfdbData,
    "dicom": DicomData,
    "text": TextData,
}
"""Every ``[data].kind`` and the model that validates it."""


class SiteManifest(FrozenModel):
    """A hospital's description of its data: what is predicted, how to split, where the data is.

    Attributes
    ----------
    site : str
        The site's name.
    study : str, optional
        The study / federation this data belongs to.
    task : {"regression", "binary", "multiclass"}
        What is predicted.
    classes : list, optional
        Classification only: the allowed values of the target column, in class-index order
        (class ``i`` is ``classes[i]``); a label outside them is an error. Derived from the
        data (sorted) when omitted — declare them in a federation, since one site may lack a
        class. With a table's ``positive_*`` rule they list the raw values before binarising.
    min_cohort_size : int
        Refuse to load fewer patients than this (records for signal windows and WFDB).
    split : SplitSpec
        Train / validation / test fractions.
    data : DataSpec
        Where the data is and how to read it; ``kind`` picks the loader.
    """

    site: str = Field(min_length=1)
    study: str | None = None
    task: Task
    classes: list[Scalar] | None = None
    min_cohort_size: int = Field(default=DEFAULT_MIN_COHORT_SIZE, ge=1)
    split: SplitSpec = SplitSpec()
    data: DataSpec

    @model_validator(mode="after")
    def _task_fits_data(self) -> SiteManifest:
        """Check the task against the classes and the data kind."""
        if self.classes is not None:
            if self.task == "regression":
                raise ValueError("classes is for classification; remove it for a regression task")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("classes lists a label twice")
        positive = isinstance(self.data, TableData) and (
            self.data.positive_values is not None or self.data.positive_above is not None
        )
        if positive and self.task != "binary":
            raise ValueError("positive_values / positive_above need task = 'binary'")
        if self.task == "binary" and self.classes is not None and not positive:
            if len(self.classes) != 2:
                raise ValueError(
                    f"task = 'binary' needs exactly 2 classes, got {len(self.classes)}; "
                    "use task = 'multiclass' or a positive_values / positive_above rule"
                )
        if self.task == "regression" and self.data.kind in ("images_npz", "images_png", "dicom"):
            raise ValueError("image sites are classification sites; use 'binary' or 'multiclass'")
        if self.data.kind == "text" and self.task == "regression":
            raise ValueError("text sites classify: use task = 'binary' or 'multiclass'")
        if self.data.kind in ("signal_windows", "wfdb") and self.task != "binary":
            raise ValueError("signal windows are labelled 0/1: use task = 'binary'")
        if self.data.kind == "images_npz" and "split" in self.model_fields_set:
            raise ValueError(
                "images_npz uses the file's own train/val/test splits; remove the [split] table"
            )
        return self


def _location(loc: tuple[Any, ...]) -> str:
    """Return a dotted manifest location, dropping the discriminator tag pydantic inserts."""
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[0] == "data" and parts[1] in DATA_KINDS:
        del parts[1]
    return ".".join(parts) if parts else "(top level)"


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    """Return the field names allowed where an unknown field ``loc`` was found."""
    parent = [str(p) for p in loc[:-1]]
    model: type[BaseModel] = SiteManifest
    if parent[:1] == ["split"]:
        model = SplitSpec
    elif parent[:1] == ["data"] and len(parent) >= 2 and parent[1] in DATA_KINDS:
        model = DATA_KINDS[parent[1]]
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    """Turn one pydantic error into a readable line about the manifest."""
    loc = tuple(error["loc"])
    where = _location(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown field '{where}'; allowed here: {', '.join(_allowed_fields(loc))}"
    if kind == "union_tag_invalid":
        return (
            f"unknown data kind {error['ctx']['tag']!r} in [data].kind; "
            f"known kinds: {', '.join(DATA_KINDS)}"
        )
    if kind == "union_tag_not_found":
        return f"[data] needs a kind; known kinds: {', '.join(DATA_KINDS)}"
    if kind == "missing":
        return f"missing required field '{where}'"
    msg = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    shown = f" (got {value!r})" if isinstance(value, (int, float, str, bool)) else ""
    return f"'{where}': {msg}{shown}"


def parse_manifest(
    raw: dict[str, Any], *, base_dir: Path | None = None, source: str = "<manifest>"
) -> SiteManifest:
    """Validate a manifest already read from TOML; relative paths resolve against ``base_dir``.

    Parameters
    ----------
    raw : dict
        The parsed TOML document.
    base_dir : pathlib.Path, optional
        Folder relative data paths are resolved against (the manifest's folder).
    source : str
        Name of the manifest used in error messages.

    Raises
    ------
    ManifestError
        Listing every invalid, unknown or missing field.
    """
    try:
        return SiteManifest.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ManifestError(
            f"invalid site manifest {source}:\n{lines}\n"
            "Fix these fields (simulations/sites/*.toml has a working example of every data kind; docs/sites/README.md explains each).",
            path=source if source != "<manifest>" else None,
        ) from None


def load_manifest(path: Path | str) -> SiteManifest:
    """Read and validate a site manifest TOML file; relative data paths resolve against its folder.

    Raises
    ------
    MissingFileError
        When the manifest does not exist.
    ManifestError
        When it is not valid TOML or does not describe a site.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(
            f"site manifest {path} not found; pass the path of a TOML manifest "
            "(examples in simulations/sites/, copied out by `fedcare examples copy DIR`)",
            path=path,
        )
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(
            f"site manifest {path} is not valid TOML: {exc}; fix the syntax at that line",
            path=path,
        ) from None
    except UnicodeDecodeError:
        raise ManifestError(
            f"site manifest {path} is not UTF-8 text; save it as UTF-8 TOML", path=path
        ) from None
    manifest = parse_manifest(raw, base_dir=path.resolve().parent, source=str(path))
    logger.debug("read manifest %s for site %s (%s)", path, manifest.site, manifest.data.kind)
    return manifest
