"""Pooled and local-only baselines on real data (WDBC, split into three hospitals by hand)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from fedcare.client.dataset import SiteData, Split
from fedcare.client.training import TrainSettings
from fedcare.models import ModelSpec
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.settings import PrivacySettings
from fedcare.simulations import baselines
from fedcare.simulations.baselines import (
    BaselineResult,
    IncompatibleSitesError,
    local_baselines,
    pool_sites,
    pooled_baseline,
    run_baselines,
    weighted_mean,
)

TARGET_EPSILON = 3.0
DELTA = 1e-5
ROUNDS = 2
TRAIN = TrainSettings(local_epochs=1, batch_size=32, lr=0.5, device="cpu")
PRIVACY = PrivacySettings.with_target(epsilon=TARGET_EPSILON, delta=DELTA)
SPEC = ModelSpec(family="logistic")


def make_sites() -> list[SiteData]:
    """WDBC standardised and dealt to three hospitals; ``site-c`` has no test split (val only)."""
    bunch = load_breast_cancer()
    x = (bunch.data - bunch.data.mean(0)) / bunch.data.std(0)
    y = 1 - bunch.target  # 1 = malignant
    order = np.random.default_rng(0).permutation(len(y))
    sites = []
    for name, part, (f_train, f_val) in zip(
        ("site-a", "site-b", "site-c"), np.array_split(order, 3), ((0.7, 0.1), (0.7, 0.1), (0.7, 0.3))
    ):
        n = len(part)
        cut1, cut2 = int(f_train * n), int((f_train + f_val) * n)

        def split(idx: np.ndarray) -> Split:
            return Split(
                inputs=(torch.as_tensor(x[idx], dtype=torch.float32),),
                targets=torch.as_tensor(y[idx], dtype=torch.long),
                groups=idx.astype(np.int64),
            )

        sites.append(
            SiteData(
                name=name, kind="table", task="binary", num_classes=2, input_shape=(x.shape[1],),
                train=split(part[:cut1]), val=split(part[cut1:cut2]), test=split(part[cut2:]),
            )
        )
    return sites


@pytest.fixture(scope="module")
def arms() -> Iterator[dict[str, Any]]:
    """Train both arms once, recording every ledger they open (real ones refused)."""
    sites = make_sites()
    opened: list[tuple[str, str]] = []
    real_in_memory = PrivacyLedger.in_memory

    def spy(**kwargs: Any) -> PrivacyLedger:
        opened.append((kwargs["site"], kwargs["study"]))
        return real_in_memory(**kwargs)

    def refuse(*args: Any, **kwargs: Any) -> PrivacyLedger:
        raise AssertionError("a baseline opened a site ledger on disk")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PrivacyLedger, "in_memory", staticmethod(spy))
        mp.setattr(PrivacyLedger, "open", staticmethod(refuse))
        kwargs = {"spec": SPEC, "train": TRAIN, "privacy": PRIVACY, "rounds": ROUNDS, "seed": 0}
        pooled = pooled_baseline(sites, **kwargs)
        local = local_baselines(sites, **kwargs)
    yield {"sites": sites, "pooled": pooled, "local": local, "opened": opened}


@pytest.mark.slow
def test_pooled_baseline_reports_per_site_weighted_and_pooled_test_metrics(arms: dict[str, Any]) -> None:
    # Prepare
    sites, result = arms["sites"], arms["pooled"]
    # Assert
    assert isinstance(result, BaselineResult) and result.arm == "pooled"
    assert result.num_examples == {"site-a": len(sites[0].test), "site-b": len(sites[1].test), "site-c": len(sites[2].val)}
    assert set(result.sites) == {"site-a", "site-b", "site-c"}
    for metric in ("auroc", "accuracy", "loss"):
        expected = sum(result.sites[s][metric] * n for s, n in result.num_examples.items()) / sum(result.num_examples.values())
        assert result.site_weighted_mean[metric] == pytest.approx(expected, rel=1e-12)
    assert result.metrics["loss"] == pytest.approx(result.site_weighted_mean["loss"], rel=1e-9)  # a mean: both agree
    assert result.intervals["auroc"][0] <= result.metrics["auroc"] <= result.intervals["auroc"][1]
    assert set(result.pooled_test) >= {"auroc", "accuracy", "loss"}
    assert result.pooled_test["auroc"] > 0.9  # DP logistic regression still separates WDBC well
    assert result.epochs == ROUNDS * TRAIN.local_epochs
    assert result.num_train == sum(len(s.train) for s in sites)


@pytest.mark.slow
def test_every_arm_spends_the_same_privacy_target(arms: dict[str, Any]) -> None:
    # Prepare
    pooled, local = arms["pooled"], arms["local"]
    # Assert: noise calibrated to reach the target after all rounds, never beyond it
    assert TARGET_EPSILON * 0.9 < pooled.epsilon <= TARGET_EPSILON + 1e-9
    assert set(local.site_epsilon) == {"site-a", "site-b", "site-c"}
    for eps in local.site_epsilon.values():
        assert TARGET_EPSILON * 0.9 < eps <= TARGET_EPSILON + 1e-9
    assert local.epsilon == max(local.site_epsilon.values())
    assert pooled.delta == local.delta == DELTA


@pytest.mark.slow
def test_local_baselines_evaluate_each_model_on_its_site_and_on_the_pooled_test(arms: dict[str, Any]) -> None:
    # Prepare
    local = arms["local"]
    pooled_test_size = sum(len(s.test) for s in arms["sites"])
    # Assert
    assert local.arm == "local"
    assert set(local.site_pooled_test) == {"site-a", "site-b", "site-c"}
    weights = local.num_examples
    for metric in ("auroc", "loss"):
        expected = sum(local.site_pooled_test[s][metric] * weights[s] for s in weights) / sum(weights.values())
        assert local.pooled_test[metric] == pytest.approx(expected, rel=1e-12)
        expected = sum(local.sites[s][metric] * weights[s] for s in weights) / sum(weights.values())
        assert local.site_weighted_mean[metric] == pytest.approx(expected, rel=1e-12)
    assert pooled_test_size == len(pool_sites(arms["sites"]).test)
    assert local.metrics["auroc"] > 0.8


@pytest.mark.slow
def test_baselines_use_fresh_in_memory_ledgers_only(arms: dict[str, Any]) -> None:
    # Assert (PrivacyLedger.open raised if called)
    assert arms["opened"] == [
        ("pooled", "baseline-pooled"),
        ("site-a", "baseline-local"),
        ("site-b", "baseline-local"),
        ("site-c", "baseline-local"),
    ]


@pytest.mark.slow
def test_summary_keeps_metrics_at_the_top_and_nests_the_rest(arms: dict[str, Any]) -> None:
    # Execute
    summary = arms["pooled"].to_summary()
    # Assert
    numbers = {k for k, v in summary.items() if isinstance(v, float)}
    assert numbers == set(arms["pooled"].metrics)
    assert summary["privacy"]["epsilon"] == arms["pooled"].epsilon
    assert summary["sites"] == arms["pooled"].sites


def test_pool_sites_concatenates_every_split_and_prefixes_groups() -> None:
    # Prepare
    sites = make_sites()
    # Execute
    pooled = pool_sites(sites)
    # Assert
    assert pooled.name == "pooled"
    for split in ("train", "val", "test"):
        assert len(getattr(pooled, split)) == sum(len(getattr(s, split)) for s in sites)
    assert pooled.train.groups[0] == f"site-a:{sites[0].train.groups[0]}"
    assert torch.equal(pooled.train.inputs[0][: len(sites[0].train)], sites[0].train.inputs[0])


def test_incompatible_or_missing_sites_are_refused() -> None:
    # Prepare
    sites = make_sites()
    other = SiteData(
        name="x", kind="table", task="multiclass", num_classes=3, input_shape=(30,),
        train=sites[0].train, val=sites[0].val, test=sites[0].test,
    )
    # Execute / Assert
    with pytest.raises(IncompatibleSitesError, match="site-a and x hold different data"):
        pool_sites([sites[0], other])
    with pytest.raises(IncompatibleSitesError, match="no sites"):
        pooled_baseline([], spec=SPEC, train=TRAIN, privacy=PRIVACY, rounds=1, seed=0)


def test_weighted_mean_skips_nan_and_weights_by_examples() -> None:
    # Execute
    out = weighted_mean(
        {"a": {"auroc": 0.5, "loss": 1.0}, "b": {"auroc": math.nan, "loss": 4.0}, "c": {"auroc": 1.0}},
        {"a": 1, "b": 2, "c": 3},
    )
    # Assert
    assert out == {"auroc": pytest.approx((0.5 * 1 + 1.0 * 3) / 4), "loss": pytest.approx((1.0 + 8.0) / 3)}
    assert math.isnan(weighted_mean({"a": {"auroc": math.nan}}, {"a": 5})["auroc"])


@pytest.mark.slow
def test_local_baselines_without_dp_report_unbounded_epsilon() -> None:
    # Prepare
    sites = make_sites()[:2]
    # Execute
    with pytest.warns(UserWarning, match="DISABLED"):
        result = local_baselines(sites, spec=SPEC, train=TRAIN, privacy=PrivacySettings.disabled(), rounds=1, seed=0)
    # Assert
    assert result.epsilon == math.inf and all(e == math.inf for e in result.site_epsilon.values())
    assert result.metrics["auroc"] > 0.9


@pytest.mark.slow
def test_run_baselines_follows_a_scenario() -> None:
    # Prepare
    scenario_mod = pytest.importorskip("fedcare.simulations.scenario")
    scenario = scenario_mod.Scenario(
        name="bc", rounds=1, data={"kind": "sklearn"}, privacy=PRIVACY, baselines=["pooled"],
        training={"local_epochs": 1, "batch_size": 32, "lr": 0.5},
    )
    sites = make_sites()
    # Execute
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baselines(scenario, sites, which=["pooled", "oracle"])
    out = run_baselines(scenario, sites, which=["pooled"])
    # Assert
    assert set(out) == {"pooled"}
    assert out["pooled"]["auroc"] > 0.9
    assert out["pooled"]["training"]["epochs"] == 1
    assert 0 < out["pooled"]["privacy"]["epsilon"] <= TARGET_EPSILON + 1e-9


def test_rounds_must_be_positive() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="at least one round"):
        baselines.pooled_baseline(make_sites(), spec=SPEC, train=TRAIN, privacy=PRIVACY, rounds=0, seed=0)
