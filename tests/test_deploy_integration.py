"""A real deployment on 127.0.0.1: SuperLink + three SuperNodes, TLS, node authentication.

Three UCI heart-disease hospitals (Cleveland, Hungarian, VA; Switzerland, 46 patients, is left
out) federate a logistic regression for two rounds with the real fedcare ServerApp and
ClientApp, submitted with ``fedcare run``, then run a second study under SecAgg+ with
client-level DP. Each node has a policy file (node config ``policy``) that accepts plain rounds,
which the first study is. Every process is stopped by PID in teardown.
Takes about 2 min on 2 CPU cores (47 s plain study, 63 s SecAgg+ study measured): each task
is forked from the node's warm executor (``client/warm_exec.py``) and the nodes and the server
poll at fedcare's shorter intervals.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from deploy_support import federation, heart_manifest, write_heart_study  # noqa: E402

from fedcare.server.checkpoint import FINAL_MODEL_FILE, HISTORY_FILE  # noqa: E402
from fedcare.server.cli import run_command  # noqa: E402
from fedcare.client.deploy import pin_app_in_policy  # noqa: E402
from fedcare.server.deploy import run_status  # noqa: E402
from fedcare.server.flower_app import app_hash, build_flower_app, load_study  # noqa: E402

SITES = ["cleveland", "hungarian", "va"]

DESCRIPTION = "three UCI heart-disease hospitals, deployment test"
#: the same federation, a second study: SecAgg+ with client-level DP (server.secagg)
SECURE_EXTRA = (
    "secure-aggregation = true\nclient-dp-clipping-norm = 1.0\n"
    "client-dp-noise-multiplier = 1.0\nclient-dp-delta = 1e-5\n"
)


@pytest.mark.integration
@pytest.mark.slow
def test_three_hospitals_federate_over_tls_with_node_auth(
    tmp_path: Path, shared_data: Path
) -> None:
    # Prepare
    started = time.monotonic()
    model_dir = tmp_path / "model"
    study = tmp_path / "study.toml"
    write_heart_study(study, name="heart-deploy-test", description=DESCRIPTION, checkpoint_dir=model_dir)
    cli = typer.Typer()
    cli.command()(run_command)

    # Each hospital's own policy file: the strict default, except that it accepts plain rounds
    # (without one a node requires SecAgg+ and would refuse the first, plain study)
    policy = tmp_path / "policy.toml"
    policy.write_text("require_secure_aggregation = false\n", encoding="utf-8")
    secure_dir = tmp_path / "secure-model"
    secure_study = tmp_path / "secure-study.toml"
    write_heart_study(secure_study, name="heart-secagg-test", description=DESCRIPTION, checkpoint_dir=secure_dir,
                      extra=SECURE_EXTRA)
    # the coordinator publishes each study's app hash (`fedcare server app-hash`); the hospital
    # pins both (`fedcare node pin-app HASH --policy FILE`)
    for name, path in (("plain", study), ("secure", secure_study)):
        digest = app_hash(build_flower_app(load_study(path), tmp_path / f"app-{name}"))
        assert pin_app_in_policy(policy, digest)

    with federation(tmp_path / "fed", nodes=SITES) as fed:
        ready = {}
        for site in SITES:
            manifest = heart_manifest(shared_data, site, tmp_path / "manifests")
            node = fed.start_node(site, manifest, extra_node_config={"policy": str(policy)})
            ready[site] = node.ready_s

        # Execute
        run_started = time.monotonic()
        result = CliRunner().invoke(
            cli,
            [str(study), "--superlink", fed.coordinator_address, "--certs", str(fed.certs.root),
             "--control-token", str(fed.control_token), "--timeout", "480"],
        )  # fmt: skip
        run_s = time.monotonic() - run_started

        # Assert
        assert result.exit_code == 0, result.output
        match = re.search(r"run (\d+) finished:completed", result.output)
        assert match is not None, result.output
        status = run_status(int(match.group(1)), fed.connection)
        assert status["status"] == "finished:completed"
        assert status["fab-name"] == "fedcare-heart-deploy-test"
        for node in fed.nodes:
            assert node.handle.running(), node.handle.log_tail()

        # Execute (2): a SecAgg+ study with client-level DP on the same federation
        secure_started = time.monotonic()
        secure = CliRunner().invoke(
            cli,
            [str(secure_study), "--superlink", fed.coordinator_address, "--certs", str(fed.certs.root),
             "--control-token", str(fed.control_token), "--timeout", "480"],
        )  # fmt: skip
        secure_s = time.monotonic() - secure_started

        # Assert (2)
        assert secure.exit_code == 0, secure.output
        secure_match = re.search(r"run (\d+) finished:completed", secure.output)
        assert secure_match is not None, secure.output
        secure_history = json.loads((secure_dir / HISTORY_FILE).read_text())
        assert secure_history["status"] == "completed"
        last = secure_history["rounds"][-1]
        assert last["train"]["secure-aggregation"] == 1.0 and last["train"]["client-epsilon"] > 0
        assert len(last["site_train"]) == len(SITES)
        # heart-va's 19 test patients are below the default min_evaluation_cohort (20): it refuses evaluation
        assert len(last["site_evaluate"]) == len(SITES) - 1
        assert any(r["stage"] == "evaluate" and "[evaluation_cohort]" in r["reason"] for r in last["refusals"])
        assert (secure_dir / FINAL_MODEL_FILE).is_file()

    assert (model_dir / FINAL_MODEL_FILE).is_file()
    history = json.loads((model_dir / HISTORY_FILE).read_text())
    assert history["run_config"]["num-server-rounds"] == 2
    for site in SITES:  # each hospital kept its own privacy ledger where its node said
        assert any((tmp_path / "fed" / "ledgers" / site).iterdir()), site
    for node in fed.nodes:
        assert not node.handle.running()
    print(
        f"\nnode start->ready: {', '.join(f'{k} {v:.1f} s' for k, v in ready.items())}; "
        f"2-round run {run_s:.1f} s; 2-round SecAgg+ run {secure_s:.1f} s; test {time.monotonic() - started:.1f} s"
    )
