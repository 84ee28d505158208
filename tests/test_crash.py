"""Killing a training process (SIGKILL) at any moment never lowers the ε its ledger records.

A real subprocess (this file run as a script) trains round after round with a persistent ledger;
the test kills it between rounds and in the middle of a round, restarts it, and checks the
ledger file after every kill. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcare.client.dataset import SiteData, Split
from fedcare.client.training import TrainSettings, train_local
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.settings import PrivacySettings

SITE, STUDY = "crash-site", "crash-study"
WAIT_S = 90.0
PRIVACY = PrivacySettings.with_noise(noise_multiplier=2.0, epsilon_budget=10.0)


# ----------------------------------------------------------------------------- the helper process


class _SlowLogistic(torch.nn.Module):
    """Logistic regression that takes ``step_sleep`` seconds per forward (a long round)."""

    def __init__(self, step_sleep: float) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.step_sleep = step_sleep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.step_sleep)
        return self.linear(x).squeeze(-1)


def _data() -> SiteData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    split = Split(inputs=(x,), targets=(x[:, 0] > 0).long())
    return SiteData(name=SITE, kind="table", task="binary", num_classes=2, input_shape=(4,),
                    train=split, val=split, test=split)


def _helper(ledger_dir: Path, rounds: int, step_sleep: float, idle_sleep: float) -> None:
    """Train ``rounds`` rounds, writing ``progress`` (last finished round) after each one."""
    model = _SlowLogistic(step_sleep)
    data = _data()
    for r in range(1, rounds + 1):
        ledger = PrivacyLedger.open(ledger_dir, site=SITE, study=STUDY)  # as the ClientApp does
        train_local(model, data, train=TrainSettings(batch_size=10, seed=r), privacy=PRIVACY,
                    ledger=ledger, planned_rounds=rounds, round_index=r)
        (ledger_dir / "progress").write_text(str(r))
        time.sleep(idle_sleep)


# ----------------------------------------------------------------------------- test side


def _start(ledger_dir: Path, *, step_sleep: float, idle_sleep: float) -> subprocess.Popen[bytes]:
    # stderr to a file: a pipe nobody reads would fill up with Opacus's warnings and block
    with (ledger_dir.parent / "helper-stderr.txt").open("ab") as err:
        return subprocess.Popen(
            [sys.executable, __file__, "--ledger-dir", str(ledger_dir), "--rounds", "200",
             "--step-sleep", str(step_sleep), "--idle-sleep", str(idle_sleep)],
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONWARNINGS": "default"},
        )


def _ledger_file(ledger_dir: Path) -> Path:
    return PrivacyLedger.path_for(ledger_dir, site=SITE, study=STUDY)


def _read_state(ledger_dir: Path) -> dict[str, Any] | None:
    path = _ledger_file(ledger_dir)
    if not path.exists():
        return None
    return json.loads(path.read_text())  # atomic replace: never a torn file


def _wait_until(proc: subprocess.Popen[bytes], condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if proc.poll() is not None:
            log = Path(proc.args[3]).parent / "helper-stderr.txt"  # args: python, file, --ledger-dir, DIR
            raise AssertionError(f"helper exited ({proc.returncode}) before {what}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")
        time.sleep(0.01)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def _spent_in(state: dict[str, Any]) -> float:
    """Return ε of a ledger state read from disk (a pending reservation counts in full)."""
    ledger = PrivacyLedger.in_memory(site=SITE, study=STUDY)
    ledger.load_state_dict(state)
    return ledger.spent_epsilon()


def _spent(ledger_dir: Path) -> float:
    """Return ε as a restarted node sees it (opening folds a dead process's reservation)."""
    return PrivacyLedger.open(ledger_dir, site=SITE, study=STUDY).spent_epsilon()


@pytest.mark.slow
def test_sigkill_between_and_during_rounds_never_lowers_epsilon(tmp_path: Path) -> None:
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    progress = ledger_dir / "progress"

    # 1. kill between rounds: right after a round finished (the helper then idles)
    proc = _start(ledger_dir, step_sleep=0.0, idle_sleep=2.0)
    try:
        _wait_until(proc, lambda: progress.exists() and int(progress.read_text() or 0) >= 1, "round 1 to finish")
        state = _read_state(ledger_dir)
    finally:
        _kill(proc)
    assert state is not None and state["rounds_completed"] >= 1
    before = _spent_in(state)  # what the ledger said just before the kill
    after = _spent(ledger_dir)
    state = _read_state(ledger_dir)
    assert after >= before > 0
    assert state is not None and state["pending"] is None

    # 2. kill in the middle of a round: the reservation is on disk, training is running
    rounds_before = len(state["rounds"])
    proc = _start(ledger_dir, step_sleep=0.1, idle_sleep=0.0)  # a round of 20 steps takes > 2 s
    try:
        _wait_until(proc, lambda: (s := _read_state(ledger_dir)) is not None and s["pending"] is not None,
                    "a round to be reserved")
        time.sleep(0.3)  # a few of the round's steps run
        mid = _read_state(ledger_dir)
    finally:
        _kill(proc)
    assert mid is not None and mid["pending"] is not None
    before = _spent_in(mid)  # counts the reservation
    after = _spent(ledger_dir)  # the first open after the kill charges the reservation in full
    state = _read_state(ledger_dir)
    assert state is not None and state["pending"] is None
    assert after >= before
    assert state["rounds"][-1]["status"] == "interrupted"
    assert len(state["rounds"]) == rounds_before + 1
    assert state["accountant_state"]["history"][-1][2] == state["rounds"][-1]["steps_charged"] + sum(
        r["steps_charged"] for r in state["rounds"][:-1]
    )

    # 3. a restarted node goes on training where the ledger left off (in this process)
    ledger = PrivacyLedger.open(ledger_dir, site=SITE, study=STUDY)
    result = train_local(_SlowLogistic(0.0), _data(), train=TrainSettings(batch_size=10, seed=99),
                         privacy=PRIVACY, ledger=ledger, planned_rounds=200, round_index=99)
    state = _read_state(ledger_dir)
    assert result.epsilon > after and result.epsilon == _spent(ledger_dir)
    assert state is not None and state["pending"] is None and len(state["rounds"]) == rounds_before + 2
    assert not [p for p in ledger_dir.iterdir() if p.name.endswith(".tmp")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fedcare crash-test helper: trains until killed")
    parser.add_argument("--ledger-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--idle-sleep", type=float, default=0.0)
    args = parser.parse_args()
    _helper(args.ledger_dir, args.rounds, args.step_sleep, args.idle_sleep)
