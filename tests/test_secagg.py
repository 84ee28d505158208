"""SecAgg+ with client-level DP: the secure sum, the accountant, loud failure, and the site policy."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from opacus.accountants import RDPAccountant

from fedcare.client.app import LocalSite, make_client_app
from fedcare.client.secure import SECURE_ROUND_STATE
from fedcare.privacy.artefacts import ArtefactKey, generate_key
from fedcare.privacy.audit_log import generate_signing_key, load_verify_key, verify_log
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import node_default_policy
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import _to_record, initial_arrays, run_server, train_config
from fedcare.server.checkpoint import (
    FINAL_MODEL_FILE,
    HISTORY_FILE,
    CheckpointTamperedError,
    RoundRecord,
    load_checkpoint,
    load_model_file,
)
from fedcare.server.config import InvalidRunConfigError, RunConfig
from fedcare.server.secagg import CLIENT_EPSILON, SecureAggregationError, client_level_epsilon
from fedcare.server.strategy import TooFewSitesError
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition
from fedcare.simulations.runner import InProcessGrid, run_scenario
from fedcare.simulations.scenario import DEFAULT_SCENARIO, load_scenario

SCENARIO = DEFAULT_SCENARIO.parent / "secagg_breast_cancer.toml"


class _WireGrid(InProcessGrid):
    """InProcessGrid that copies every message, as serialising it over the wire does.

    SecAgg+ sends one RecordDict to every node and ``secaggplus_mod`` pops keys from it: sharing
    the object between in-process nodes would corrupt the protocol, never a real federation.
    """

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        copies = [Message(content=copy.deepcopy(m.content), metadata=copy.copy(m.metadata)) for m in messages]
        return super().send_and_receive(copies, timeout=timeout)


@dataclasses.dataclass(frozen=True)
class _Sites:
    sites: tuple[LocalSite, ...]
    fail_in_masked_stage: int | None = None  # partition id whose training raises

    def __call__(self, context: Context) -> LocalSite:
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        if pid == self.fail_in_masked_stage and SECURE_ROUND_STATE in context.state.config_records:
            raise RuntimeError("simulated crash of the site during the masked-vector stage")
        return self.sites[pid]


def _sites(tmp_path: Path, n: int, *, privacy: PrivacySettings, require_secagg: bool = False,
           scheme: PartitionScheme | None = None) -> tuple[LocalSite, ...]:
    data = partition(load_builtin("breast_cancer"), scheme=scheme or PartitionScheme(kind="iid"), num_sites=n, seed=0)
    policy = node_default_policy().model_copy(
        update={"require_dp": privacy.enabled, "require_secure_aggregation": require_secagg,
                "max_epsilon_per_study": 50.0, "max_epsilon_total": 50.0,
                # small test splits evaluated; non-DP sites (ε unbounded) can only release exact ones
                "min_evaluation_cohort": 1, "evaluation": "dp" if privacy.enabled else "exact"}
    )
    return tuple(
        LocalSite(data=d, privacy=privacy, ledger_dir=tmp_path / "ledgers", name=d.name, seed=i, policy=policy)
        for i, d in enumerate(data)
    )


def _config(tmp_path: Path, n: int, **changes: Any) -> RunConfig:
    values: dict[str, Any] = dict(
        input_shape=(30,), num_rounds=1, min_sites=n, lr=0.5, batch_size=32, seed=3,
        checkpoint_dir=tmp_path / "ckpt", secure_aggregation=True, client_dp_clipping_norm=0.5,
        client_dp_noise_multiplier=0.0, round_timeout_s=60.0,
    )
    values.update(changes)
    return RunConfig(**values)


def _local_update(site: LocalSite, config: RunConfig, start: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Train one site exactly as its node does (the same handler, a plain round) and return its update."""
    app = make_client_app(_Sites((site,)))
    grid = InProcessGrid(app, 1)
    record = train_config(config)
    record["server-round"] = 1
    msg = Message(RecordDict({"arrays": _to_record(start), "config": record}), dst_node_id=1, message_type="train")
    reply = list(grid.send_and_receive([msg]))[0]
    assert not reply.has_error(), reply.error
    trained = OrderedDict((k, v.numpy()) for k, v in reply.content["arrays"].items())
    return OrderedDict((k, trained[k] - start[k]) for k in start)


# --------------------------------------------------------------------------- the secure sum


