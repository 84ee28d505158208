"""Budgeted retries (issue 13 item 1): every ledger transition of a round, voids, retries and the reserve.

A round is reserved, trained, released (handed to Flower) and closed; a process that dies leaves
its reservation behind, which the next open voids (the update provably never left the site) or
charges in full. These tests drive each transition on a real ledger file, with "death" simulated as
the existing crash tests do: the OS drops the dead process's lock (``ledger._lock.release()``) and
the object is never used again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedcare.privacy.engine import EPSILON_TOLERANCE
from fedcare.privacy.errors import BudgetExceededError, LedgerMismatchError, LedgerRollbackError
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import SitePolicy, load_policy
from fedcare.privacy.settings import PrivacySettings
from fedcare.privacy.spend_record import SpendRecord

SIGMA, Q, STEPS = 1.1, 0.01, 100
SITE, STUDY = "hospital-a", "heart-study"


def _rdp(history: list[tuple[float, float, int]]) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=1e-5)


def _ledger(folder: Path, *, reserve: int | None = 2) -> PrivacyLedger:
    ledger = PrivacyLedger.open(folder, site=SITE, study=STUDY)
    ledger.bind(accountant="rdp", delta=1e-5, epsilon_budget=10.0)
    if reserve is not None:
        ledger.set_retry_reserve(reserve)
    return ledger


def _train(ledger: PrivacyLedger, steps: int = STEPS) -> None:
    for _ in range(steps):
        ledger.accountant.step(noise_multiplier=SIGMA, sample_rate=Q)


def _released_round(ledger: PrivacyLedger, round_index: int) -> float:
    """Run one round the way the ClientApp does: held, trained, released."""
    with ledger.session(hold_release=True):
        ledger.reserve_round(round_index=round_index, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
        _train(ledger)
        ledger.finalise_round()
        return ledger.release_round()


def _die(ledger: PrivacyLedger) -> None:
    """What the OS does for a killed process: its lock is gone, its memory too."""
    ledger._lock.release()
    ledger._depth = 0


def _reopen(folder: Path) -> PrivacyLedger:
    return PrivacyLedger.open(folder, site=SITE, study=STUDY)


# ---------------------------------------------------------------- held rounds


def test_a_held_round_stays_pending_and_counted_until_it_is_released(tmp_path: Path) -> None:
    # Prepare
    ledger = _ledger(tmp_path)
    one = _rdp([(SIGMA, Q, STEPS)])
    # Execute
    with ledger.session(hold_release=True):
        ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
        _train(ledger)
        after_finalise = ledger.finalise_round()
        on_disk = json.loads(ledger.path.read_text())
        released = ledger.release_round()
    # Assert
    assert on_disk["pending"]["phase"] == "trained" and on_disk["accountant_state"]["history"] == []
    assert after_finalise == pytest.approx(one, abs=1e-12) and released == pytest.approx(one, abs=1e-12)
    assert ledger.pending is None and ledger.history == [(SIGMA, Q, STEPS)]
    assert ledger.rounds[-1]["status"] == "completed" and "released_at" in ledger.rounds[-1]
    assert ledger.committed_epsilon() == pytest.approx(one, abs=1e-12)


def test_release_without_a_trained_round_is_refused(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    with pytest.raises(LedgerMismatchError, match="no trained round"):
        ledger.release_round()


def test_a_held_round_the_live_process_does_not_release_is_charged_as_failed(tmp_path: Path) -> None:
    # Prepare / Execute: an error after training, in a live process (its error reply leaves the site)
    ledger = _ledger(tmp_path)
    with pytest.raises(RuntimeError, match="building the reply"):
        with ledger.session(hold_release=True):
            ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
            _train(ledger)
            ledger.finalise_round()
            raise RuntimeError("building the reply failed")
    # Assert
    assert ledger.rounds[-1]["status"] == "failed" and ledger.history == [(SIGMA, Q, STEPS)]
    assert _reopen(tmp_path).spent_epsilon() == pytest.approx(_rdp([(SIGMA, Q, STEPS)]), abs=1e-12)


# ---------------------------------------------------------------- a dead process's reservation


@pytest.mark.parametrize("phase", ["training", "trained"])
def test_a_round_killed_before_its_release_is_voided_on_restart(tmp_path: Path, phase: str) -> None:
    # Prepare: one released round, then round 2 killed while training (or trained, not yet handed over)
    ledger = _ledger(tmp_path)
    first = _released_round(ledger, 1)
    ledger._enter()
    ledger._hold_release = True
    ledger.reserve_round(round_index=2, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    _train(ledger, STEPS // 2 if phase == "training" else STEPS)
    if phase == "trained":
        ledger.finalise_round()
    during = ledger.spent_epsilon()
    _die(ledger)
    # Execute
    restarted = _reopen(tmp_path)
    # Assert
    voided = restarted.rounds[-1]
    assert during == pytest.approx(_rdp([(SIGMA, Q, 2 * STEPS)]), abs=1e-12)
    assert restarted.pending is None and restarted.history == [(SIGMA, Q, STEPS)]
    assert restarted.spent_epsilon() == pytest.approx(first, abs=1e-12)
    assert voided["status"] == "voided" and voided["round"] == 2 and voided["steps_charged"] == 0
    assert "died while the round was" in voided["reason"] and "never left the site" in voided["reason"]
    assert restarted.retry_summary() == {"rounds_charged": 1, "rounds_voided": 1, "retries": 0,
                                         "retry_reserve": 2, "retry_reserve_left": 2}
    assert json.loads(restarted.path.read_text())["pending"] is None


def test_a_void_is_logged_as_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = _ledger(tmp_path)
    ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    _die(ledger)
    with caplog.at_level("WARNING", logger="fedcare.privacy.ledger"):
        _reopen(tmp_path)
    assert any("round 1 VOIDED" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_released_round_stays_charged_when_the_process_dies_afterwards(tmp_path: Path) -> None:
    # Prepare: the round was handed to Flower, then the process was killed
    ledger = _ledger(tmp_path)
    charged = _released_round(ledger, 1)
    _die(ledger)
    # Execute
    restarted = _reopen(tmp_path)
    # Assert
    assert restarted.rounds[-1]["status"] == "completed"
    assert restarted.spent_epsilon() == pytest.approx(charged, abs=1e-12)
    assert restarted.retry_summary()["rounds_voided"] == 0


def test_a_ledger_without_a_retry_reserve_charges_a_dead_reservation_in_full(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, reserve=None)
    ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    _die(ledger)
    restarted = _reopen(tmp_path)
    assert restarted.rounds[-1]["status"] == "interrupted"
    assert "no retry reserve" in restarted.rounds[-1]["reason"]
    assert restarted.history == [(SIGMA, Q, STEPS)]


def test_voids_stop_at_the_retry_reserve(tmp_path: Path) -> None:
    # Prepare / Execute: three kills in training with a reserve of 2
    statuses = []
    for attempt in range(3):
        ledger = _ledger(tmp_path, reserve=2)
        ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
        _die(ledger)
        statuses.append(_reopen(tmp_path).rounds[-1]["status"])
    restarted = _reopen(tmp_path)
    # Assert
    assert statuses == ["voided", "voided", "interrupted"]
    assert "already voided 2 round(s)" in restarted.rounds[-1]["reason"]
    assert [r["attempt"] for r in restarted.rounds] == [1, 2, 3]
    assert restarted.history == [(SIGMA, Q, STEPS)]


def test_a_commit_round_reservation_is_never_voided(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS, _voidable=False)
    _die(ledger)
    restarted = _reopen(tmp_path)
    assert restarted.rounds[-1]["status"] == "interrupted"
    assert "not made by a training round" in restarted.rounds[-1]["reason"]


def test_aborting_a_round_keeps_it_charged(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    eps = ledger.abort_round(reason="a data error during training")
    assert eps == pytest.approx(_rdp([(SIGMA, Q, STEPS)]), abs=1e-12)
    assert _reopen(tmp_path).rounds[-1]["status"] == "failed"


# ---------------------------------------------------------------- retries


def test_a_round_redone_after_it_left_the_site_is_a_retry_charged_once_more(tmp_path: Path) -> None:
    # Prepare: round 3 left the site, then the server died and redid it
    ledger = _ledger(tmp_path)
    for rnd in (1, 2, 3):
        _released_round(ledger, rnd)
    # Execute
    final = _released_round(ledger, 3)
    # Assert
    assert [(r["round"], r["attempt"], r["retry"]) for r in ledger.rounds] == [
        (1, 1, False), (2, 1, False), (3, 1, False), (3, 2, True)]
    assert final == pytest.approx(_rdp([(SIGMA, Q, 4 * STEPS)]), abs=1e-12)
    assert ledger.retry_summary() == {"rounds_charged": 4, "rounds_voided": 0, "retries": 1,
                                      "retry_reserve": 2, "retry_reserve_left": 1}


def test_a_round_redone_after_a_void_is_charged_once(tmp_path: Path) -> None:
    # Prepare: round 2 killed while training, voided on restart
    ledger = _ledger(tmp_path)
    _released_round(ledger, 1)
    ledger.reserve_round(round_index=2, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    _die(ledger)
    restarted = _reopen(tmp_path)
    # Execute: the server sends round 2 again
    final = _released_round(restarted, 2)
    # Assert
    assert [(r["round"], r["status"], r["retry"]) for r in restarted.rounds] == [
        (1, "completed", False), (2, "voided", False), (2, "completed", False)]
    assert final == pytest.approx(_rdp([(SIGMA, Q, 2 * STEPS)]), abs=1e-12)
    assert restarted.retry_summary()["retries"] == 0


# ---------------------------------------------------------------- the spend record


def test_a_void_is_recorded_before_the_ledger_so_a_crash_between_is_not_a_rollback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a dead reservation; the first restart dies after the record line, before the ledger write
    ledger = _ledger(tmp_path)
    _released_round(ledger, 1)
    ledger.reserve_round(round_index=2, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    _die(ledger)

    def crash(path: Path, data: dict) -> None:
        raise OSError("power cut")

    monkeypatch.setattr("fedcare.privacy.ledger._atomic_write_json", crash)
    with pytest.raises(OSError, match="power cut"):
        _reopen(tmp_path)
    monkeypatch.undo()
    # Execute
    restarted = _reopen(tmp_path)
    # Assert: no rollback error; the reservation is voided once; the record ends at the voided ε
    last = SpendRecord(tmp_path, site=SITE).last_by_study()[STUDY][0]
    assert restarted.rounds[-1]["status"] == "voided" and len(restarted.rounds) == 2
    assert last == pytest.approx(restarted.spent_epsilon(), rel=1e-9)


def test_putting_back_the_ledger_from_before_a_released_round_is_still_a_rollback(tmp_path: Path) -> None:
    # Prepare: round 1 released, round 2 voided, round 2 redone and released
    ledger = _ledger(tmp_path)
    _released_round(ledger, 1)
    old = ledger.path.read_text()
    ledger.reserve_round(round_index=2, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    _die(ledger)
    _released_round(_reopen(tmp_path), 2)
    # Execute: an older copy is put back
    ledger.path.write_text(old)
    # Assert
    with pytest.raises(LedgerRollbackError):
        _reopen(tmp_path)


# ---------------------------------------------------------------- the reserve in the noise plan


def test_the_policy_retry_reserve_defaults_to_two_and_is_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("retry_rounds = 3\n")
    assert SitePolicy().retry_rounds == 2
    assert load_policy(path).retry_rounds == 3
    with pytest.raises(ValueError):
        SitePolicy(retry_rounds=-1)


def test_noise_planned_with_the_reserve_fits_the_retries_in_the_budget(tmp_path: Path) -> None:
    # Prepare: 3 planned rounds + a reserve of 2, target ε = 2 (the ClientApp plans 3 + 2 rounds)
    import torch  # noqa: PLC0415 - only this test trains

    from fedcare.client.dataset import SiteData, Split  # noqa: PLC0415
    from fedcare.client.training import TrainSettings, train_local  # noqa: PLC0415
    from fedcare.models import build_model  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    split = Split(inputs=(x,), targets=(x[:, 0] > 0).long())
    data = SiteData(name="site", kind="table", task="binary", num_classes=2, input_shape=(5,),
                    train=split, val=split, test=split)
    privacy = PrivacySettings.with_target(epsilon=2.0)
    train = TrainSettings(batch_size=30, local_epochs=1, seed=0)
    model = build_model("logistic", in_features=5)

    def round_(folder: Path, rnd: int, planned: int) -> float:
        ledger = PrivacyLedger.open(folder, site="site", study="s")
        return train_local(model, data, train=train, privacy=privacy, ledger=ledger,
                           planned_rounds=planned, round_index=rnd).epsilon

    # Execute: rounds 1, 2, 3 with rounds 2 and 3 each redone once (the server died after they left)
    with_reserve = [round_(tmp_path / "a", rnd, 3 + 2) for rnd in (1, 2, 2, 3, 3)]
    without = [round_(tmp_path / "b", rnd, 3) for rnd in (1, 2, 2)]
    # Assert: with the reserve all five charges fit and end at the target; without it, round 3 is refused
    assert with_reserve == sorted(with_reserve)
    assert 2.0 - EPSILON_TOLERANCE <= with_reserve[-1] <= 2.0
    assert with_reserve[2] < 2.0 - EPSILON_TOLERANCE  # the planned rounds alone leave the reserve unused
    with pytest.raises(BudgetExceededError):
        round_(tmp_path / "b", 3, 3)
    assert without[-1] <= 2.0 and not math.isnan(without[-1])


# ---------------------------------------------------------------- resume as a command (issue 13 item 3)


def _study_file(tmp_path: Path, extra: str = "", name: str = "heart.toml") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(f'[study]\nname = "heart"\n\n[run]\ninput-shape = "15"\nnum-server-rounds = 3\n'
                    f'checkpoint-dir = "{tmp_path / "ckpt"}"\n{extra}')
    return path


def test_resume_is_a_run_config_override_that_keeps_the_app_hash(tmp_path: Path) -> None:
    # Prepare
    from flwr.common.config import parse_config_args  # noqa: PLC0415

    from fedcare.server.config import RunConfig, resume_override  # noqa: PLC0415
    from fedcare.server.deploy import _run_config_args  # noqa: PLC0415
    from fedcare.server.flower_app import app_hash, build_flower_app, load_study  # noqa: PLC0415

    plain = load_study(_study_file(tmp_path / "a"))
    edited = load_study(_study_file(tmp_path / "a", "resume = true\n", name="edited.toml"))
    # Execute: what `fedcare run --resume` hands `flwr run`, as flwr parses it, fused into the app's config
    args = _run_config_args(resume_override(plain.run_config()))
    override = parse_config_args([a for a in args if a != "--run-config"])
    resumed = RunConfig.from_run_config({**plain.canonical_app_config(), **override})
    # Assert: the run resumes; the app is the one the hospitals pinned; editing the file would change it
    assert args == ["--run-config", "resume=true"]
    assert override == {"resume": True} and resumed.resume is True
    pinned = app_hash(build_flower_app(plain, tmp_path / "app-plain"))
    assert app_hash(build_flower_app(plain, tmp_path / "app-again")) == pinned
    assert app_hash(build_flower_app(edited, tmp_path / "app-edited")) != pinned


def test_resume_without_checkpoints_is_refused_with_the_fix(tmp_path: Path) -> None:
    from fedcare.server.config import InvalidRunConfigError, RunConfig, resume_override  # noqa: PLC0415

    with pytest.raises(InvalidRunConfigError, match="set checkpoint-dir"):
        resume_override(RunConfig(input_shape=(15,)))
    with pytest.raises(InvalidRunConfigError, match="fedcare's own ServerApp"):
        resume_override(None)


def test_a_resumed_run_logs_the_study_s_round_numbers() -> None:
    # Prepare: flwr's own header lines, as a run resumed after round 3 of 5 logs them
    import logging  # noqa: PLC0415

    from fedcare.server.lifecycle import RealRoundNumbers  # noqa: PLC0415

    renumber = RealRoundNumbers(3)
    plain = logging.LogRecord("flwr", logging.INFO, __file__, 1, "[ROUND %s/%s]", (1, 2), None)
    legacy = logging.LogRecord("flwr", logging.INFO, __file__, 1, "[ROUND %s]", (2,), None)
    other = logging.LogRecord("flwr", logging.INFO, __file__, 1, "Received %s results", (1,), None)
    # Execute
    kept = [renumber.filter(r) for r in (plain, legacy, other)]
    renumber.filter(plain)  # a second handler's pass changes nothing
    # Assert
    assert kept == [True, True, True]
    assert [r.getMessage() for r in (plain, legacy, other)] == ["[ROUND 4/5]", "[ROUND 5]", "Received 1 results"]


def test_the_coordinator_sees_each_site_s_charged_voided_and_retried_rounds() -> None:
    from fedcare.models import wire  # noqa: PLC0415
    from fedcare.server.checkpoint import RoundRecord  # noqa: PLC0415
    from fedcare.server.lifecycle import site_ledgers  # noqa: PLC0415

    record = RoundRecord(round=3, site_train={
        "cleveland": {wire.EPSILON: 1.2, wire.ROUNDS_CHARGED: 4.0, wire.ROUNDS_VOIDED: 1.0,
                      wire.ROUND_RETRIES: 1.0, wire.RETRY_RESERVE: 2.0},
        "legacy-site": {wire.EPSILON: 1.0},
    })
    assert site_ledgers(record) == {"cleveland": {"rounds_charged": 4, "rounds_voided": 1, "retries": 1,
                                                  "retry_reserve": 2}}
