"""PrivacySettings: validation, defaults, the accountant registry, and loud warnings on weak settings."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
from pydantic import ValidationError

from opacus.layers import DPLSTM
from torch import nn

from fedcare.models import build_model
from fedcare.privacy.engine import resolve_grad_sample_mode
from fedcare.privacy.fast_grad import supports_fast_grad
from fedcare.privacy.errors import PrivacyWarning
from fedcare.privacy.settings import DEFAULT_TARGET_EPSILON, PrivacySettings, known_accountants


def test_defaults_train_under_dp_with_the_site_default_target() -> None:
    # Prepare / Execute
    s = PrivacySettings()
    # Assert
    assert s.enabled is True
    assert s.target_epsilon == DEFAULT_TARGET_EPSILON == 3.0
    assert s.noise_multiplier is None
    assert s.delta == 1e-5
    assert s.max_grad_norm == 1.0
    assert s.accountant == "rdp"
    assert s.budget == 3.0
    assert s.grad_sample_mode == "auto"


def test_policy_dict_as_a_scenario_or_policy_file_gives_it() -> None:
    s = PrivacySettings.model_validate(
        {"enabled": True, "target_epsilon": 2.5, "delta": 1e-6, "max_grad_norm": 0.5, "accountant": "prv"}
    )
    assert (s.target_epsilon, s.delta, s.max_grad_norm, s.accountant, s.budget) == (2.5, 1e-6, 0.5, "prv", 2.5)


def test_both_epsilon_and_noise_is_refused() -> None:
    with pytest.raises(ValidationError, match="exactly one of target_epsilon"):
        PrivacySettings(target_epsilon=3.0, noise_multiplier=1.0, epsilon_budget=3.0)


def test_explicit_none_for_both_is_refused() -> None:
    with pytest.raises(ValidationError, match="exactly one of target_epsilon"):
        PrivacySettings(target_epsilon=None, noise_multiplier=None)


def test_fixed_noise_needs_a_budget() -> None:
    with pytest.raises(ValidationError, match="needs epsilon_budget"):
        PrivacySettings(noise_multiplier=1.0)
    s = PrivacySettings(noise_multiplier=1.0, epsilon_budget=4.0)
    assert s.target_epsilon is None and s.budget == 4.0


def test_budget_below_target_is_refused() -> None:
    with pytest.raises(ValidationError, match="below target_epsilon"):
        PrivacySettings(target_epsilon=3.0, epsilon_budget=2.0)
    assert PrivacySettings(target_epsilon=3.0, epsilon_budget=5.0).budget == 5.0


def test_unknown_accountant_lists_opacus_registry() -> None:
    with pytest.raises(ValidationError) as err:
        PrivacySettings(accountant="moments")
    message = str(err.value)
    assert "unknown accountant 'moments'" in message
    for name in known_accountants():
        assert name in message
    assert {"rdp", "prv", "gdp"} <= set(known_accountants())


def test_gdp_is_known_to_opacus_but_refused() -> None:
    with pytest.raises(ValidationError, match="approximation"):
        PrivacySettings(accountant="gdp")


@pytest.mark.parametrize(
    "bad",
    [
        {"target_epsilon": 0.0},
        {"target_epsilon": -1.0},
        {"delta": 0.0},
        {"delta": 1.0},
        {"max_grad_norm": 0.0},
        {"target_epsilon": math.inf},
        {"target_epsilon": math.nan},
        {"grad_sample_mode": "vmap"},
        {"grad_sample_mode": "ghost_fsdp"},
        {"secure_mode": True},
        {"unknown_field": 1},
    ],
)
def test_invalid_values_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        PrivacySettings(**bad)


def test_settings_are_frozen() -> None:
    s = PrivacySettings()
    with pytest.raises(ValidationError):
        s.target_epsilon = 100.0  # type: ignore[misc]


def test_helpers_are_keyword_only_and_build_what_they_say() -> None:
    with pytest.raises(TypeError):
        PrivacySettings.with_target(3.0)  # type: ignore[misc]
    t = PrivacySettings.with_target(epsilon=1.5, delta=1e-6, grad_sample_mode="ghost")
    n = PrivacySettings.with_noise(noise_multiplier=1.2, epsilon_budget=4.0, accountant="prv")
    d = PrivacySettings.disabled()
    assert (t.target_epsilon, t.noise_multiplier, t.delta, t.grad_sample_mode) == (1.5, None, 1e-6, "ghost")
    assert (n.noise_multiplier, n.budget, n.accountant) == (1.2, 4.0, "prv")
    assert d.enabled is False and d.budget == math.inf


@pytest.mark.parametrize(
    ("family", "kwargs", "expected"),
    [
        ("cnn", {"in_channels": 1, "num_classes": 2, "image_size": 28}, "ew"),
        ("cnn", {"in_channels": 3, "num_classes": 5, "image_size": 224, "width": 4}, "ew"),
        ("lstm", {"input_size": 36, "num_classes": 2, "hidden_size": 32, "use_mask": True}, "fast"),
        ("lstm", {"input_size": 3, "num_classes": 4, "num_layers": 2, "bidirectional": True}, "fast"),
        ("logistic", {"in_features": 13}, "fast"),
        ("logistic", {"in_features": 13, "num_classes": 3}, "fast"),
        ("linear", {"in_features": 10}, "fast"),
    ],
)
def test_auto_grad_sample_mode_is_the_measured_fastest_per_family(family: str, kwargs: dict, expected: str) -> None:
    # Prepare
    model = build_model(family, **kwargs)
    # Execute / Assert
    assert resolve_grad_sample_mode("auto", module=model) == expected
    assert PrivacySettings().grad_sample_mode == "auto"


def test_auto_falls_back_to_opacus_without_a_fast_path() -> None:
    # an LSTM layout the fused path does not reproduce (2 layers with dropout): hooks, not ew
    lstm = build_model("lstm", input_size=3, num_classes=2, hidden_size=4)
    lstm.forward_lstm = DPLSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True)
    assert not supports_fast_grad(lstm)
    assert resolve_grad_sample_mode("auto", module=lstm) == "hooks"
    # only ExpandedWeights layers: ew; a layer ExpandedWeights does not know (PReLU): hooks
    assert resolve_grad_sample_mode("auto", module=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))) == "ew"
    assert resolve_grad_sample_mode("auto", module=nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 1))) == "hooks"


def test_explicit_grad_sample_modes_pass_through_and_unknown_ones_are_refused() -> None:
    for mode in ("hooks", "ew", "ghost", "functorch", "fast"):
        assert resolve_grad_sample_mode(mode) == mode
        assert PrivacySettings(grad_sample_mode=mode).grad_sample_mode == mode
    with pytest.raises(ValueError, match="unknown grad_sample_mode 'vmap'; known: auto, hooks, ew"):
        resolve_grad_sample_mode("vmap")
    with pytest.raises(ValueError, match="depends on the model: pass module="):
        resolve_grad_sample_mode("auto")


def test_strong_settings_do_not_warn() -> None:
    s = PrivacySettings(target_epsilon=3.0, delta=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyWarning)  # any PrivacyWarning fails the test
        assert s.warn_if_weak(num_examples=1000) == []


@pytest.mark.parametrize(
    ("settings", "num_examples", "fragment"),
    [
        (PrivacySettings(enabled=False), 1000, "DISABLED"),
        (PrivacySettings(target_epsilon=12.0), 1000, "target_epsilon = 12"),
        (PrivacySettings(noise_multiplier=1.0, epsilon_budget=20.0), 1000, "epsilon_budget = 20"),
        (PrivacySettings(target_epsilon=3.0, delta=1e-3), 1000, "not below 1/n"),
        (PrivacySettings(target_epsilon=3.0, delta=1e-5), 200_000, "not below 1/n"),
    ],
)
def test_weak_settings_warn_loudly_and_log(
    settings: PrivacySettings, num_examples: int, fragment: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedcare.privacy.settings"):
        with pytest.warns(PrivacyWarning, match=fragment):
            found = settings.warn_if_weak(num_examples=num_examples)
    # Assert
    assert any(fragment in m for m in found)
    assert any(r.levelno == logging.WARNING and fragment in r.getMessage() for r in caplog.records)


def test_privacy_warning_is_a_user_warning() -> None:
    assert issubclass(PrivacyWarning, UserWarning)
