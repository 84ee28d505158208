"""fedcare.privacy.fast_grad: exact per-sample gradients vs Opacus, and Opacus's own DP plumbing."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcare.models import ClinicalLSTM, LinearRegression, LogisticRegression, MedicalCNN
from fedcare.privacy.fast_grad import (
    FastGradSampleModule,
    UnsupportedModelError,
    make_private_fast,
    supports_fast_grad,
)

TOL = 1e-5
N = 12


def _seq(n: int = N, t: int = 9, f: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, t, f, generator=g)
    mask = (torch.rand(n, t, f, generator=g) < 0.5).float()
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    return x, lengths, mask


def _cases() -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...], torch.Tensor, nn.Module]]:
    g = torch.Generator().manual_seed(0)
    x_tab = torch.randn(N, 13, generator=g)
    x, lengths, mask = _seq()
    binary = torch.randint(0, 2, (N,), generator=g).float()
    classes = torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(0)
    return [
        ("logistic", LogisticRegression(13), (x_tab,), binary, nn.BCEWithLogitsLoss()),
        ("multinomial", LogisticRegression(13, 3), (x_tab,), classes, nn.CrossEntropyLoss()),
        ("linear", LinearRegression(13), (x_tab,), torch.randn(N, generator=g), nn.MSELoss()),
        (
            "lstm-mask",
            ClinicalLSTM(5, 2, hidden_size=7, use_mask=True),
            (x, lengths, mask),
            binary,
            nn.BCEWithLogitsLoss(),
        ),
        (
            "lstm-bi-2layer-multiclass",
            ClinicalLSTM(5, 3, hidden_size=6, num_layers=2, bidirectional=True),
            (x, lengths),
            classes,
            nn.CrossEntropyLoss(),
        ),
        ("lstm-regression", ClinicalLSTM(5, 1, hidden_size=4), (x,), torch.randn(N), nn.MSELoss()),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_gradients_and_clipped_sum_match_opacus(case, reduction: str) -> None:
    """Per-sample gradients and the clipped sum equal Opacus hooks + DPOptimizer to 1e-5."""
    # Prepare
    _, model, inputs, target, criterion = case
    model = copy.deepcopy(model)
    criterion = copy.deepcopy(criterion)
    criterion.reduction = reduction
    max_grad_norm = 0.05
    reference = GradSampleModule(copy.deepcopy(model), loss_reduction=reduction)
    ref_opt = DPOptimizer(
        torch.optim.SGD(reference.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=N,
        loss_reduction=reduction,
    )
    fast = FastGradSampleModule(
        model, max_grad_norm=max_grad_norm, loss_reduction=reduction, keep_grad_sample=True
    )

    # Execute
    criterion(reference(*inputs), target).backward()
    ref_opt.clip_and_accumulate()
    criterion(fast(*inputs), target).backward()

    # Assert
    ref_params = list(reference._module.parameters())
    fast_params = list(model.parameters())
    assert len(ref_params) == len(fast_params)
    for p_ref, p_fast in zip(ref_params, fast_params):
        assert p_fast.grad_sample.shape == p_ref.grad_sample.shape
        torch.testing.assert_close(p_fast.grad_sample, p_ref.grad_sample, rtol=0, atol=TOL)
        torch.testing.assert_close(p_fast.grad, p_ref.summed_grad, rtol=0, atol=TOL)
    norms = fast.per_sample_gradient_norms
    assert norms is not None and (norms > max_grad_norm).any()  # clipping was exercised


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_equal_the_model_forward(case) -> None:
    """The fast forward returns what the model itself returns (training and eval)."""
    # Prepare
    _, model, inputs, _target, _criterion = case
    fast = FastGradSampleModule(model, max_grad_norm=1.0)

    # Execute
    expected = model(*inputs)
    got_train = fast(*inputs)
    fast.eval()
    got_eval = fast(*inputs)

    # Assert
    torch.testing.assert_close(got_train, expected, rtol=0, atol=TOL)
    torch.testing.assert_close(got_eval, expected, rtol=0, atol=0)


def test_make_private_fast_keeps_opacus_sampling_noise_and_accounting() -> None:
    """Poisson loader, noise std sigma*C / expected batch, and accountant steps are Opacus's."""
    # Prepare
    torch.manual_seed(0)
    n, batch, sigma, clip = 256, 32, 1.3, 0.7
    dataset = TensorDataset(torch.randn(n, 13), torch.randint(0, 2, (n,)).float())
    model = LogisticRegression(13)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    engine = PrivacyEngine(accountant="rdp")
    fast, optimizer, loader = make_private_fast(
        engine,
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(dataset, batch_size=batch),
        noise_multiplier=sigma,
        max_grad_norm=clip,
    )
    criterion = nn.BCEWithLogitsLoss()
    empty = tuple(t[:0] for t in dataset.tensors)  # a zero-size batch: the update is pure noise

    # Execute
    steps = 0
    for x, y in loader:
        optimizer.zero_grad()
        criterion(fast(x), y).backward()
        optimizer.step()
        steps += 1
    updates = []
    for _ in range(400):
        before = model.linear.weight.detach().clone()
        optimizer.zero_grad()
        criterion(fast(*empty[:1]), empty[1]).backward()
        optimizer.step()
        updates.append(model.linear.weight.detach() - before)
    noise = torch.cat([u.flatten() for u in updates])

    # Assert
    assert isinstance(optimizer, DPOptimizerFastGradientClipping)
    assert type(loader.batch_sampler).__name__ == "UniformWithReplacementSampler"
    assert loader.batch_sampler.sample_rate == pytest.approx(batch / n)
    assert optimizer.noise_multiplier == sigma and optimizer.max_grad_norm == clip
    assert optimizer.expected_batch_size == batch
    assert engine.accountant.history == [(sigma, batch / n, steps + 400)]
    expected_std = sigma * clip / batch
    assert noise.std().item() == pytest.approx(expected_std, rel=0.05)
    assert not any(hasattr(p, "_forward_counter") for p in model.parameters())  # hooks removed


