"""The scatternet family: fixed scattering features + a linear head, the DP recipe for images."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator

from fedcare.client.dataset import SiteData, Split
from fedcare.client.training import TrainSettings, train_local
from fedcare.models import ModelSpec, ScatterNetClassifier, build_for_data, get_weights, set_weights
from fedcare.models.scatter import SCATTER_CHANNELS
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.settings import PrivacySettings


def _images(n: int, *, channels: int = 1, side: int = 28, seed: int = 0) -> SiteData:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, channels, side, side, generator=g) + y.view(-1, 1, 1, 1).float()
    split = Split(inputs=(x,), targets=y)
    return SiteData(name="img", kind="image", task="binary", num_classes=2,
                    input_shape=(channels, side, side), train=split, val=split, test=split)


def test_only_the_linear_head_is_trained_and_exchanged() -> None:
    # Prepare / Execute
    model = build_for_data(ModelSpec(family="scatternet"), task="binary", num_classes=2, input_shape=(1, 28, 28))
    # Assert: 81 coefficients x 7 x 7 into one logit; the scattering filters are not in the state
    assert SCATTER_CHANNELS == 81
    assert isinstance(model, ScatterNetClassifier)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {"head.weight": (1, 81 * 49), "head.bias": (1,)}
    assert sum(p.numel() for p in model.parameters()) == 81 * 49 + 1
    ModuleValidator.validate(model, strict=True)


def test_rgb_multiclass_and_larger_images_pool_to_the_same_head_size() -> None:
    # Prepare
    model = build_for_data(ModelSpec(family="scatternet"), task="multiclass", num_classes=3, input_shape=(3, 64, 64))
    # Execute
    out = model(torch.randn(2, 3, 64, 64))
    # Assert
    assert out.shape == (2, 3)
    assert model.head.in_features == 3 * 81 * 49


@pytest.mark.parametrize("shape", [(1, 30, 30), (1, 24, 24), (28,)])
def test_images_the_transform_cannot_take_are_refused_with_what_to_do(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="scatternet"):
        build_for_data(ModelSpec(family="scatternet"), task="binary", num_classes=2, input_shape=shape)


def test_features_are_a_fixed_function_of_the_image() -> None:
    # Prepare: two models built separately (two sites) with different head weights
    torch.manual_seed(0)
    a = ScatterNetClassifier()
    torch.manual_seed(1)
    b = ScatterNetClassifier()
    x = torch.randn(4, 1, 28, 28)
    # Execute / Assert: same features at both sites, so a head trained at one means the same at the other
    assert torch.equal(a.features(x), b.features(x))
    set_weights(b, get_weights(a))
    assert torch.equal(a(x), b(x))


def test_dp_round_trains_the_head_and_charges_the_ledger(tmp_path: Path) -> None:
    # Prepare
    data = _images(64)
    torch.manual_seed(0)
    model = build_for_data(ModelSpec(family="scatternet"), task="binary", num_classes=2, input_shape=(1, 28, 28))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ledger = PrivacyLedger.open(tmp_path / "ledger", site="img", study="scatter")
    privacy = PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=10.0, delta=1e-3)
    # Execute
    result = train_local(model, data, train=TrainSettings(batch_size=16, lr=1.0, seed=0), privacy=privacy,
                         ledger=ledger, planned_rounds=1, round_index=1)
    # Assert: 4 Poisson steps taken and charged; the head moved; nothing else is in the state
    assert result.steps == 4 and math.isfinite(result.loss)
    assert result.epsilon > 0 and ledger.spent_epsilon() == pytest.approx(result.epsilon)
    assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])
    assert set(model.state_dict()) == {"head.weight", "head.bias"}


def test_cached_features_equal_the_transform_and_the_bound_holds() -> None:
    # Prepare
    from fedcare.models.scatter import FeatureCache, _scattering

    model = ScatterNetClassifier()
    x = torch.randn(6, 1, 28, 28)
    expected = _scattering(28)(x).flatten(1, 2)
    # Execute: once to fill, once shuffled (all hits)
    first = model.scattering(x)
    again = model.scattering(x[[5, 3, 1, 0, 2, 4]])
    # Assert: bitwise the transform's output, in the batch's order
    assert torch.equal(first, expected)
    assert torch.equal(again, expected[[5, 3, 1, 0, 2, 4]])
    small = FeatureCache(max_bytes=2 * expected[0].numel() * 4)
    for i in range(3):
        small.put(FeatureCache.key(x[i], b"s"), expected[i])
    assert len(small) == 2 and small.get(FeatureCache.key(x[0], b"s")) is None
    assert FeatureCache.key(x[0], b"s") != FeatureCache.key(x[0], b"t")
