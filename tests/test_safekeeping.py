"""Encrypted checkpoints and the signed audit log through the real ServerApp path (in process).

The real ``run_server`` and ClientApp (DP-SGD with a fixed σ) run on the in-process Grid; a run
is stopped right after a checkpoint with an exception from the round callback, the checkpoint
is damaged on disk, and resuming must refuse it (never restart from round 1).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context

from fedcare.client.app import LocalSite, make_client_app
from fedcare.privacy.artefacts import ArtefactKey, generate_key
from fedcare.privacy.audit_log import generate_signing_key, load_verify_key, verify_log
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import SitePolicy, node_default_policy
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import initial_arrays, run_server
from fedcare.server.checkpoint import (
    CheckpointKeyError,
    CheckpointTamperedError,
    RoundRecord,
    load_checkpoint,
    load_model_file,
)
from fedcare.server.config import RunConfig
from fedcare.server.safekeeping import config_sha256, load_artefact_key, refusal_rule
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition
from fedcare.simulations.runner import InProcessGrid

PRIVACY = PrivacySettings.with_noise(noise_multiplier=1.2, epsilon_budget=8.0)
POLICY = SitePolicy.model_validate(
    {**node_default_policy().model_dump(), "max_epsilon_per_study": 8.0, "max_epsilon_total": 64.0,
     "require_secure_aggregation": False}  # plain rounds: the audit log records secure_aggregation = false
)  # the node default, with room for the fixed-σ study (ε ≈ 4.2 after round 1)
STUDY = "safekeeping"


@dataclasses.dataclass(frozen=True)
class _Sites:
    sites: tuple[LocalSite, ...]

    def __call__(self, context: Context) -> LocalSite:
        return self.sites[int(context.node_config["partition-id"])]


class _Stop(Exception):
    """Raised by the round callback to stop a run right after a checkpoint."""


def _stop_after(round_number: int):  # noqa: ANN202 - a callback factory
    def on_round(record: RoundRecord) -> None:
        if record.round == round_number:
            raise _Stop(f"stopped after round {round_number}")

    return on_round


def _grid(folder: Path, n: int = 3, **site_changes: object) -> InProcessGrid:
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=n, seed=0)
    sites = tuple(
        LocalSite(data=d, privacy=PRIVACY, ledger_dir=folder / "ledgers", name=d.name, seed=i,
                  policy=POLICY, **site_changes)  # type: ignore[arg-type]
        for i, d in enumerate(data)
    )
    return InProcessGrid(make_client_app(_Sites(sites)), n)


def _config(folder: Path, *, resume: bool = False, **changes: object) -> RunConfig:
    values: dict[str, object] = {
        "study": STUDY, "input_shape": (30,), "num_rounds": 2, "min_sites": 3, "batch_size": 64, "lr": 0.5,
        "checkpoint_dir": folder / "ckpt", "resume": resume, "seed": 3,
    }
    values.update(changes)
    return RunConfig(**values)  # type: ignore[arg-type]


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    """An artefact key and an audit signing key, as the coordinator's commands create them."""
    generate_key(tmp_path / "artefact.key")
    private, public = generate_signing_key(tmp_path / "audit.key")
    return {"artefact": tmp_path / "artefact.key", "audit": private, "audit_pub": public}


def _epsilons(folder: Path) -> dict[str, float]:
    return {
        s: PrivacyLedger.open(folder / "ledgers", site=s, study=STUDY).spent_epsilon()
        for s in ("site-000", "site-001", "site-002")
    }


def _flip(path: Path, offset_from_end: int = 40) -> None:
    blob = bytearray(path.read_bytes())
    blob[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(blob))


