"""Short DP-SGD training on every real data set, read through its site manifest.

One test per data set (UCI heart disease: Cleveland alone and the four hospitals pooled;
PhysioNet 2012 set A; MIT-BIH site a; BreastMNIST; PneumoniaMNIST). Each loads the site from a
manifest file (``simulations/sites/<name>.toml`` copied into ``tmp_path`` with its data paths pointed
at the ``shared_data`` fixture, plus the few changes a recipe makes), trains the family meant
for the data with :func:`~fedcare.client.training.train_local` under a real target ε with a
persistent :class:`~fedcare.privacy.ledger.PrivacyLedger`, then asserts

- the test-split AUROC is clearly better than chance (each floor sits below the lowest value
  measured over five seeds, see ``docs/training.md`` "Recipes on the real data");
- the ε in the last :class:`~fedcare.client.training.TrainResult` equals the ledger's
  ``spent_epsilon()`` and an independent Opacus accountant stepped with the (σ, q, steps)
  the rounds report, to 1e-9, and lies within Opacus's calibration tolerance below the target.

Seeds are fixed (initialisation, Poisson sampling, noise), so each run is reproducible.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedcare.client.dataset import SiteData
from fedcare.client.loaders import load_site_file
from fedcare.client.metrics import evaluate
from fedcare.client.training import TrainResult, TrainSettings, train_local
from fedcare.models import ModelSpec, build_for_data
from fedcare.privacy.engine import EPSILON_TOLERANCE
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.settings import PrivacySettings
from fedcare.simulations.baselines import pool_sites

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "simulations" / "sites"
PREFIX = "${FEDCARE_DATA_ROOT}"
HEART_HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")


@dataclass(frozen=True)
class Recipe:
    """A DP training recipe for one data set and the AUROC floor it must clear on the test split."""

    model: ModelSpec
    epsilon: float
    delta: float
    max_grad_norm: float
    train: TrainSettings
    rounds: int
    min_auroc: float
    accountant: str = "rdp"


RECIPES: dict[str, Recipe] = {
    # logistic regression on 15 features (one-hot cp / restecg, standardised per site)
    "heart_cleveland": Recipe(
        model=ModelSpec(family="logistic"), epsilon=3.0, delta=1e-5, max_grad_norm=1.0,
        train=TrainSettings(local_epochs=10, batch_size=32, lr=0.5, seed=0, device="cpu"),
        rounds=2, min_auroc=0.80, accountant="prv",
    ),
    "heart_pooled": Recipe(
        model=ModelSpec(family="logistic"), epsilon=3.0, delta=1e-5, max_grad_norm=1.0,
        train=TrainSettings(local_epochs=10, batch_size=32, lr=0.5, seed=0, device="cpu"),
        rounds=2, min_auroc=0.75,
    ),
    # LSTM over 48 hourly steps x (36 series + 36 mask channels), all 4000 patients of set A
    "physionet2012_all": Recipe(
        model=ModelSpec(family="lstm", hidden_size=16), epsilon=5.0, delta=1e-5, max_grad_norm=1.0,
        train=TrainSettings(local_epochs=3, batch_size=256, lr=4.0, seed=0, device="cpu"),
        rounds=2, min_auroc=0.70,
    ),
    # LSTM over 0.7 s windows decimated by 18 (14 steps); the R peak at 80 % of the window
    "mitbih_site_a": Recipe(
        model=ModelSpec(family="lstm", hidden_size=16), epsilon=5.0, delta=1e-5, max_grad_norm=1.0,
        train=TrainSettings(local_epochs=3, batch_size=128, lr=4.0, seed=0, device="cpu"),
        rounds=2, min_auroc=0.90,
    ),
    # the GroupNorm CNN, width 8, on 28 x 28 images
    "breastmnist": Recipe(
        model=ModelSpec(family="cnn", width=8), epsilon=8.0, delta=1e-5, max_grad_norm=1.0,
        train=TrainSettings(local_epochs=10, batch_size=32, lr=0.5, seed=0, device="cpu"),
        rounds=2, min_auroc=0.70,
    ),
    "pneumoniamnist": Recipe(
        model=ModelSpec(family="cnn", width=8), epsilon=5.0, delta=1e-5, max_grad_norm=1.0,
        train=TrainSettings(local_epochs=3, batch_size=128, lr=2.0, seed=0, device="cpu"),
        rounds=2, min_auroc=0.80,
    ),
}

MITBIH_WINDOWS = {"decimate": 18, "before": 0.8}
"""MIT-BIH manifest changes: 14 steps keep the LSTM cheap; the QRS near the last step learns fast."""


def write_manifest(tmp_path: Path, shared_data: Path, name: str, **data_changes: Any) -> Path:
    """Write simulations/sites/<name>.toml into ``tmp_path`` with data paths under ``shared_data``."""
    raw = tomllib.loads((SITES / f"{name}.toml").read_text(encoding="utf-8"))
    for key in ("path", "outcomes"):
        if key in raw["data"]:
            assert raw["data"][key].startswith(PREFIX), raw["data"][key]
            raw["data"][key] = str(shared_data) + raw["data"][key][len(PREFIX) :]
    raw["data"].update(data_changes)
    path = tmp_path / "manifests" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path


def opacus_epsilon(results: list[TrainResult], *, accountant: str, delta: float) -> float:
    """Return ε of a fresh Opacus accountant stepped once per DP-SGD step the rounds report."""
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    for result in results:
        for _ in range(result.steps):
            acc.step(noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate)
    return float(acc.get_epsilon(delta=delta))


def round_settings(train: TrainSettings, round_index: int) -> TrainSettings:
    """Return ``train`` with this round's seed: sampling and noise must differ between rounds."""
    assert train.seed is not None
    return train.model_copy(update={"seed": train.seed * 1000 + round_index})


