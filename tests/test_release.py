"""Release of a model: encrypted artefacts, signed audit log, privacy report and the membership gate.

Two real simulations (Flower's Ray engine, ``fedcare simulate``, about a minute each here) and
one in-process deployment release (``fedcare audit membership`` then ``fedcare release``):

- a DP federation with an artefact key, an audit key and a lenient gate: the checkpoints are
  ciphertext only, the gate passes and the exported model is written, the report's per-site ε
  equals each site's ledger file, the audit log verifies and a flipped byte is named;
- a deliberately overfitted non-private federation (random labels, more features than patients
  per site, many epochs): the gate blocks the release with its message, exit code 1, no export.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from scenarios import dp_breast_cancer_scenario  # noqa: E402

from fedcare.cli import app  # noqa: E402
from fedcare.client.loaders import load_site_file  # noqa: E402
from fedcare.client.training import TrainSettings, train_local  # noqa: E402
from fedcare.models import ModelSpec, build_for_data, get_weights  # noqa: E402
from fedcare.privacy.artefacts import ArtefactKey, generate_key  # noqa: E402
from fedcare.privacy.audit_log import generate_signing_key, load_verify_key, verify_log  # noqa: E402
from fedcare.privacy.ledger import PrivacyLedger  # noqa: E402
from fedcare.privacy.report import load_report  # noqa: E402
from fedcare.privacy.settings import PrivacySettings  # noqa: E402
from fedcare.server.checkpoint import load_model_file, save_model_file  # noqa: E402
from fedcare.server.safekeeping import artefact_metadata  # noqa: E402
from fedcare.server.config import RunConfig  # noqa: E402

# plain rounds: the audit log's round entries say so (tampered below)
DP_SCENARIO = dp_breast_cancer_scenario("release-dp", rounds=2, tables="""
[artefacts]
key = "keys/artefact.key"

[audit]
signing_key = "keys/audit.key"

[release]
max_membership_auc = 0.7
attack = "loss"
bootstrap = 300

[simulation]
round_timeout_s = 300
""")

OVERFIT_SCENARIO = """
name = "release-overfit"
rounds = 2
seed = 0

[data]
kind = "manifest"
path = "noise.toml"

[partition]
hospitals = 2
kind = "iid"
min_per_site = 20

[training]
local_epochs = 100
batch_size = 8
lr = 1.0

[privacy]
enabled = false

[policy]
require_dp = false
require_secure_aggregation = false  # a plain, non-DP arm made to overfit

[release]
max_membership_auc = 0.6
attack = "loss"
bootstrap = 300

[simulation]
round_timeout_s = 300
"""


def _noise_site(folder: Path, *, rows: int = 200, features: int = 100) -> Path:
    """Patients with noise features and random labels: a model can only memorise its training set."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(rows, features)), columns=[f"f{i}" for i in range(features)])
    frame["target"] = rng.integers(0, 2, size=rows)
    frame.to_csv(folder / "noise.csv", index=False)
    manifest = folder / "noise.toml"
    manifest.write_text(
        'site = "noise"\ntask = "binary"\nclasses = [0, 1]\n[split]\nval = 0.0\ntest = 0.5\nseed = 0\n'
        '[data]\nkind = "table"\npath = "noise.csv"\ntarget = "target"\nstandardize = true\n'
    )
    return manifest


def _external_site(folder: Path) -> Path:
    """The breast cancer table as one external validation site (the study's 30 features)."""
    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.copy()
    frame["target"] = 1 - frame["target"]  # 1 = malignant, as the built-in source codes it
    frame.to_csv(folder / "wdbc.csv", index=False)
    manifest = folder / "external.toml"
    manifest.write_text(
        'site = "wdbc-external"\ntask = "binary"\nclasses = [0, 1]\n[split]\nval = 0.0\ntest = 0.5\nseed = 0\n'
        '[data]\nkind = "table"\npath = "wdbc.csv"\ntarget = "target"\n'
    )
    return manifest


