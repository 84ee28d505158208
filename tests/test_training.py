"""Local training and evaluation: DP-SGD on real clinical tables, the model families, metrics, devices."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

from fedcare.client.dataset import SiteData, Split
from fedcare.client.device import select_device
from fedcare.client.metrics import evaluate
from fedcare.client.training import TaskLoss, TrainSettings, train_local
from fedcare.models import build_model
from fedcare.privacy.engine import PrivateTraining, make_private
from fedcare.privacy.errors import MissingLedgerError, PrivacyWarning, UnsupportedModuleError
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.settings import PrivacySettings


def _sklearn_site(loader, task: str, *, seed: int = 0, test_fraction: float = 0.25) -> SiteData:
    """Standardise a scikit-learn table (train statistics only) into a SiteData."""
    x, y = loader(return_X_y=True)
    idx = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * (1 - test_fraction))
    tr, te = idx[:cut], idx[cut:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-8
    x = ((x - mean) / std).astype(np.float32)
    if task == "regression":
        y = ((y - y[tr].mean()) / y[tr].std()).astype(np.float32)
        targets = torch.tensor(y)
    else:
        targets = torch.tensor(y, dtype=torch.long)

    def split(i: np.ndarray) -> Split:
        return Split(inputs=(torch.tensor(x[i]),), targets=targets[i])

    classes = 1 if task == "regression" else int(targets.max()) + 1
    return SiteData(name="sk", kind="table", task=task, num_classes=classes, input_shape=(x.shape[1],),
                    train=split(tr), val=split(te), test=split(te))


def _ledger(tmp_path: Path, study: str) -> PrivacyLedger:
    return PrivacyLedger.open(tmp_path / "ledgers", site="sk", study=study)


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def breast_cancer() -> SiteData:
    """Wisconsin breast cancer (569 patients, shipped with scikit-learn)."""
    return _sklearn_site(load_breast_cancer, "binary")


def test_dp_logistic_regression_on_breast_cancer_beats_chance_clearly(
    breast_cancer: SiteData, tmp_path: Path
) -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model("logistic", in_features=30)
    privacy = PrivacySettings.with_target(epsilon=3.0)
    ledger = _ledger(tmp_path, "bc")
    train = TrainSettings(local_epochs=2, batch_size=32, lr=0.5, seed=0)
    # Execute: 3 planned federated rounds on one site
    results = [
        train_local(model, breast_cancer, train=train, privacy=privacy, ledger=ledger, planned_rounds=3,
                    round_index=r)
        for r in (1, 2, 3)
    ]
    metrics = evaluate(model, breast_cancer.test, "binary")
    # Assert
    assert metrics["auroc"] > 0.9 and metrics["accuracy"] > 0.85
    assert results[-1].epsilon <= 3.0 and results[-1].delta == 1e-5
    assert results[0].num_examples == len(breast_cancer.train) == 426
    assert all(r.steps == 2 * 14 for r in results)  # q = 1/ceil(426/32) = 1/14
    assert set(model.state_dict()) == {"linear.weight", "linear.bias"}  # no Opacus "_module." prefix


@pytest.mark.parametrize("mode", ["ghost", "functorch", "ew", "fast"])
def test_grad_sample_modes_train_the_same_model_as_hooks(breast_cancer: SiteData, tmp_path: Path, mode: str) -> None:
    # Prepare: same start, same seed, fixed noise
    privacy = {m: PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=10.0, grad_sample_mode=m)
               for m in ("hooks", mode)}
    train = TrainSettings(batch_size=64, lr=0.3, seed=7)
    trained = {}
    for m in privacy:
        torch.manual_seed(0)
        model = build_model("logistic", in_features=30)
        # Execute
        train_local(model, breast_cancer, train=train, privacy=privacy[m], ledger=_ledger(tmp_path, m),
                    planned_rounds=1, round_index=1)
        trained[m] = _weights(model)
    # Assert: per-sample clipping is exact in every mode
    for a, b in zip(trained["hooks"], trained[mode], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_seeded_training_is_reproducible(breast_cancer: SiteData, tmp_path: Path) -> None:
    privacy = PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=10.0)
    runs = []
    for i, seed in enumerate((3, 3, 4)):
        torch.manual_seed(0)
        model = build_model("logistic", in_features=30)
        train_local(model, breast_cancer, train=TrainSettings(batch_size=64, seed=seed), privacy=privacy,
                    ledger=_ledger(tmp_path, f"seed-{i}"), planned_rounds=1, round_index=1)
        runs.append(torch.cat([w.flatten() for w in _weights(model)]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_caller_module_is_left_clean_for_the_next_round(breast_cancer: SiteData, tmp_path: Path) -> None:
    # Prepare
    model = build_model("logistic", in_features=30)
    privacy = PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=10.0)
    ledger = _ledger(tmp_path, "clean")
    # Execute: two rounds on the same module (a second wrap would fail if hooks were left)
    for r in (1, 2):
        train_local(model, breast_cancer, train=TrainSettings(batch_size=64), privacy=privacy, ledger=ledger,
                    planned_rounds=2, round_index=r)
    # Assert
    for sub in model.modules():
        assert not sub._forward_hooks and not sub._backward_hooks
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter")
    assert ledger.rounds_completed == 2


def test_dp_needs_a_ledger(breast_cancer: SiteData) -> None:
    model = build_model("logistic", in_features=30)
    before = _weights(model)
    with pytest.raises(MissingLedgerError, match="ledger"):
        train_local(model, breast_cancer, train=TrainSettings(), privacy=PrivacySettings(), ledger=None,
                    planned_rounds=1, round_index=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_training_without_dp_warns_and_records_an_unbounded_round(
    breast_cancer: SiteData, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    model = build_model("logistic", in_features=30)
    ledger = _ledger(tmp_path, "no-dp")
    # Execute
    with caplog.at_level(logging.WARNING), pytest.warns(PrivacyWarning, match="DISABLED"):
        result = train_local(model, breast_cancer, train=TrainSettings(lr=0.5, seed=0),
                             privacy=PrivacySettings.disabled(), ledger=ledger, planned_rounds=1, round_index=1)
    # Assert
    assert result.epsilon == math.inf and result.noise_multiplier == 0.0 and result.delta == 0.0
    assert PrivacyLedger.open(tmp_path / "ledgers", site="sk", study="no-dp").spent_epsilon() == math.inf
    assert evaluate(model, breast_cancer.test, "binary")["auroc"] > 0.95
    assert "DISABLED" in caplog.text


def test_dp_linear_regression_on_diabetes_explains_variance(tmp_path: Path) -> None:
    # Prepare
    data = _sklearn_site(load_diabetes, "regression")
    torch.manual_seed(0)
    model = build_model("linear", in_features=10)
    # Execute
    result = train_local(model, data, train=TrainSettings(local_epochs=10, batch_size=32, lr=0.2, seed=0),
                         privacy=PrivacySettings.with_target(epsilon=3.0), ledger=_ledger(tmp_path, "diabetes"),
                         planned_rounds=1, round_index=1)
    metrics = evaluate(model, data.test, "regression")
    # Assert
    assert metrics["r2"] > 0.0
    assert set(metrics) == {"loss", "mae", "rmse", "r2"}
    assert result.epsilon <= 3.0


def test_dp_multiclass_logistic_on_wine(tmp_path: Path) -> None:
    data = _sklearn_site(load_wine, "multiclass")
    torch.manual_seed(0)
    model = build_model("logistic", in_features=13, num_classes=3)
    train_local(model, data, train=TrainSettings(local_epochs=5, batch_size=16, lr=0.5, seed=0),
                privacy=PrivacySettings.with_target(epsilon=5.0), ledger=_ledger(tmp_path, "wine"),
                planned_rounds=1, round_index=1)
    metrics = evaluate(model, data.test, "multiclass")
    assert metrics["auroc"] > 0.8 and metrics["accuracy"] > 0.6


def _sequences(n: int, *, t: int = 10, f: int = 3, seed: int = 0) -> SiteData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, f, generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.rand(n, t, f, generator=g) > 0.2).float()
    y = (x[torch.arange(n), lengths - 1, 0] > 0).long()
    split = Split(inputs=(x, lengths, mask), targets=y)
    return SiteData(name="seq", kind="sequence", task="binary", num_classes=2, input_shape=(t, f),
                    train=split, val=split, test=split, has_mask=True)


def test_lstm_smoke_with_mask_and_empty_poisson_batches(tmp_path: Path) -> None:
    # Prepare: 12 sequences, B=2 -> q=1/6: some Poisson batches are empty
    data = _sequences(12)
    model = build_model("lstm", input_size=3, num_classes=2, hidden_size=6, bidirectional=True, use_mask=True)
    before = _weights(model)
    # Execute
    result = train_local(model, data, train=TrainSettings(batch_size=2, seed=1),
                         privacy=PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=10.0, delta=1e-3),
                         ledger=_ledger(tmp_path, "lstm"), planned_rounds=1, round_index=1)
    # Assert
    assert result.steps == 6
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(evaluate(model, data.test, "binary")["loss"])


def test_cnn_smoke(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 28, 28, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    split = Split(inputs=(x,), targets=y)
    data = SiteData(name="img", kind="image", task="multiclass", num_classes=3, input_shape=(1, 28, 28),
                    train=split, val=split, test=split)
    model = build_model("cnn", in_channels=1, num_classes=3, image_size=28, width=4)
    result = train_local(model, data, train=TrainSettings(batch_size=8, seed=0),
                         privacy=PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=10.0, delta=1e-3),
                         ledger=_ledger(tmp_path, "cnn"), planned_rounds=1, round_index=1)
    assert result.steps == 2 and math.isfinite(result.loss)
    assert set(evaluate(model, data.test, "multiclass")) == {"loss", "accuracy", "balanced_accuracy", "auroc", "auprc"}


def _images(n: int, *, num_classes: int = 3, seed: int = 0) -> SiteData:
    g = torch.Generator().manual_seed(seed)
    split = Split(inputs=(torch.randn(n, 1, 28, 28, generator=g),),
                  targets=torch.randint(0, num_classes, (n,), generator=g))
    return SiteData(name="img", kind="image", task="multiclass", num_classes=num_classes,
                    input_shape=(1, 28, 28), train=split, val=split, test=split)


@pytest.mark.parametrize("family", ["logistic", "lstm"])
def test_fast_path_round_charges_the_ledger_exactly_like_hooks(
    breast_cancer: SiteData, tmp_path: Path, family: str
) -> None:
    # Prepare: "auto" resolves to the fast path for both families; the same rounds with hooks
    if family == "logistic":
        data, build = breast_cancer, lambda: build_model("logistic", in_features=30)
        train = TrainSettings(batch_size=64, lr=0.3, seed=7)
    else:  # 12 sequences, B=2: q=1/6 and some Poisson batches are empty
        data = _sequences(12)
        build = lambda: build_model("lstm", input_size=3, num_classes=2, hidden_size=6,  # noqa: E731
                                    bidirectional=True, use_mask=True)
        train = TrainSettings(batch_size=2, lr=0.3, seed=1)
    models, ledgers, results_by_mode = {}, {}, {}
    for mode in ("auto", "hooks"):
        torch.manual_seed(0)
        models[mode] = build()
        ledgers[mode] = _ledger(tmp_path, f"{family}-{mode}")
        results_by_mode[mode] = []
    # Execute: two rounds of a two-round study (noise calibrated for both); as in a federation,
    # both runs start round 2 from the same weights (the noise stream depends on them)
    for r in (1, 2):
        if r > 1:
            models["auto"].load_state_dict(models["hooks"].state_dict())
        for mode in ("auto", "hooks"):
            privacy = PrivacySettings.with_target(epsilon=3.0, delta=1e-3, grad_sample_mode=mode)
            results_by_mode[mode].append(train_local(
                models[mode], data, train=train, privacy=privacy, ledger=ledgers[mode],
                planned_rounds=2, round_index=r))
    runs = {m: (results_by_mode[m], ledgers[m], _weights(models[m])) for m in models}
    # Assert: ε reported = ledger's = a fresh Opacus accountant's over the same history, exactly
    for results, ledger, _ in runs.values():
        fresh = RDPAccountant()
        fresh.history = [tuple(h) for h in ledger.history]
        assert results[-1].epsilon == ledger.spent_epsilon() == fresh.get_epsilon(delta=1e-3)
        assert 0 < results[0].epsilon < results[-1].epsilon <= 3.0
        # the optimizer's step hook charged the ledger's accountant once per step, no more
        assert all(r["steps_done"] == r["steps_reserved"] == r["steps_charged"] > 0 for r in ledger.rounds)
    fast, hooks = runs["auto"], runs["hooks"]
    assert fast[1].history == hooks[1].history and len(fast[1].history) == 1  # (σ, q, steps)
    assert [r.noise_multiplier for r in fast[0]] == [r.noise_multiplier for r in hooks[0]]
    assert [r.epsilon for r in fast[0]] == [r.epsilon for r in hooks[0]]
    assert fast[1].history[0][2] == 2 * fast[0][0].steps
    for a, b in zip(fast[2], hooks[2], strict=True):  # same noise, same sampling: same model
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ew_cnn_round_with_empty_poisson_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: 16 images, B=2 -> q=1/8; with sampling seed 5 three of the 8 batches are empty
    data = _images(16)
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=3, image_size=28, width=4)
    before = _weights(model)
    ledger = _ledger(tmp_path, "cnn-ew")
    modes, empty = [], []
    original = PrivateTraining.empty_step

    def counting(self: PrivateTraining) -> None:
        modes.append(self.grad_sample_mode)
        empty.append([p.detach().clone() for p in self.module._module.parameters()])
        original(self)
        empty[-1] = [p.detach() - b for p, b in zip(self.module._module.parameters(), empty[-1], strict=True)]

    monkeypatch.setattr(PrivateTraining, "empty_step", counting)
    # Execute
    result = train_local(model, data, train=TrainSettings(batch_size=2, seed=5),
                         privacy=PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=10.0, delta=1e-3),
                         ledger=ledger, planned_rounds=1, round_index=1)
    # Assert: "auto" chose ew; empty batches stepped (noise moved every weight) and were charged
    assert modes and set(modes) == {"ew"}
    assert all(all(d.abs().sum() > 0 for d in step) for step in empty)
    assert result.steps == 8 and math.isfinite(result.loss)
    assert ledger.history == [(1.0, 1 / 8, 8)]
    assert ledger.rounds[0]["steps_done"] == 8  # the accountant took one step per batch, empty or not
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_ew_empty_step_is_opacus_hooks_empty_batch() -> None:
    # Prepare: the same CNN made private with ew and with hooks, same noise generator seed
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 3, (16,), generator=g))
    torch.manual_seed(0)
    models = {m: build_model("cnn", in_channels=1, num_classes=3, image_size=28, width=4) for m in ("hooks", "ew")}
    models["ew"].load_state_dict(models["hooks"].state_dict())
    start = _weights(models["hooks"])
    accountants = {m: RDPAccountant() for m in models}
    private = {
        m: make_private(module=models[m], optimizer=torch.optim.SGD(models[m].parameters(), lr=1.0),
                        data_loader=DataLoader(dataset, batch_size=4), criterion=TaskLoss("multiclass"),
                        accountant=accountants[m], noise_multiplier=1.3, max_grad_norm=0.5,
                        grad_sample_mode=m, noise_generator=torch.Generator().manual_seed(3))
        for m in models
    }
    x, y = dataset.tensors[0][:0], dataset.tensors[1][:0]
    # Execute: hooks runs forward/backward on the empty batch; ew skips the forward (empty_step)
    with pytest.raises(RuntimeError, match="Batch size must be positive"):
        private["ew"].module(x)
    private["hooks"].optimizer.zero_grad()
    private["hooks"].criterion(private["hooks"].module(x), y).backward()
    private["hooks"].optimizer.step()
    private["ew"].optimizer.zero_grad()
    private["ew"].empty_step()
    # Assert: one accountant step each, the same pure-noise update (every weight moved)
    assert accountants["ew"].history == accountants["hooks"].history == [(1.3, 0.25, 1)]
    for a, b, s in zip(models["ew"].parameters(), models["hooks"].parameters(), start, strict=True):
        assert torch.equal(a, b) and (a != s).all()
    for p in private.values():
        p.close()


def test_fast_mode_on_a_cnn_is_refused_before_anything_is_charged(tmp_path: Path) -> None:
    model = build_model("cnn", in_channels=1, num_classes=3, image_size=28, width=4)
    before = _weights(model)
    ledger = _ledger(tmp_path, "cnn-fast")
    with pytest.raises(UnsupportedModuleError, match="'fast'.*use 'auto', 'hooks' or 'ew'"):
        train_local(model, _images(16), train=TrainSettings(batch_size=2, seed=0),
                    privacy=PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=10.0, delta=1e-3,
                                                       grad_sample_mode="fast"),
                    ledger=ledger, planned_rounds=1, round_index=1)
    assert ledger.history == [] and ledger.rounds == [] and ledger.pending is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fedprox_pulls_toward_the_global_weights(breast_cancer: SiteData, tmp_path: Path) -> None:
    privacy = PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=10.0)
    distance = {}
    for mu in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model("logistic", in_features=30)
        start = torch.cat([w.flatten() for w in _weights(model)])
        train_local(model, breast_cancer, train=TrainSettings(batch_size=32, lr=0.5, proximal_mu=mu, seed=0),
                    privacy=privacy, ledger=_ledger(tmp_path, f"prox-{mu}"), planned_rounds=1, round_index=1)
        distance[mu] = float((torch.cat([w.flatten() for w in _weights(model)]) - start).norm())
    assert distance[1.0] < 0.9 * distance[0.0]


def test_gradient_clipping_without_dp_scales_the_step_to_the_norm(breast_cancer: SiteData) -> None:
    # Prepare: one full-batch SGD step (batch = n, lr 1) from the same start, clipped and unclipped
    privacy = PrivacySettings.disabled()
    steps = {}
    for clip in (0.0, 0.01):
        torch.manual_seed(0)
        model = build_model("logistic", in_features=30)
        start = torch.cat([w.flatten() for w in _weights(model)])
        settings = TrainSettings(batch_size=len(breast_cancer.train), lr=1.0, clip_grad_norm=clip, seed=0)
        # Execute
        with pytest.warns(PrivacyWarning):
            result = train_local(model, breast_cancer, train=settings, privacy=privacy, ledger=None,
                                 planned_rounds=1, round_index=1)  # fmt: skip
        assert result.steps == 1
        steps[clip] = torch.cat([w.flatten() for w in _weights(model)]) - start
    # Assert: the clipped step is the unclipped one (lr * gradient) rescaled to norm 0.01
    full = steps[0.0]
    assert float(full.norm()) > 0.1
    torch.testing.assert_close(steps[0.01], full * (0.01 / full.norm()), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError):
        TrainSettings(clip_grad_norm=-1.0)


def test_train_settings_validate() -> None:
    with pytest.raises(ValueError):
        TrainSettings(local_epochs=0)
    with pytest.raises(ValueError):
        TrainSettings(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TrainSettings(unknown=1)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------- metrics


class _Fixed(torch.nn.Module):
    """A 'model' that returns its input's first column (or all columns) as the output."""

    def __init__(self, columns: int | None = None) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.columns = columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.columns is None else x[:, : self.columns]


