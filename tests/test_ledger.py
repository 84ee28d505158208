"""PrivacyLedger: persistence, refusal of foreign or corrupt files, reservations, and ε only growing."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedcare.privacy.errors import (
    BudgetExceededError,
    LedgerCorruptError,
    LedgerError,
    LedgerMismatchError,
)
from fedcare.privacy.ledger import LEDGER_FORMAT, PrivacyLedger, merge_steps

SIGMA, Q, STEPS = 1.1, 0.01, 100
SITE, STUDY = "hospital-a", "heart-study"


def _bound(tmp_path: Path, **terms: float) -> PrivacyLedger:
    ledger = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    ledger.bind(accountant="rdp", delta=terms.get("delta", 1e-5), epsilon_budget=terms.get("budget", 10.0))
    return ledger


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def test_missing_file_gives_a_new_empty_ledger(tmp_path: Path) -> None:
    # Execute
    ledger = PrivacyLedger.open(tmp_path / "ledgers", site=SITE, study=STUDY)
    # Assert
    assert ledger.spent_epsilon() == 0.0
    assert ledger.rounds == [] and ledger.rounds_completed == 0
    assert ledger.path == PrivacyLedger.path_for(tmp_path / "ledgers", site=SITE, study=STUDY)
    assert (tmp_path / "ledgers").is_dir()


def test_commit_persists_and_reopening_restores_everything(tmp_path: Path) -> None:
    # Prepare
    ledger = _bound(tmp_path)
    # Execute
    eps1 = ledger.commit_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    eps2 = ledger.commit_round(round_index=2, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    again = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    # Assert
    assert eps1 < eps2
    assert eps2 == pytest.approx(_rdp_epsilon([(SIGMA, Q, 2 * STEPS)]), abs=1e-12)
    assert again.spent_epsilon() == eps2
    assert again.history == [(SIGMA, Q, 2 * STEPS)]  # merged like Opacus's own step()
    assert again.rounds_completed == 2
    assert [r["round"] for r in again.rounds] == [1, 2]
    assert (again.accountant_name, again.delta, again.epsilon_budget) == ("rdp", 1e-5, 10.0)
    state = json.loads(ledger.path.read_text())
    assert state["kind"] == LEDGER_FORMAT
    assert state["accountant_state"] == {"mechanism": "rdp", "history": [[SIGMA, Q, 2 * STEPS]]}
    assert state["site"] == SITE and state["study"] == STUDY and len(state["checksum"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing


def test_projection_does_not_change_the_ledger(tmp_path: Path) -> None:
    # Prepare
    ledger = _bound(tmp_path)
    ledger.commit_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    before_bytes = ledger.path.read_bytes()
    before_eps = ledger.spent_epsilon()
    live_history = list(ledger.accountant.history)
    # Execute
    projected = ledger.projected_epsilon(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    checked = ledger.check_round(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    # Assert
    assert projected == checked == pytest.approx(_rdp_epsilon([(SIGMA, Q, 2 * STEPS)]), abs=1e-12)
    assert ledger.spent_epsilon() == before_eps < projected
    assert ledger.history == [(SIGMA, Q, STEPS)]
    assert list(ledger.accountant.history) == live_history
    assert ledger.path.read_bytes() == before_bytes


def test_check_round_refuses_over_budget(tmp_path: Path) -> None:
    ledger = _bound(tmp_path, budget=0.5)
    with pytest.raises(BudgetExceededError) as err:
        ledger.check_round(noise_multiplier=SIGMA, sample_rate=Q, steps=1000)
    assert err.value.budget == 0.5 and err.value.spent == 0.0 and err.value.projected > 0.5
    assert "ethics board" in str(err.value)


def test_ledger_of_another_site_is_refused_and_left_alone(tmp_path: Path) -> None:
    # Prepare: site A's ledger where site B's should be
    a = _bound(tmp_path)
    a.commit_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    b_path = PrivacyLedger.path_for(tmp_path, site="hospital-b", study=STUDY)
    shutil.copy(a.path, b_path)
    original = b_path.read_bytes()
    # Execute / Assert
    with pytest.raises(LedgerMismatchError, match="not of site 'hospital-b'"):
        PrivacyLedger.open(tmp_path, site="hospital-b", study=STUDY)
    assert b_path.read_bytes() == original


def test_ledger_of_another_study_is_refused(tmp_path: Path) -> None:
    a = _bound(tmp_path)
    a.commit_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    shutil.copy(a.path, PrivacyLedger.path_for(tmp_path, site=SITE, study="other-study"))
    with pytest.raises(LedgerMismatchError, match="study 'heart-study'"):
        PrivacyLedger.open(tmp_path, site=SITE, study="other-study")


@pytest.mark.parametrize(
    ("terms", "fragment"),
    [({"accountant": "prv"}, "accounts with 'rdp'"), ({"delta": 1e-6}, "δ=1e-05")],
)
def test_other_accountant_or_delta_is_refused(tmp_path: Path, terms: dict, fragment: str) -> None:
    # Prepare
    a = _bound(tmp_path)
    a.commit_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    original = a.path.read_bytes()
    # Execute / Assert: at open ...
    with pytest.raises(LedgerMismatchError, match=fragment):
        PrivacyLedger.open(tmp_path, site=SITE, study=STUDY, **terms)
    # ... and when a running node's settings change
    ledger = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    with pytest.raises(LedgerMismatchError, match="one study keeps one"):
        ledger.bind(accountant=terms.get("accountant", "rdp"), delta=terms.get("delta", 1e-5), epsilon_budget=10.0)
    assert a.path.read_bytes() == original


def test_budget_can_be_lowered_never_raised(tmp_path: Path) -> None:
    ledger = _bound(tmp_path, budget=3.0)
    with pytest.raises(LedgerMismatchError, match="never raised"):
        ledger.bind(accountant="rdp", delta=1e-5, epsilon_budget=4.0)
    ledger.bind(accountant="rdp", delta=1e-5, epsilon_budget=2.0)
    assert ledger.epsilon_budget == 2.0


def test_corrupt_json_is_refused_with_do_not_delete(tmp_path: Path) -> None:
    # Prepare
    a = _bound(tmp_path)
    a.commit_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    a.path.write_text(a.path.read_text()[:-20])  # a torn write
    torn = a.path.read_bytes()
    # Execute / Assert
    with pytest.raises(LedgerCorruptError, match="Do NOT delete it"):
        PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    assert a.path.read_bytes() == torn


def test_edited_history_fails_the_checksum(tmp_path: Path) -> None:
    a = _bound(tmp_path)
    a.commit_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    state = json.loads(a.path.read_text())
    state["accountant_state"]["history"][0][2] = 1  # someone "forgets" 99 steps
    a.path.write_text(json.dumps(state))
    with pytest.raises(LedgerCorruptError, match="checksum mismatch"):
        PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)


def test_not_a_ledger_is_refused(tmp_path: Path) -> None:
    path = PrivacyLedger.path_for(tmp_path, site=SITE, study=STUDY)
    path.write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(LedgerMismatchError, match="not a fedcare privacy ledger"):
        PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)


def test_state_dict_round_trip_and_refusals(tmp_path: Path) -> None:
    # Prepare
    a = _bound(tmp_path)
    a.commit_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    state = a.state_dict()
    # Execute: a fresh in-memory ledger takes the state
    b = PrivacyLedger.in_memory(site=SITE, study=STUDY)
    b.load_state_dict(state)
    # Assert
    assert b.spent_epsilon() == a.spent_epsilon() and b.history == a.history
    with pytest.raises(LedgerMismatchError, match="not a fedcare privacy ledger"):
        b.load_state_dict({"kind": "torch-optimizer"})
    other = PrivacyLedger.in_memory(site="hospital-b", study=STUDY)
    with pytest.raises(LedgerMismatchError, match="not of site 'hospital-b'"):
        other.load_state_dict(state)
    a.commit_round(round_index=2, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    with pytest.raises(LedgerMismatchError, match="lowers ε"):
        a.load_state_dict(state)  # the older, cheaper state
    assert a.history == [(SIGMA, Q, 2 * STEPS)]


def test_reservation_counts_before_training_and_finalising_keeps_it(tmp_path: Path) -> None:
    # Prepare
    ledger = _bound(tmp_path)
    expected = _rdp_epsilon([(SIGMA, Q, STEPS)])
    # Execute: reserve; Opacus's hook would step the live accountant STEPS times
    projected = ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    on_disk = json.loads(ledger.path.read_text())
    during = ledger.spent_epsilon()
    observer = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)  # another process's view
    for _ in range(STEPS):
        ledger.accountant.step(noise_multiplier=SIGMA, sample_rate=Q)
    final = ledger.finalise_round()
    # Assert
    assert on_disk["pending"]["steps"] == STEPS and on_disk["accountant_state"]["history"] == []
    assert projected == pytest.approx(expected, abs=1e-12)
    assert during == pytest.approx(expected, abs=1e-12)
    assert observer.spent_epsilon() == pytest.approx(expected, abs=1e-12)
    assert observer.pending is not None  # the round is alive (locked): counted, not folded
    assert final == pytest.approx(expected, abs=1e-12)
    assert json.loads(ledger.path.read_text())["pending"] is None
    assert ledger.rounds[-1]["status"] == "completed" and ledger.rounds[-1]["steps_done"] == STEPS


def test_a_dead_process_reservation_is_charged_in_full(tmp_path: Path) -> None:
    # Prepare: reserve, run a third of the steps, then "die" (the OS drops the lock)
    ledger = _bound(tmp_path)
    ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    for _ in range(STEPS // 3):
        ledger.accountant.step(noise_multiplier=SIGMA, sample_rate=Q)
    before = ledger.spent_epsilon()
    ledger._lock.release()  # what the OS does for a killed process
    # Execute
    restarted = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    # Assert
    assert restarted.pending is None
    assert restarted.history == [(SIGMA, Q, STEPS)]
    assert restarted.spent_epsilon() >= before
    assert restarted.rounds[-1]["status"] == "interrupted"
    assert json.loads(restarted.path.read_text())["pending"] is None


def test_abort_still_charges_the_reservation(tmp_path: Path) -> None:
    ledger = _bound(tmp_path)
    ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    eps = ledger.abort_round(reason="test")
    assert eps == pytest.approx(_rdp_epsilon([(SIGMA, Q, STEPS)]), abs=1e-12)
    assert ledger.rounds[-1]["status"] == "failed"


def test_more_steps_than_reserved_are_charged(tmp_path: Path) -> None:
    ledger = _bound(tmp_path)
    ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=10)
    for _ in range(15):
        ledger.accountant.step(noise_multiplier=SIGMA, sample_rate=Q)
    ledger.finalise_round()
    assert ledger.history == [(SIGMA, Q, 15)]


def test_a_second_reservation_needs_the_first_closed(tmp_path: Path) -> None:
    ledger = _bound(tmp_path)
    with ledger.session():
        ledger.reserve_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
        with pytest.raises(LedgerMismatchError, match="already reserved"):
            ledger.reserve_round(round_index=2, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    # leaving the session with the round open charged it
    assert ledger.pending is None and ledger.rounds[-1]["status"] == "failed"


def test_non_private_round_makes_epsilon_infinite(tmp_path: Path) -> None:
    ledger = _bound(tmp_path)
    ledger.record_non_private_round(round_index=1)
    again = PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    assert again.spent_epsilon() == math.inf
    with pytest.raises(BudgetExceededError):
        again.check_round(noise_multiplier=SIGMA, sample_rate=Q, steps=1)


def test_in_memory_ledger_warns_and_writes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedcare.privacy.ledger"):
        ledger = PrivacyLedger.in_memory(site=SITE, study=STUDY, accountant="rdp", delta=1e-5, epsilon_budget=5.0)
    ledger.commit_round(round_index=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    assert ledger.path is None and "NOT persisted" in caplog.text
    assert ledger.spent_epsilon() > 0


def test_merge_steps_matches_opacus_step() -> None:
    acc = RDPAccountant()
    for nm, sr in [(1.0, 0.1)] * 3 + [(2.0, 0.1)] * 2 + [(1.0, 0.1)]:
        acc.step(noise_multiplier=nm, sample_rate=sr)
    merged = merge_steps([], noise_multiplier=1.0, sample_rate=0.1, steps=3)
    merged = merge_steps(merged, noise_multiplier=2.0, sample_rate=0.1, steps=2)
    merged = merge_steps(merged, noise_multiplier=1.0, sample_rate=0.1, steps=1)
    assert merged == acc.history == [(1.0, 0.1, 3), (2.0, 0.1, 2), (1.0, 0.1, 1)]


def test_ledger_errors_share_a_base() -> None:
    assert issubclass(LedgerCorruptError, LedgerError) and issubclass(LedgerMismatchError, LedgerError)


def test_candidate_paths_pick_a_sites_ledgers_by_name_only(tmp_path: Path) -> None:
    # Prepare: one shared folder, ledgers of sites whose names share a prefix
    for site, study in [("site-1", "a"), ("site-1", "b"), ("site-10", "a"), ("site-100", "c")]:
        PrivacyLedger.path_for(tmp_path, site=site, study=study).write_text("{}")

    # Execute
    found = PrivacyLedger.candidate_paths(tmp_path, site="site-1")

    # Assert: both of site-1's studies, none of site-10's or site-100's
    assert found == sorted([PrivacyLedger.path_for(tmp_path, site="site-1", study=s) for s in ("a", "b")])
