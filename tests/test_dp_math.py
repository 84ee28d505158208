"""DP arithmetic with exact known numbers: Opacus's accountants, noise calibration, sample rates.

The hard-coded values were computed once with Opacus 1.6.0 and are asserted to 1e-6: a change
means the accounting changed, which must be noticed, not absorbed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedcare.client.dataset import SiteData, Split
from fedcare.client.training import TrainSettings, train_local
from fedcare.models import build_model
from fedcare.privacy.engine import (
    EPSILON_TOLERANCE,
    calibrate_noise_multiplier,
    sample_rate_for,
    steps_per_epoch,
)
from fedcare.privacy.errors import BudgetExceededError
from fedcare.privacy.ledger import PrivacyLedger, epsilon_of
from fedcare.privacy.settings import PrivacySettings

# (σ, q, steps, δ) -> ε, Opacus 1.6.0
RDP_EPSILON_1_1_001_1000 = 1.7117700912203435
PRV_EPSILON_1_1_001_1000 = 1.52547264980387
RDP_EPSILON_1_0_1_18_180 = 5.700190702848483
# get_noise_multiplier(target_epsilon=3, target_delta=1e-5, sample_rate=1/15, steps=150, "rdp")
SIGMA_EPS3_Q15_150 = 1.53076171875


def test_rdp_epsilon_known_value() -> None:
    acc = RDPAccountant()
    acc.history = [(1.1, 0.01, 1000)]
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(RDP_EPSILON_1_1_001_1000, abs=1e-6)
    assert epsilon_of([(1.1, 0.01, 1000)], accountant="rdp", delta=1e-5) == pytest.approx(
        RDP_EPSILON_1_1_001_1000, abs=1e-6
    )
    assert epsilon_of([(1.0, 1 / 18, 180)], accountant="rdp", delta=1e-5) == pytest.approx(
        RDP_EPSILON_1_0_1_18_180, abs=1e-6
    )


def test_prv_epsilon_known_value_is_tighter_than_rdp() -> None:
    acc = PRVAccountant()
    acc.history = [(1.1, 0.01, 1000)]
    eps = acc.get_epsilon(delta=1e-5)
    assert eps == pytest.approx(PRV_EPSILON_1_1_001_1000, abs=1e-6)
    assert epsilon_of([(1.1, 0.01, 1000)], accountant="prv", delta=1e-5) == pytest.approx(eps, abs=1e-12)
    assert eps < RDP_EPSILON_1_1_001_1000


def test_empty_history_spends_nothing() -> None:
    assert epsilon_of([], accountant="rdp", delta=1e-5) == 0.0
    assert epsilon_of([(1.0, 0.1, 0)], accountant="prv", delta=1e-5) == 0.0


def test_noise_calibration_known_value_and_reaches_target() -> None:
    # Execute
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=1 / 15, steps=150,
                                       accountant="rdp")
    reached = epsilon_of([(sigma, 1 / 15, 150)], accountant="rdp", delta=1e-5)
    # Assert
    assert sigma == pytest.approx(SIGMA_EPS3_Q15_150, abs=1e-6)
    assert 3.0 - EPSILON_TOLERANCE <= reached <= 3.0


def test_calibration_on_top_of_a_history_reaches_target() -> None:
    prior = [(2.0, 0.05, 200)]
    spent = epsilon_of(prior, accountant="rdp", delta=1e-5)
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=300,
                                       accountant="rdp", prior_history=prior)
    reached = epsilon_of([(2.0, 0.05, 200), (sigma, 0.05, 300)], accountant="rdp", delta=1e-5)
    assert spent < 3.0
    assert 3.0 - EPSILON_TOLERANCE <= reached <= 3.0
    with pytest.raises(ValueError, match="budget is too low"):
        calibrate_noise_multiplier(target_epsilon=spent, delta=1e-5, sample_rate=0.05, steps=10,
                                   accountant="rdp", prior_history=prior)


@pytest.mark.parametrize(("n", "b", "q", "per_epoch"), [(569, 32, 1 / 18, 18), (450, 32, 1 / 15, 15),
                                                        (93 * 4, 4, 1 / 93, 92), (10, 32, 1.0, 1)])
def test_sample_rate_and_steps_follow_opacus(n: int, b: int, q: float, per_epoch: int) -> None:
    # 1/93 is one of the rates where Opacus's int(1/q) loses a step: we follow Opacus exactly
    assert sample_rate_for(num_examples=n, batch_size=b) == q
    assert steps_per_epoch(sample_rate=q) == per_epoch


def _table_site(n: int, features: int = 5, seed: int = 0) -> SiteData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
    split = Split(inputs=(x,), targets=y)
    return SiteData(name="site", kind="table", task="binary", num_classes=2, input_shape=(features,),
                    train=split, val=split, test=split)


def test_calibrated_training_ends_at_the_target_and_all_epsilons_agree(tmp_path: Path) -> None:
    # Prepare: 3 planned rounds of 2 epochs, 300 examples, B=30 -> q=1/10, 20 steps per round
    data = _table_site(300)
    privacy = PrivacySettings.with_target(epsilon=2.0)
    ledger = PrivacyLedger.open(tmp_path, site="site", study="calib")
    model = build_model("logistic", in_features=5)
    train = TrainSettings(batch_size=30, local_epochs=2, lr=0.2, seed=0)
    # Execute
    results = [
        train_local(model, data, train=train, privacy=privacy, ledger=ledger, planned_rounds=3, round_index=r)
        for r in (1, 2, 3)
    ]
    # Assert
    sigma = results[0].noise_multiplier
    assert {r.noise_multiplier for r in results} == {sigma}  # one calibration for the study
    assert sigma == pytest.approx(
        calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=60, accountant="rdp"),
        abs=1e-12,
    )
    assert [r.steps for r in results] == [20, 20, 20] and results[0].sample_rate == 0.1
    final = results[-1].epsilon
    assert 2.0 - EPSILON_TOLERANCE <= final <= 2.0
    assert results[0].epsilon < results[1].epsilon < final
    acc = RDPAccountant()
    acc.history = [(sigma, 0.1, 60)]
    assert final == ledger.spent_epsilon() == pytest.approx(acc.get_epsilon(delta=1e-5), abs=1e-12)
    assert ledger.history == [(sigma, 0.1, 60)]
    assert PrivacyLedger.open(tmp_path, site="site", study="calib").spent_epsilon() == final
    assert np.isfinite(results[-1].loss)


def test_an_interrupted_round_uses_up_a_planned_round(tmp_path: Path) -> None:
    # Prepare: round 1 trained, round 2 was reserved and then the process died
    data = _table_site(300)
    privacy = PrivacySettings.with_target(epsilon=2.0)
    train = TrainSettings(batch_size=30, local_epochs=2, seed=0)
    model = build_model("logistic", in_features=5)
    ledger = PrivacyLedger.open(tmp_path, site="site", study="interrupted")
    first = train_local(model, data, train=train, privacy=privacy, ledger=ledger, planned_rounds=3, round_index=1)
    ledger.reserve_round(round_index=2, noise_multiplier=first.noise_multiplier, sample_rate=0.1, steps=20)
    ledger._lock.release()  # what the OS does when the process is killed
    # Execute: the restarted node redoes round 2, then is asked for round 3
    ledger = PrivacyLedger.open(tmp_path, site="site", study="interrupted")
    redo = train_local(model, data, train=train, privacy=privacy, ledger=ledger, planned_rounds=3, round_index=2)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(BudgetExceededError):
        train_local(model, data, train=train, privacy=privacy, ledger=ledger, planned_rounds=3, round_index=3)
    # Assert: the killed round cost its full plan, so 3 rounds were spent and the 4th is refused
    assert [r["status"] for r in ledger.rounds] == ["completed", "interrupted", "completed"]
    assert redo.noise_multiplier == first.noise_multiplier
    assert 2.0 - EPSILON_TOLERANCE <= redo.epsilon <= 2.0
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_a_longer_plan_recalibrates_the_rest_and_still_ends_at_target(tmp_path: Path) -> None:
    # Prepare
    data = _table_site(300)
    privacy = PrivacySettings.with_target(epsilon=2.0)
    train = TrainSettings(batch_size=30, local_epochs=2, seed=0)
    model = build_model("logistic", in_features=5)
    ledger = PrivacyLedger.open(tmp_path, site="site", study="longer")
    first = train_local(model, data, train=train, privacy=privacy, ledger=ledger, planned_rounds=2, round_index=1)
    # Execute: the study now plans 4 rounds: 3 remain for the budget the last round would have had
    later = [
        train_local(model, data, train=train, privacy=privacy, ledger=ledger, planned_rounds=4, round_index=r)
        for r in (2, 3, 4)
    ]
    # Assert
    assert later[0].noise_multiplier > first.noise_multiplier
    assert later[0].noise_multiplier == later[1].noise_multiplier == later[2].noise_multiplier
    assert 2.0 - EPSILON_TOLERANCE <= later[-1].epsilon <= 2.0
    assert ledger.calibration["plan"]["planned_rounds"] == 4
