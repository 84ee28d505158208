"""A deployed study's final model carries its operating threshold, chosen from the sites' validation histograms.

In process, as a deployment runs: the ServerApp (``server.app``) drives the real ClientApp of three
hospitals (``client.app``) over an ``InProcessGrid``. After the last round of a binary study the
server asks each site, through its evaluation policy, for the final model's validation
histograms, and stores the Youden threshold of their sum in ``final_model.npz``
(``server.operating_point``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Iterable
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedcare.client.app import LocalSite, make_client_app
from fedcare.client.dataset import SiteData, Split
from fedcare.client.metrics import evaluation_statistics
from fedcare.models import ModelSpec, wire
from fedcare.privacy.errors import PrivacyWarning
from fedcare.privacy.global_metrics import BINS, choose_threshold, class_histograms
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import Rule, SitePolicy, node_default_policy
from fedcare.privacy.release_mechanisms import EVALUATION, EVALUATION_EXACT, sum_statistics
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import make_server_app, run_server
from fedcare.server.checkpoint import FINAL_MODEL_FILE, HISTORY_FILE, MODEL_THRESHOLD, build_saved_model, load_model_file
from fedcare.server.config import RunConfig
from fedcare.server.operating_point import planned_evaluation_queries, warn_if_no_query_left
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.external import evaluate_model_file
from fedcare.simulations.inprocess import InProcessGrid
from fedcare.simulations.partition import PartitionScheme, partition

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from scenarios import write_wdbc_site  # noqa: E402

NAMES = ("hospital-a", "hospital-b", "hospital-c")
ROUNDS = 2
DP = PrivacySettings.with_target(epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
#: the strict default, accepting plain rounds (the in-process grid runs the plain path)
PLAIN = node_default_policy().model_copy(update={"require_secure_aggregation": False})
EXACT = PLAIN.model_copy(update={"evaluation": "exact"})
OFF = PLAIN.model_copy(update={"evaluation": "off"})


@dataclasses.dataclass(frozen=True)
class _Hospitals:
    """The nodes' site provider: ``partition-id`` picks the hospital (picklable, no state)."""

    sites: tuple[LocalSite, ...]

    def __call__(self, context: Context) -> LocalSite:
        return self.sites[int(context.node_config["partition-id"])]


def _relabel(split: Split) -> Split:
    """Return ``split`` with three classes from the signs of its first two features (a multiclass study)."""
    x = split.inputs[0]
    return dataclasses.replace(split, targets=((x[:, 0] > 0).long() + (x[:, 1] > 0).long()))


def _data(task: str) -> list[SiteData]:
    if task == "regression":
        return partition(load_builtin("diabetes"), scheme=PartitionScheme(kind="iid"), num_sites=3, seed=0)
    sites = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=3, seed=0)
    if task == "multiclass":
        sites = [dataclasses.replace(s, task="multiclass", num_classes=3, train=_relabel(s.train),
                                     val=_relabel(s.val), test=_relabel(s.test)) for s in sites]
    return sites


def _hospitals(tmp_path: Path, policies: tuple[SitePolicy, ...], task: str = "binary") -> _Hospitals:
    data = _data(task)
    return _Hospitals(tuple(
        LocalSite(data=d, privacy=DP, ledger_dir=tmp_path / "ledgers", name=name, seed=i + 1, policy=policy)
        for i, (d, name, policy) in enumerate(zip(data, NAMES, policies, strict=True))
    ))


def _config(tmp_path: Path, task: str = "binary", **overrides: object) -> RunConfig:
    family = {"binary": "logistic", "multiclass": "logistic", "regression": "linear"}[task]
    shape = (10,) if task == "regression" else (30,)
    values: dict[str, object] = dict(
        study="threshold", num_rounds=ROUNDS, min_sites=2, lr=0.5, batch_size=32, input_shape=shape, task=task,
        num_classes={"binary": 2, "multiclass": 3, "regression": 1}[task], model=ModelSpec(family=family),
        checkpoint_dir=tmp_path / "run", round_timeout_s=60.0,
    )
    return RunConfig(**(values | overrides))  # type: ignore[arg-type]


