"""Status views: the study's progress file, the coordinator's snapshot and page, a hospital's ledger view.

The browser test against a real deployment is ``tests/test_status_browser.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedcare.client.cli import node_app
from fedcare.client.status import node_status
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import load_policy
from fedcare.privacy.release_mechanisms import release_reserve
from fedcare.server import status_page
from fedcare.server.checkpoint import RoundRecord
from fedcare.server.deploy import FlowerCommandError, FlowerConnection, UnsafeControlAddressError
from fedcare.server.progress import PROGRESS_FILE, ProgressWriter, read_progress
from fedcare.server.status_page import (
    StatusSource,
    build_app,
    collect_status,
    format_rows,
    node_names,
    record_node_name,
    serve,
)

TOKEN = "t" * 43
NODES = [
    {"node-id": "101", "status": "online", "online-at": "2026-12-07 10:00:00Z", "offline-at": "N/A", "created-at": "x"},
    {"node-id": "202", "status": "offline", "online-at": "2026-12-07 09:00:00Z", "offline-at": "2026-12-07 09:30:00Z",
     "created-at": "x"},
    {"node-id": "303", "status": "online", "online-at": "2026-12-07 10:01:00Z", "offline-at": "N/A", "created-at": "x"},
    {"node-id": "404", "status": "unregistered", "online-at": "N/A", "offline-at": "N/A", "created-at": "x"},
]
RUNS = [{"run-id": "77", "fab-name": "fedcare-heart", "status": "running", "status-details": "N/A", "elapsed": 93.41,
         "running-at": "2026-12-07 10:02:00Z", "finished-at": "N/A"}]


def _record(rnd: int) -> RoundRecord:
    return RoundRecord(
        round=rnd,
        site_train={"cleveland": {"epsilon": 0.5 * rnd, "delta": 1e-5, "epsilon-budget": 3.0},
                    "hungarian": {"epsilon": 0.25 * rnd, "delta": 1e-5}},
        site_evaluate={"cleveland": {"auroc": 0.8}},
        refusals=[{"stage": "evaluate", "node_id": 303, "site": "va", "code": 1001,
                   "reason": "site 'va' refused [evaluation_cohort]: 19 test patients < 20"}],
        complete=True,
    )


def _source(tmp_path: Path, study_dirs: tuple[Path, ...] = ()) -> StatusSource:
    ca = tmp_path / "ca.crt"
    ca.write_text("not read in these tests", encoding="utf-8")
    return StatusSource(state_dir=tmp_path / "state",
                        connection=FlowerConnection(address="127.0.0.1:9301", root_certificates=ca),
                        study_dirs=study_dirs)


@pytest.fixture
def flower_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SuperLink's node and run lists, as `flwr supernode ls` / `flwr ls` print them."""
    monkeypatch.setattr(status_page, "list_nodes", lambda conn, **_: [dict(n) for n in NODES])
    monkeypatch.setattr(status_page, "list_runs", lambda conn, **_: [dict(r) for r in RUNS])


def test_progress_file_follows_rounds_stages_refusals_and_the_end(tmp_path: Path) -> None:
    # Prepare
    writer = ProgressWriter(tmp_path, study="heart", num_rounds=3)

    # Execute
    writer.start(run_id="77", rounds_complete=0)
    writer.stage(1, "train")
    in_training = read_progress(tmp_path)
    writer.close_round(_record(1), node_sites={101: "cleveland", 202: "hungarian"})
    writer.close_round(_record(1), node_sites={101: "cleveland"})  # the same refusal twice is kept once
    writer.stage(2, "evaluate")
    writer.end("failed", reason="round 2 failed: site va dropped", rnd=2,
               refusals=[{"stage": "train", "node_id": 303, "site": "va", "code": 1003, "reason": "dropped"}])
    final = read_progress(tmp_path)

    # Assert
    assert in_training is not None and (in_training["round"], in_training["stage"]) == (1, "train")
    assert final is not None
    assert (final["status"], final["stage"], final["round"], final["rounds_complete"]) == ("failed", "failed", 2, 1)
    assert final["reason"] == "round 2 failed: site va dropped"
    assert final["sites"]["cleveland"] == {"last_round": 1, "epsilon": 0.5, "delta": 1e-5, "epsilon_budget": 3.0}
    assert final["sites"]["hungarian"]["epsilon_budget"] is None
    assert [(r["round"], r["stage"], r["site"]) for r in final["refusals"]] == [(1, "evaluate", "va"), (2, "train", "va")]
    assert final["node_sites"] == {"101": "cleveland"}
    assert (tmp_path / PROGRESS_FILE).stat().st_mode & 0o077 == 0