def test_secure_aggregate_is_the_unweighted_mean_of_the_clipped_updates(tmp_path: Path) -> None:
    # Prepare: no sample-level DP, σ = 0 client DP: the aggregate is deterministic
    sites = _sites(tmp_path, 3, privacy=PrivacySettings.disabled(),
                   scheme=PartitionScheme(kind="quantity", alpha=1.0, min_per_site=40))
    config = _config(tmp_path, 3)
    start = initial_arrays(config)
    clip = config.client_dp_clipping_norm
    clipped = []
    for site in sites:
        update = _local_update(dataclasses.replace(site, ledger_dir=tmp_path / "plain-ledgers"), config, start)
        norm = float(np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update.values())))
        clipped.append({k: u * min(1.0, clip / norm) for k, u in update.items()})
    expected = OrderedDict((k, start[k] + np.mean([c[k] for c in clipped], axis=0)) for k in start)
    sizes = {len(s.data.train) for s in sites}

    # Execute
    history = run_server(_WireGrid(make_client_app(_Sites(sites)), 3), config)

    # Assert
    arrays, _ = load_model_file(tmp_path / "ckpt" / FINAL_MODEL_FILE)
    assert list(arrays) == list(start)
    for k in start:
        np.testing.assert_allclose(arrays[k], expected[k], atol=1e-4)  # quantisation: 16 / 2**22 per site
    assert any(not np.allclose(arrays[k], start[k]) for k in start)
    assert len(sizes) > 1  # the sites differ in size, yet each counts once (see expected)
    record = history.rounds[0]
    assert set(record.site_train) == {s.name for s in sites}
    assert all(m["secure-aggregation"] == 1.0 for m in record.site_train.values())
    # the count in the plaintext metrics is each site's Laplace-noised release (issue 11), never the exact one
    stored = {s.name: [r["value"] for r in PrivacyLedger.open(s.ledger_dir, site=s.name, study=config.study).releases
                       if r["mechanism"] == "count"] for s in sites}
    assert {n: [m["num-examples"]] for n, m in record.site_train.items()} == stored
    assert set(record.site_evaluate) == {s.name for s in sites}
    assert json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())["status"] == "completed"


def test_a_secure_run_repeats_exactly_for_the_same_seed(tmp_path: Path) -> None:
    # Prepare: sample-level DP on (its noise is seeded from the round's starting weights, so any
    # run-to-run difference in SecAgg+'s stochastic rounding would change everything after it)
    privacy = PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=50.0)
    finals = []
    for run in ("a", "b"):
        folder = tmp_path / run
        sites = _sites(folder, 3, privacy=privacy)
        config = _config(folder, 3, num_rounds=2)

        # Execute
        run_server(_WireGrid(make_client_app(_Sites(sites)), 3), config)
        finals.append(load_model_file(folder / "ckpt" / FINAL_MODEL_FILE)[0])

    # Assert: bit-identical final models
    assert list(finals[0]) == list(finals[1])
    for k in finals[0]:
        np.testing.assert_array_equal(finals[0][k], finals[1][k])


def test_client_level_epsilon_is_not_the_poisson_add_remove_figure() -> None:
    # exact values: tests/attacks/test_client_level_accounting.py (fixed-size sampling, replace-one)
    accountant = RDPAccountant()
    accountant.history = [(0.8, 0.5, 2), (1.1, 1.0, 1)]

    assert client_level_epsilon([(0.8, 1, 2), (0.8, 1, 2), (1.1, 2, 2)], 1e-5) > accountant.get_epsilon(1e-5)
    assert client_level_epsilon([(0.0, 1.0)], 1e-5) == float("inf")


# --------------------------------------------------------------------------- loud failure


def test_a_site_failing_in_the_masked_stage_fails_the_run_loudly(tmp_path: Path) -> None:
    # Prepare
    sites = _sites(tmp_path, 3, privacy=PrivacySettings.disabled())
    config = _config(tmp_path, 3, num_rounds=2)
    grid = _WireGrid(make_client_app(_Sites(sites, fail_in_masked_stage=1)), 3)

    # Execute
    with pytest.raises(SecureAggregationError, match="collect-masked-vectors stage.*simulated crash"):
        run_server(grid, config)

    # Assert
    history = json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())
    assert history["status"] == "failed" and "simulated crash" in history["reason"]
    assert not (tmp_path / "ckpt" / FINAL_MODEL_FILE).exists()
    assert not any(r.get("complete") for r in history["rounds"])


