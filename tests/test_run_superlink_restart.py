"""``fedcare run`` waits (bounded) for a SuperLink that restarts while its run is going on (issue 13).

Found by ``benchmarks/replay.py`` (SuperLink ``kill -9`` in round 2): ``submit_run`` gave up at the
first ``flwr ls`` that found the SuperLink unreachable, so the coordinator resumed the study while
the first run's ServerApp was still alive. No deployment here: ``flwr run`` is a script that prints
what Flower prints, and ``run_status`` (``flwr ls``) is scripted.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from fedcare.server import deploy
from fedcare.server.deploy import FlowerCommandError, FlowerConnection, submit_run

UNAVAILABLE = ("`flwr ls --run-id 42` failed: Connection to the SuperLink is unavailable. Please check your "
               "network connection and 'address' in the SuperLink connection configuration.")


def _fake_flwr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, statuses: list[Any]) -> list[Any]:
    """Make ``flwr run`` print a started run 42 and ``run_status`` answer ``statuses`` in turn."""
    script = tmp_path / "flwr"
    script.write_text("#!/bin/sh\necho 'Successfully started run 42'\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(deploy, "find_executable", lambda name: str(script))
    calls: list[Any] = []

    def run_status(run_id: int, connection: FlowerConnection, **_: Any) -> dict[str, Any]:
        answer = statuses[min(len(calls), len(statuses) - 1)]
        calls.append(answer)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(deploy, "run_status", run_status)
    return calls


def _submit(tmp_path: Path) -> deploy.RunOutcome:
    app = tmp_path / "app"
    app.mkdir(exist_ok=True)
    return submit_run(app, FlowerConnection(address="127.0.0.1:9093", insecure=True), timeout=60.0,
                      status_timeout=5.0, flwr_home=tmp_path / "home")


def test_a_superlink_back_within_the_patience_lets_the_run_report_its_own_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two polls find the SuperLink down (restarting), then the run is listed as finished
    calls = _fake_flwr(tmp_path, monkeypatch, [FlowerCommandError(UNAVAILABLE), FlowerCommandError(UNAVAILABLE),
                                               {"status": "finished:failed", "status-details": "No heartbeat"}])

    # Execute
    outcome = _submit(tmp_path)

    # Assert
    assert (outcome.run_id, outcome.status, outcome.details) == (42, "finished:failed", "No heartbeat")
    assert len(calls) == 3


def test_a_superlink_too_busy_to_answer_is_waited_for_like_a_restarting_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: under load (50 nodes on 2 cores) one `flwr ls` ran past its bound; the next answered
    slow = "`flwr ls fedcare --run-id 42 --format json` did not answer within 60 s: check that the SuperLink runs"
    calls = _fake_flwr(tmp_path, monkeypatch, [FlowerCommandError(slow), {"status": "finished:completed"}])

    # Execute
    outcome = _submit(tmp_path)

    # Assert
    assert (outcome.run_id, outcome.status) == (42, "finished:completed")
    assert len(calls) == 2


def test_a_superlink_gone_past_the_patience_fails_saying_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    _fake_flwr(tmp_path, monkeypatch, [FlowerCommandError(UNAVAILABLE)])
    monkeypatch.setattr(deploy, "SUPERLINK_PATIENCE_S", 0.0)

    # Execute / Assert
    with pytest.raises(FlowerCommandError, match=r"lost the SuperLink while run 42 was running.*"
                                                 r"fedcare run STUDY.toml --resume"):
        _submit(tmp_path)


def test_another_flwr_ls_failure_is_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the Control API answers, but refuses (e.g. a revoked token): nothing to wait for
    calls = _fake_flwr(tmp_path, monkeypatch, [FlowerCommandError("`flwr ls --run-id 42` failed: permission denied"),
                                               {"status": "finished:completed"}])

    # Execute / Assert
    with pytest.raises(FlowerCommandError, match=r"permission denied"):
        _submit(tmp_path)
    assert len(calls) == 1
