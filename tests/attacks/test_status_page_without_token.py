"""Attack: read the federation's status (hospitals, ε per site, refusal reasons) without the Control API token.

The attacker is a local user (or a web page in the coordinator's browser) that reaches the status
page's loopback port but does not hold ``STATE/control.token``. It asks for the JSON with no
token, a wrong one, the token's prefix, the token in the query string or a cookie instead of the
header, a lower-case scheme, and through the page itself (which must carry no data). Every
answer must be a 401 that names no hospital and no reason. The page must also refuse to listen
on a non-loopback address.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fedcare.server import status_page
from fedcare.server.deploy import FlowerConnection, UnsafeControlAddressError
from fedcare.server.progress import ProgressWriter
from fedcare.server.checkpoint import RoundRecord

TOKEN = "s3cret-token-" + "k" * 30
SECRET_REASON = "site 'st-marys' refused [epsilon_study]: budget spent"


def _source(tmp_path: Path) -> status_page.StatusSource:
    ca = tmp_path / "ca.crt"
    ca.write_text("unused", encoding="utf-8")
    study = tmp_path / "study"
    writer = ProgressWriter(study, study="oncology", num_rounds=2)
    writer.start(run_id="1", rounds_complete=0)
    writer.close_round(RoundRecord(round=1, site_train={"st-marys": {"epsilon": 1.0}}, complete=True,
                                   refusals=[{"stage": "train", "node_id": 9, "site": "st-marys", "code": 1002,
                                              "reason": SECRET_REASON}]))
    status_page.record_node_name(tmp_path / "state", 9, "st-marys")
    return status_page.StatusSource(state_dir=tmp_path / "state", study_dirs=(study,),
                                    connection=FlowerConnection(address="127.0.0.1:9301", root_certificates=ca))


def test_attacker_without_the_token_learns_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a federation with one named hospital online and a refusal on record
    monkeypatch.setattr(status_page, "list_nodes", lambda conn, **_: [{"node-id": "9", "status": "online"}])
    monkeypatch.setattr(status_page, "list_runs", lambda conn, **_: [])
    app = status_page.build_app(_source(tmp_path), token=TOKEN, refresh_s=1.0)
    attempts = {
        "no token": {},
        "wrong token": {"headers": {"Authorization": "Bearer " + "x" * len(TOKEN)}},
        "prefix": {"headers": {"Authorization": "Bearer " + TOKEN[:-1]}},
        "token longer": {"headers": {"Authorization": "Bearer " + TOKEN + "x"}},
        "lower-case scheme": {"headers": {"Authorization": "bearer " + TOKEN}},
        "basic": {"headers": {"Authorization": "Basic " + TOKEN}},
        "query string": {"params": {"token": TOKEN}},
        "cookie": {"cookies": {"fedcare-token": TOKEN}},
    }

    # Execute
    with TestClient(app) as client:
        for _ in range(100):  # wait (bounded) until the page has a snapshot an attacker would want
            owner = client.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"})
            if owner.json()["hospitals"]:
                break
            time.sleep(0.05)
        answers = {name: client.get("/api/status", **kwargs) for name, kwargs in attempts.items()}
        page = client.get("/")

    # Assert: the owner sees it; nobody else does
    assert "st-marys" in owner.text and SECRET_REASON in owner.text
    for name, answer in answers.items():
        assert answer.status_code == 401, name
        assert "st-marys" not in answer.text and "epsilon_study" not in answer.text, name
    assert "st-marys" not in page.text and SECRET_REASON not in page.text


def test_attacker_on_the_network_cannot_reach_the_page(tmp_path: Path) -> None:
    # Prepare
    source = _source(tmp_path)

    # Execute / Assert: the coordinator cannot be talked into serving it beyond loopback
    for address in ("0.0.0.0:9400", "[::]:9400", "10.0.0.5:9400"):
        with pytest.raises(UnsafeControlAddressError):
            status_page.serve(source, listen=address)
