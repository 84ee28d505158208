"""Checkpoints: round trip (model, FedAdam moments, history, RNG), atomic writes, damaged files."""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fedcare.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    MetricsHistory,
    load_checkpoint,
    load_model_file,
    save_checkpoint,
    save_model_file,
)


def _history() -> MetricsHistory:
    history = MetricsHistory()
    first = history.round(1)
    first.train = {"train-loss": 0.5, "epsilon": 1.25}
    first.evaluate = {"auroc": 0.8, "accuracy": float("nan")}
    first.site_evaluate = {"a": {"auroc": 0.7}, "b": {"auroc": 0.9}}
    first.worst_site = {"site": "a", "metric": "auroc", "value": 0.7}
    first.refusals = [{"stage": "train", "node_id": 7, "site": "c", "code": 1002, "reason": "budget"}]
    first.complete = True
    history.round(2).train = {"train-loss": 0.4}  # started, never finished
    history.node_sites = {7: "c"}
    return history


def _checkpoint(rng: random.Random) -> Checkpoint:
    arrays = OrderedDict(
        [("linear.weight", np.arange(6, dtype=np.float32).reshape(1, 6)), ("linear.bias", np.array([0.5], np.float32))]
    )
    moments = {
        "m_t": OrderedDict((k, v * 0.1) for k, v in arrays.items()),
        "v_t": OrderedDict((k, v * 0.01 + 1e-9) for k, v in arrays.items()),
    }
    state = rng.getstate()
    return Checkpoint(
        round=3,
        arrays=arrays,
        strategy_state={"kind": "fedcare-strategy/1", "strategy": "FedAdam", "arrays": moments},
        history=_history().state_dict(),
        run_config={"strategy": "fedadam", "input-shape": "6", "num-server-rounds": 5},
        rng_state=[state[0], list(state[1]), state[2]],
    )


def test_round_trip_keeps_model_fedadam_state_history_and_rng(tmp_path: Path) -> None:
    # Prepare
    ckpt = _checkpoint(random.Random(42))
    path = tmp_path / "ckpt" / "checkpoint.npz"

    # Execute
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)

    # Assert
    assert loaded.round == 3
    assert list(loaded.arrays) == ["linear.weight", "linear.bias"]
    for name, value in ckpt.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[name], value)
        assert loaded.arrays[name].dtype == np.float32
    for attr in ("m_t", "v_t"):
        for name, value in ckpt.strategy_state["arrays"][attr].items():
            np.testing.assert_array_equal(loaded.strategy_state["arrays"][attr][name], value)
    assert loaded.strategy_state["strategy"] == "FedAdam"
    assert loaded.run_config == ckpt.run_config
    restored = random.Random()
    restored.setstate((loaded.rng_state[0], tuple(loaded.rng_state[1]), loaded.rng_state[2]))
    assert restored.random() == random.Random(42).random()
    history = MetricsHistory()
    history.load_state_dict(loaded.history)
    assert [r.round for r in history.rounds] == [1, 2]
    assert history.last_complete == 1
    assert history.round(1).refusals[0]["site"] == "c"
    assert np.isnan(history.round(1).evaluate["accuracy"])  # NaN survives as JSON null
    assert history.node_sites == {7: "c"}
    history.drop_incomplete()
    assert [r.round for r in history.rounds] == [1]


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "checkpoint.npz"
    good = _checkpoint(random.Random(0))
    save_checkpoint(path, good)
    before = path.read_bytes()
    bad = Checkpoint(
        round=4,
        arrays=OrderedDict([("../escape", np.zeros(1))]),  # refused while writing
        strategy_state={},
        history={},
        run_config={},
    )

    # Execute
    with pytest.raises(ValueError, match="cannot store"):
        save_checkpoint(path, bad)

    # Assert
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fedcare-state", "checkpoint.npz"]
    assert load_checkpoint(path).round == 3


def test_an_interrupted_write_never_replaces_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, _checkpoint(random.Random(0)))
    before = path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)

    # Execute
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _checkpoint(random.Random(1)))

    # Assert
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fedcare-state", "checkpoint.npz"]


def test_damaged_or_foreign_files_raise_checkpoint_error(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.npz"
    save_checkpoint(truncated, _checkpoint(random.Random(0)))
    truncated.write_bytes(truncated.read_bytes()[:100])
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, meta=np.frombuffer(b'{"format": "other"}', dtype=np.uint8))

    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="not a fedcare-checkpoint/1"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.npz")


def test_history_refuses_a_state_of_another_kind() -> None:
    with pytest.raises(CheckpointError, match="not a metrics history"):
        MetricsHistory().load_state_dict({"kind": "fedcare-strategy/1"})


def test_model_file_round_trip(tmp_path: Path) -> None:
    arrays = OrderedDict([("w", np.ones((2, 3), np.float32)), ("b", np.zeros(2, np.float32))])
    save_model_file(tmp_path / "m.npz", arrays, {"task": "binary", "input_shape": [3]})

    loaded, meta = load_model_file(tmp_path / "m.npz")

    assert list(loaded) == ["w", "b"]
    np.testing.assert_array_equal(loaded["w"], arrays["w"])
    assert meta["task"] == "binary" and meta["input_shape"] == [3]
    with pytest.raises(CheckpointError, match="not a fedcare model file"):
        save_checkpoint(tmp_path / "c.npz", _checkpoint(random.Random(0)))
        load_model_file(tmp_path / "c.npz")
