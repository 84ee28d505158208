"""Partitioners: exact IID sizes, real label / size skew, intact groups, minimum sizes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedcare.client.dataset import SiteData, Split
from fedcare.simulations.partition import (
    PARTITIONERS,
    InfeasiblePartitionError,
    MissingGroupsError,
    PartitionError,
    PartitionScheme,
    mean_label_tv,
    partition,
    site_names,
)

SPLITS = ("train", "val", "test")


def _split(n: int, offset: int, num_classes: int, rng: np.random.Generator, num_groups: int | None) -> Split:
    """A split whose first feature is a unique example id (offset + row); random group ids."""
    ids = np.arange(offset, offset + n)
    x = np.column_stack([ids, rng.normal(size=(n, 2))]).astype(np.float32)
    y = rng.integers(0, num_classes, size=n)
    groups = None if num_groups is None else rng.integers(0, num_groups, size=n)
    return Split(inputs=(torch.as_tensor(x),), targets=torch.as_tensor(y, dtype=torch.long), groups=groups)


def make_data(
    n_train: int = 1000,
    n_val: int = 200,
    n_test: int = 300,
    *,
    num_classes: int = 5,
    num_groups: int | None = None,
    seed: int = 0,
) -> SiteData:
    """A synthetic classification dataset; ``num_groups`` gives every split group ids 0…G-1."""
    rng = np.random.default_rng(seed)
    splits = {
        name: _split(n, offset, num_classes, rng, num_groups)
        for name, n, offset in (("train", n_train, 0), ("val", n_val, 10**6), ("test", n_test, 2 * 10**6))
    }
    return SiteData(
        name="pool", kind="table", task="multiclass", num_classes=num_classes, input_shape=(3,),
        feature_names=["id", "a", "b"], **splits,
    )


def ids(split: Split) -> np.ndarray:
    """Example ids of a split."""
    return split.inputs[0][:, 0].numpy().astype(np.int64)


def test_iid_sizes_are_exact_and_every_example_is_used_once() -> None:
    # Prepare
    data = make_data(1003, 205, 299)
    # Execute
    sites = partition(data, scheme=PartitionScheme(kind="iid"), num_sites=10, seed=1)
    # Assert
    assert [s.name for s in sites] == [f"site-{i:03d}" for i in range(10)]
    for name, total in zip(SPLITS, (1003, 205, 299)):
        sizes = sorted(len(getattr(s, name)) for s in sites)
        base = total // 10
        assert sizes == [base] * (10 - total % 10) + [base + 1] * (total % 10)
        assert np.array_equal(np.sort(np.concatenate([ids(getattr(s, name)) for s in sites])), np.sort(ids(getattr(data, name))))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "quantity", "natural"])
def test_every_kind_assigns_each_example_to_exactly_one_site(kind: str) -> None:
    # Prepare
    data = make_data(num_groups=40)
    # Execute
    sites = partition(data, scheme=PartitionScheme(kind=kind, alpha=0.3, min_per_site=5), num_sites=8, seed=3)
    # Assert
    for name in SPLITS:
        got = np.concatenate([ids(getattr(s, name)) for s in sites])
        assert np.array_equal(np.sort(got), np.sort(ids(getattr(data, name))))
        for s in sites:  # examples keep their original order within a site
            assert np.all(np.diff(ids(getattr(s, name))) > 0)
    assert all(len(s.train) >= 5 for s in sites)
    assert all((s.kind, s.task, s.num_classes, s.input_shape) == ("table", "multiclass", 5, (3,)) for s in sites)


def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha() -> None:
    # Prepare
    data = make_data(3000, 300, 600)
    # Execute
    tv = {
        alpha: np.mean([
            mean_label_tv(partition(data, scheme=PartitionScheme(kind="dirichlet", alpha=alpha), num_sites=10, seed=s))
            for s in range(3)
        ])
        for alpha in (0.1, 1.0, 100.0)
    }
    # Assert
    assert tv[0.1] > tv[1.0] > tv[100.0]
    assert tv[0.1] > 0.4  # sites see few classes
    assert tv[100.0] < 0.1  # close to the pooled mix


def test_dirichlet_test_split_follows_the_sites_training_labels() -> None:
    # Prepare
    data = make_data(4000, 400, 2000, num_classes=4)
    # Execute
    sites = partition(data, scheme=PartitionScheme(kind="dirichlet", alpha=0.2), num_sites=5, seed=0)
    # Assert: a site's test labels resemble its own training labels, not the pooled mix
    def dist(split: Split) -> np.ndarray:
        c = np.bincount(split.targets.numpy(), minlength=4)
        return c / max(c.sum(), 1)

    pooled = dist(data.train)
    own = np.mean([0.5 * np.abs(dist(s.test) - dist(s.train)).sum() for s in sites])
    to_pool = np.mean([0.5 * np.abs(dist(s.test) - pooled).sum() for s in sites])
    assert own < 0.15 < to_pool


def test_quantity_small_alpha_skews_sizes_more_than_large_alpha() -> None:
    # Prepare
    data = make_data(5000)

    def spread(alpha: float) -> float:
        sizes = [len(s.train) for s in partition(data, scheme=PartitionScheme(kind="quantity", alpha=alpha), num_sites=20, seed=2)]
        return float(np.std(sizes) / np.mean(sizes))

    # Execute
    skewed, even = spread(0.1), spread(100.0)
    # Assert
    assert skewed > 1.0 > 0.2 > even


@pytest.mark.parametrize("kind", ["dirichlet", "quantity"])
def test_skewed_kinds_still_give_every_site_min_per_site_and_an_eval_example(kind: str) -> None:
    # Prepare
    data = make_data(2000, 200, 300)
    scheme = PartitionScheme(kind=kind, alpha=0.01, min_per_site=15)
    # Execute
    sites = partition(data, scheme=scheme, num_sites=100, seed=4)
    # Assert
    assert min(len(s.train) for s in sites) >= 15
    assert min(len(s.val) for s in sites) >= 1
    assert min(len(s.test) for s in sites) >= 1


def test_rebalancing_is_exactly_tight_when_data_only_just_suffices() -> None:
    # Prepare: 500 examples, 100 sites × 5 = every example needed
    data = make_data(500, 100, 100)
    # Execute
    sites = partition(data, scheme=PartitionScheme(kind="dirichlet", alpha=0.05, min_per_site=5), num_sites=100, seed=0)
    # Assert
    assert [len(s.train) for s in sites] == [5] * 100


def test_thousand_sites() -> None:
    # Prepare
    data = make_data(20_000, 2_000, 3_000, num_groups=5_000)
    # Execute
    out = {
        kind: partition(data, scheme=PartitionScheme(kind=kind, alpha=0.1, min_per_site=10), num_sites=1000, seed=0)
        for kind in ("iid", "dirichlet", "quantity", "natural")
    }
    # Assert
    for kind, sites in out.items():
        assert len(sites) == 1000, kind
        assert sites[0].name == "site-000" and sites[-1].name == "site-999"
        assert sum(len(s.train) for s in sites) == 20_000
        assert min(len(s.train) for s in sites) >= 10, kind


def test_natural_partition_keeps_every_group_on_one_site() -> None:
    # Prepare
    data = make_data(1000, 200, 300, num_groups=30)
    for assign in ("greedy", "round_robin"):
        # Execute
        sites = partition(data, scheme=PartitionScheme(kind="natural", assign=assign), num_sites=7, seed=0)
        # Assert
        owner: dict[int, str] = {}
        for s in sites:
            for name in SPLITS:
                for g in np.unique(getattr(s, name).groups):
                    assert owner.setdefault(int(g), s.name) == s.name, f"group {g} split across sites ({assign})"
        assert len(owner) == 30


def test_natural_greedy_balances_training_sizes() -> None:
    # Prepare: 60 groups of very different sizes
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), rng.integers(1, 60, size=60))
    n = len(groups)
    split = Split(inputs=(torch.zeros(n, 3),), targets=torch.zeros(n, dtype=torch.long), groups=groups)
    empty = Split(inputs=(torch.zeros(0, 3),), targets=torch.zeros(0, dtype=torch.long), groups=np.zeros(0, dtype=int))
    data = SiteData(name="p", kind="table", task="binary", num_classes=2, input_shape=(3,), train=split, val=empty, test=empty)
    # Execute
    sites = partition(data, scheme=PartitionScheme(kind="natural", assign="greedy"), num_sites=6, seed=0)
    # Assert: longest-processing-time is within the largest group of perfect balance
    sizes = [len(s.train) for s in sites]
    assert max(sizes) - min(sizes) <= np.bincount(groups).max()
    assert sum(sizes) == n


def test_natural_each_gives_one_site_per_group() -> None:
    # Prepare
    data = make_data(300, 60, 60, num_groups=12)
    # Execute
    sites = partition(data, scheme=PartitionScheme(kind="natural", assign="each"), num_sites=12, seed=0)
    # Assert
    assert [len(np.unique(np.concatenate([getattr(s, n).groups for n in SPLITS]))) for s in sites] == [1] * 12
    with pytest.raises(InfeasiblePartitionError, match="12 groups"):
        partition(data, scheme=PartitionScheme(kind="natural", assign="each"), num_sites=5, seed=0)


def test_natural_errors_are_clear() -> None:
    # Prepare
    no_groups = make_data(100, 20, 20)
    few_groups = make_data(100, 20, 20, num_groups=3)
    # Execute / Assert
    with pytest.raises(MissingGroupsError, match="Split.groups"):
        partition(no_groups, scheme=PartitionScheme(kind="natural"), num_sites=2, seed=0)
    with pytest.raises(InfeasiblePartitionError, match="only 3 groups"):
        partition(few_groups, scheme=PartitionScheme(kind="natural"), num_sites=4, seed=0)
    with pytest.raises(InfeasiblePartitionError, match="groups are never split"):
        partition(few_groups, scheme=PartitionScheme(kind="natural", min_per_site=40), num_sites=2, seed=0)


def test_same_seed_same_partition_other_seed_other_partition() -> None:
    # Prepare
    data = make_data(num_groups=50)
    for kind in ("iid", "dirichlet", "quantity", "natural"):
        scheme = PartitionScheme(kind=kind, alpha=0.5)
        # Execute
        a, b, c = (partition(data, scheme=scheme, num_sites=6, seed=s) for s in (7, 7, 8))
        # Assert
        same = all(np.array_equal(ids(getattr(x, n)), ids(getattr(y, n))) for x, y in zip(a, b) for n in SPLITS)
        differ = any(not np.array_equal(ids(x.train), ids(y.train)) for x, y in zip(a, c))
        assert same and differ, kind


def test_too_many_sites_raises_with_what_to_do() -> None:
    # Prepare
    data = make_data(500, 50, 50)
    # Execute / Assert
    with pytest.raises(InfeasiblePartitionError, match="use at most 500 sites"):
        partition(data, scheme=PartitionScheme(kind="iid"), num_sites=1000, seed=0)
    with pytest.raises(InfeasiblePartitionError, match="use at most 50 sites"):
        partition(data, scheme=PartitionScheme(kind="dirichlet", min_per_site=10), num_sites=51, seed=0)
    with pytest.raises(PartitionError, match="at least one site"):
        partition(data, scheme=PartitionScheme(kind="iid"), num_sites=0, seed=0)


def test_scheme_is_frozen_and_refuses_unknown_kinds_and_fields() -> None:
    # Execute / Assert
    with pytest.raises(ValidationError, match="known partition kinds: dirichlet, iid, natural, quantity"):
        PartitionScheme(kind="by-postcode")
    with pytest.raises(ValidationError):
        PartitionScheme(kind="iid", beta=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        PartitionScheme(kind="dirichlet", alpha=0.0)
    with pytest.raises(ValidationError):
        PartitionScheme(kind="iid").alpha = 2.0  # type: ignore[misc]
    assert PARTITIONERS.names() == ["dirichlet", "iid", "natural", "quantity"]


def test_regression_targets_are_binned_for_label_skew() -> None:
    # Prepare
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        return Split(inputs=(torch.as_tensor(rng.normal(size=(n, 2)), dtype=torch.float32),),
                     targets=torch.as_tensor(rng.normal(size=n), dtype=torch.float32))

    data = SiteData(name="r", kind="table", task="regression", num_classes=1, input_shape=(2,),
                    train=split(2000), val=split(200), test=split(200))
    # Execute
    sites = partition(data, scheme=PartitionScheme(kind="dirichlet", alpha=0.05, min_per_site=20), num_sites=5, seed=0)
    # Assert: sites cover different ranges of the target
    means = sorted(float(s.train.targets.mean()) for s in sites)
    assert sum(len(s.train) for s in sites) == 2000 and min(len(s.train) for s in sites) >= 20
    assert means[-1] - means[0] > 0.5


def test_site_names_widen_beyond_a_thousand() -> None:
    # Execute / Assert
    assert site_names(3) == ["site-000", "site-001", "site-002"]
    assert site_names(1001)[-1] == "site-1000" and site_names(1001)[0] == "site-0000"


def test_a_scenario_partition_table_maps_onto_the_scheme() -> None:
    # Prepare: the runner builds hospitals with PartitionSpec.scheme() and partition()
    from fedcare.simulations.scenario import PartitionSpec

    spec = PartitionSpec(hospitals=4, kind="quantity", alpha=0.5, min_per_site=20)
    # Execute
    sites = partition(make_data(400, 40, 40), scheme=spec.scheme(), num_sites=spec.hospitals, seed=0)
    # Assert
    assert len(sites) == 4 and min(len(s.train) for s in sites) >= 20