def test_progress_writer_without_a_folder_writes_nothing(tmp_path: Path) -> None:
    # Prepare
    writer = ProgressWriter(None, study="heart", num_rounds=1)

    # Execute
    writer.start(run_id=None, rounds_complete=0)
    writer.close_round(_record(1))

    # Assert
    assert writer.path is None and list(tmp_path.iterdir()) == []


def test_snapshot_names_hospitals_as_registered_then_as_reported(tmp_path: Path, flower_lists: None) -> None:
    # Prepare: cleveland registered with --state; node 303 only reported its site name in a study
    study = tmp_path / "heart"
    writer = ProgressWriter(study, study="heart", num_rounds=3)
    writer.start(run_id="77", rounds_complete=0)
    writer.close_round(_record(1), node_sites={303: "va"})
    record_node_name(tmp_path / "state", 101, "cleveland", public_key=tmp_path / "cleveland.pub")

    # Execute
    snapshot = collect_status(_source(tmp_path, (study, tmp_path / "not-started")))

    # Assert
    assert [(h["name"], h["node_id"], h["status"], h["last_seen"]) for h in snapshot["hospitals"]] == [
        ("cleveland", "101", "online", "now"),
        ("node-202", "202", "offline", "2026-12-07 09:30:00Z"),
        ("va", "303", "online", "now"),
    ]
    assert snapshot["runs"][0] == {"run_id": "77", "app": "fedcare-heart", "status": "running", "details": "",
                                   "elapsed": "0:01:33", "running_at": "2026-12-07 10:02:00Z", "finished_at": None}
    heart, waiting = snapshot["studies"]
    assert (heart["round"], heart["num_rounds"], heart["stage"], heart["run_id"]) == (1, 3, "closed", "77")
    assert heart["sites"]["cleveland"]["remaining"] == pytest.approx(2.5)
    assert waiting["status"] == "waiting"
    assert snapshot["superlink"]["error"] is None
    rows = format_rows(snapshot)
    assert ["heart", "running", "1/3", "closed", "cleveland", "0.500", "3.000", "2.500"] in rows["sites"]
    assert rows["refusals"][0][3] == "va" and "[evaluation_cohort]" in rows["refusals"][0][4]


def test_node_names_file_keeps_every_registration(tmp_path: Path) -> None:
    # Prepare / Execute
    record_node_name(tmp_path, 5, "cleveland")
    record_node_name(tmp_path, 6, "hungarian")

    # Assert
    assert node_names(tmp_path) == {5: "cleveland", 6: "hungarian"}
    assert node_names(tmp_path / "nowhere") == {}


def test_snapshot_reports_an_unreachable_superlink_instead_of_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    def refuse(conn: Any, **_: Any) -> list[dict[str, Any]]:
        raise FlowerCommandError("`flwr supernode ls` did not answer within 60 s")

    monkeypatch.setattr(status_page, "list_nodes", refuse)

    # Execute
    snapshot = collect_status(_source(tmp_path))

    # Assert
    assert snapshot["superlink"]["reachable"] is False
    assert "did not answer" in snapshot["superlink"]["error"]
    assert snapshot["hospitals"] == []