def _run(hospitals: _Hospitals, config: RunConfig) -> tuple[dict, dict]:
    """Run the study as the deployed ServerApp does; return (final model meta, history.json)."""
    grid = InProcessGrid(make_client_app(hospitals), num_nodes=len(hospitals.sites))
    with pytest.warns(PrivacyWarning):  # plain rounds (and exact evaluations) are warned by every site
        run_server(grid, config, operating_point=True)
    folder = config.checkpoint_dir
    assert folder is not None
    _, meta = load_model_file(folder / FINAL_MODEL_FILE)
    return meta, json.loads((folder / HISTORY_FILE).read_text())




def _validation_releases(site: LocalSite, study: str = "threshold") -> list[dict]:
    ledger = PrivacyLedger.open(site.ledger_dir, site=site.name, study=study)
    return [r for r in ledger.releases if r.get("split") == "validation"]


def _summed_validation_histograms(config: RunConfig, sites: list[LocalSite]) -> tuple[np.ndarray, np.ndarray]:
    """Return what the sites hold exactly: the final model's class histograms on their validation splits, summed."""
    assert config.checkpoint_dir is not None
    arrays, meta = load_model_file(config.checkpoint_dir / FINAL_MODEL_FILE)
    model = build_saved_model(arrays, meta)
    return class_histograms(sum_statistics(evaluation_statistics(model, s.data.val, "binary") for s in sites))


def test_the_deployed_model_stores_the_threshold_of_the_summed_exact_validation_histograms(tmp_path: Path) -> None:
    # Prepare: three hospitals whose policies release exact evaluations (opt-in)
    hospitals = _hospitals(tmp_path, (EXACT, EXACT, EXACT))
    config = _config(tmp_path)

    # Execute
    meta, history = _run(hospitals, config)

    # Assert: exactly Youden's threshold of the sites' summed validation histograms, and how it was chosen
    neg, pos = _summed_validation_histograms(config, list(hospitals.sites))
    assert neg.sum() > 0 and pos.sum() > 0
    assert meta[MODEL_THRESHOLD] == choose_threshold(neg, pos)
    point = history["operating_point"]
    assert point["threshold"] == meta[MODEL_THRESHOLD] and point["stored"] is True
    assert point["sites"] == list(NAMES)
    assert point["dp_noised"] is False and point["releases"] == dict.fromkeys(NAMES, "exact")
    assert point["examples"] == sum(len(s.data.val) for s in hospitals.sites)
    assert point["refusals"] == [] and point["reason"] is None
    for site in hospitals.sites:  # one exact release of the validation split each, outside ε
        releases = _validation_releases(site)
        assert [(r["mechanism"], r["records"]) for r in releases] == [(EVALUATION_EXACT, len(site.data.val))]

    # `fedcare evaluate` scores the deployed model at its stored threshold, not at 0.5
    assert config.checkpoint_dir is not None
    result = evaluate_model_file(config.checkpoint_dir / FINAL_MODEL_FILE, write_wdbc_site(tmp_path), out=tmp_path / "e.json")
    assert result["threshold_stored"] is True and result["threshold"] == meta[MODEL_THRESHOLD] != 0.5


def test_under_dp_the_threshold_is_a_bin_edge_and_each_ledger_shows_the_extra_evaluation_charge(tmp_path: Path) -> None:
    # Prepare: the default evaluation policy (Laplace-noised, 0.1 per query, 5 queries)
    hospitals = _hospitals(tmp_path, (PLAIN, PLAIN, PLAIN))
    config = _config(tmp_path)

    # Execute: run through the ServerApp a deployment loads (config given in process)
    grid = InProcessGrid(make_client_app(hospitals), num_nodes=3)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.warns(PrivacyWarning):
        make_server_app(config)(grid, context)

    # Assert: a bin edge strictly inside (0, 1), chosen on DP-noised histograms of all three sites
    assert config.checkpoint_dir is not None
    _, meta = load_model_file(config.checkpoint_dir / FINAL_MODEL_FILE)
    history = json.loads((config.checkpoint_dir / HISTORY_FILE).read_text())
    threshold = meta[MODEL_THRESHOLD]
    assert 0 < threshold < 1 and math.isclose(threshold * BINS, round(threshold * BINS), abs_tol=1e-9)
    point = history["operating_point"]
    assert point["dp_noised"] is True and point["sites"] == list(NAMES) and point["threshold"] == threshold
    policy = PLAIN
    for site in hospitals.sites:
        ledger = PrivacyLedger.open(site.ledger_dir, site=site.name, study=config.study)
        evaluations = [r for r in ledger.releases if r["mechanism"] == EVALUATION]
        # one charge per round's test evaluation, plus the validation query, each ε = 0.1, Laplace(2 / 0.1)
        assert len(evaluations) == ROUNDS + 1
        assert [r.get("split") for r in evaluations] == [None] * ROUNDS + ["validation"]
        assert evaluations[-1]["epsilon"] == policy.evaluation_epsilon_per_query
        assert evaluations[-1]["scale"] == 2.0 / policy.evaluation_epsilon_per_query
        assert ledger.release_epsilon(EVALUATION) == pytest.approx((ROUNDS + 1) * 0.1, abs=1e-12)
        reported = point["site_privacy"][site.name]
        assert reported[wire.EVALUATION_QUERIES] == ROUNDS + 1
        assert reported[wire.EPSILON] == pytest.approx(ledger.spent_epsilon(), abs=1e-12)
    report = json.loads((config.checkpoint_dir / "privacy_report.json").read_text())
    assert {s["site"]: s["evaluation_queries"] for s in report["sites"]} == dict.fromkeys(NAMES, ROUNDS + 1)


