"""Split one dataset into virtual hospitals: natural (by group), IID, label skew, quantity skew.

Every partitioner assigns each example of the train, validation and test splits to a site with
the *same rule* for the three splits, so that each virtual hospital can evaluate locally on data
that looks like its training data:

``natural``
    By :attr:`Split.groups` (patient, record, ICU type, source hospital…). A group's train,
    validation and test examples all go to the same site, so no group straddles two sites.
    ``assign="each"`` makes one site per group (``num_sites`` must equal the number of groups);
    ``"greedy"`` hands groups, largest first, to the site with the fewest training examples so
    far (then validation- / test-only groups to the site with the fewest of those): balanced
    sizes; ``"round_robin"`` deals groups in a seeded random order.
``iid``
    Each split is shuffled and cut into ``num_sites`` parts whose sizes differ by at most one.
``dirichlet``
    Label skew (Hsu et al., 2019): for every class ``k`` a site mix ``p_k ~ Dir(alpha·1)`` is
    drawn once and the class's examples of *each* split are shared by it (largest-remainder
    rounding). Small ``alpha`` gives sites few classes; large ``alpha`` approaches IID.
    Regression targets are binned into :data:`REGRESSION_BINS` quantile bins of the training
    targets first.
``quantity``
    Quantity skew: site shares ``q ~ Dir(alpha·1)`` are drawn once; every site first gets
    ``min_per_site`` training examples and the remaining ones are shared by ``q``; validation and
    test are shared by ``q``. Labels stay IID.

**Minimum size.** Every site gets at least ``min_per_site`` training examples.
``iid`` and ``quantity`` guarantee it by construction. ``dirichlet`` *rebalances* after the
draw: the sites short of ``min_per_site`` take examples from the sites with the most training
examples (each donor keeps at least ``min_per_site``; examples are taken from the top down, the
largest donor first, so the skew elsewhere is left as drawn). ``natural`` never splits a group,
so it cannot rebalance: it raises :class:`InfeasiblePartitionError` instead. Whatever the kind,
asking for more than ``num_train // min_per_site`` sites raises the same error before any
drawing. Validation and test splits are rebalanced the same way to ``min_eval_per_site``
examples per site (default 1, so that every site can evaluate locally; federated evaluation
refuses a site with neither) whenever the split holds at least ``num_sites × min_eval_per_site``
examples; otherwise, and for ``natural``, some sites may get an empty validation / test split
(a warning is logged).

Partitions are deterministic for a seed (``numpy.random.default_rng(seed)``) and vectorised:
1,000 sites take milliseconds for the assignment (building the 1,000 ``SiteData`` dominates).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Callable
from typing import Final, Literal

import numpy as np
from pydantic import Field, field_validator

from ..client.dataset import SiteData, Split
from ..config_base import FrozenModel
from ..models import Registry, UnknownNameError

__all__ = [
    "PARTITIONERS",
    "REGRESSION_BINS",
    "Assignment",
    "InfeasiblePartitionError",
    "MissingGroupsError",
    "PartitionError",
    "PartitionScheme",
    "label_distribution",
    "mean_label_tv",
    "partition",
    "site_names",
]

logger = logging.getLogger(__name__)

#: quantile bins that stand in for classes when ``dirichlet`` partitions a regression target
REGRESSION_BINS: Final = 10


class PartitionError(ValueError):
    """Base class: a dataset cannot be partitioned as asked."""


class InfeasiblePartitionError(PartitionError):
    """The sites cannot all get ``min_per_site`` training examples (too many sites or too little data)."""


class MissingGroupsError(PartitionError):
    """A ``natural`` partition was asked for data whose splits carry no ``groups``."""


@dataclasses.dataclass(frozen=True)
class Assignment:
    """The site index (``0 … num_sites-1``) of every example of each split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


Partitioner = Callable[[SiteData, "PartitionScheme", int, np.random.Generator], Assignment]

PARTITIONERS: Registry[Partitioner] = Registry("partition kind")


class PartitionScheme(FrozenModel):
    """How to split one dataset into virtual hospitals.

    Attributes
    ----------
    kind : str
        A registered partition kind: ``natural``, ``iid``, ``dirichlet`` or ``quantity``.
    alpha : float
        Dirichlet concentration for ``dirichlet`` (label skew) and ``quantity`` (size skew);
        small values skew strongly, large values approach IID. Ignored by the other kinds.
    min_per_site : int
        Training examples every site must get (see the module docstring for how).
    min_eval_per_site : int
        Validation and test examples every site gets when the split has enough (not ``natural``).
    assign : {"greedy", "round_robin", "each"}
        How ``natural`` hands groups to sites. Ignored by the other kinds.
    """

    kind: str = "iid"
    alpha: float = Field(default=0.5, gt=0, allow_inf_nan=False)
    min_per_site: int = Field(default=1, ge=1)
    min_eval_per_site: int = Field(default=1, ge=0)
    assign: Literal["greedy", "round_robin", "each"] = "greedy"

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        """Refuse a kind no partitioner is registered for, listing the known ones."""
        try:
            PARTITIONERS.get(value)
        except UnknownNameError as err:
            raise ValueError(str(err)) from None
        return value