def test_status_json_needs_the_control_token_and_the_page_holds_no_data(tmp_path: Path, flower_lists: None) -> None:
    # Prepare
    record_node_name(tmp_path / "state", 101, "cleveland")
    app = build_app(_source(tmp_path), token=TOKEN, refresh_s=1.0)

    # Execute
    with TestClient(app) as client:
        page = client.get("/")
        anonymous = client.get("/api/status")
        wrong = client.get("/api/status", headers={"Authorization": "Bearer " + "x" * 43})
        for _ in range(100):  # the first snapshot is collected in the background; bounded
            allowed = client.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"})
            if allowed.json()["hospitals"]:
                break
            time.sleep(0.05)

    # Assert
    assert page.status_code == 200 and "fedcare federation status" in page.text
    assert "cleveland" not in page.text and TOKEN not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert "cleveland" not in anonymous.text
    assert allowed.status_code == 200
    assert [h["name"] for h in allowed.json()["hospitals"]] == ["cleveland", "node-202", "node-303"]


def test_status_page_refuses_a_short_token_and_a_non_loopback_address(tmp_path: Path) -> None:
    # Prepare
    source = _source(tmp_path)

    # Execute / Assert
    with pytest.raises(ValueError, match="Control API token"):
        build_app(source, token="short")
    with pytest.raises(UnsafeControlAddressError, match="loopback"):
        serve(source, listen="0.0.0.0:9400")


def _ledger_with_two_rounds(directory: Path, *, site: str, study: str) -> None:
    ledger = PrivacyLedger.open(directory, site=site, study=study)
    ledger.bind(accountant="rdp", delta=1e-5, epsilon_budget=3.0)
    ledger.record_release(mechanism="count", epsilon=0.1, sensitivity=1.0, scale=10.0, value=123457.0, of=123456)
    ledger.commit_round(round_index=1, noise_multiplier=1.1, sample_rate=0.05, steps=20)
    ledger.commit_round(round_index=2, noise_multiplier=1.1, sample_rate=0.05, steps=20)


def test_node_status_reads_the_ledger_and_policy_and_shows_no_patient_value(tmp_path: Path) -> None:
    # Prepare
    ledgers = tmp_path / "ledger"
    _ledger_with_two_rounds(ledgers, site="cleveland", study="heart")
    _ledger_with_two_rounds(ledgers, site="other-site", study="heart")  # another site's file in the folder
    policy = tmp_path / "policy.toml"
    policy.write_text('require_secure_aggregation = false\nallowed_app_hashes = ["' + "a" * 64 + '"]\n')
    expected = PrivacyLedger.open(ledgers, site="cleveland", study="heart")

    # Execute
    status = node_status(ledgers, site="cleveland", policy_file=policy)
    text = json.dumps(status.to_dict())

    # Assert
    assert [s.study for s in status.studies] == ["heart"]
    heart = status.studies[0]
    assert heart.spent == expected.spent_epsilon() and heart.spent > 0.1
    assert heart.releases == pytest.approx(0.1)
    assert heart.budget == 3.0 and heart.remaining == pytest.approx(3.0 - heart.spent)
    assert heart.reserve == release_reserve(load_policy(policy))
    assert (heart.rounds_completed, heart.rounds_charged) == (2, 2)
    assert [(r["round"], r["status"]) for r in heart.recent] == [(1, "completed"), (2, "completed")]
    assert status.pinned_apps == ["a" * 64]
    assert "123456" not in text and "123457" not in text  # the exact and the noised count stay in the ledger


def test_node_status_command_prints_each_study(tmp_path: Path) -> None:
    # Prepare
    ledgers = tmp_path / "ledger"
    _ledger_with_two_rounds(ledgers, site="cleveland", study="heart")
    cli = typer.Typer()
    cli.add_typer(node_app, name="node")

    # Execute
    result = CliRunner().invoke(cli, ["node", "status", "--ledger-dir", str(ledgers), "--site-name", "cleveland"])
    missing = CliRunner().invoke(cli, ["node", "status", "--ledger-dir", str(tmp_path / "no"), "--site-name", "x"])

    # Assert
    assert result.exit_code == 0, result.output
    assert "heart" in result.output and "3.000" in result.output and "2/2" in result.output
    assert "recent rounds 1 completed" in result.output
    assert missing.exit_code == 1 and "--ledger-dir" in missing.output