def train_and_check(data: SiteData, recipe: Recipe, ledger_dir: Path) -> tuple[float, float]:
    """Train ``data`` with ``recipe`` under DP, check its accounting; return (test AUROC, ε)."""
    # Prepare
    torch.manual_seed(recipe.train.seed)
    model = build_for_data(
        recipe.model, task=data.task, num_classes=data.num_classes,
        input_shape=data.input_shape, has_mask=data.has_mask,
    )
    privacy = PrivacySettings.with_target(
        epsilon=recipe.epsilon, delta=recipe.delta, max_grad_norm=recipe.max_grad_norm,
        accountant=recipe.accountant,  # type: ignore[arg-type]
    )
    ledger = PrivacyLedger.open(ledger_dir, site=data.name, study="test-train-real")
    # Execute: a fresh seed every round (as client/app.py does), never the same noise twice
    results = [
        train_local(model, data, train=round_settings(recipe.train, r), privacy=privacy,
                    ledger=ledger, planned_rounds=recipe.rounds, round_index=r)
        for r in range(recipe.rounds)
    ]
    auroc = evaluate(model, data.test, data.task)["auroc"]
    # Assert: the accounting
    last = results[-1]
    independent = opacus_epsilon(results, accountant=recipe.accountant, delta=recipe.delta)
    reopened = PrivacyLedger.open(ledger_dir, site=data.name, study="test-train-real")
    assert last.delta == recipe.delta
    assert all(r.steps > 0 and r.noise_multiplier > 0 for r in results)
    assert last.epsilon == pytest.approx(ledger.spent_epsilon(), abs=1e-9)
    assert last.epsilon == pytest.approx(reopened.spent_epsilon(), abs=1e-9)
    assert last.epsilon == pytest.approx(independent, abs=1e-9)
    assert recipe.epsilon - EPSILON_TOLERANCE <= last.epsilon <= recipe.epsilon
    assert sum(steps for _, _, steps in reopened.history) == sum(r.steps for r in results)
    # Assert: better than chance
    assert math.isfinite(auroc)
    assert auroc >= recipe.min_auroc, f"{data.name}: test AUROC {auroc:.3f} < {recipe.min_auroc}"
    return auroc, last.epsilon


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Train on one CPU thread (shared machines); restore torch's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_heart_cleveland_logistic_dp(shared_data: Path, tmp_path: Path) -> None:
    # Prepare
    data = load_site_file(write_manifest(tmp_path, shared_data, "heart_cleveland"))
    assert (data.kind, data.input_shape, len(data.train)) == ("table", (15,), 211)
    # Execute / Assert
    train_and_check(data, RECIPES["heart_cleveland"], tmp_path / "ledgers")


def test_heart_four_hospitals_pooled_logistic_dp(shared_data: Path, tmp_path: Path) -> None:
    # Prepare
    sites = [
        load_site_file(write_manifest(tmp_path, shared_data, f"heart_{h}")) for h in HEART_HOSPITALS
    ]
    data = pool_sites(sites, name="heart-pooled")
    assert len(data.train) + len(data.val) + len(data.test) == 740  # FLamby's 303/261/46/130
    # Execute / Assert
    train_and_check(data, RECIPES["heart_pooled"], tmp_path / "ledgers")


def test_physionet2012_lstm_with_mask_dp(shared_data: Path, tmp_path: Path) -> None:
    # Prepare
    data = load_site_file(write_manifest(tmp_path, shared_data, "physionet2012_all"))
    assert (data.kind, data.input_shape, data.has_mask) == ("sequence", (48, 36), True)
    assert len(data.train) == 2800
    # Execute / Assert
    train_and_check(data, RECIPES["physionet2012_all"], tmp_path / "ledgers")


def test_mitbih_site_a_pvc_lstm_dp(shared_data: Path, tmp_path: Path) -> None:
    # Prepare
    path = write_manifest(tmp_path, shared_data, "mitbih_site_a", **MITBIH_WINDOWS)
    with pytest.warns(UserWarning, match="min_cohort_size"):
        data = load_site_file(path)
    assert (data.kind, data.input_shape) == ("signal", (14, 1))
    assert int(data.test.targets.sum()) > 50  # enough PVC in the test split for a stable AUROC
    # Execute / Assert
    train_and_check(data, RECIPES["mitbih_site_a"], tmp_path / "ledgers")


@pytest.mark.parametrize("name", ["breastmnist", "pneumoniamnist"])
def test_medmnist_cnn_dp(shared_data: Path, tmp_path: Path, name: str) -> None:
    # Prepare
    data = load_site_file(write_manifest(tmp_path, shared_data, name))
    assert (data.kind, data.input_shape) == ("image", (1, 28, 28))
    # Execute / Assert
    train_and_check(data, RECIPES[name], tmp_path / "ledgers")