def site_names(num_sites: int) -> list[str]:
    """Return ``site-000``, ``site-001``, … (wider numbers beyond 1,000 sites)."""
    width = max(3, len(str(num_sites - 1)))
    return [f"site-{i:0{width}d}" for i in range(num_sites)]


def partition(
    data: SiteData, *, scheme: PartitionScheme, num_sites: int, seed: int
) -> list[SiteData]:
    """Split ``data`` into ``num_sites`` virtual hospitals named ``site-000``…

    Parameters
    ----------
    data : SiteData
        The dataset to split (train, validation and test are all shared out).
    scheme : PartitionScheme
        Which partitioner and its settings.
    num_sites : int
        How many sites to make (at least 1).
    seed : int
        Seed of every random draw; the same seed gives the same partition.

    Returns
    -------
    list of SiteData
        One per site, in site order, with the same kind, task, classes and shape as ``data``;
        within a site, examples keep their original order.

    Raises
    ------
    InfeasiblePartitionError
        When some site would get fewer than ``scheme.min_per_site`` training examples.
    MissingGroupsError
        When ``scheme.kind == "natural"`` and a split has no ``groups``.
    """
    if num_sites < 1:
        raise PartitionError(f"num_sites = {num_sites}: ask for at least one site")
    n_train = len(data.train)
    need = num_sites * scheme.min_per_site
    if n_train < need:
        raise InfeasiblePartitionError(
            f"{num_sites} sites × min_per_site = {scheme.min_per_site} need {need} training "
            f"examples but '{data.name}' has {n_train}: use at most "
            f"{n_train // scheme.min_per_site} sites or lower min_per_site"
        )
    rng = np.random.default_rng(seed)
    assignment = PARTITIONERS.get(scheme.kind)(data, scheme, num_sites, rng)
    counts = np.bincount(assignment.train, minlength=num_sites)
    short = np.flatnonzero(counts < scheme.min_per_site)
    if short.size:  # only ``natural`` can get here: the others rebalance
        names = site_names(num_sites)
        raise InfeasiblePartitionError(
            f"{scheme.kind} partition of '{data.name}' into {num_sites} sites leaves "
            f"{short.size} site(s) (e.g. {names[short[0]]} with {counts[short[0]]}) below "
            f"min_per_site = {scheme.min_per_site} training examples; groups are never split, "
            "so use fewer sites, lower min_per_site, or another kind"
        )
    for split_name in ("val", "test"):
        split_sites = getattr(assignment, split_name)
        if len(split_sites):
            empty = num_sites - np.unique(split_sites).size
            if empty:
                logger.warning(
                    "%s partition: %d of %d sites get an empty %s split", scheme.kind, empty,
                    num_sites, split_name,
                )
    per_split = {
        name: _indices_per_site(getattr(assignment, name), num_sites)
        for name in ("train", "val", "test")
    }
    logger.info(
        "%s partition of '%s' into %d sites: train sizes %d to %d",
        scheme.kind, data.name, num_sites, counts.min(), counts.max(),
    )
    return [
        dataclasses.replace(
            data,
            name=name,
            train=data.train.subset(per_split["train"][i]),
            val=data.val.subset(per_split["val"][i]),
            test=data.test.subset(per_split["test"][i]),
        )
        for i, name in enumerate(site_names(num_sites))
    ]


def label_distribution(split: Split, num_classes: int) -> np.ndarray:
    """Return the class frequencies of ``split`` (zeros when it is empty)."""
    counts = np.bincount(split.targets.numpy().astype(np.int64), minlength=num_classes)
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)


def mean_label_tv(sites: list[SiteData]) -> float:
    """Return the mean total-variation distance of the sites' training labels to the pooled ones.

    0 means every site sees the pooled class mix; 1 means sites and pool share no class.
    Classification only.
    """
    if not sites:
        raise PartitionError("mean_label_tv needs at least one site")
    k = sites[0].num_classes
    if sites[0].task == "regression":
        raise PartitionError("mean_label_tv measures class skew; this is a regression task")
    pooled = np.zeros(k)
    dists = []
    for site in sites:
        counts = np.bincount(site.train.targets.numpy().astype(np.int64), minlength=k)
        pooled += counts
        dists.append(counts / max(counts.sum(), 1))
    pooled /= pooled.sum()
    return float(np.mean([0.5 * np.abs(d - pooled).sum() for d in dists]))


# --------------------------------------------------------------------------- helpers