def test_a_threshold_above_the_sites_fails_the_run(tmp_path: Path) -> None:
    sites = _sites(tmp_path, 3, privacy=PrivacySettings.disabled())
    config = _config(tmp_path, 3, secagg_num_shares=5, secagg_reconstruction_threshold=4)

    with pytest.raises(SecureAggregationError, match="setup stage"):
        run_server(_WireGrid(make_client_app(_Sites(sites)), 3), config)

    assert json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())["status"] == "failed"
    assert not (tmp_path / "ckpt" / FINAL_MODEL_FILE).exists()


def test_a_parameter_beyond_the_quantisation_range_is_refused_not_clipped(tmp_path: Path) -> None:
    sites = _sites(tmp_path, 3, privacy=PrivacySettings.disabled())
    config = _config(tmp_path, 3, secagg_clipping_range=1e-3)

    with pytest.raises(SecureAggregationError, match="beyond the SecAgg\\+ quantisation range"):
        run_server(_WireGrid(make_client_app(_Sites(sites)), 3), config)

    assert not (tmp_path / "ckpt" / FINAL_MODEL_FILE).exists()


# --------------------------------------------------------------------------- policy


def test_a_site_requiring_secagg_refuses_a_plain_round_and_accepts_a_secure_one(tmp_path: Path) -> None:
    # Prepare
    dp = PrivacySettings.with_target(epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    sites = _sites(tmp_path, 3, privacy=dp, require_secagg=True)  # 3: the policy's min_secure_cohort
    app = make_client_app(_Sites(sites))
    plain = RunConfig(input_shape=(30,), num_rounds=1, min_sites=3, lr=0.5, checkpoint_dir=tmp_path / "plain")
    secure = _config(tmp_path / "secure", 3, client_dp_noise_multiplier=1.0)

    # Execute / Assert: plain round refused on the secure_aggregation rule
    with pytest.raises(TooFewSitesError, match=r"secure_aggregation"):
        run_server(_WireGrid(app, 3), plain)
    history = run_server(_WireGrid(app, 3), secure)

    record = history.rounds[0]
    assert record.complete and set(record.site_train) == {s.name for s in sites}
    assert all(0 < m["epsilon"] <= 3.0 for m in record.site_train.values())
    assert record.train[CLIENT_EPSILON] == pytest.approx(client_level_epsilon([(1.0, 1.0)], 1e-5))


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"secure-aggregation": True, "strategy": "fedmedian"}, "needs a mean-based strategy"),
        ({"secure-aggregation": True, "strategy": "fedtrimmedavg"}, "median, trimmed-mean and Krum"),
        ({"client-dp-clipping-norm": 1.0}, "set secure-aggregation = true"),
    ],
)
def test_secure_settings_are_validated(values: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRunConfigError, match=message):
        RunConfig.from_run_config({"input-shape": "30", **values})


# --------------------------------------------------------------------------- simulation (Ray)


@pytest.mark.slow
def test_secagg_scenario_with_client_dp_completes_in_simulation(tmp_path: Path) -> None:
    # Prepare
    scenario = load_scenario(SCENARIO)
    initial = initial_arrays(RunConfig(input_shape=(30,), seed=scenario.seed))

    # Execute
    summary = run_scenario(scenario, tmp_path / "out")

    # Assert
    assert summary.status == "completed" and summary.rounds_completed == scenario.rounds
    secure = summary.secure_aggregation
    assert secure is not None and secure["enabled"] and secure["client_dp"]
    n = scenario.num_hospitals  # every site sampled every round: fixed-size sampling with m = n
    steps = [(scenario.client_dp.noise_multiplier, n, n)] * scenario.rounds  # type: ignore[union-attr]
    assert secure["client_epsilon"] == pytest.approx(client_level_epsilon(steps, scenario.client_dp.delta))  # type: ignore[union-attr]
    assert secure["client_delta"] == scenario.client_dp.delta  # type: ignore[union-attr]
    report = json.loads((tmp_path / "out" / "privacy_report.json").read_text())
    assert report["secure_aggregation"] is True
    assert report["client_level"]["epsilon"] == pytest.approx(secure["client_epsilon"], rel=1e-12)
    arrays, _ = load_model_file(tmp_path / "out" / "checkpoints" / FINAL_MODEL_FILE)
    assert any(not np.allclose(arrays[k], initial[k]) for k in initial)
    assert len(summary.privacy) == scenario.num_hospitals
    assert all(0 < p["epsilon"] <= 20.0 for p in summary.privacy.values())  # type: ignore[operator]