class _WireGrid(InProcessGrid):
    """InProcessGrid that copies every message, as the wire does (SecAgg+'s mod pops record keys)."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        copies = [Message(content=copy.deepcopy(m.content), metadata=copy.copy(m.metadata)) for m in messages]
        return super().send_and_receive(copies, timeout=timeout)


def test_a_secure_study_on_the_node_default_policy_stores_a_dp_threshold_too(tmp_path: Path) -> None:
    # Prepare: three hospitals on the strict node default (SecAgg+ required, DP evaluation)
    default = node_default_policy()
    hospitals = _hospitals(tmp_path, (default, default, default))
    config = _config(tmp_path, num_rounds=1, min_sites=3, secure_aggregation=True)

    # Execute
    run_server(_WireGrid(make_client_app(hospitals), num_nodes=3), config, operating_point=True)

    # Assert: the secure driver asks the same validation query; each site charged it once
    assert config.checkpoint_dir is not None
    _, meta = load_model_file(config.checkpoint_dir / FINAL_MODEL_FILE)
    point = json.loads((config.checkpoint_dir / HISTORY_FILE).read_text())["operating_point"]
    assert point["sites"] == list(NAMES) and point["dp_noised"] is True
    assert meta[MODEL_THRESHOLD] == point["threshold"]
    assert all([r["epsilon"] for r in _validation_releases(s)] == [0.1] for s in hospitals.sites)


def test_a_site_with_evaluation_off_contributes_nothing_and_the_refusal_is_recorded(tmp_path: Path) -> None:
    # Prepare: hospital-b releases no evaluation at all
    hospitals = _hospitals(tmp_path, (EXACT, OFF, EXACT))
    config = _config(tmp_path, fraction_evaluate=0.0)  # no per-round evaluation: hospital-b trains only

    # Execute
    meta, history = _run(hospitals, config)

    # Assert: the threshold of the two other sites' histograms; hospital-b's refusal and its rule recorded
    a, b, c = hospitals.sites
    neg, pos = _summed_validation_histograms(config, [a, c])
    assert meta[MODEL_THRESHOLD] == choose_threshold(neg, pos)
    point = history["operating_point"]
    assert point["sites"] == ["hospital-a", "hospital-c"]
    assert [(r["site"], r["code"]) for r in point["refusals"]] == [("hospital-b", wire.ERROR_POLICY)]
    assert f"[{Rule.EVALUATION.value}]" in point["refusals"][0]["reason"]
    assert _validation_releases(b) == []
    assert PrivacyLedger.open(b.ledger_dir, site=b.name, study=config.study).release_count(EVALUATION) == 0


def test_too_few_sites_answering_keeps_one_half_and_says_why(tmp_path: Path) -> None:
    # Prepare: two of three hospitals release no evaluation; the study needs two sites
    hospitals = _hospitals(tmp_path, (OFF, OFF, EXACT))
    config = _config(tmp_path, fraction_evaluate=0.0)

    # Execute
    meta, history = _run(hospitals, config)

    # Assert: no threshold in the model file (scored at 0.5), the reason in history.json
    assert MODEL_THRESHOLD not in meta
    point = history["operating_point"]
    assert point["stored"] is False and point["threshold"] is None
    assert point["sites"] == ["hospital-c"]
    assert "fewer than min-sites = 2" in point["reason"]
    assert [r["site"] for r in point["refusals"]] == ["hospital-a", "hospital-b"]


def test_a_site_whose_queries_are_spent_refuses_the_validation_query_and_says_so(tmp_path: Path) -> None:
    # Prepare: every site answers only as many evaluations as the study has rounds
    spent = PLAIN.model_copy(update={"max_evaluation_queries_per_study": ROUNDS})
    hospitals = _hospitals(tmp_path, (spent, spent, spent))
    config = _config(tmp_path)

    # Execute
    meta, history = _run(hospitals, config)

    # Assert: every site refused on the query budget; nothing more charged; the model keeps 0.5
    assert MODEL_THRESHOLD not in meta
    point = history["operating_point"]
    assert point["sites"] == [] and len(point["refusals"]) == 3
    assert all(f"[{Rule.EVALUATION_QUERIES.value}]" in r["reason"] for r in point["refusals"])
    for site in hospitals.sites:
        assert PrivacyLedger.open(site.ledger_dir, site=site.name, study=config.study).release_count(EVALUATION) == ROUNDS


def test_summed_histograms_of_one_class_keep_one_half(tmp_path: Path) -> None:
    # Prepare: every validation patient of every site relabelled negative
    def negative(site: LocalSite) -> LocalSite:
        val = dataclasses.replace(site.data.val, targets=torch.zeros_like(site.data.val.targets))
        return dataclasses.replace(site, data=dataclasses.replace(site.data, val=val))

    hospitals = _Hospitals(tuple(negative(s) for s in _hospitals(tmp_path, (EXACT, EXACT, EXACT)).sites))
    config = _config(tmp_path, fraction_evaluate=0.0)

    # Execute
    meta, history = _run(hospitals, config)

    # Assert
    assert MODEL_THRESHOLD not in meta
    assert history["operating_point"]["sites"] == list(NAMES)
    assert "hold one class only" in history["operating_point"]["reason"]


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_multiclass_and_regression_studies_store_no_threshold_and_ask_nothing(tmp_path: Path, task: str) -> None:
    # Prepare
    hospitals = _hospitals(tmp_path, (EXACT, EXACT, EXACT), task=task)
    config = _config(tmp_path, task=task, fraction_evaluate=0.0)

    # Execute
    meta, history = _run(hospitals, config)

    # Assert: no threshold, no validation release at any site
    assert MODEL_THRESHOLD not in meta
    assert history["operating_point"]["stored"] is False
    assert history["operating_point"]["reason"] == f"a {task} study has no operating threshold"
    assert all(_validation_releases(s) == [] for s in hospitals.sites)


def test_a_plan_without_a_query_left_for_the_threshold_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: 5 rounds evaluated + the validation query = 6 > the default policy's 5 queries
    five = _config(tmp_path, num_rounds=5)
    four = _config(tmp_path, num_rounds=4)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedcare.server.operating_point"):
        warn_if_no_query_left(four)
        quiet = list(caplog.records)
        warn_if_no_query_left(five)

    # Assert
    assert planned_evaluation_queries(four) == 5 and planned_evaluation_queries(five) == 6
    assert planned_evaluation_queries(_config(tmp_path, num_rounds=5, fraction_evaluate=0.0)) == 1
    assert quiet == []
    assert len(caplog.records) == 1 and "threshold 0.5" in caplog.records[0].getMessage()


def test_the_nodes_are_asked_in_batches_of_a_round_and_the_threshold_is_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: three exact sites; record the size of every batch the ServerApp sends
    from fedcare.server import operating_point

    hospitals = _hospitals(tmp_path, (EXACT, EXACT, EXACT))
    config = _config(tmp_path, min_sites=2, fraction_train=0.5)  # a round trains max(2, ceil(1.5)) = 2
    batches: list[int] = []
    real = InProcessGrid.send_and_receive

    def recording(self: InProcessGrid, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        if sent and sent[0].metadata.group_id == operating_point._GROUP:
            batches.append(len(sent))
        return real(self, sent, timeout=timeout)

    monkeypatch.setattr(InProcessGrid, "send_and_receive", recording)

    # Execute
    meta, history = _run(hospitals, config)

    # Assert: two batches (2 + 1), every site answered, and the threshold of all three sites' histograms
    assert operating_point.query_batch_size(config, 3) == 2
    assert batches == [2, 1]
    neg, pos = _summed_validation_histograms(config, list(hospitals.sites))
    assert meta[MODEL_THRESHOLD] == choose_threshold(neg, pos)
    assert history["operating_point"]["sites"] == list(NAMES)
