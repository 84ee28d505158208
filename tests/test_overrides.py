"""``--set KEY=VALUE`` (simulations/overrides.py): one scenario value overridden, validated as the file is."""

from __future__ import annotations

import pytest

from fedcare.simulations.overrides import apply_overrides, parse_assignment
from fedcare.simulations.scenario import DEFAULT_SCENARIO, InvalidScenarioError, load_scenario


def test_values_are_read_as_toml_or_as_plain_text() -> None:
    assert parse_assignment("training.lr=0.05") == (["training", "lr"], 0.05)
    assert parse_assignment("baselines=['pooled', 'local']") == (["baselines"], ["pooled", "local"])
    assert parse_assignment("strategy.name=fedprox") == (["strategy", "name"], "fedprox")
    assert parse_assignment("secure_aggregation.enabled=false") == (["secure_aggregation", "enabled"], False)


def test_overrides_change_only_their_keys_and_keep_the_rest_as_given() -> None:
    # Prepare
    scenario = load_scenario(DEFAULT_SCENARIO)

    # Execute
    changed = apply_overrides(scenario, ["training.lr=0.05", "rounds=2", "strategy.name=fedprox",
                                         "strategy.proximal-mu=0.1", "policy.max_epsilon_per_study=2.5"])  # fmt: skip

    # Assert: the frozen original is untouched; a [policy] key set here counts as given, the others stay unset
    assert (changed.training.lr, changed.rounds, changed.strategy.params) == (0.05, 2, {"proximal-mu": 0.1})
    assert changed.policy is not None and changed.policy.model_fields_set == {"max_epsilon_per_study"}
    assert changed.model_dump(exclude={"training", "rounds", "strategy", "policy"}) == scenario.model_dump(
        exclude={"training", "rounds", "strategy", "policy"}
    )
    assert scenario.training.lr != 0.05 and scenario.policy is None


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("training.lrr=1", r"training\.lrr: unknown key \(not a scenario setting\)"),
        ("trainin.lr=1", r"unknown scenario key 'trainin'; keys here: .*training"),
        ("training.lr=-1", r"training\.lr: Input should be greater than 0"),
        ("rounds.x=1", r"'rounds' is a value, not a table; set rounds=VALUE"),
        ("training.lr", r"is not KEY=VALUE; write e\.g\. --set training\.lr=0\.1"),
        ("strategy.proximal-mu=0.1", r"proximal-mu applies to strategy 'fedprox' only"),
    ],
)
def test_unknown_keys_and_refused_values_name_the_key(assignment: str, message: str) -> None:
    scenario = load_scenario(DEFAULT_SCENARIO)

    with pytest.raises(InvalidScenarioError, match=message):
        apply_overrides(scenario, [assignment])