def test_a_study_file_turns_on_secure_aggregation_with_client_dp(tmp_path: Path) -> None:
    from fedcare.server.flower_app import flower_pyproject, load_study  # noqa: PLC0415

    path = tmp_path / "study.toml"
    path.write_text(
        '[study]\nname = "secure-study"\n[run]\ninput-shape = "15"\nsecure-aggregation = true\n'
        "client-dp-clipping-norm = 1.0\nclient-dp-noise-multiplier = 0.8\n",
        encoding="utf-8",
    )

    study = load_study(path)

    config = study.run_config()
    assert config is not None and config.secure_aggregation and config.client_dp
    assert config.client_dp_noise_multiplier == 0.8
    app_config = flower_pyproject(study)["tool"]["flwr"]["app"]["config"]
    assert app_config["secure-aggregation"] is True and app_config["client-dp-clipping-norm"] == 1.0


# --------------------------------------------------------------------------- safekeeping (encryption, audit, report)

SECURE_STUDY = "secure-safekeeping"
SAMPLE_DP = PrivacySettings.with_noise(noise_multiplier=1.2, epsilon_budget=20.0)


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    """An artefact key and an audit signing key, as the coordinator's commands create them."""
    generate_key(tmp_path / "artefact.key")
    private, public = generate_signing_key(tmp_path / "audit.key")
    return {"artefact": tmp_path / "artefact.key", "audit": private, "audit_pub": public}


class _Stop(Exception):
    """Raised by the round callback to stop a run right after a checkpoint."""


def _stop_after_round_1(record: RoundRecord) -> None:
    if record.round == 1:
        raise _Stop("stopped after round 1")


def _safe_config(tmp_path: Path, keys: dict[str, Path], **changes: Any) -> RunConfig:
    values: dict[str, Any] = dict(study=SECURE_STUDY, num_rounds=2, client_dp_noise_multiplier=1.0,
                                  artefact_key=str(keys["artefact"]), audit_key=keys["audit"])
    values.update(changes)
    return _config(tmp_path, 3, **values)


def _spent(tmp_path: Path, sites: tuple[LocalSite, ...]) -> dict[str, float]:
    return {
        s.name: PrivacyLedger.open(tmp_path / "ledgers", site=s.name, study=SECURE_STUDY).spent_epsilon()
        for s in sites
    }


