"""Input standardisation that travels with a model: which statistics, fitted where, applied how.

A site's loader standardises its features (``client/loaders``: tables, time series, signals) with
**its own** training split's mean and standard deviation. A model trained that way expects every
evaluating site to do the same, and a site's figures then depend on how its records are grouped
(the same patients scored as one site or as four get different inputs). Two choices, each
recorded in the model file (``server.checkpoint.MODEL_PREPROCESSING``) as a :class:`Preprocessing`:

- ``per-site``: each site standardises with its own training statistics (the loaders' default);
  the model file says so, and ``fedcare evaluate`` loads the validation site as its manifest says.
- ``global``: one mean and standard deviation per feature for the whole federation, computed from
  the sites' summed sufficient statistics (:func:`site_moments` → count, sum, sum of squares of
  the *raw* training features; :func:`global_standardiser` adds them up). The sums are what a
  site would release (securely summed, or with DP noise charged to its ledger); in a simulation
  the virtual hospitals' exact sums are added. The model file stores the mean and standard
  deviation; ``fedcare evaluate`` loads the site's raw features (a table manifest with
  ``standardize = false``) and applies them, so every evaluating site transforms a record the same
  way, however records are grouped into sites.

Pure NumPy / torch; no site data is kept beyond the per-feature sums.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..config_base import FrozenModel

__all__ = ["MIN_STD", "Moments", "Preprocessing", "global_standardiser", "site_moments"]

MIN_STD: Final = 1e-8


class Moments(FrozenModel):
    """One site's sufficient statistics of its training features: count, per-feature sum and sum of squares."""

    n: float = Field(ge=0)
    total: list[float]
    squares: list[float]

    def __add__(self, other: Moments) -> Moments:
        """Return the element-wise sum of two sites' moments."""
        if len(self.total) != len(other.total):
            raise ValueError(f"moments of {len(self.total)} and {len(other.total)} features cannot be added; "
                             "every site must hold the same features")
        return Moments(n=self.n + other.n, total=list(np.add(self.total, other.total)),
                       squares=list(np.add(self.squares, other.squares)))  # fmt: skip


def site_moments(x: torch.Tensor | np.ndarray) -> Moments:
    """Return the count, per-feature sum and sum of squares of a site's raw training features ``x`` (N, F)."""
    arr = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return Moments(n=float(len(arr)), total=arr.sum(axis=0).tolist(), squares=(arr**2).sum(axis=0).tolist())


class Preprocessing(FrozenModel):
    """What a model expects of its inputs (stored in the model file's meta under ``preprocessing``).

    Attributes
    ----------
    kind : {"per-site", "global"}
        ``per-site``: each site standardises with its own training statistics; ``global``: every
        site applies ``mean`` / ``std`` to its raw features.
    mean, std : list of float
        ``global`` only: per-feature mean and standard deviation (std ≥ ``MIN_STD``).
    n : float
        ``global`` only: training examples the statistics came from.
    """

    kind: Literal["per-site", "global"] = "per-site"
    mean: list[float] = Field(default_factory=list)
    std: list[float] = Field(default_factory=list)
    n: float = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> Preprocessing:
        """Refuse global statistics without a mean and a positive std per feature."""
        if self.kind == "global":
            if not self.mean or len(self.mean) != len(self.std):
                raise ValueError("global preprocessing needs one mean and one std per feature")
            if not all(np.isfinite(self.mean)) or not all(s >= MIN_STD and np.isfinite(s) for s in self.std):
                raise ValueError("global preprocessing needs finite means and standard deviations ≥ 1e-8")
        elif self.mean or self.std:
            raise ValueError("per-site preprocessing carries no statistics; use kind = 'global' for them")
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` (N, F) standardised with the stored statistics (``global``); unchanged (``per-site``)."""
        if self.kind == "per-site":
            return x
        if x.shape[-1] != len(self.mean):
            raise ValueError(f"the model's preprocessing has {len(self.mean)} features, the data {x.shape[-1]}; "
                             "validate on a site with the study's features")
        mean = torch.as_tensor(self.mean, dtype=x.dtype)
        std = torch.as_tensor(self.std, dtype=x.dtype)
        return (x - mean) / std

    def to_meta(self) -> dict[str, Any]:
        """Return the JSON-ready form stored in a model file."""
        return self.model_dump()

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Preprocessing:
        """Return the preprocessing a model file's meta records (``per-site`` when it records none: older files)."""
        raw = meta.get("preprocessing")
        return cls() if raw is None else cls.model_validate(raw)


def global_standardiser(moments: Iterable[Moments]) -> Preprocessing:
    """Return the ``global`` preprocessing of the summed moments of several sites (population std).

    Raises
    ------
    ValueError
        With no site or no example.
    """
    items = list(moments)
    if not items:
        raise ValueError("no site moments given; every training site contributes its sums")
    total = items[0]
    for m in items[1:]:
        total = total + m
    if total.n < 1:
        raise ValueError("the sites' moments count no example; standardisation needs training data")
    mean = np.asarray(total.total) / total.n
    var = np.maximum(np.asarray(total.squares) / total.n - mean**2, 0.0)
    std = np.maximum(np.sqrt(var), MIN_STD)
    return Preprocessing(kind="global", mean=mean.tolist(), std=std.tolist(), n=total.n)
