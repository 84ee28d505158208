"""Strategies by name, the wrapper's per-site records, and the ServerApp/ClientApp message contract.

Runs the real ServerApp loop (``run_server``) against an in-process Grid (no Ray): fast and
deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from scripted_apps import scripted_app  # noqa: E402

from fedcare.client.app import LocalSite, make_client_app  # noqa: E402
from fedcare.client.errors import DataValidationError  # noqa: E402
from fedcare.models import UnknownNameError, wire  # noqa: E402
from fedcare.privacy.settings import PrivacySettings  # noqa: E402
from fedcare.server.app import run_server  # noqa: E402
from fedcare.server.config import RunConfig  # noqa: E402
from fedcare.server.strategy import (  # noqa: E402
    STRATEGIES,
    FedcareStrategy,
    StrategyStateError,
    TooFewSitesError,
    aggregate_evaluate_metrics,
    aggregate_train_metrics,
    build_strategy,
    worst_site,
)
from fedcare.simulations.builtin import load_builtin  # noqa: E402
from fedcare.simulations.partition import PartitionScheme, partition  # noqa: E402
from fedcare.simulations.runner import InProcessGrid  # noqa: E402

# --------------------------------------------------------------------------- a scripted ClientApp (tests/fixtures/scripted_apps.py)

REFUSE: dict[tuple[int, int], str] = {}  # (partition, round) -> reason, set per test (scripted_app's refusals)


@pytest.fixture(autouse=True)
def _no_refusals() -> None:
    REFUSE.clear()


def _config(tmp_path: Path | None = None, **changes: object) -> RunConfig:
    values: dict[str, object] = {"input_shape": (3,), "num_rounds": 2, "min_sites": 2, "seed": 1}
    if tmp_path is not None:
        values["checkpoint_dir"] = tmp_path
    values.update(changes)
    return RunConfig(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- registry


def test_registry_holds_the_nine_strategies_and_refuses_others() -> None:
    assert STRATEGIES.names() == ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian", "fedprox", "fedtrimmedavg", "fedyogi", "krum"]
    with pytest.raises(UnknownNameError, match="unknown strategy 'scaffold'; known strategys: fedadagrad, fedadam"):
        STRATEGIES.get("scaffold")


@pytest.mark.parametrize(
    ("name", "params", "cls", "attrs"),
    [
        ("fedavg", {}, FedAvg, {}),
        ("fedprox", {"proximal_mu": 0.3}, FedProx, {"proximal_mu": 0.3}),
        ("fedadam", {"eta": 0.02, "beta_1": 0.5, "tau": 1e-4}, FedAdam, {"eta": 0.02, "beta_1": 0.5, "tau": 1e-4}),
        ("fedmedian", {}, FedMedian, {}),
        ("fedtrimmedavg", {"trim_beta": 0.1}, FedTrimmedAvg, {"beta": 0.1}),
        ("krum", {"num_malicious_nodes": 1, "min_sites": 5}, Krum, {"num_malicious_nodes": 1}),
    ],
)
def test_build_strategy_wraps_the_flwr_class_with_its_parameters(
    name: str, params: dict[str, object], cls: type, attrs: dict[str, object]
) -> None:
    # Prepare / Execute
    wrapped = build_strategy(_config(strategy=name, fraction_evaluate=0.5, **params))

    # Assert
    assert isinstance(wrapped, FedcareStrategy)
    assert type(wrapped.strategy) is cls
    inner = wrapped.strategy
    assert (inner.fraction_evaluate, inner.min_train_nodes, inner.min_available_nodes) == (
        0.5, wrapped.min_sites, wrapped.min_sites,
    )
    assert inner.weighted_by_key == wire.NUM_EXAMPLES
    for attr, value in attrs.items():
        assert getattr(inner, attr) == value


# --------------------------------------------------------------------------- metric aggregation


def _record(n: int, **metrics: float) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({wire.NUM_EXAMPLES: n, **metrics})})


def test_train_metrics_are_weighted_but_privacy_is_the_worst_site() -> None:
    records = [_record(10, loss=1.0, epsilon=0.5, delta=1e-5), _record(30, loss=2.0, epsilon=2.5, delta=1e-6)]

    out = aggregate_train_metrics(records, wire.NUM_EXAMPLES)

    assert out["loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert out["epsilon"] == 2.5
    assert out["delta"] == 1e-5
    assert wire.NUM_EXAMPLES not in out


def test_evaluate_metrics_leave_out_a_site_reporting_nan() -> None:
    records = [_record(10, auroc=0.5, accuracy=0.5), _record(30, auroc=float("nan"), accuracy=0.9),
               _record(60, auroc=0.8, accuracy=0.7)]

    out = aggregate_evaluate_metrics(records, wire.NUM_EXAMPLES)

    assert out["auroc"] == pytest.approx((10 * 0.5 + 60 * 0.8) / 70)
    assert out["accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9 + 60 * 0.7) / 100)


def test_evaluate_metric_no_site_can_compute_stays_nan() -> None:
    out = aggregate_evaluate_metrics([_record(5, r2=float("nan"))], wire.NUM_EXAMPLES)
    assert math.isnan(out["r2"])


def test_worst_site_prefers_auroc_then_accuracy_and_takes_the_highest_error() -> None:
    assert worst_site({"a": {"auroc": 0.9, "accuracy": 0.5}, "b": {"auroc": 0.7, "accuracy": 0.9}}) == {
        "site": "b", "metric": "auroc", "value": 0.7,
    }
    assert worst_site({"a": {"auroc": float("nan"), "accuracy": 0.8}, "b": {"auroc": float("nan"), "accuracy": 0.6}}) == {
        "site": "b", "metric": "accuracy", "value": 0.6,
    }
    assert worst_site({"a": {"rmse": 1.0}, "b": {"rmse": 3.0}})["site"] == "b"
    assert worst_site({}) is None


# --------------------------------------------------------------------------- the wrapper in a real loop


def test_global_metrics_are_example_weighted_and_sites_are_keyed_by_their_names(tmp_path: Path) -> None:
    # Prepare
    grid = InProcessGrid(scripted_app(refuse=REFUSE), num_nodes=3)

    # Execute
    history = run_server(grid, _config(tmp_path, num_rounds=1, min_sites=3))

    # Assert
    rec = history.round(1)
    assert rec.complete
    assert sorted(rec.site_train) == ["hospital-0", "hospital-1", "hospital-2"]
    assert rec.site_evaluate["hospital-2"]["accuracy"] == pytest.approx(0.8)
    assert rec.evaluate["accuracy"] == pytest.approx((10 * 0.6 + 20 * 0.7 + 30 * 0.8) / 60)
    assert rec.train["train-loss"] == pytest.approx((10 * 0 + 20 * 1 + 30 * 2) / 60)
    assert rec.train["epsilon"] == 1.5
    assert rec.worst_site == {"site": "hospital-0", "metric": "auroc", "value": pytest.approx(0.6)}
    assert rec.refusals == []


def test_fedavg_update_equals_the_weighted_mean_of_site_updates(tmp_path: Path) -> None:
    from fedcare.server.app import initial_arrays
    from fedcare.server.checkpoint import load_model_file

    config = _config(tmp_path, num_rounds=1, min_sites=3)
    run_server(InProcessGrid(scripted_app(refuse=REFUSE), num_nodes=3), config)

    final, _ = load_model_file(tmp_path / "final_model.npz")
    for name, start in initial_arrays(config).items():
        np.testing.assert_allclose(final[name], start + (10 * 1 + 20 * 2 + 30 * 3) / 60, rtol=1e-6)


def test_a_refusing_site_is_recorded_and_the_round_goes_on(tmp_path: Path) -> None:
    # Prepare
    REFUSE[(1, 2)] = "privacy budget spent"

    # Execute
    history = run_server(InProcessGrid(scripted_app(refuse=REFUSE), num_nodes=3), _config(tmp_path, min_sites=2))

    # Assert
    rec = history.round(2)
    assert rec.complete
    assert sorted(rec.site_train) == ["hospital-0", "hospital-2"]
    assert rec.refusals == [
        {"stage": "train", "node_id": 2, "site": "hospital-1", "code": wire.ERROR_BUDGET_SPENT,
         "reason": "site 'hospital-1' refused to train: privacy budget spent"}
    ]
    assert "hospital-1" in rec.site_evaluate  # it still evaluates


def test_too_few_training_sites_stop_the_run_after_the_last_good_checkpoint(tmp_path: Path) -> None:
    # Prepare
    REFUSE[(0, 2)] = "data failed validation"
    REFUSE[(1, 2)] = "budget"

    # Execute
    with pytest.raises(TooFewSitesError, match=r"round 2: only 1 site\(s\) trained, fewer than min-sites = 2"):
        run_server(InProcessGrid(scripted_app(refuse=REFUSE), num_nodes=3), _config(tmp_path, min_sites=2))

    # Assert
    import json

    from fedcare.server.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "checkpoint.npz").round == 1
    written = json.loads((tmp_path / "history.json").read_text())
    assert written["status"] == "stopped"
    assert [(r["round"], r["complete"]) for r in written["rounds"]] == [(1, True), (2, False)]
    assert {r["site"] for r in written["rounds"][1]["refusals"]} == {"hospital-0", "hospital-1"}


def test_strategy_state_round_trips_and_refuses_other_strategies() -> None:
    # Prepare
    adam = build_strategy(_config(strategy="fedadam"))
    assert isinstance(adam.strategy, FedAdam)
    adam.strategy.m_t = {"w": np.ones(3)}
    adam.strategy.v_t = {"w": np.full(3, 2.0)}
    state = adam.state_dict()

    # Execute
    other = build_strategy(_config(strategy="fedadam"))
    other.load_state_dict(state)

    # Assert
    assert isinstance(other.strategy, FedAdam)
    np.testing.assert_array_equal(other.strategy.v_t["w"], np.full(3, 2.0))
    state["arrays"]["m_t"]["w"][0] = 99.0  # the loaded state is a copy
    assert other.strategy.m_t["w"][0] == 1.0
    with pytest.raises(StrategyStateError, match="of strategy 'FedAdam', this run uses 'FedAvg'"):
        build_strategy(_config()).load_state_dict(state)
    with pytest.raises(StrategyStateError, match="not a fedcare strategy state"):
        adam.load_state_dict({"kind": "fedcare-metrics-history/1"})


# --------------------------------------------------------------------------- the real ClientApp


@dataclasses.dataclass(frozen=True)
class _Sites:
    """A picklable provider of in-memory sites; partitions in ``broken`` fail validation."""

    sites: tuple[LocalSite, ...]
    broken: tuple[int, ...] = ()

    def __call__(self, context: Context) -> LocalSite:
        pid = int(context.node_config["partition-id"])
        if pid in self.broken:
            raise DataValidationError(f"column 'age' of partition {pid} holds text")
        return self.sites[pid]


def _local_sites(tmp_path: Path, privacy: PrivacySettings, n: int = 3) -> tuple[LocalSite, ...]:
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=n, seed=0)
    return tuple(
        LocalSite(data=d, privacy=privacy, ledger_dir=tmp_path / "ledgers", name=d.name, seed=i)
        for i, d in enumerate(data)
    )


def _real_config(tmp_path: Path, **changes: object) -> RunConfig:
    values: dict[str, object] = {
        "input_shape": (30,), "num_rounds": 2, "min_sites": 2, "checkpoint_dir": tmp_path / "ckpt",
        "batch_size": 64, "lr": 0.5, "study": "contract",
    }
    values.update(changes)
    return RunConfig(**values)  # type: ignore[arg-type]


FIXED_NOISE = PrivacySettings.with_noise(noise_multiplier=1.5, epsilon_budget=50.0)


def test_client_app_trains_with_dp_and_reports_site_epsilon(tmp_path: Path) -> None:
    # Prepare
    provider = _Sites(_local_sites(tmp_path, FIXED_NOISE))

    # Execute
    history = run_server(InProcessGrid(make_client_app(provider), 3), _real_config(tmp_path))

    # Assert
    first, second = history.round(1), history.round(2)
    assert sorted(second.site_train) == ["site-000", "site-001", "site-002"]
    for site, metrics in second.site_train.items():
        assert metrics["delta"] == 1e-5
        assert 0 < first.site_train[site]["epsilon"] < metrics["epsilon"] < 50.0  # ε only grows
        assert metrics["noise-multiplier"] == 1.5
        assert math.isnan(metrics["train-loss"])  # computed without noise: a DP site withholds it
    assert set(second.evaluate) >= {"auroc", "accuracy", "loss"}
    assert second.evaluate["auroc"] > 0.8
    assert len(list((tmp_path / "ledgers").glob("*.json"))) == 3


def test_a_site_may_opt_in_to_report_its_training_loss(tmp_path: Path) -> None:
    sites = tuple(dataclasses.replace(s, report_train_loss=True) for s in _local_sites(tmp_path, FIXED_NOISE))

    history = run_server(InProcessGrid(make_client_app(_Sites(sites)), 3), _real_config(tmp_path, num_rounds=1))

    sites_metrics = list(history.round(1).site_train.values())
    assert all(0 < m["train-loss"] < 5 for m in sites_metrics)
    weighted = sum(m["train-loss"] * m[wire.NUM_EXAMPLES] for m in sites_metrics)
    assert history.round(1).train["train-loss"] == pytest.approx(
        weighted / sum(m[wire.NUM_EXAMPLES] for m in sites_metrics)
    )


def test_evaluate_with_train_records_the_same_evaluations_with_one_exchange_per_round(tmp_path: Path) -> None:
    # Prepare: the same DP study twice, with and without a separate evaluate stage
    histories, calls = {}, {}
    for fused in (False, True):
        folder = tmp_path / ("fused" if fused else "staged")
        grid = InProcessGrid(make_client_app(_Sites(_local_sites(folder, FIXED_NOISE))), 3)
        # Execute
        histories[fused] = run_server(grid, _real_config(folder, num_rounds=3, evaluate_with_train=fused))
        calls[fused] = grid.calls
    # Assert: every round's model evaluated by every site, exactly as the evaluate stage does it
    assert calls == {False: 3 * 3 * 2, True: 3 * 3 + 3}  # train + evaluate messages
    for rnd in (1, 2, 3):
        staged, fused = histories[False].round(rnd), histories[True].round(rnd)
        assert sorted(fused.site_evaluate) == ["site-000", "site-001", "site-002"]
        assert fused.site_evaluate == staged.site_evaluate
        assert fused.evaluate == pytest.approx(staged.evaluate)
        assert fused.worst_site == staged.worst_site
        same_training = {"num-examples", "steps", "epsilon", "delta", "noise-multiplier"}  # not time, NaN loss
        assert {s: {k: m[k] for k in same_training} for s, m in fused.site_train.items()} == {
            s: {k: m[k] for k in same_training} for s, m in staged.site_train.items()
        }
    assert not any(k.startswith(wire.EVALUATED_PREFIX) for k in histories[True].round(2).site_info["site-000"])


def test_evaluate_with_train_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ValueError, match="fraction-evaluate = 0"):
        _config(evaluate_with_train=True, fraction_evaluate=0.0)
    with pytest.raises(ValueError, match="not available with secure-aggregation"):
        _config(evaluate_with_train=True, secure_aggregation=True)
    with pytest.raises(ValueError, match="num_rounds"):
        FedcareStrategy(FedAvg(), min_sites=1, evaluate_with_train=True)


def test_a_site_whose_data_fails_validation_refuses_with_its_reason(tmp_path: Path) -> None:
    provider = _Sites(_local_sites(tmp_path, FIXED_NOISE), broken=(1,))

    history = run_server(InProcessGrid(make_client_app(provider), 3), _real_config(tmp_path, num_rounds=1))

    refusals = history.round(1).refusals
    assert [(r["stage"], r["code"]) for r in refusals] == [("train", wire.ERROR_DATA_INVALID),
                                                           ("evaluate", wire.ERROR_DATA_INVALID)]
    assert refusals[0]["site"] == "partition-1"
    assert "column 'age' of partition 1 holds text" in refusals[0]["reason"]
    assert sorted(history.round(1).site_train) == ["site-000", "site-002"]


def test_a_site_whose_data_does_not_fit_the_model_refuses(tmp_path: Path) -> None:
    provider = _Sites(_local_sites(tmp_path, FIXED_NOISE))

    with pytest.raises(TooFewSitesError) as info:
        run_server(InProcessGrid(make_client_app(provider), 3), _real_config(tmp_path, input_shape=(12,)))

    assert "input shape (30,) (study: (12,))" in str(info.value)


def test_a_site_whose_budget_is_spent_refuses_and_its_ledger_stays(tmp_path: Path) -> None:
    # Prepare: a budget that one round fits and a second does not
    tight = PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=1.5)
    sites = _local_sites(tmp_path, FIXED_NOISE)
    sites = (dataclasses.replace(sites[0], privacy=tight), *sites[1:])
    config = _real_config(tmp_path, num_rounds=2)

    # Execute
    history = run_server(InProcessGrid(make_client_app(_Sites(sites)), 3), config)

    # Assert
    refusal = history.round(2).refusals
    assert [(r["site"], r["code"]) for r in refusal] == [("site-000", wire.ERROR_BUDGET_SPENT)]
    assert "would be exceeded" in refusal[0]["reason"]
    assert history.round(2).complete
    assert "site-000" not in history.round(2).site_train


def test_a_round_waits_a_bounded_time_for_enough_sites(tmp_path: Path) -> None:
    # Prepare: two connected sites, three required
    grid = InProcessGrid(scripted_app(refuse=REFUSE), num_nodes=2)
    config = _config(tmp_path, min_sites=3, round_timeout_s=0.3)

    # Execute / Assert
    with pytest.raises(TooFewSitesError, match=r"only 2 site\(s\) connected after 0.3 s"):
        run_server(grid, config)
    assert grid.calls == 0


# --------------------------------------------------------------------------- the deployed apps


def _context(run_config: dict[str, object]) -> Context:
    from flwr.app import RecordDict as _RecordDict

    return Context(run_id=1, node_id=0, node_config={}, state=_RecordDict(), run_config=run_config)  # type: ignore[arg-type]


def _table_site(folder: Path) -> Path:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.to_csv(folder / "wdbc.csv", index=False)
    manifest = folder / "site.toml"
    manifest.write_text(
        'site = "wdbc"\ntask = "binary"\nclasses = [0, 1]\n[split]\nval = 0.1\ntest = 0.3\nseed = 0\n'
        '[data]\nkind = "table"\npath = "wdbc.csv"\ntarget = "target"\n'
    )
    return manifest


def test_the_deployed_server_app_parses_the_run_config_once(tmp_path: Path) -> None:
    from fedcare.server.app import app as server_app
    from fedcare.server.config import InvalidRunConfigError

    run_config = {"input-shape": "3", "num-server-rounds": 1, "min-sites": 3, "checkpoint-dir": str(tmp_path)}
    server_app(InProcessGrid(scripted_app(refuse=REFUSE), 3), _context(run_config))

    assert (tmp_path / "history.json").is_file() and (tmp_path / "final_model.npz").is_file()
    with pytest.raises(InvalidRunConfigError, match="unknown run-config key"):
        server_app(InProcessGrid(scripted_app(refuse=REFUSE), 3), _context({**run_config, "rounds": 2}))


def test_the_deployed_client_app_reads_the_site_from_node_config(tmp_path: Path) -> None:
    # Prepare
    from fedcare.client.app import app as client_app

    manifest = _table_site(tmp_path)
    settings = tmp_path / "privacy.toml"
    settings.write_text("[privacy]\nnoise_multiplier = 1.0\nepsilon_budget = 10.0\n")
    policy = tmp_path / "policy.toml"  # the hospital allows this study's ε (σ = 1 gives ≈ 4.3)
    policy.write_text("max_epsilon_per_study = 10.0\nmax_epsilon_total = 10.0\nrequire_secure_aggregation = false\n")
    node = {"site-manifest": str(manifest), "ledger-dir": str(tmp_path / "ledger"), "privacy-settings": str(settings),
            "policy": str(policy)}
    config = _real_config(tmp_path, num_rounds=1, min_sites=2)

    # Execute
    history = run_server(InProcessGrid(client_app, 2, node_config=node), config)

    # Assert
    assert list(history.round(1).site_train) == ["wdbc", "wdbc@node-2"]  # two nodes, one manifest
    assert history.round(1).site_train["wdbc"]["noise-multiplier"] == 1.0
    assert len(list((tmp_path / "ledger").glob("*.json"))) == 1


def test_a_node_without_a_ledger_folder_refuses(tmp_path: Path) -> None:
    from fedcare.client.app import app as client_app

    node = {"site-manifest": str(_table_site(tmp_path))}

    with pytest.raises(TooFewSitesError) as info:
        run_server(InProcessGrid(client_app, 2, node_config=node), _real_config(tmp_path, num_rounds=1))

    assert "node config lacks 'ledger-dir'" in str(info.value)
    assert "site 'site' refused to train" in str(info.value)  # named after the manifest file
