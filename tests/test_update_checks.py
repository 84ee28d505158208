"""The coordinator checks every update before aggregation: refused, recorded, audited, and the round goes on.

Plain rounds run the real ServerApp loop (``run_server``) on an in-process Grid with a scripted
ClientApp; SecAgg+ rounds run flwr's SecAgg+ workflow and fedcare's secure mod around a scripted
handler (the server sees only the unmasked mean, which is what it checks).
"""

from __future__ import annotations

import json
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from scripted_apps import Corrupt, WireGrid, plain_update_app, secure_app  # noqa: E402

from fedcare.models import wire  # noqa: E402
from fedcare.privacy.audit_log import generate_signing_key, load_verify_key, verify_log  # noqa: E402
from fedcare.server.app import initial_arrays, run_server  # noqa: E402
from fedcare.server.checkpoint import FINAL_MODEL_FILE, HISTORY_FILE, load_model_file  # noqa: E402
from fedcare.server.config import InvalidRunConfigError, RunConfig  # noqa: E402
from fedcare.server.secagg import SITES_LOST, SecureAggregationError  # noqa: E402
from fedcare.server.strategy import TooFewSitesError  # noqa: E402
from fedcare.server.update_checks import UpdateCheck, check_secure_aggregate, update_norm  # noqa: E402
from fedcare.simulations.runner import InProcessGrid  # noqa: E402

SIZES = (10, 20, 30, 40, 50)


