"""benchmarks/utility.py: every (data set, arm) scenario is valid and its sites would accept it.

The benchmark itself is not a test (no timings, hours of CPU); this checks, without data or Ray,
that each arm it builds is the scenario it claims: the same model, rounds and training settings
as the data set's reference scenario, FedProx / DP where the arm says so, and virtual hospitals
whose policy accepts the arm (DP still required in the DP arms, plain rounds allowed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from benchmark_scripts import import_benchmark  # noqa: E402

from fedcare.simulations.runner import _refuse_plain_rounds_the_sites_refuse, _site_policy  # noqa: E402

UTILITY = import_benchmark("utility")
CASES = [(d, a) for d in sorted(UTILITY.DATASETS) for a in UTILITY.ARMS
         if not UTILITY.DATASETS[d].dp_recipe or a in UTILITY.DP_EPSILON]


@pytest.mark.parametrize(("dataset", "arm"), CASES, ids=[f"{d}-{a}" for d, a in CASES])
def test_each_arm_is_the_reference_scenario_with_one_change(dataset: str, arm: str) -> None:
    # Prepare
    data = UTILITY.DATASETS[dataset]
    reference = UTILITY.scenario_for(data, 3, "reference", mu=0.01)

    # Execute
    scenario = UTILITY.scenario_for(data, 3, arm, mu=0.01)
    policy = _site_policy(scenario)

    # Assert: same model, rounds, training and seed in every arm
    assert (scenario.model, scenario.rounds, scenario.training, scenario.seed) == (
        reference.model, reference.rounds, reference.training, 3)
    assert scenario.name.endswith(f"-{arm}-s3")
    _refuse_plain_rounds_the_sites_refuse(scenario)  # raises if every site would refuse
    assert not policy.require_secure_aggregation
    if arm == "reference":
        assert scenario.baselines == ["pooled", "local"] and not scenario.privacy.enabled
    elif data.dp_recipe:  # the recipe as written, at the arm's ε
        assert scenario.baselines == [] and reference.privacy.enabled
        assert scenario.privacy.max_grad_norm == reference.privacy.max_grad_norm
    else:
        assert scenario.baselines == []
    if arm == "fedprox":
        assert scenario.strategy.name == "fedprox" and scenario.strategy.params == {"proximal-mu": 0.01}
    else:
        assert scenario.strategy.name == "fedavg"
    if arm in UTILITY.DP_EPSILON:
        eps = UTILITY.DP_EPSILON[arm]
        assert scenario.privacy.enabled and scenario.privacy.target_epsilon == eps
        assert scenario.privacy.delta == UTILITY.DELTA
        assert policy.require_dp  # the node default: DP arms do not weaken it
        assert policy.max_epsilon_per_study >= eps and policy.max_epsilon_total >= eps
        assert policy.max_delta >= UTILITY.DELTA


def test_rounds_override_changes_the_rounds_only() -> None:
    # Prepare
    data = UTILITY.DATASETS["physionet"]
    reference = UTILITY.scenario_for(data, 1, "dp8", mu=0.01)
    # Execute
    longer = UTILITY.scenario_for(data, 1, "dp8", mu=0.01, rounds=20)
    # Assert
    assert reference.rounds == 10 and longer.rounds == 20
    assert longer.model_copy(update={"rounds": 10}) == reference


def test_paired_gap_pairs_by_seed_and_skips_unpaired() -> None:
    # Prepare: seeds 0 and 2 in both, seed 1 only in the model
    model = {0: {"auroc": 0.80}, 1: {"auroc": 0.90}, 2: {"auroc": 0.70}}
    pooled = {2: {"auroc": 0.75}, 0: {"auroc": 0.85}}

    # Execute
    gaps = UTILITY.paired_gap(model, pooled, "auroc")

    # Assert
    assert gaps == pytest.approx([-0.05, -0.05])