def _indices_per_site(sites_of: np.ndarray, num_sites: int) -> list[np.ndarray]:
    """Return, for each site, the sorted example indices assigned to it."""
    order = np.argsort(sites_of, kind="stable")  # stable: indices ascend within a site
    bounds = np.cumsum(np.bincount(sites_of, minlength=num_sites))[:-1]
    return np.split(order.astype(np.int64), bounds)


def _apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """Return integer counts summing to ``total`` proportional to ``shares`` (largest remainder)."""
    shares = np.nan_to_num(np.asarray(shares, dtype=np.float64), nan=0.0)
    s = shares.sum()
    shares = shares / s if s > 0 else np.full(len(shares), 1.0 / len(shares))
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    left = total - int(counts.sum())
    if left > 0:
        counts[np.argsort(counts - exact, kind="stable")[:left]] += 1  # largest remainders first
    return counts


def _deal(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return a site per example: a random permutation of ``counts[s]`` copies of each site ``s``."""
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


def _dirichlet(alpha: float, size: int, rng: np.random.Generator, rows: int | None = None) -> np.ndarray:
    """Draw ``Dir(alpha·1)`` vectors of length ``size``, repairing the rare all-zero underflow."""
    shape = (size,) if rows is None else (rows, size)
    draws = np.atleast_2d(rng.dirichlet(np.full(size, alpha), size=rows or 1))
    bad = ~np.isfinite(draws).all(axis=1) | (draws.sum(axis=1) <= 0)
    if bad.any():  # tiny alpha can underflow every gamma draw: put all the mass on one site
        draws[bad] = 0.0
        draws[bad, rng.integers(0, size, size=int(bad.sum()))] = 1.0
    return draws.reshape(shape)


def _class_ids(data: SiteData) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Return an integer label per example of each split and the number of labels."""
    if data.task != "regression":
        ids = [s.targets.numpy().astype(np.int64) for s in (data.train, data.val, data.test)]
        k = max(data.num_classes, 1 + max((int(i.max()) for i in ids if i.size), default=0))
        return ids[0], ids[1], ids[2], k
    y_train = data.train.targets.numpy().astype(np.float64)
    edges = np.unique(np.quantile(y_train, np.linspace(0, 1, REGRESSION_BINS + 1)[1:-1]))
    ids = [np.searchsorted(edges, s.targets.numpy(), side="right") for s in (data.train, data.val, data.test)]
    return ids[0], ids[1], ids[2], len(edges) + 1


# --------------------------------------------------------------------------- partitioners


@PARTITIONERS.register("iid")
def _iid(data: SiteData, scheme: PartitionScheme, num_sites: int, rng: np.random.Generator) -> Assignment:
    """Shuffle each split and cut it into near-equal parts (sizes differ by at most one)."""
    equal = np.full(num_sites, 1.0)
    return Assignment(
        *(_deal(_apportion(len(s), equal), rng) for s in (data.train, data.val, data.test))
    )


@PARTITIONERS.register("quantity")
def _quantity(data: SiteData, scheme: PartitionScheme, num_sites: int, rng: np.random.Generator) -> Assignment:
    """Share each split by one draw ``q ~ Dir(alpha)``, after ``min_per_site`` training examples each."""
    q = _dirichlet(scheme.alpha, num_sites, rng)
    floor = np.full(num_sites, scheme.min_per_site, dtype=np.int64)
    train_counts = floor + _apportion(len(data.train) - int(floor.sum()), q)
    return Assignment(
        _deal(train_counts, rng),
        *(
            _rebalance(_deal(_apportion(len(s), q), rng), num_sites, _eval_min(s, scheme, num_sites), rng)
            for s in (data.val, data.test)
        ),
    )


@PARTITIONERS.register("dirichlet")
def _label_skew(data: SiteData, scheme: PartitionScheme, num_sites: int, rng: np.random.Generator) -> Assignment:
    """Share each class of each split by one draw ``p_k ~ Dir(alpha)`` per class, then rebalance."""
    *labels, k = _class_ids(data)
    mix = _dirichlet(scheme.alpha, num_sites, rng, rows=k)  # (classes, sites)
    out = []
    for y in labels:
        sites_of = np.empty(len(y), dtype=np.int64)
        for c in range(k):
            members = np.flatnonzero(y == c)
            if members.size:
                sites_of[members] = _deal(_apportion(members.size, mix[c]), rng)
        out.append(sites_of)
    out[0] = _rebalance(out[0], num_sites, scheme.min_per_site, rng)
    out[1] = _rebalance(out[1], num_sites, _eval_min(data.val, scheme, num_sites), rng)
    out[2] = _rebalance(out[2], num_sites, _eval_min(data.test, scheme, num_sites), rng)
    return Assignment(*out)


def _eval_min(split: Split, scheme: PartitionScheme, num_sites: int) -> int:
    """Return the validation / test minimum per site: ``min_eval_per_site`` if the split has enough."""
    return scheme.min_eval_per_site if len(split) >= num_sites * scheme.min_eval_per_site else 0


def _rebalance(sites_of: np.ndarray, num_sites: int, minimum: int, rng: np.random.Generator) -> np.ndarray:
    """Move examples from the largest sites to those below ``minimum`` (needs n ≥ sites × minimum).

    Within each site, examples are ranked in a random order; an example ranked ``r ≥ minimum`` can
    move. The ``deficit`` movable examples with the highest ranks move (ties at random), which
    takes from the largest site first and levels the donors from the top.
    """
    counts = np.bincount(sites_of, minlength=num_sites)
    deficit = np.maximum(minimum - counts, 0)
    need = int(deficit.sum())
    if need == 0:
        return sites_of
    n = len(sites_of)
    jitter = rng.permutation(n)
    order = np.lexsort((jitter, sites_of))  # by site, random within a site
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    movable = np.flatnonzero(rank >= minimum)
    take = movable[np.lexsort((jitter[movable], -rank[movable]))[:need]]
    result = sites_of.copy()
    result[take] = rng.permutation(np.repeat(np.arange(num_sites), deficit))
    logger.info("partition rebalanced: moved %d examples to %d short sites", need, int((deficit > 0).sum()))
    return result


@PARTITIONERS.register("natural")
def _natural(data: SiteData, scheme: PartitionScheme, num_sites: int, rng: np.random.Generator) -> Assignment:
    """Give each group (all its train, validation and test examples) to one site."""
    splits = (data.train, data.val, data.test)
    missing = [name for name, s in zip(("train", "val", "test"), splits) if s.groups is None and len(s)]
    if missing:
        raise MissingGroupsError(
            f"a natural partition needs Split.groups, but the {', '.join(missing)} split(s) of "
            f"'{data.name}' carry none: have the loader set groups, or use 'iid', 'dirichlet' "
            "or 'quantity'"
        )
    parts = [np.asarray(s.groups) if s.groups is not None else np.empty(0) for s in splits]
    keys, inverse = np.unique(np.concatenate(parts), return_inverse=True)
    inverse = inverse.reshape(-1)
    bounds = np.cumsum([len(p) for p in parts])[:-1]
    g_train, g_val, g_test = np.split(inverse, bounds)
    num_groups = len(keys)
    if scheme.assign == "each":
        if num_sites != num_groups:
            raise InfeasiblePartitionError(
                f"natural partition with assign='each' makes one site per group: '{data.name}' "
                f"has {num_groups} groups, not {num_sites}; set num_sites = {num_groups} or use "
                "assign='greedy'"
            )
        site_of_group = np.arange(num_groups)
    elif num_sites > num_groups:
        raise InfeasiblePartitionError(
            f"natural partition of '{data.name}' into {num_sites} sites: only {num_groups} groups "
            "and groups are never split; use at most that many sites or another kind"
        )
    elif scheme.assign == "round_robin":
        site_of_group = np.empty(num_groups, dtype=np.int64)
        site_of_group[rng.permutation(num_groups)] = np.arange(num_groups) % num_sites
    else:
        train_size = np.bincount(g_train, minlength=num_groups)
        eval_size = np.bincount(np.concatenate([g_val, g_test]), minlength=num_groups)
        site_of_group = _greedy(train_size, eval_size, num_sites, rng)
    return Assignment(site_of_group[g_train], site_of_group[g_val], site_of_group[g_test])


def _greedy(train_size: np.ndarray, eval_size: np.ndarray, num_sites: int, rng: np.random.Generator) -> np.ndarray:
    """Longest-processing-time: largest groups first, each to the site with the fewest examples.

    Groups with training examples are balanced on training examples (ties: validation + test
    examples); groups with none (validation / test only) are then balanced on validation + test.
    """
    jitter = rng.permutation(len(train_size))
    site_of_group = np.empty(len(train_size), dtype=np.int64)
    loads = [[0, 0, s] for s in range(num_sites)]  # [primary, secondary, site]
    for primary, secondary, chosen in ((train_size, eval_size, train_size > 0), (eval_size, train_size, train_size == 0)):
        groups = np.flatnonzero(chosen)
        groups = groups[np.lexsort((jitter[groups], -secondary[groups], -primary[groups]))]
        heap = [(p, q, s) for p, q, s in loads]
        heapq.heapify(heap)
        for g in groups.tolist():
            p, q, s = heapq.heappop(heap)
            site_of_group[g] = s
            heapq.heappush(heap, (p + int(primary[g]), q + int(secondary[g]), s))
        loads = [[q, p, s] for p, q, s in heap]  # swap roles for the next pass
    return site_of_group
