"""Attack (issue 11, finding 8): alter a plaintext checkpoint, then resume the run.

Written as the attacker: someone who can write the coordinator's checkpoint folder (a shared
volume, a backup being restored) but cannot read the run's 0600 key edits ``checkpoint.npz``.
Before the fix a plaintext checkpoint carried no authentication: weights multiplied by −5 were
resumed, the run finished "completed" and wrote a new privacy report for the poisoned model.

Now every checkpoint is authenticated (HMAC-SHA256 under ``.fedcare-state/checkpoint-mac.key``,
or AES-GCM with an artefact key) and a head record names the last round checkpointed: each attack
below is refused with ``CheckpointTamperedError`` before any site is asked to train, and the run
writes no final model, no completed history and no privacy report.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context

from fedcare.client.app import LocalSite, make_client_app
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import run_server
from fedcare.server.checkpoint import CheckpointTamperedError, RoundRecord, load_checkpoint
from fedcare.server.config import RunConfig
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition
from fedcare.simulations.runner import InProcessGrid

STUDY = "tamper"
PRIVACY = PrivacySettings.with_noise(noise_multiplier=1.2, epsilon_budget=8.0)


@dataclasses.dataclass(frozen=True)
class _Sites:
    sites: tuple[LocalSite, ...]

    def __call__(self, context: Context) -> LocalSite:
        return self.sites[int(context.node_config["partition-id"])]


class _Stop(Exception):
    """Raised by the round callback: the coordinator stopped after round 2's checkpoint."""


def _sites(folder: Path) -> _Sites:
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=2, seed=0)
    return _Sites(tuple(LocalSite(data=d, privacy=PRIVACY, ledger_dir=folder / "ledgers", name=d.name, seed=i)
                        for i, d in enumerate(data)))


def _config(folder: Path, *, resume: bool) -> RunConfig:
    return RunConfig(study=STUDY, input_shape=(30,), num_rounds=3, min_sites=2, batch_size=64, lr=0.5,
                     checkpoint_dir=folder / "ckpt", resume=resume, seed=1)


def _interrupted_run(folder: Path) -> tuple[_Sites, Path]:
    """Run rounds 1 and 2, keeping an authentic copy of round 1's checkpoint; return (sites, copy)."""
    sites = _sites(folder)
    copy = folder / "round1-checkpoint.npz"

    def on_round(record: RoundRecord) -> None:
        if record.round == 1:
            shutil.copy(folder / "ckpt" / "checkpoint.npz", copy)
        if record.round == 2:
            raise _Stop

    with pytest.raises(_Stop):
        run_server(InProcessGrid(make_client_app(sites), 2), _config(folder, resume=False), on_round=on_round)
    assert load_checkpoint(folder / "ckpt" / "checkpoint.npz").round == 2
    return sites, copy


def _rewrite(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Open the npz as the attacker would, change entries in place, write it back."""
    with np.load(path, allow_pickle=False) as npz:
        entries = {name: np.array(npz[name]) for name in npz.files}
    change(entries)
    with open(path, "wb") as fh:
        np.savez(fh, **entries)


def _epsilons(folder: Path) -> dict[str, float]:
    return {s: PrivacyLedger.open(folder / "ledgers", site=s, study=STUDY).spent_epsilon()
            for s in ("site-000", "site-001")}


def _assert_refused_and_nothing_released(folder: Path, sites: _Sites, match: str) -> None:
    before = _epsilons(folder)
    grid = InProcessGrid(make_client_app(sites), 2)
    with pytest.raises(CheckpointTamperedError, match=match) as err:
        run_server(grid, _config(folder, resume=True))
    assert "restore" in str(err.value) and "start a new run" in str(err.value)
    assert grid.calls == 0  # no site was asked to train on the poisoned model
    out = folder / "ckpt"
    assert not (out / "final_model.npz").exists()
    assert not (out / "history.json").exists()
    assert not (out / "privacy_report.json").exists() and not (out / "privacy_report.md").exists()
    assert _epsilons(folder) == before


def test_weights_multiplied_by_minus_five_are_refused(tmp_path: Path) -> None:
    # Prepare: the attacker multiplies every model tensor of the plaintext checkpoint by -5
    sites, _ = _interrupted_run(tmp_path)

    def poison(entries: dict[str, np.ndarray]) -> None:
        for name in [n for n in entries if n.startswith("model/")]:
            entries[name] = entries[name] * np.float32(-5.0)

    _rewrite(tmp_path / "ckpt" / "checkpoint.npz", poison)

    # Execute / Assert
    _assert_refused_and_nothing_released(tmp_path, sites, "failed authentication")


def test_an_older_authentic_model_under_the_newer_round_is_refused(tmp_path: Path) -> None:
    # Prepare: round 1's (authentic) weights spliced into round 2's checkpoint, tag kept
    sites, round1 = _interrupted_run(tmp_path)
    with np.load(round1, allow_pickle=False) as old:
        older = {n: np.array(old[n]) for n in old.files if n.startswith("model/")}

    def splice(entries: dict[str, np.ndarray]) -> None:
        assert any(not np.array_equal(entries[n], v) for n, v in older.items())  # a real change
        entries.update(older)

    _rewrite(tmp_path / "ckpt" / "checkpoint.npz", splice)

    # Execute / Assert
    _assert_refused_and_nothing_released(tmp_path, sites, "failed authentication")


def test_the_whole_older_checkpoint_put_back_is_refused(tmp_path: Path) -> None:
    # Prepare: the authentic round-1 file put back in place of round 2's (a rollback)
    sites, round1 = _interrupted_run(tmp_path)
    shutil.copy(round1, tmp_path / "ckpt" / "checkpoint.npz")

    # Execute / Assert
    _assert_refused_and_nothing_released(tmp_path, sites, "not the latest: it holds round 1, and round 2")


def test_a_checkpoint_with_its_tag_stripped_is_refused(tmp_path: Path) -> None:
    # Prepare: poisoned weights and no tag at all (as an unauthenticated checkpoint would be)
    sites, _ = _interrupted_run(tmp_path)

    def strip(entries: dict[str, np.ndarray]) -> None:
        del entries["mac"]
        for name in [n for n in entries if n.startswith("model/")]:
            entries[name] = entries[name] * np.float32(-5.0)

    _rewrite(tmp_path / "ckpt" / "checkpoint.npz", strip)

    # Execute / Assert
    _assert_refused_and_nothing_released(tmp_path, sites, "carries no authentication tag")


def test_the_untouched_checkpoint_still_resumes_to_a_completed_run(tmp_path: Path) -> None:
    # Prepare
    sites, _ = _interrupted_run(tmp_path)

    # Execute
    history = run_server(InProcessGrid(make_client_app(sites), 2), _config(tmp_path, resume=True))

    # Assert: the defence does not block the honest path
    assert [r.round for r in history.completed] == [1, 2, 3]
    assert (tmp_path / "ckpt" / "privacy_report.json").exists()
    key = tmp_path / "ckpt" / ".fedcare-state" / "checkpoint-mac.key"
    assert key.stat().st_mode & 0o777 == 0o600
