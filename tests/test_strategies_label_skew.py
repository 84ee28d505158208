"""The server optimisers for label skew (issue 14 item 2): FedAvgM, FedYogi, FedAdagrad.

Each builds flwr's own class with the run config's values; a parameter for another strategy, or
an out-of-range or non-finite value, is refused with a message naming the key and what to do;
FedAvgM's momentum (a list of arrays in flwr, not a dict) survives a checkpoint and a resume. The
end-to-end cases run the real ServerApp loop on the in-process Grid with the scripted ClientApp of
``tests/fixtures/scripted_apps.py``: site i adds i + 1 to every weight and reports 10·(i + 1)
examples, so with three sites the example-weighted mean update is (1·10 + 2·20 + 3·30) / 60 = 7/3
per round and the global model after each round is known exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdagrad, FedAvgM, FedYogi

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from scripted_apps import scripted_app  # noqa: E402

from fedcare.models import UnknownNameError  # noqa: E402
from fedcare.server.app import run_server  # noqa: E402
from fedcare.server.checkpoint import load_checkpoint  # noqa: E402
from fedcare.server.config import STRATEGY_NAMES, InvalidRunConfigError, RunConfig  # noqa: E402
from fedcare.server.lifecycle import initial_arrays  # noqa: E402
from fedcare.server.strategy import STRATEGIES, StrategyStateError, build_strategy  # noqa: E402
from fedcare.server.study_tables import convert_run_table  # noqa: E402
from fedcare.simulations.runner import InProcessGrid  # noqa: E402

MEAN_UPDATE = 7.0 / 3.0  # scripted_app, three sites: sum((i + 1) * 10 (i + 1)) / sum(10 (i + 1))


def _flat(**changes: object) -> dict[str, object]:
    """Return a minimal flat run config with ``changes``."""
    return {"input-shape": "3", **changes}


def _config(tmp_path: Path | None = None, **changes: object) -> RunConfig:
    """Return a RunConfig of a 3-feature logistic model, 3 sites, 2 rounds, with ``changes``."""
    values: dict[str, object] = {"input_shape": (3,), "num_rounds": 2, "min_sites": 3, "seed": 1}
    if tmp_path is not None:
        values["checkpoint_dir"] = tmp_path
    values.update(changes)
    return RunConfig(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize(
    ("flat", "cls", "attrs"),
    [
        ({"strategy": "fedavgm", "server-momentum": 0.7, "server-learning-rate": 0.5}, FedAvgM,
         {"server_momentum": 0.7, "server_learning_rate": 0.5, "server_opt": True}),
        ({"strategy": "fedavgm"}, FedAvgM, {"server_momentum": 0.9, "server_learning_rate": 1.0}),
        ({"strategy": "fedyogi", "eta": 0.03, "eta-l": 0.2, "beta-1": 0.8, "beta-2": 0.95, "tau": 0.01}, FedYogi,
         {"eta": 0.03, "eta_l": 0.2, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.01}),
        ({"strategy": "fedadagrad", "eta": 0.02, "eta-l": 0.3, "tau": 1e-4}, FedAdagrad,
         {"eta": 0.02, "eta_l": 0.3, "tau": 1e-4}),
    ],
)
def test_each_new_strategy_builds_flwrs_class_with_the_run_config_values(
    flat: dict[str, object], cls: type, attrs: dict[str, object]
) -> None:
    # Prepare
    config = RunConfig.from_run_config(_flat(**flat))

    # Execute
    wrapped = build_strategy(config)

    # Assert
    assert type(wrapped.strategy) is cls
    for attr, value in attrs.items():
        assert getattr(wrapped.strategy, attr) == value
    assert RunConfig.from_run_config(config.to_run_config()) == config
    assert {k: v for k, v in config.to_run_config().items() if k in flat} == flat


def test_the_registry_and_the_config_list_the_new_names() -> None:
    # Execute
    names = STRATEGIES.names()

    # Assert
    assert {"fedavgm", "fedyogi", "fedadagrad"} <= set(names)
    assert names == sorted(STRATEGY_NAMES)
    with pytest.raises(UnknownNameError, match="unknown strategy 'scaffold'"):
        STRATEGIES.get("scaffold")


def test_scaffold_is_refused_listing_the_new_strategies() -> None:
    with pytest.raises(InvalidRunConfigError, match=r"unknown strategy 'scaffold'.*fedavgm.*fedyogi"):
        RunConfig.from_run_config(_flat(strategy="scaffold"))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"strategy": "fedavg", "server-momentum": 0.9},
         r"server-momentum applies to strategy 'fedavgm' only, but strategy is 'fedavg': remove it or set strategy = 'fedavgm'"),
        ({"strategy": "fedadam", "server-learning-rate": 0.5}, r"server-learning-rate applies to strategy 'fedavgm' only"),
        ({"strategy": "fedadagrad", "beta-1": 0.9},
         r"beta-1 applies to strategy 'fedadam' or 'fedyogi' only, but strategy is 'fedadagrad'"),
        ({"strategy": "fedavgm", "eta": 0.1}, r"eta applies to strategy 'fedadagrad' or 'fedadam' or 'fedyogi' only"),
        ({"strategy": "fedavgm", "server-momentum": 1.0}, r"server-momentum: Input should be less than 1"),
        ({"strategy": "fedavgm", "server-momentum": -0.1}, r"server-momentum: Input should be greater than or equal to 0"),
        ({"strategy": "fedavgm", "server-momentum": float("nan")}, r"server-momentum: Input should be a finite number"),
        ({"strategy": "fedavgm", "server-learning-rate": 0.0}, r"server-learning-rate: Input should be greater than 0"),
        ({"strategy": "fedavgm", "server-learning-rate": float("inf")},
         r"server-learning-rate: Input should be a finite number"),
        ({"strategy": "fedyogi", "eta": float("inf")}, r"eta: Input should be a finite number"),
        ({"strategy": "fedyogi", "tau": 0.0}, r"tau: Input should be greater than 0"),
        ({"strategy": "fedadagrad", "eta": -0.01}, r"eta: Input should be greater than 0"),
        ({"strategy": "fedyogi", "beta-2": 1.0}, r"beta-2: Input should be less than 1"),
    ],
)
def test_a_bad_or_misplaced_strategy_parameter_is_refused_naming_the_key(flat: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRunConfigError, match=message):
        RunConfig.from_run_config(_flat(**flat))


@pytest.mark.parametrize("strategy", ["fedavgm", "fedyogi", "fedadagrad"])
def test_secure_aggregation_refuses_the_server_optimisers(strategy: str) -> None:
    with pytest.raises(InvalidRunConfigError, match=rf"mean-based strategy \(fedavg, fedprox\), not '{strategy}'"):
        RunConfig.from_run_config(_flat(strategy=strategy, **{"secure-aggregation": True}))


def test_the_study_converter_moves_the_fedavgm_keys_into_the_strategy_table() -> None:
    # Prepare
    old = {"run": {"strategy": "fedavgm", "server-momentum": 0.8, "server-learning-rate": 0.5, "min-sites": 3}}

    # Execute
    new = convert_run_table(old)

    # Assert
    assert new["strategy"] == {"name": "fedavgm", "server-momentum": 0.8, "server-learning-rate": 0.5}
    assert new["run"] == {"min-sites": 3}


# --------------------------------------------------------------------------- FedAvgM end to end


def test_fedavgm_applies_server_momentum_through_the_serverapp(tmp_path: Path) -> None:
    # Prepare: β = 0.5, η_s = 1: round 1 moves by g, round 2 by (1 + β) g, g = 7/3
    config = _config(tmp_path, strategy="fedavgm", server_momentum=0.5, server_learning_rate=1.0)
    start = initial_arrays(config)

    # Execute
    run_server(InProcessGrid(scripted_app(), num_nodes=3), config)

    # Assert
    ckpt = load_checkpoint(tmp_path / "checkpoint.npz")
    for name, value in ckpt.arrays.items():
        np.testing.assert_allclose(value, start[name] + (1 + 1.5) * MEAN_UPDATE, rtol=1e-5)
    momentum = ckpt.strategy_state["arrays"]["momentum_vector"]
    assert list(momentum) == [str(i) for i in range(len(start))]
    for stored, name in zip(momentum.values(), start, strict=True):
        np.testing.assert_allclose(stored, np.full_like(start[name], -1.5 * MEAN_UPDATE), rtol=1e-5)


def test_fedavgm_resumes_with_its_momentum(tmp_path: Path) -> None:
    # Prepare: two rounds, then resume to three; round 3 moves by (1 + β + β²) g only if m is restored
    first = _config(tmp_path, strategy="fedavgm", server_momentum=0.5)
    start = initial_arrays(first)
    run_server(InProcessGrid(scripted_app(), num_nodes=3), first)

    # Execute
    run_server(InProcessGrid(scripted_app(), num_nodes=3),
               _config(tmp_path, strategy="fedavgm", server_momentum=0.5, num_rounds=3, resume=True))

    # Assert
    ckpt = load_checkpoint(tmp_path / "checkpoint.npz")
    assert ckpt.round == 3
    for name, value in ckpt.arrays.items():
        np.testing.assert_allclose(value, start[name] + (1 + 1.5 + 1.75) * MEAN_UPDATE, rtol=1e-5)


def test_a_fedavgm_state_with_gaps_in_its_momentum_is_refused() -> None:
    # Prepare
    state = {"kind": "fedcare-strategy/1", "strategy": "FedAvgM",
             "arrays": {"momentum_vector": {"0": np.ones(2), "2": np.ones(2)}}}

    # Execute / Assert
    with pytest.raises(StrategyStateError, match=r"momentum_vector must be stored as arrays '0' … '1'"):
        build_strategy(_config(strategy="fedavgm")).load_state_dict(state)


def test_fedyogi_state_round_trips() -> None:
    # Prepare
    yogi = build_strategy(_config(strategy="fedyogi"))
    yogi.strategy.m_t = {"w": np.ones(3)}
    yogi.strategy.v_t = {"w": np.full(3, 2.0)}

    # Execute
    other = build_strategy(_config(strategy="fedyogi"))
    other.load_state_dict(yogi.state_dict())

    # Assert
    np.testing.assert_array_equal(other.strategy.v_t["w"], np.full(3, 2.0))
    with pytest.raises(StrategyStateError, match="of strategy 'FedYogi', this run uses 'FedAdagrad'"):
        build_strategy(_config(strategy="fedadagrad")).load_state_dict(yogi.state_dict())