def _entries(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_an_encrypted_audited_secure_run_resumes_and_reports_client_and_site_epsilon(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    # Prepare: round 1 of 2 checkpointed encrypted, then the run stops
    sites = _sites(tmp_path, 3, privacy=SAMPLE_DP)
    app = make_client_app(_Sites(sites))
    with pytest.raises(_Stop):
        run_server(_WireGrid(app, 3), _safe_config(tmp_path, keys), on_round=_stop_after_round_1)

    # Execute: resume the encrypted secure run to round 2
    config = _safe_config(tmp_path, keys, resume=True)
    history = run_server(_WireGrid(app, 3), config)

    # Assert: no plaintext model or checkpoint; both artefacts decrypt with the key
    folder = tmp_path / "ckpt"
    assert [r.round for r in history.completed] == [1, 2]
    assert not list(folder.glob("*.npz"))
    key = ArtefactKey.from_file(keys["artefact"])
    assert load_checkpoint(folder / "checkpoint.npz.enc", key=key).round == 2
    arrays, meta = load_model_file(folder / "final_model.npz.enc", key=key)
    assert meta["study"] == SECURE_STUDY and list(arrays) == list(initial_arrays(config))
    # Assert: one verified chain over both starts; every round entry says SecAgg+ was on
    assert verify_log(folder / "audit.jsonl", load_verify_key(keys["audit_pub"])).ok
    entries = _entries(folder / "audit.jsonl")
    assert [e["kind"] for e in entries] == [
        "run_start", "round", "checkpoint", "run_start", "round", "checkpoint", "checkpoint"
    ]
    rounds = [e["fields"] for e in entries if e["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["secure_aggregation"] is True and r["aggregate_update_norm"] > 0 for r in rounds)
    assert all(s["manifest_sha256"] != "0" * 64 for r in rounds for s in r["sites"])
    # Assert: the report states SecAgg+, the client-level ε (fixed-size sampling, replace-one), each ledger's ε
    report = json.loads((folder / "privacy_report.json").read_text())
    client = report["client_level"]
    assert report["secure_aggregation"] is True
    sampled = len(sites)  # σ = 1, every site sampled, two rounds
    assert client["epsilon"] == pytest.approx(
        client_level_epsilon([(1.0, sampled, sampled)] * 2, config.client_dp_delta), rel=1e-12
    )
    assert (client["delta"], client["noise_multiplier"], client["clipping_norm"]) == (
        config.client_dp_delta, 1.0, config.client_dp_clipping_norm
    )
    assert client["accountant"].startswith("dp_accounting RDP, SampledWithoutReplacementDpEvent")
    assert client["neighbouring"].startswith("replace-one site") and "without replacement" in client["sampling"]
    assert (client["sample_rate"], client["rounds"]) == (1.0, 2)
    spent = _spent(tmp_path, sites)
    assert {s["site"]: s["epsilon"] for s in report["sites"]} == pytest.approx(spent, rel=1e-12)
    assert {(s["accountant"], s["max_grad_norm"], s["rounds"]) for s in report["sites"]} == {("rdp", 1.0, 2)}
    # the audit log's round entry holds the ε of the training replies; the final evaluation (ε 0.1) came after
    assert {r["site"]: r["epsilon_spent"] + 0.1 for r in rounds[-1]["sites"]} == pytest.approx(spent, rel=1e-12)
    markdown = (folder / "privacy_report.md").read_text()
    assert "On (SecAgg+)" in markdown and "not against the coordinator" in markdown


def test_a_flipped_byte_in_a_secure_checkpoint_stops_the_resume(tmp_path: Path, keys: dict[str, Path]) -> None:
    # Prepare: an encrypted secure checkpoint of round 1, one byte flipped
    sites = _sites(tmp_path, 3, privacy=SAMPLE_DP)
    app = make_client_app(_Sites(sites))
    with pytest.raises(_Stop):
        run_server(_WireGrid(app, 3), _safe_config(tmp_path, keys), on_round=_stop_after_round_1)
    ckpt = tmp_path / "ckpt" / "checkpoint.npz.enc"
    spent_before = _spent(tmp_path, sites)
    blob = bytearray(ckpt.read_bytes())
    blob[-40] ^= 0x01
    ckpt.write_bytes(bytes(blob))

    # Execute
    with pytest.raises(CheckpointTamperedError) as caught:
        run_server(_WireGrid(app, 3), _safe_config(tmp_path, keys, resume=True))

    # Assert: the plain path's error, no round ran, no model written
    message = str(caught.value)
    assert str(ckpt) in message and "authentication" in message and "restore it from a trusted backup" in message
    assert _spent(tmp_path, sites) == spent_before
    assert not (tmp_path / "ckpt" / "final_model.npz.enc").exists()


def test_a_failed_secure_round_is_in_the_audit_log_before_the_run_fails(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    # Prepare
    sites = _sites(tmp_path, 3, privacy=PrivacySettings.disabled())
    grid = _WireGrid(make_client_app(_Sites(sites, fail_in_masked_stage=1)), 3)
    config = _safe_config(tmp_path, keys)

    # Execute
    with pytest.raises(SecureAggregationError, match="collect-masked-vectors stage"):
        run_server(grid, config)

    # Assert: the failing site's error, then the failed round, in a verified log; its text not logged
    log = tmp_path / "ckpt" / "audit.jsonl"
    assert verify_log(log, load_verify_key(keys["audit_pub"])).ok
    entries = _entries(log)
    assert [e["kind"] for e in entries] == ["run_start", "refusal", "round_failed"]
    refusal, failed = entries[1]["fields"], entries[2]["fields"]
    assert refusal["round"] == 1 and refusal["rule"].startswith("collect-masked-vectors.")
    assert "simulated crash" not in refusal["reason"]
    assert failed == {**failed, "round": 1, "stage": "collect-masked-vectors", "failures": 1,
                      "secure_aggregation": True}
    assert json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())["status"] == "failed"
    assert not list((tmp_path / "ckpt").glob("final_model.npz*"))
