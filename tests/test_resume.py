"""Resume: a run stopped after a checkpoint continues to the same model as an uninterrupted run.

Two levels:

- in process (fast): the real ServerApp and ClientApp (DP-SGD, FedAdam) on an in-process Grid,
  stopped by an exception right after round 2's checkpoint, then resumed;
- a real simulation (slow): ``fedcare simulate`` in a subprocess on Ray, SIGKILLed after
  round 2's checkpoint, resumed with ``--resume``, compared with an uninterrupted run.

Tolerance: sites seed their own randomness per round (``LocalSite.seed``), the server restores
flwr's sampling RNG and FedAdam's moments, and replies are aggregated in site order, so the
computation is the same operation for operation; the measured difference is 0.0 in both
settings. The assertion allows 1e-6 (absolute, on weights of order 1) for floating-point
effects we do not control (e.g. BLAS thread scheduling in Ray workers).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flwr.app import Context

from fedcare.client.app import make_client_app
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import CheckpointExistsError, ResumeMismatchError, run_server
from fedcare.server.checkpoint import CheckpointError, RoundRecord, load_checkpoint, load_model_file
from fedcare.server.config import RunConfig
from fedcare.simulations.runner import InProcessGrid

from fedcare.client.app import LocalSite
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition

TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class _Sites:
    """A provider of in-memory sites by partition id."""

    sites: tuple[LocalSite, ...]

    def __call__(self, context: Context) -> LocalSite:
        return self.sites[int(context.node_config["partition-id"])]


def _local_sites(folder: Path, privacy: PrivacySettings, n: int = 3) -> tuple[LocalSite, ...]:
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=n, seed=0)
    return tuple(
        LocalSite(data=d, privacy=privacy, ledger_dir=folder / "ledgers", name=d.name, seed=i)
        for i, d in enumerate(data)
    )


class _Stop(Exception):
    """Raised by the round callback to stop a run after a checkpoint."""


def _config(folder: Path, *, resume: bool = False, **changes: object) -> RunConfig:
    values: dict[str, object] = {
        "study": "resume", "input_shape": (30,), "num_rounds": 4, "min_sites": 3,
        "strategy": "fedadam", "eta": 0.05, "batch_size": 64, "lr": 0.5,
        "checkpoint_dir": folder / "ckpt", "resume": resume, "seed": 3,
    }
    values.update(changes)
    return RunConfig(**values)  # type: ignore[arg-type]


PRIVACY = PrivacySettings.with_noise(noise_multiplier=1.2, epsilon_budget=8.0)  # fixed σ: no calibration


def _stop_after(round_number: int):  # noqa: ANN202 - a callback factory
    def on_round(record: RoundRecord) -> None:
        if record.round == round_number:
            raise _Stop(f"stopped after round {round_number}")

    return on_round


def _epsilon(folder: Path, site: str) -> float:
    return PrivacyLedger.open(folder / "ledgers", site=site, study="resume").spent_epsilon()


def test_in_process_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # Prepare
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    sites_whole = _Sites(_local_sites(whole, PRIVACY))
    sites_parts = _Sites(_local_sites(parts, PRIVACY))

    # Execute
    run_server(InProcessGrid(make_client_app(sites_whole), 3), _config(whole))
    with pytest.raises(_Stop):
        run_server(InProcessGrid(make_client_app(sites_parts), 3), _config(parts), on_round=_stop_after(2))
    assert load_checkpoint(parts / "ckpt" / "checkpoint.npz").round == 2
    history = run_server(InProcessGrid(make_client_app(sites_parts), 3), _config(parts, resume=True))

    # Assert
    expected, _ = load_model_file(whole / "ckpt" / "final_model.npz")
    resumed, _ = load_model_file(parts / "ckpt" / "final_model.npz")
    for name in expected:
        np.testing.assert_allclose(resumed[name], expected[name], rtol=0, atol=TOLERANCE)
    assert [r.round for r in history.completed] == [1, 2, 3, 4]
    for site in ("site-000", "site-001", "site-002"):
        assert _epsilon(parts, site) == pytest.approx(_epsilon(whole, site), rel=1e-9)
        assert 0 < _epsilon(parts, site) <= 8.0


def test_resume_after_the_last_round_only_rewrites_the_outputs(tmp_path: Path) -> None:
    provider = _Sites(_local_sites(tmp_path, PRIVACY))
    run_server(InProcessGrid(make_client_app(provider), 3), _config(tmp_path, num_rounds=1))
    before = _epsilon(tmp_path, "site-000")
    grid = InProcessGrid(make_client_app(provider), 3)

    history = run_server(grid, _config(tmp_path, num_rounds=1, resume=True))

    assert grid.calls == 0
    assert [r.round for r in history.completed] == [1]
    assert _epsilon(tmp_path, "site-000") == before


def test_an_existing_checkpoint_is_never_overwritten_without_resume(tmp_path: Path) -> None:
    provider = _Sites(_local_sites(tmp_path, PRIVACY))
    run_server(InProcessGrid(make_client_app(provider), 3), _config(tmp_path, num_rounds=1))

    with pytest.raises(CheckpointExistsError, match="set resume = true"):
        run_server(InProcessGrid(make_client_app(provider), 3), _config(tmp_path, num_rounds=1))


def test_resume_refuses_a_checkpoint_of_another_strategy_or_model(tmp_path: Path) -> None:
    provider = _Sites(_local_sites(tmp_path, PRIVACY))
    run_server(InProcessGrid(make_client_app(provider), 3), _config(tmp_path, num_rounds=1))

    with pytest.raises(ResumeMismatchError, match="strategy: checkpoint 'fedadam', now 'fedavg'"):
        run_server(InProcessGrid(make_client_app(provider), 3),
                   RunConfig(study="resume", input_shape=(30,), num_rounds=2, min_sites=3,
                             checkpoint_dir=tmp_path / "ckpt", resume=True))
    (tmp_path / "ckpt" / "checkpoint.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="damaged"):
        run_server(InProcessGrid(make_client_app(provider), 3), _config(tmp_path, num_rounds=2, resume=True))


# --------------------------------------------------------------------------- a real kill


SCENARIO = """
name = "resume-kill"
rounds = {rounds}
seed = 5

