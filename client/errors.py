"""Exceptions raised while reading and validating a site's manifest and data.

Every failure raises exactly one :class:`DataValidationError` subclass whose message names the
file (and the column, line, patient or key where it applies), says what is wrong and what to
change. Messages never quote patient measurements: they name rows, columns and files instead.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CohortTooSmallError",
    "DataValidationError",
    "DtypeError",
    "EmptySplitError",
    "LabelError",
    "MalformedFileError",
    "ManifestError",
    "MissingFileError",
    "MissingValueError",
    "OutcomeMismatchError",
    "RecordNotFoundError",
    "SchemaError",
    "ShapeError",
    "SplitClassError",
    "TimestampError",
    "WindowError",
]


class DataValidationError(ValueError):
    """Base class: a site's manifest or data failed validation; nothing may train on it.

    Parameters
    ----------
    message : str
        What is wrong, where, and what to change.
    path : pathlib.Path, optional
        The file the problem is in, when there is one.
    """

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


class ManifestError(DataValidationError):
    """The site manifest is unreadable TOML, has an unknown field, or a value of the wrong type."""


class MissingFileError(DataValidationError):
    """A file the manifest points to does not exist."""


class MalformedFileError(DataValidationError):
    """A file exists but cannot be parsed (wrong field count on a line, corrupt archive…)."""


class TimestampError(MalformedFileError):
    """A time-series file holds a time stamp that is not ``hh:mm``."""


class SchemaError(DataValidationError):
    """A file lacks a column or key the manifest names (the message lists those that exist)."""


class RecordNotFoundError(SchemaError):
    """A signal record named in the manifest is not in the signal file."""


class DtypeError(DataValidationError):
    """A numeric column holds a value that is not a number."""


class MissingValueError(DataValidationError):
    """Values are missing where the manifest's missing-value policy does not allow it."""


class LabelError(DataValidationError):
    """Targets are missing, outside the declared classes, or unusable for the task."""


class CohortTooSmallError(DataValidationError):
    """The site holds fewer patients than ``min_cohort_size``."""


class EmptySplitError(DataValidationError):
    """A train, validation or test split came out empty."""


class SplitClassError(EmptySplitError):
    """A split holds no example of a class it must hold (the test split of a binary task)."""


class ShapeError(DataValidationError):
    """An image (or array) does not have the declared shape."""


class OutcomeMismatchError(DataValidationError):
    """The outcomes file lacks patients that have time series."""


class WindowError(DataValidationError):
    """A signal window is longer than the signal, or no window fits inside it."""