def _simulate(scenario: Path, out: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["simulate", str(scenario), "--out", str(out)])
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


@pytest.mark.slow
def test_a_dp_federation_is_released_with_ciphertext_checkpoints_a_verified_log_and_ledger_epsilons(
    tmp_path: Path,
) -> None:
    # Prepare
    (tmp_path / "keys").mkdir()
    key = generate_key(tmp_path / "keys" / "artefact.key")
    _, public = generate_signing_key(tmp_path / "keys" / "audit.key")
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(DP_SCENARIO)
    out = tmp_path / "out"

    # Execute
    code, output = _simulate(scenario, out)

    # Assert: released, checkpoints encrypted only
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["release"]["released"] is True
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "checkpoint.npz.enc" in checkpoints and "final_model.npz.enc" in checkpoints
    assert "checkpoint.npz" not in checkpoints and "final_model.npz" not in checkpoints
    exported, _ = load_model_file(out / "final_model.npz")  # the export is plaintext
    inside, _ = load_model_file(out / "checkpoints" / "final_model.npz.enc", key=key)
    for name in exported:
        np.testing.assert_array_equal(exported[name], inside[name])

    # Assert: the report's per-site ε is each site's ledger, and the gate passed
    report = load_report(out / "privacy_report.json")
    assert len(report.sites) == 3 and report.gate is not None and report.gate.passed
    for site in report.sites:
        ledger = PrivacyLedger.open(out / "ledgers", site=site.site, study="release-dp").spent_epsilon()
        assert site.dp_enabled and site.accountant == "rdp" and site.rounds == 2
        assert site.epsilon == pytest.approx(ledger, rel=1e-12) and 0 < ledger <= 20.0
    assert "Not a formal guarantee" in (out / "privacy_report.md").read_text()

    # Assert: the audit log verifies, ends with the release, and the report names its head
    log = out / "checkpoints" / "audit.jsonl"
    verified = verify_log(log, load_verify_key(public), anchor=report.audit_log_head)
    assert verified.ok, verified.describe()
    kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
    assert kinds[0] == "run_start" and kinds.count("round") == 2 and kinds[-1] == "release"
    release = json.loads(log.read_text().splitlines()[-1])["fields"]
    assert release["gate_passed"] is True and release["membership_auc"] <= 0.7

    # Assert: external validation reads the encrypted model only with its key
    site = _external_site(tmp_path)
    model = str(out / "checkpoints" / "final_model.npz.enc")
    without = CliRunner().invoke(app, ["evaluate", "--model", model, "--site", str(site)])
    with_key = CliRunner().invoke(app, ["evaluate", "--model", model, "--site", str(site), "--key",
                                        str(tmp_path / "keys" / "artefact.key")])  # fmt: skip
    assert without.exit_code == 2 and "encrypted model file" in " ".join(without.output.split())
    assert with_key.exit_code == 0, with_key.output

    # Execute: flip one byte of the first round entry
    lines = log.read_bytes().split(b"\n")
    index = kinds.index("round")
    lines[index] = lines[index].replace(b'"secure_aggregation":false', b'"secure_aggregation":true', 1)
    log.write_bytes(b"\n".join(lines))
    tampered = verify_log(log, load_verify_key(public))
    cli = CliRunner().invoke(app, ["audit", "verify", str(log), "--key", str(public)])

    # Assert
    assert not tampered.ok and tampered.first_bad_line == index + 1 and tampered.problem == "bad_signature"
    assert cli.exit_code == 1 and f"line {index + 1}: bad_signature" in " ".join(cli.output.split())


