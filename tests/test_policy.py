"""Site privacy policy: strict default, file loading, and one refusal per rule (fail closed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedcare.privacy.policy import (
    PolicyFileError,
    PolicyViolation,
    RoundRequest,
    Rule,
    SitePolicy,
    check_round,
    load_policy,
)

APP = "ab" * 32


def _request(**changes: Any) -> RoundRequest:
    """A round the strict default accepts, with ``changes`` applied."""
    values: dict[str, Any] = {
        "study": "heart-disease",
        "model_family": "logistic",
        "dp_enabled": True,
        "target_epsilon": 2.0,
        "noise_multiplier": 1.1,
        "delta": 1e-5,
        "max_grad_norm": 1.0,
        "secure_aggregation": True,
        "app_hash": APP,
        "cohort_size": 200,
        "epsilon_spent_study": 0.5,
        "epsilon_spent_total": 1.5,
    }
    values.update(changes)
    return RoundRequest(**values)


def test_no_file_gives_the_strict_default() -> None:
    # Execute
    policy = load_policy(None)

    # Assert
    assert policy == SitePolicy.strict_default()
    assert (policy.max_epsilon_per_study, policy.max_epsilon_total, policy.max_delta) == (3.0, 6.0, 1e-5)
    assert policy.require_dp and policy.require_secure_aggregation
    assert policy.min_cohort_size == 20 and policy.allowed_app_hashes is None


def test_strict_default_accepts_a_conforming_round() -> None:
    check_round(SitePolicy.strict_default(), _request())  # does not raise


@pytest.mark.parametrize(
    ("changes", "rule", "in_message"),
    [
        ({"model_family": "transformer"}, Rule.MODEL_FAMILY, "'transformer' is not allowed"),
        ({"secure_aggregation": False}, Rule.SECURE_AGGREGATION, "must enable SecAgg+"),
        ({"cohort_size": 19}, Rule.COHORT_SIZE, "19 patients is below the minimum 20"),
        ({"dp_enabled": False}, Rule.DP_REQUIRED, "must enable privacy"),
        ({"delta": 1e-4}, Rule.DELTA, "δ = 0.0001 exceeds the site's ceiling 1e-05"),
        ({"delta": None}, Rule.DELTA, "does not state δ"),
        ({"noise_multiplier": 0.3}, Rule.NOISE_MULTIPLIER, "0.3 is below the site's minimum 0.5"),
        ({"noise_multiplier": None}, Rule.NOISE_MULTIPLIER, "unknown"),
        ({"max_grad_norm": 5.0}, Rule.MAX_GRAD_NORM, "5 exceeds the site's maximum 2"),
        ({"max_grad_norm": None}, Rule.MAX_GRAD_NORM, "clipping norm"),
        ({"target_epsilon": None}, Rule.EPSILON_UNBOUNDED, "unbounded"),
        ({"target_epsilon": 4.0}, Rule.EPSILON_STUDY, "ε = 4 (spent 0.5), above the site's per-study maximum 3"),
        ({"target_epsilon": None, "epsilon_after_round": 3.2}, Rule.EPSILON_STUDY, "per-study maximum 3"),
        ({"epsilon_spent_total": 5.0}, Rule.EPSILON_TOTAL, "would reach 6.5 (spent 5), above its maximum 6"),
    ],
)
def test_each_violation_is_refused_naming_rule_value_and_limit(changes: dict[str, Any], rule: Rule, in_message: str) -> None:
    # Prepare
    request = _request(**changes)

    # Execute
    with pytest.raises(PolicyViolation) as info:
        check_round(SitePolicy.strict_default(), request)

    # Assert
    assert info.value.rule == rule
    assert f"[{rule.value}]" in str(info.value)
    assert in_message in str(info.value)


def test_pinned_app_hash_refuses_other_and_missing_hashes() -> None:
    # Prepare
    policy = SitePolicy(allowed_app_hashes=["cd" * 32])

    # Execute / Assert
    for app_hash in (APP, None):
        with pytest.raises(PolicyViolation) as info:
            check_round(policy, _request(app_hash=app_hash))
        assert info.value.rule == "app_hash"
        assert "the coordinator must run the app the hospital approved" in str(info.value)
    check_round(policy, _request(app_hash="cd" * 32))


def test_accountant_projection_is_checked_against_the_remaining_total() -> None:
    # Prepare: target 2 would fit, but the node's accountant projects 2.9 after this round
    policy = SitePolicy(max_epsilon_per_study=3.0, max_epsilon_total=4.0)

    # Execute / Assert: total after the round = spent total - spent study + projection
    # = 1.5 - 0.5 + 2.9 = 3.9 fits under 4.0; with 1.7 spent in total it is 4.1 and does not
    check_round(policy, _request(epsilon_after_round=2.9))
    with pytest.raises(PolicyViolation) as info:
        check_round(policy, _request(epsilon_after_round=2.9, epsilon_spent_total=1.7))
    assert info.value.rule == "epsilon_total"
    assert info.value.asked == pytest.approx(4.1)
    assert info.value.limit == 4.0


def test_round_without_dp_is_accepted_only_by_a_policy_that_allows_it_and_warns(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "policy.toml"
    path.write_text("require_dp = false\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="require_dp = false"):
        policy = load_policy(path)

    # Execute / Assert
    with pytest.warns(UserWarning, match="WITHOUT differential privacy"):
        check_round(policy, _request(dp_enabled=False, target_epsilon=None, noise_multiplier=None))


def test_malformed_request_values_are_a_policy_violation() -> None:
    # Execute
    with pytest.raises(PolicyViolation) as info:
        RoundRequest.from_values({"study": "s", "model_family": "cnn", "dp_enabled": True, "secure_aggregation": True,
                                  "cohort_size": -1, "epsilon_spent_study": 0.0, "epsilon_spent_total": 0.0,
                                  "delta": float("nan")})  # fmt: skip

    # Assert
    assert info.value.rule == "malformed_request"
    assert "cohort_size" in str(info.value) and "delta" in str(info.value)


def test_inconsistent_ledger_values_are_refused() -> None:
    with pytest.raises(PolicyViolation, match="epsilon_spent_study .* exceeds epsilon_spent_total"):
        RoundRequest.from_values(_request().model_dump() | {"epsilon_spent_study": 2.0, "epsilon_spent_total": 1.0})


def test_policy_file_loads_and_warns_on_weaker_settings(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "policy.toml"
    path.write_text(
        'max_epsilon_per_study = 5.0\nmax_epsilon_total = 8.0\nrequire_secure_aggregation = false\n'
        f'allowed_model_families = ["logistic"]\nallowed_app_hashes = ["{APP}"]\n',
        encoding="utf-8",
    )

    # Execute
    with pytest.warns(UserWarning) as caught:
        policy = load_policy(path)

    # Assert
    assert policy.max_epsilon_per_study == 5.0 and policy.allowed_model_families == ("logistic",)
    assert policy.max_delta == 1e-5  # a key not given keeps the strict default
    messages = " ".join(str(w.message) for w in caught)
    assert "require_secure_aggregation = false" in messages and "max_epsilon_per_study = 5.0" in messages


@pytest.mark.parametrize(
    ("content", "in_message"),
    [
        ("max_epsilon = 3\n", "max_epsilon: Extra inputs are not permitted"),
        ("max_delta = 2.0\n", "max_delta"),
        ("max_epsilon_per_study = 9.0\n", "exceeds max_epsilon_total"),
        ("allowed_app_hashes = ['not-a-hash']\n", "allowed_app_hashes"),
        ("max_epsilon_per_study = nan\n", "max_epsilon_per_study"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_invalid_policy_files_are_refused(tmp_path: Path, content: str, in_message: str) -> None:
    # Prepare
    path = tmp_path / "policy.toml"
    path.write_text(content, encoding="utf-8")

    # Execute / Assert
    with pytest.raises(PolicyFileError, match="policy.toml") as info:
        load_policy(path)
    assert in_message in str(info.value)


def test_missing_policy_file_is_refused_not_defaulted(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="not found"):
        load_policy(tmp_path / "absent.toml")