def _nan(a: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    a["linear.weight"][0, 1] = np.nan
    return a


def _inf(a: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    a["linear.bias"][0] = -np.inf
    return a


def _shape(a: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    a["linear.bias"] = np.ones((1, 1), dtype=np.float32)  # would broadcast into the bias silently
    return a


def _name(a: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    a["backdoor"] = a.pop("linear.bias")
    return a


def _dtype(a: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.astype(np.int64)) for k, v in a.items())


def _huge(a: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v + np.float32(1e4)) for k, v in a.items())


def _config(tmp_path: Path, **changes: Any) -> RunConfig:
    values: dict[str, Any] = {"input_shape": (3,), "num_rounds": 2, "min_sites": 2, "seed": 1,
                              "checkpoint_dir": tmp_path / "ckpt", "fraction_evaluate": 0.0}
    values.update(changes)
    return RunConfig(**values)


def _entries(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


# --------------------------------------------------------------------------- plain rounds


@pytest.mark.parametrize(
    ("corrupt", "changes", "says"),
    [
        (_nan, {}, "array 'linear.weight' holds 1 NaN and 0 infinite value(s)"),
        (_inf, {}, "array 'linear.bias' holds 0 NaN and 1 infinite value(s)"),
        (_shape, {}, "array 'linear.bias' has shape (1, 1), the model's is (1,)"),
        (_name, {}, "missing ['linear.bias'], unexpected ['backdoor']"),
        (_dtype, {}, "array 'linear.weight' has dtype int64, the model's is float32"),
        (_huge, {"max_update_norm": 1.0}, "above max-update-norm = 1"),
    ],
    ids=["nan", "inf", "shape", "name", "dtype", "norm"],
)
def test_a_bad_update_is_refused_audited_and_the_round_goes_on(
    tmp_path: Path, corrupt: Corrupt, changes: dict[str, Any], says: str
) -> None:
    # Prepare: hospital-1 sends a bad update in both rounds; an audit key
    private, public = generate_signing_key(tmp_path / "audit.key")
    config = _config(tmp_path, audit_key=private, **changes)
    start = initial_arrays(config)

    # Execute
    history = run_server(InProcessGrid(plain_update_app(dict(enumerate(SIZES)), {1: corrupt}), num_nodes=3), config)

    # Assert: both rounds complete on the weighted mean of hospitals 0 and 2 (weights 10 and 30)
    final, _ = load_model_file(tmp_path / "ckpt" / FINAL_MODEL_FILE)
    step = (10 * 0.01 + 30 * 0.03) / 40
    for name, value in start.items():
        np.testing.assert_allclose(final[name], value + 2 * step, rtol=1e-5, atol=1e-6)
    for record in history.rounds:
        assert record.complete
        assert [(r["site"], r["code"]) for r in record.refusals] == [("hospital-1", wire.ERROR_UPDATE_REFUSED)]
        assert says in record.refusals[0]["reason"]
    log = tmp_path / "ckpt" / "audit.jsonl"
    assert verify_log(log, load_verify_key(public)).ok
    refusals = [e["fields"] for e in _entries(log) if e["kind"] == "refusal"]
    assert [(f["site"], f["round"], f["rule"]) for f in refusals] == [
        ("hospital-1", 1, "train.update_refused"), ("hospital-1", 2, "train.update_refused")]
    assert says in refusals[0]["reason"]
    assert json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())["status"] == "completed"


@pytest.mark.parametrize("weight", [float("nan"), -5.0, 0.0, float("inf")])
def test_an_update_with_a_poisoned_weight_is_refused(tmp_path: Path, weight: float) -> None:
    history = run_server(InProcessGrid(plain_update_app({**dict(enumerate(SIZES)), 1: weight}), num_nodes=3), _config(tmp_path, num_rounds=1))

    (record,) = history.rounds
    assert record.complete and [r["site"] for r in record.refusals] == ["hospital-1"]
    assert "weight 'num-examples'" in record.refusals[0]["reason"]
    final, _ = load_model_file(tmp_path / "ckpt" / FINAL_MODEL_FILE)
    assert all(np.isfinite(v).all() for v in final.values())


def test_an_update_within_the_bound_is_aggregated(tmp_path: Path) -> None:
    # 0.01·3 on each of 4 values: norm 0.06 < 0.1; every site aggregated
    history = run_server(InProcessGrid(plain_update_app(dict(enumerate(SIZES))), num_nodes=3), _config(tmp_path, num_rounds=1, max_update_norm=0.1))

    assert history.rounds[0].refusals == [] and len(history.rounds[0].site_train) == 3


def test_refused_updates_count_against_min_sites(tmp_path: Path) -> None:
    with pytest.raises(TooFewSitesError, match=r"only 1 site\(s\) trained.*2 updates refused"):
        run_server(InProcessGrid(plain_update_app(dict(enumerate(SIZES)), {0: _nan, 2: _inf}), num_nodes=3), _config(tmp_path, num_rounds=1))

    assert json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())["status"] == "stopped"


def test_update_check_unit_cases() -> None:
    # Prepare: a reference model and replies built as a node builds them
    InProcessGrid(ClientApp(), 1)  # sets flwr's task identity Message needs
    reference = {"w": np.zeros((2, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}

    def reply(arrays: dict[str, np.ndarray], **records: Any) -> Message:
        content = RecordDict({wire.ARRAYS: ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items())),
                              wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 5}), **records})
        msg = Message(content, dst_node_id=0, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = 7
        return msg

    good = {"w": np.full((2, 2), 0.5, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    check = UpdateCheck(max_update_norm=1.0)

    # Execute / Assert
    assert update_norm(reference, good) == 1.0
    assert check.problem(reply(good), reference) is None
    assert "above max-update-norm" in str(check.problem(reply({**good, "b": np.full(2, 0.1, np.float32)}), reference))
    extra = reply(good, other=ArrayRecord(OrderedDict(w=Array(good["w"]))))
    assert "not one 'arrays'" in str(check.problem(extra, reference))
    accepted, refused = check.screen([reply(good), reply({**good, "w": np.full((2, 2), np.nan, np.float32)})], reference)
    assert len(accepted) == 1 and [(r.node_id, r.reason) for r in refused] == [
        (7, "array 'w' holds 4 NaN and 0 infinite value(s)")]
    with pytest.raises(ValueError, match="finite number >= 0"):
        UpdateCheck(max_update_norm=math.inf)


# --------------------------------------------------------------------------- configuration


def test_max_update_norm_is_parsed_once_and_kept_out_of_the_hash_when_unset() -> None:
    config = RunConfig.from_run_config({"input-shape": "3", "max-update-norm": 2.5})

    assert config.max_update_norm == 2.5
    assert config.to_run_config()["max-update-norm"] == 2.5
    assert "max-update-norm" not in RunConfig(input_shape=(3,)).to_run_config()
    with pytest.raises(InvalidRunConfigError, match="max_update_norm|max-update-norm"):
        RunConfig.from_run_config({"input-shape": "3", "max-update-norm": -1.0})


# --------------------------------------------------------------------------- SecAgg+: what the server can check


def _secure(tmp_path: Path, **changes: Any) -> RunConfig:
    values: dict[str, Any] = dict(input_shape=(3,), num_rounds=1, min_sites=4, seed=1, checkpoint_dir=tmp_path / "ckpt",
                                  fraction_evaluate=0.0, secure_aggregation=True, client_dp_clipping_norm=0.5,
                                  client_dp_noise_multiplier=0.0)
    values.update(changes)
    return RunConfig(**values)


def test_under_secagg_a_site_with_a_nan_model_refuses_itself_and_the_round_goes_on(tmp_path: Path) -> None:
    # Prepare: hospital-2's training diverged (NaN); its own mod must not quantise it
    config = _secure(tmp_path)
    start = initial_arrays(config)

    # Execute
    history = run_server(WireGrid(secure_app({2: float("nan")}), 5), config)

    # Assert: four sites summed (each +0.01), the NaN site named
    (record,) = history.rounds
    assert record.train[SITES_LOST] == 1.0
    assert [r["stage"] for r in record.refusals] == ["collect-masked-vectors"]
    assert "NaN or infinite parameters" in record.refusals[0]["reason"]
    final, _ = load_model_file(tmp_path / "ckpt" / FINAL_MODEL_FILE)
    for name, value in start.items():
        np.testing.assert_allclose(final[name], value + 0.01, atol=1e-5)


def test_under_secagg_a_mean_update_above_max_update_norm_is_refused_loudly(tmp_path: Path) -> None:
    # every site moves each of the 4 weights by 0.1: mean update norm 0.2 > 0.15
    with pytest.raises(SecureAggregationError, match=r"mean update of the secure aggregate has L2 norm 0\.2.*"
                                                     r"above max-update-norm = 0\.15"):
        run_server(WireGrid(secure_app({}, default=0.1), 5), _secure(tmp_path, max_update_norm=0.15))

    saved = json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())
    assert saved["status"] == "failed" and "aggregate was refused" in saved["reason"]
    assert not (tmp_path / "ckpt" / FINAL_MODEL_FILE).exists()


def test_check_secure_aggregate_cases() -> None:
    reference = {"w": np.zeros(4, dtype=np.float32)}
    step = 2 * 8.0 / 4194304

    def check(values: np.ndarray, **limits: float) -> str | None:
        return check_secure_aggregate(reference, {"w": values}, **{"max_update_norm": 0.0, "clipping_norm": 0.0,
                                                                   "quantisation_step": step, **limits})

    assert check(np.full(4, 0.25, np.float32), clipping_norm=0.5) is None  # norm 0.5 = C
    assert "skipped its clipping" in str(check(np.full(4, 0.26, np.float32), clipping_norm=0.5))
    assert "holds 1 NaN" in str(check(np.array([0, 0, np.nan, 0], np.float32)))
    assert "has shape (2, 2)" in str(check(np.zeros((2, 2), np.float32)))
    assert "above max-update-norm = 0.1" in str(check(np.full(4, 0.1, np.float32), max_update_norm=0.1))