def test_one_step_matches_opacus_hooks_with_the_same_noise() -> None:
    """With the same noise generator seed, a step equals Opacus hooks mode's step."""
    # Prepare
    torch.manual_seed(0)
    x, lengths, mask = _seq(n=16)
    y = torch.randint(0, 2, (16,)).float()
    dataset = TensorDataset(x, lengths, mask, y)
    model = ClinicalLSTM(5, 2, hidden_size=6, use_mask=True)
    twin = copy.deepcopy(model)
    kwargs = {"noise_multiplier": 0.8, "max_grad_norm": 0.3}
    fast, opt_fast, _ = make_private_fast(
        PrivacyEngine(accountant="rdp"),
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(dataset, batch_size=8),
        noise_generator=torch.Generator().manual_seed(7),
        **kwargs,
    )
    ref, opt_ref, _ = PrivacyEngine(accountant="rdp").make_private(
        module=twin,
        optimizer=torch.optim.SGD(twin.parameters(), lr=0.5),
        data_loader=DataLoader(dataset, batch_size=8),
        noise_generator=torch.Generator().manual_seed(7),
        grad_sample_mode="hooks",
        **kwargs,
    )
    criterion = nn.BCEWithLogitsLoss()

    # Execute
    for module, opt in ((fast, opt_fast), (ref, opt_ref)):
        opt.zero_grad()
        criterion(module(x, lengths, mask), y).backward()
        opt.step()

    # Assert
    for p_fast, p_ref in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p_fast, p_ref, rtol=0, atol=TOL)


def test_unsupported_models_are_refused() -> None:
    """Models without an exact fast path raise, naming the Opacus modes to use instead."""
    # Prepare
    cnn = MedicalCNN(1, 2, 28)

    # Execute / Assert
    assert not supports_fast_grad(cnn)
    assert supports_fast_grad(LogisticRegression(4))
    with pytest.raises(UnsupportedModelError, match="grad_sample_mode"):
        FastGradSampleModule(cnn, max_grad_norm=1.0)