@pytest.mark.slow
def test_the_gate_blocks_the_release_of_an_overfitted_non_private_federation(tmp_path: Path) -> None:
    # Prepare
    _noise_site(tmp_path)
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(OVERFIT_SCENARIO)
    out = tmp_path / "out"

    # Execute
    code, output = _simulate(scenario, out)

    # Assert
    assert code == 1, output
    assert "blocked: release blocked: membership inference exceeds max AUC 0.600" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "blocked" and "Do not release this model" in summary["reason"]
    assert summary["release"]["released"] is False and "model" not in summary["files"]
    assert not (out / "final_model.npz").exists()
    report = load_report(out / "privacy_report.json")
    assert report.gate is not None and report.gate.passed is False
    assert report.membership is not None and report.membership.worst().ci_high > 0.6
    assert all(not s.dp_enabled for s in report.sites)


def test_fedcare_release_gates_an_encrypted_deployment_model_on_its_membership_audit(tmp_path: Path) -> None:
    # Prepare: an overfitted model written as the ServerApp writes it under a key, and its audit
    manifest = _noise_site(tmp_path, rows=60, features=80)
    key_file = tmp_path / "artefact.key"
    key = generate_key(key_file)
    audit_key, _ = generate_signing_key(tmp_path / "audit.key")
    data = load_site_file(manifest)
    spec = ModelSpec(family="logistic")
    model = build_for_data(spec, task="binary", num_classes=2, input_shape=data.input_shape, has_mask=False)
    recipe = TrainSettings(local_epochs=150, batch_size=16, lr=1.0, seed=0, device="cpu")
    train_local(model, data, train=recipe, privacy=PrivacySettings.disabled(), ledger=None, planned_rounds=1,
                round_index=1)  # fmt: skip
    config = RunConfig(study="noise", input_shape=data.input_shape)
    encrypted = tmp_path / "final_model.npz.enc"
    save_model_file(encrypted, get_weights(model), {"model_spec": spec.model_dump(), "task": "binary", "num_classes": 2,
                    "input_shape": list(data.input_shape), "has_mask": False, "study": "noise"},
                    key=key, metadata=artefact_metadata(config, "model", 1))  # fmt: skip
    audit_json = tmp_path / "membership.json"
    runner = CliRunner()
    audited = runner.invoke(app, ["audit", "membership", "--model", str(encrypted), "--key", str(key_file),
                                  "--site", str(manifest), "--shadows", "0", "--out", str(audit_json)])  # fmt: skip
    assert audited.exit_code == 0, audited.output
    log = tmp_path / "audit.jsonl"
    common = ["release", "--model", str(encrypted), "--key", str(key_file), "--membership", str(audit_json),
              "--audit-key", str(audit_key), "--audit-log", str(log)]  # fmt: skip

    # Execute
    blocked = runner.invoke(app, [*common, "--max-auc", "0.6", "--out", str(tmp_path / "blocked")])
    passed = runner.invoke(app, [*common, "--max-auc", "1.0", "--out", str(tmp_path / "released")])
    other = tmp_path / "other.npz.enc"
    other.write_bytes(encrypted.read_bytes()[:-1] + bytes([encrypted.read_bytes()[-1] ^ 1]))
    wrong = runner.invoke(app, ["release", "--model", str(other), "--key", str(key_file), "--membership",
                                str(audit_json), "--max-auc", "1.0", "--out", str(tmp_path / "wrong")])  # fmt: skip

    # Assert
    assert blocked.exit_code == 1 and "release blocked" in " ".join(blocked.output.split())
    assert not (tmp_path / "blocked" / "final_model.npz").exists()
    assert passed.exit_code == 0, passed.output
    exported, _ = load_model_file(tmp_path / "released" / "final_model.npz")
    inside, _ = load_model_file(encrypted, key=ArtefactKey.from_file(key_file))
    assert all(np.array_equal(exported[k], inside[k]) for k in inside)
    assert wrong.exit_code == 2 and "not of the model to release" in " ".join(wrong.output.split())
    releases = [json.loads(line)["fields"] for line in log.read_text().splitlines()]
    assert [r["gate_passed"] for r in releases] == [False, True]
