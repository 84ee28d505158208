"""fedcare.config_base: the one frozen-model base every config and record model derives from."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from fedcare.client.manifest import SiteManifest
from fedcare.config_base import FiniteFrozenModel, FrozenModel
from fedcare.privacy.report import PrivacyReport
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.flower_app import Study
from fedcare.simulations.scenario import Scenario, StrategySpec


class _Settings(FrozenModel):
    rate: float = 0.5


class _Budget(FiniteFrozenModel):
    epsilon: float = 1.0


def test_frozen_model_refuses_changes_and_unknown_keys() -> None:
    # Prepare
    settings = _Settings()
    # Execute / Assert
    with pytest.raises(ValidationError):
        settings.rate = 0.1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        _Settings(rat=0.1)  # type: ignore[call-arg]
    assert _Settings(rate=math.inf).rate == math.inf


def test_finite_frozen_model_also_refuses_nan_and_infinity() -> None:
    # Prepare / Execute / Assert
    for bad in (math.nan, math.inf):
        with pytest.raises(ValidationError):
            _Budget(epsilon=bad)
    assert _Budget(epsilon=2.0).epsilon == 2.0


@pytest.mark.parametrize(
    ("model", "base"),
    [
        (SiteManifest, FrozenModel),
        (Study, FrozenModel),
        (Scenario, FrozenModel),
        (PrivacySettings, FiniteFrozenModel),
        (PrivacyReport, FiniteFrozenModel),
    ],
)
def test_config_models_derive_from_the_shared_base(model: type, base: type) -> None:
    # Prepare / Execute / Assert
    assert issubclass(model, base)
    assert model.model_config["frozen"] is True
    assert model.model_config["extra"] == "forbid"


def test_a_model_adds_only_its_own_setting_to_the_base() -> None:
    # Prepare / Execute
    spec = StrategySpec(name="fedavg", **{"proximal-mu": 0.1})
    # Assert: extra keys allowed (its parameters), still frozen
    assert spec.params == {"proximal-mu": 0.1}
    with pytest.raises(ValidationError):
        spec.name = "fedprox"  # type: ignore[misc]