def test_binary_metrics_match_scikit_learn() -> None:
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0], [1.0], [-0.2]])
    y = torch.tensor([1, 0, 0, 0, 1, 1])
    m = evaluate(_Fixed(), Split(inputs=(logits,), targets=y), "binary")
    assert m["auroc"] == pytest.approx(roc_auc_score(y.numpy(), logits[:, 0].numpy()))
    assert m["accuracy"] == pytest.approx(4 / 6)  # predictions 1,0,1,0,1,0
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y.numpy(), [1, 0, 1, 0, 1, 0]))
    assert m["auprc"] == pytest.approx(average_precision_score(y.numpy(), logits[:, 0].numpy()))
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float())
    assert m["loss"] == pytest.approx(float(expected_loss), rel=1e-6)


def test_one_class_split_gives_nan_auroc_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    logits = torch.tensor([[2.0], [-1.0], [0.5]])
    with caplog.at_level(logging.WARNING, logger="fedcare.client.metrics"):
        m = evaluate(_Fixed(), Split(inputs=(logits,), targets=torch.tensor([1, 1, 1])), "binary")
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert "only one class present" in caplog.text


def test_multiclass_with_a_missing_class_averages_present_classes(caplog: pytest.LogCaptureFixture) -> None:
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([0, 1, 0, 1])  # class 2 absent
    with caplog.at_level(logging.WARNING, logger="fedcare.client.metrics"):
        m = evaluate(_Fixed(columns=3), Split(inputs=(logits,), targets=y), "multiclass")
    assert 0.0 <= m["auroc"] <= 1.0 and m["accuracy"] == pytest.approx(3 / 4)
    assert "2 of 3 classes present" in caplog.text


def test_regression_metrics_known_values() -> None:
    preds = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = torch.tensor([1.0, 2.0, 2.0, 6.0])
    m = evaluate(_Fixed(), Split(inputs=(preds,), targets=y), "regression")
    assert m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 4))
    assert m["loss"] == pytest.approx(5 / 4)
    assert m["r2"] == pytest.approx(1 - 5 / 14.75)  # SS_res 5, SS_tot 14.75


def test_task_loss_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one value per example"):
        TaskLoss("binary")(torch.zeros(4, 1), torch.zeros(4))


def test_select_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("quantum")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")
