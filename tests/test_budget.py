"""The budget cannot be overrun: a round that would exceed it is refused before anything changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcare.client.dataset import SiteData, Split
from fedcare.client.training import TrainSettings, train_local
from fedcare.models import build_model
from fedcare.privacy.errors import BudgetExceededError
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.settings import PrivacySettings

SITE, STUDY = "site", "budget-study"


def _site(n: int = 200, seed: int = 0) -> SiteData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    split = Split(inputs=(x,), targets=y)
    return SiteData(name=SITE, kind="table", task="binary", num_classes=2, input_shape=(4,),
                    train=split, val=split, test=split)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_round_that_would_exceed_the_budget_is_refused_untouched(tmp_path: Path) -> None:
    # Prepare: fixed noise; each round of 20 steps at q=0.1 costs about 1 ε; budget 2.5
    data = _site()
    privacy = PrivacySettings.with_noise(noise_multiplier=1.5, epsilon_budget=2.5)
    train = TrainSettings(batch_size=20, local_epochs=2, seed=0)
    model = build_model("logistic", in_features=4)
    ledger = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    accepted = []
    refused = None
    # Execute: train until refused (bounded)
    for r in range(1, 11):
        weights, file_bytes, spent = _state(model), ledger.path.read_bytes() if ledger.path.exists() else b"", ledger.spent_epsilon()
        try:
            accepted.append(train_local(model, data, train=train, privacy=privacy, ledger=ledger,
                                        planned_rounds=10, round_index=r))
        except BudgetExceededError as exc:
            refused = exc
            break
    # Assert
    assert refused is not None and len(accepted) >= 1
    assert accepted[-1].epsilon <= 2.5 < refused.projected
    assert refused.spent == pytest.approx(accepted[-1].epsilon) and refused.budget == 2.5
    message = str(refused)
    for fragment in (f"{refused.spent:.4f}", f"{refused.projected:.4f}", "2.5000", "ethics board",
                     "fewer rounds", "noise"):
        assert fragment in message
    _assert_same(weights, _state(model))  # model unchanged by the refused round
    assert ledger.path.read_bytes() == file_bytes  # ledger file unchanged
    assert ledger.spent_epsilon() == spent
    reopened = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    assert reopened.spent_epsilon() == spent and reopened.rounds_completed == len(accepted)


def test_a_first_round_over_budget_leaves_no_trace(tmp_path: Path) -> None:
    data = _site()
    model = build_model("logistic", in_features=4)
    before = _state(model)
    ledger = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    with pytest.raises(BudgetExceededError):
        train_local(model, data, train=TrainSettings(batch_size=20, seed=0),
                    privacy=PrivacySettings.with_noise(noise_multiplier=0.5, epsilon_budget=0.1),
                    ledger=ledger, planned_rounds=1, round_index=1)
    _assert_same(before, _state(model))
    assert not ledger.path.exists() and ledger.spent_epsilon() == 0.0


def test_calibrated_study_refuses_rounds_beyond_the_plan(tmp_path: Path) -> None:
    # Prepare: budget = target; the plan has 2 rounds
    data = _site()
    privacy = PrivacySettings.with_target(epsilon=1.0)
    train = TrainSettings(batch_size=20, seed=0)
    model = build_model("logistic", in_features=4)
    ledger = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    for r in (1, 2):
        train_local(model, data, train=train, privacy=privacy, ledger=ledger, planned_rounds=2, round_index=r)
    before, spent = _state(model), ledger.spent_epsilon()
    # Execute / Assert: a third round (the server asks for more) is refused
    with pytest.raises(BudgetExceededError, match="would be exceeded"):
        train_local(model, data, train=train, privacy=privacy, ledger=ledger, planned_rounds=2, round_index=3)
    _assert_same(before, _state(model))
    assert ledger.spent_epsilon() == spent <= 1.0


def test_a_lowered_budget_applies_at_once(tmp_path: Path) -> None:
    data = _site()
    train = TrainSettings(batch_size=20, seed=0)
    model = build_model("logistic", in_features=4)
    ledger = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    train_local(model, data, train=train, privacy=PrivacySettings.with_noise(noise_multiplier=1.5, epsilon_budget=5.0),
                ledger=ledger, planned_rounds=5, round_index=1)
    spent = ledger.spent_epsilon()
    with pytest.raises(BudgetExceededError):
        train_local(model, data, train=train,
                    privacy=PrivacySettings.with_noise(noise_multiplier=1.5, epsilon_budget=spent * 1.01),
                    ledger=ledger, planned_rounds=5, round_index=2)
    assert ledger.epsilon_budget == pytest.approx(spent * 1.01) and ledger.spent_epsilon() == spent


class _FailsMidRound(torch.nn.Module):
    """Logistic regression whose forward raises on its ``fail_at``-th call (a crash mid-round)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated failure in the middle of a round")
        return self.linear(x).squeeze(-1)


def test_a_round_failing_midway_is_charged_and_its_update_withdrawn(tmp_path: Path) -> None:
    # Prepare
    data = _site()
    model = _FailsMidRound(fail_at=5)
    before = _state(model)
    ledger = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    # Execute
    with pytest.raises(RuntimeError, match="simulated failure"):
        train_local(model, data, train=TrainSettings(batch_size=20, seed=0),
                    privacy=PrivacySettings.with_noise(noise_multiplier=1.5, epsilon_budget=5.0),
                    ledger=ledger, planned_rounds=1, round_index=1)
    # Assert: the partially trained weights did not survive; the full round is charged
    _assert_same(before, _state(model))
    reopened = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    assert reopened.rounds[-1]["status"] == "failed"
    assert reopened.rounds[-1]["steps_charged"] == 10 and reopened.rounds[-1]["steps_done"] == 4
    assert reopened.history == [(1.5, 0.1, 10)] and reopened.pending is None
    for sub in model.modules():
        assert not sub._forward_hooks