def test_an_encrypted_run_keeps_no_plaintext_and_a_flipped_byte_stops_the_resume(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    # Prepare: round 1 checkpointed encrypted, then the run stops
    config = _config(tmp_path, artefact_key=str(keys["artefact"]))
    with pytest.raises(_Stop):
        run_server(_grid(tmp_path), config, on_round=_stop_after(1))
    ckpt = tmp_path / "ckpt" / "checkpoint.npz.enc"
    # progress.json: the status page's round and stage record (no model, no patient value)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".fedcare-state", "checkpoint.npz.enc", "progress.json"]
    # the state folder holds the checkpoint's head record and its HMAC key only, no model
    assert sorted(p.name for p in (tmp_path / "ckpt" / ".fedcare-state").iterdir()) == [
        "checkpoint-mac.key", "checkpoint.npz.enc.head.json"]
    assert load_checkpoint(ckpt, key=ArtefactKey.from_file(keys["artefact"])).round == 1
    spent_before = _epsilons(tmp_path)
    _flip(ckpt)

    # Execute
    with pytest.raises(CheckpointTamperedError) as caught:
        run_server(_grid(tmp_path), _config(tmp_path, resume=True, artefact_key=str(keys["artefact"])))

    # Assert: named file, what to do, and no round ran (no silent restart from round 1)
    message = str(caught.value)
    assert str(ckpt) in message and "authentication" in message and "restore it from a trusted backup" in message
    assert _epsilons(tmp_path) == spent_before
    assert not (tmp_path / "ckpt" / "final_model.npz.enc").exists()


def test_a_swapped_header_or_a_swapped_file_is_detected_on_resume(tmp_path: Path, keys: dict[str, Path]) -> None:
    # Prepare: a complete 1-round run (encrypted checkpoint and final model), to be resumed to 2 rounds
    run_server(_grid(tmp_path), _config(tmp_path, num_rounds=1, artefact_key=str(keys["artefact"])))
    folder = tmp_path / "ckpt"
    ckpt, model = folder / "checkpoint.npz.enc", folder / "final_model.npz.enc"
    original = ckpt.read_bytes()
    header_end = 9 + int.from_bytes(model.read_bytes()[5:9], "big")
    ckpt_header_end = 9 + int.from_bytes(original[5:9], "big")
    resume = _config(tmp_path, resume=True, artefact_key=str(keys["artefact"]))

    # Execute + Assert: the model's header (metadata) put on the checkpoint's ciphertext
    ckpt.write_bytes(model.read_bytes()[:header_end] + original[ckpt_header_end:])
    with pytest.raises(CheckpointTamperedError, match="failed authentication"):
        run_server(_grid(tmp_path), resume)

    # Execute + Assert: the (authentic) final model file put in place of the checkpoint
    ckpt.write_bytes(model.read_bytes())
    with pytest.raises(CheckpointTamperedError, match="kind: expected 'checkpoint', found 'model'"):
        run_server(_grid(tmp_path), resume)

    # Assert: the untouched checkpoint still resumes
    ckpt.write_bytes(original)
    history = run_server(_grid(tmp_path), resume)
    assert [r.round for r in history.completed] == [1, 2]
    arrays, meta = load_model_file(model, key=ArtefactKey.from_file(keys["artefact"]))
    assert meta["study"] == STUDY and set(arrays) == set(initial_arrays(resume))


def test_an_encrypted_checkpoint_needs_its_key_and_a_plaintext_one_is_refused_under_a_key(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    # Prepare
    encrypted, plain = tmp_path / "enc", tmp_path / "plain"
    run_server(_grid(encrypted), _config(encrypted, num_rounds=1, artefact_key=str(keys["artefact"])))
    run_server(_grid(plain), _config(plain, num_rounds=1))

    # Execute + Assert
    with pytest.raises(CheckpointKeyError, match="no artefact-key is configured"):
        run_server(_grid(encrypted), _config(encrypted, resume=True))
    with pytest.raises(CheckpointKeyError, match="plaintext checkpoint"):
        run_server(_grid(plain), _config(plain, resume=True, artefact_key=str(keys["artefact"])))
    with pytest.raises(CheckpointKeyError, match="encrypted model file"):
        load_model_file(encrypted / "ckpt" / "final_model.npz.enc")


def test_the_audit_log_chains_across_a_resume_and_names_a_flipped_entry(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    # Prepare: stop after round 1, then resume to round 2, both appending to one log
    config = _config(tmp_path, artefact_key=str(keys["artefact"]), audit_key=keys["audit"])
    with pytest.raises(_Stop):
        run_server(_grid(tmp_path), config, on_round=_stop_after(1))
    run_server(_grid(tmp_path), _config(tmp_path, resume=True, artefact_key=str(keys["artefact"]),
                                        audit_key=keys["audit"]))  # fmt: skip
    log = tmp_path / "ckpt" / "audit.jsonl"
    public = load_verify_key(keys["audit_pub"])

    # Execute
    report = verify_log(log, public)
    entries = [json.loads(line) for line in log.read_text().splitlines()]

    # Assert: one chain, both process starts, every round with each site's digest and ledger ε
    assert report.ok, report.describe()
    assert [e["kind"] for e in entries] == [
        "run_start", "round", "checkpoint", "run_start", "round", "checkpoint", "checkpoint"
    ]
    assert {e["fields"]["config_sha256"] for e in entries if e["kind"] == "run_start"} == {config_sha256(config)}
    last_round = entries[4]["fields"]
    assert last_round["round"] == 2 and last_round["secure_aggregation"] is False
    spent = _epsilons(tmp_path)
    for site in last_round["sites"]:
        assert len(site["manifest_sha256"]) == 64 and site["manifest_sha256"] != "0" * 64
        # the round entry holds the ε of the round's training reply; round 2's evaluation (ε 0.1) came after
        assert site["epsilon_spent"] + 0.1 == pytest.approx(spent[site["site"]], rel=1e-12)
    key = load_artefact_key(str(keys["artefact"]))
    round1 = load_checkpoint(tmp_path / "ckpt" / "checkpoint.npz.enc", key=key)  # now round 2's
    assert round1.round == 2
    first = entries[1]["fields"]
    assert first["aggregate_update_norm"] > 0
    assert entries[2]["fields"]["key_id"] == key.key_id  # type: ignore[union-attr]
    report_json = json.loads((tmp_path / "ckpt" / "privacy_report.json").read_text())
    assert {s["site"]: s["epsilon"] for s in report_json["sites"]} == pytest.approx(spent, rel=1e-12)

    # Execute: flip one byte inside the 5th entry (the second round)
    lines = log.read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b'"round":2', b'"round":3', 1)
    log.write_bytes(b"\n".join(lines))
    tampered = verify_log(log, public)

    # Assert
    assert not tampered.ok
    assert tampered.first_bad_line == 5 and tampered.problem == "bad_signature"


def test_the_update_norm_is_the_l2_norm_of_the_aggregate_update(tmp_path: Path, keys: dict[str, Path]) -> None:
    # Prepare
    config = _config(tmp_path, num_rounds=1, audit_key=keys["audit"])

    # Execute
    run_server(_grid(tmp_path), config)

    # Assert
    entries = [json.loads(line) for line in (tmp_path / "ckpt" / "audit.jsonl").read_text().splitlines()]
    after = load_checkpoint(tmp_path / "ckpt" / "checkpoint.npz").arrays
    before = initial_arrays(config)
    expected = np.sqrt(sum(float(np.sum((after[k].astype(np.float64) - before[k]) ** 2)) for k in after))
    assert entries[1]["fields"]["aggregate_update_norm"] == pytest.approx(expected, rel=1e-9)


def test_a_refusal_is_logged_with_its_rule_and_data_errors_without_their_text(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    # Prepare: site-002's policy accepts CNNs only, so it refuses the logistic model every round
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=3, seed=0)
    cnn_only = SitePolicy.model_validate({**POLICY.model_dump(), "allowed_model_families": ["cnn"]})
    sites = tuple(
        LocalSite(data=d, privacy=PRIVACY, ledger_dir=tmp_path / "ledgers", name=d.name, seed=i,
                  policy=cnn_only if i == 2 else POLICY)
        for i, d in enumerate(data)
    )  # fmt: skip
    config = _config(tmp_path, num_rounds=1, min_sites=2, audit_key=keys["audit"])

    # Execute
    run_server(InProcessGrid(make_client_app(_Sites(sites)), 3), config)

    # Assert
    entries = [json.loads(line) for line in (tmp_path / "ckpt" / "audit.jsonl").read_text().splitlines()]
    refusals = [e["fields"] for e in entries if e["kind"] == "refusal"]
    assert [(r["site"], r["rule"], r["round"]) for r in refusals] == [("site-002", "train.policy:model_family", 1)]
    assert "model_family" in refusals[0]["reason"]
    rule, reason = refusal_rule(1001, "row 7: age = 213 is out of range")
    assert rule == "data_invalid" and "213" not in reason
    assert verify_log(tmp_path / "ckpt" / "audit.jsonl", load_verify_key(keys["audit_pub"])).ok
