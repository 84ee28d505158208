"""Membership-inference audit: memorising models are caught and blocked, regularised ones pass."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from fedcare.privacy.membership import (
    AttackResult,
    _rank_auc,
    MembershipAuditResult,
    ReleaseBlocked,
    ReleaseGate,
    auc_with_ci,
    logit_confidence,
    loss_threshold_attack,
    membership_audit,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Keep torch on one thread (shared machines) and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, weight_decay: float) -> nn.Module:
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):  # bounded: full-batch steps
        optimiser.zero_grad()
        loss_fn(model(x), y).backward()
        optimiser.step()
    return model


# Memorisation: 200 random features, random labels, 60 training examples: nothing to learn but
# the examples themselves.
D_MEM, N_MEM = 200, 60


def _memorise(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_MEM, 64), nn.ReLU(), nn.Linear(64, 2))
    return _fit(model, x, y, steps=100, lr=1e-2, weight_decay=0.0)


def _memorisation_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * N_MEM, D_MEM, generator=gen)
    y = torch.randint(0, 2, (2 * N_MEM,), generator=gen)
    return (x[:N_MEM], y[:N_MEM]), (x[N_MEM:], y[N_MEM:])


# Regularised: 4 informative features, a strongly regularised logistic regression, 1500 examples
# per split.
D_REG, N_REG = 4, 1500


def _regularised(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _fit(nn.Linear(D_REG, 2), x, y, steps=100, lr=0.1, weight_decay=1e-2)


def _population(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_REG, generator=gen)
    logits = x @ torch.tensor([1.5, -1.0, 0.5, 0.0])
    y = (torch.rand(n, generator=gen) < torch.sigmoid(logits)).long()
    return x, y


def test_overfitted_model_is_detected_by_both_attacks_and_blocked() -> None:
    # Prepare
    members, nonmembers = _memorisation_data()
    model = _memorise(*members, seed=0)

    # Execute
    result = membership_audit(model, members=members, nonmembers=nonmembers, train_fn=_memorise,
                              n_shadow=8, n_bootstrap=1000, seed=0)  # fmt: skip

    # Assert
    loss, lira = result.attacks
    assert (loss.attack, lira.attack) == ("loss_threshold", "lira_online")
    assert lira.n_shadow == 8 and loss.n_members == loss.n_nonmembers == N_MEM
    assert loss.auc > 0.9 and loss.ci_low > 0.8
    assert lira.auc > 0.8 and lira.ci_low > 0.7
    with pytest.raises(ReleaseBlocked, match=r"release blocked.*max AUC 0.600.*retrain"):
        ReleaseGate(max_auc=0.6).check(result)


def test_regularised_model_on_plenty_of_data_is_near_chance_and_released() -> None:
    # Prepare
    members = _population(N_REG, seed=2)
    nonmembers = _population(N_REG, seed=3)
    model = _regularised(*members, seed=0)

    # Execute
    result = membership_audit(model, members=members, nonmembers=nonmembers, train_fn=_regularised,
                              n_shadow=4, n_bootstrap=1000, seed=0)  # fmt: skip

    # Assert
    for attack in result.attacks:
        assert abs(attack.auc - 0.5) < 0.05, attack.describe()
        assert attack.ci_high < 0.6
    ReleaseGate(max_auc=0.6).check(result)  # does not raise


def test_loss_attack_auc_and_interval_are_reproducible() -> None:
    # Prepare
    members, nonmembers = _memorisation_data()
    model = _memorise(*members, seed=0)

    # Execute
    first = loss_threshold_attack(model, members=members, nonmembers=nonmembers, n_bootstrap=200, seed=7)
    second = loss_threshold_attack(model, members=members, nonmembers=nonmembers, n_bootstrap=200, seed=7)

    # Assert
    assert first == second
    assert first.ci_low <= first.auc <= first.ci_high


def test_auc_with_ci_exact_values() -> None:
    # Prepare: members 3, 4 vs non-members 1, 2, 3 -> pairs won: (3>1,3>2,3=3 half,4>all) = 5.5 of 6
    members, nonmembers = np.array([3.0, 4.0]), np.array([1.0, 2.0, 3.0])

    # Execute
    auc, low, high = auc_with_ci(members, nonmembers, n_bootstrap=0)

    # Assert
    assert auc == pytest.approx(5.5 / 6)
    assert low == high == auc


def test_bootstrap_statistic_equals_sklearn_auc_with_ties() -> None:
    # Prepare: scores with many ties
    rng = np.random.default_rng(0)
    members, nonmembers = rng.integers(0, 5, (3, 40)).astype(float), rng.integers(0, 4, (3, 30)).astype(float)

    # Execute
    ours = _rank_auc(members, nonmembers)

    # Assert
    labels = np.r_[np.ones(40), np.zeros(30)]
    expected = [roc_auc_score(labels, np.r_[m, n]) for m, n in zip(members, nonmembers, strict=True)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_logit_confidence_binary_and_multiclass() -> None:
    # Prepare: one-logit binary head, and a 3-class head with fixed logits
    binary = nn.Linear(1, 1, bias=False)
    multi = nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        binary.weight.fill_(2.0)
        multi.weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
    x = torch.ones(2, 1)

    # Execute
    phi_binary = logit_confidence(binary, x, torch.tensor([1, 0]))
    phi_multi = logit_confidence(multi, x, torch.tensor([0, 2]))

    # Assert: φ = log p/(1-p); binary logit 2 -> +2 for label 1, -2 for label 0
    np.testing.assert_allclose(phi_binary, [2.0, -2.0])
    p = torch.softmax(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), 0).numpy()
    np.testing.assert_allclose(phi_multi, np.log(p[[0, 2]] / (1 - p[[0, 2]])), rtol=1e-9)


def _attack(auc: float, low: float, high: float, n: int = 50) -> AttackResult:
    return AttackResult(attack="loss_threshold", auc=auc, ci_low=low, ci_high=high, confidence=0.95,
                        low_fpr=0.01, tpr_at_low_fpr=0.0, n_members=n, n_nonmembers=n,
                        n_bootstrap=100, seed=0)  # fmt: skip


def test_gate_basis_upper_blocks_wide_interval_point_basis_does_not() -> None:
    # Prepare: point estimate under the limit, upper bound above it; 400 + 400 examples, enough to
    # test the limit (a smaller audit is inconclusive: tests/attacks/test_membership_gate.py)
    result = MembershipAuditResult(attacks=(_attack(0.55, 0.45, 0.65, n=400),))

    # Execute / Assert
    with pytest.raises(ReleaseBlocked, match="larger held-in and held-out splits"):
        ReleaseGate(max_auc=0.6).check(result)
    ReleaseGate(max_auc=0.6, basis="point").check(result)


def test_gate_refuses_meaningless_limits() -> None:
    with pytest.raises(ValueError, match="max_auc"):
        ReleaseGate(max_auc=0.5)
    with pytest.raises(ValueError, match="basis"):
        ReleaseGate(max_auc=0.6, basis="mean")  # type: ignore[arg-type]