[data]
kind = "sklearn"
name = "breast_cancer"

[partition]
hospitals = 3
kind = "iid"

[strategy]
name = "fedadam"
eta = 0.05

[training]
local_epochs = 3
batch_size = 16
lr = 0.2

[privacy]
enabled = true
noise_multiplier = 1.2
epsilon_budget = 100.0

[policy]                      # every site allows this study's ε (≈ 3.9 after 5 rounds)
max_epsilon_per_study = 100.0
max_epsilon_total = 100.0
require_secure_aggregation = false  # and plain rounds: FedAdam has no SecAgg+ path

[simulation]
num_cpus = 2
round_timeout_s = 120
"""
ROUNDS = 5
KILL_AFTER = 2


def _simulate(scenario: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start ``fedcare simulate`` in its own process group (so a kill reaches Ray's processes)."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "COLUMNS": "250"}
    return subprocess.Popen(
        [sys.executable, "-c", "from fedcare.cli import main; main()", "simulate", str(scenario), "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )


def _finish(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """Wait (bounded) for ``proc``; kill its group on timeout; return its output."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"simulation did not finish in {timeout_s} s:\n{out.decode()[-3000:]}")
    return out.decode()


def _checkpoint_round(path: Path) -> int:
    try:
        return load_checkpoint(path).round
    except CheckpointError:
        return 0


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_simulation(tmp_path: Path) -> None:
    # Prepare
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO.format(rounds=ROUNDS))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    ckpt = killed / "checkpoints" / "checkpoint.npz"

    # Execute: an uninterrupted run
    out = _finish(_simulate(scenario, whole), timeout_s=400)
    assert (whole / "summary.json").is_file(), out[-3000:]

    # Execute: a run killed after round KILL_AFTER is checkpointed
    proc = _simulate(scenario, killed)
    deadline = time.monotonic() + 300
    while _checkpoint_round(ckpt) < KILL_AFTER:
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint of round {KILL_AFTER} appeared:\n{proc.communicate()[0].decode()[-3000:]}")
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it exited on its own first: the assertions below say how
        pass
    killed_log = proc.communicate(timeout=60)[0].decode()
    stopped_at = _checkpoint_round(ckpt)
    assert KILL_AFTER <= stopped_at < ROUNDS, f"the run ended before the kill:\n{killed_log[-3000:]}"
    assert not (killed / "summary.json").exists()

    # Execute: resume
    log = _finish(_simulate(scenario, killed, "--resume", "--verbose"), timeout_s=400)

    # Assert
    assert f"after round {stopped_at} of {ROUNDS}" in " ".join(log.split())  # rich wraps lines
    expected, _ = load_model_file(whole / "final_model.npz")
    resumed, _ = load_model_file(killed / "final_model.npz")
    diff = max(float(np.abs(resumed[k] - expected[k]).max()) for k in expected)
    print(f"max |resumed - uninterrupted| = {diff:.3g} (killed after round {stopped_at})")
    assert diff <= TOLERANCE
    assert load_checkpoint(ckpt).round == ROUNDS
    # a site's ledger never goes backwards: a round redone after the kill is charged again
    for site in ("site-000", "site-001", "site-002"):
        again = PrivacyLedger.open(killed / "ledgers", site=site, study="resume-kill").spent_epsilon()
        once = PrivacyLedger.open(whole / "ledgers", site=site, study="resume-kill").spent_epsilon()
        assert again >= once - 1e-9
        rounds = [r["round"] for r in PrivacyLedger.open(killed / "ledgers", site=site, study="resume-kill").rounds]
        assert rounds[:KILL_AFTER] == list(range(1, KILL_AFTER + 1))
        assert rounds.count(1) == 1 and rounds[-1] == ROUNDS  # resumed, not restarted
