"""RunConfig: Flower run-config parsing, round trip, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fedcare.models import ModelSpec
from fedcare.server.config import RUN_CONFIG_KEYS, InvalidRunConfigError, RunConfig


def _minimal(**extra: object) -> dict[str, object]:
    return {"input-shape": "30", **extra}


def test_defaults_from_a_minimal_run_config() -> None:
    # Prepare / Execute
    config = RunConfig.from_run_config(_minimal())

    # Assert
    assert config.input_shape == (30,)
    assert config.strategy == "fedavg"
    assert config.num_rounds == 3
    assert config.min_sites == 2
    assert config.model == ModelSpec()
    assert config.checkpoint_dir is None
    assert config.resume is False


@pytest.mark.parametrize(
    ("strategy", "params"),
    [
        ("fedavg", {}),
        ("fedprox", {"proximal-mu": 0.5}),
        ("fedadam", {"eta": 0.05, "eta-l": 0.2, "beta-1": 0.8, "beta-2": 0.95, "tau": 1e-4}),
        ("fedmedian", {}),
        ("fedtrimmedavg", {"trim-beta": 0.1}),
        ("krum", {"num-malicious-nodes": 1, "min-sites": 5}),
    ],
)
def test_round_trip_through_the_flat_run_config(strategy: str, params: dict[str, object]) -> None:
    # Prepare
    raw = _minimal(
        strategy=strategy,
        **params,
        **{"num-server-rounds": 7, "checkpoint-dir": "/tmp/ckpt", "model-family": "cnn",
           "input-shape": "1,28,28", "task": "multiclass", "num-classes": 9, "width": 8},
    )

    # Execute
    config = RunConfig.from_run_config(raw)
    flat = config.to_run_config()

    # Assert
    assert RunConfig.from_run_config(flat) == config
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert set(flat) <= set(RUN_CONFIG_KEYS)
    assert flat["input-shape"] == "1,28,28"
    assert config.checkpoint_dir == Path("/tmp/ckpt")
    assert config.model.width == 8
    for key, value in params.items():
        assert flat[key] == value


def test_unknown_key_is_refused_listing_the_known_keys() -> None:
    with pytest.raises(InvalidRunConfigError, match=r"unknown run-config key\(s\) \['num-rounds'\].*num-server-rounds"):
        RunConfig.from_run_config(_minimal(**{"num-rounds": 3}))


def test_nested_tables_arrive_flattened_and_are_checked() -> None:
    with pytest.raises(InvalidRunConfigError, match=r"strategy\.name"):
        RunConfig.from_run_config(_minimal(strategy={"name": "fedavg"}))


def test_missing_input_shape_says_where_to_set_it() -> None:
    with pytest.raises(InvalidRunConfigError, match=r"input-shape: missing; set it"):
        RunConfig.from_run_config({})


def test_unknown_strategy_lists_the_registered_ones() -> None:
    with pytest.raises(InvalidRunConfigError, match=r"unknown strategy 'fedsgd'.*fedadagrad, fedadam, fedavg, fedavgm, fedmedian"):
        RunConfig.from_run_config(_minimal(strategy="fedsgd"))


def test_a_strategy_parameter_for_another_strategy_is_an_error() -> None:
    with pytest.raises(InvalidRunConfigError, match=r"proximal-mu applies to strategy 'fedprox' only"):
        RunConfig.from_run_config(_minimal(strategy="fedadam", **{"proximal-mu": 0.1}))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num-server-rounds", 0, "num-server-rounds"),
        ("fraction-train", 0.0, "fraction-train"),
        ("lr", -1.0, "lr"),
        ("model-family", 3, "model-family"),
        ("task", "survival", "task"),
        ("trim-beta", 0.6, "trim-beta"),
    ],
)
def test_bad_values_name_their_key(key: str, value: object, message: str) -> None:
    raw = _minimal(**{key: value})
    if key == "trim-beta":
        raw["strategy"] = "fedtrimmedavg"
    with pytest.raises(InvalidRunConfigError, match=message):
        RunConfig.from_run_config(raw)


def test_gradient_clipping_reaches_the_sites_train_config() -> None:
    # Prepare
    from fedcare.models import wire
    from fedcare.server.app import train_config

    # Execute
    config = RunConfig.from_run_config(_minimal(**{"clip-grad-norm": 1.5}))
    # Assert
    assert config.clip_grad_norm == 1.5
    assert train_config(config)[wire.CLIP_GRAD_NORM] == 1.5
    assert train_config(RunConfig.from_run_config(_minimal()))[wire.CLIP_GRAD_NORM] == 0.0
    with pytest.raises(InvalidRunConfigError, match="clip-grad-norm"):
        RunConfig.from_run_config(_minimal(**{"clip-grad-norm": -1.0}))


@pytest.mark.parametrize(("text", "shape"), [("1,28,28", (1, 28, 28)), ("1x28x28", (1, 28, 28)), (13, (13,)), ("48, 37", (48, 37))])
def test_input_shape_spellings(text: object, shape: tuple[int, ...]) -> None:
    assert RunConfig.from_run_config({"input-shape": text}).input_shape == shape


def test_input_shape_must_be_integers() -> None:
    with pytest.raises(InvalidRunConfigError, match="comma-separated integers"):
        RunConfig.from_run_config({"input-shape": "a,b"})


def test_task_and_classes_must_agree() -> None:
    with pytest.raises(InvalidRunConfigError, match="binary' needs num-classes = 2"):
        RunConfig.from_run_config(_minimal(**{"num-classes": 3}))
    with pytest.raises(InvalidRunConfigError, match="multiclass' needs num-classes >= 3"):
        RunConfig.from_run_config(_minimal(task="multiclass"))


def test_krum_needs_enough_sites_for_its_malicious_count() -> None:
    with pytest.raises(InvalidRunConfigError, match=r"min-sites >= 5"):
        RunConfig.from_run_config(_minimal(strategy="krum", **{"num-malicious-nodes": 1, "min-sites": 4}))


def test_config_is_frozen_and_refuses_unknown_fields() -> None:
    config = RunConfig(input_shape=(4,))
    with pytest.raises(ValidationError):
        config.num_rounds = 10  # type: ignore[misc]
    with pytest.raises(ValidationError):
        RunConfig(input_shape=(4,), rounds=3)  # type: ignore[call-arg]


def test_empty_checkpoint_dir_means_none() -> None:
    config = RunConfig.from_run_config(_minimal(**{"checkpoint-dir": ""}))
    assert config.checkpoint_dir is None
    assert config.to_run_config()["checkpoint-dir"] == ""
