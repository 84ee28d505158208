"""Property (hypothesis): over random schedules of rounds, crashes, failures, retries and voids, the
ledger never lets ε exceed the site's budget and never lowers the ε of what left the site.

Each schedule runs on a real ledger folder. An event is one round attempt of the ClientApp's kind
(held, trained, released) for a round index the server chose (the next one, or the same one again:
a retry), ending in one of: released (the update left), an error after training (the error reply
left: charged), a kill while training, a kill after training but before the release (both: the
update never left; voided within the reserve), or a kill after the release (charged). A kill is
what the OS does: the lock is dropped, the object forgotten, the next event reopens the file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcare.privacy.errors import BudgetExceededError
from fedcare.privacy.ledger import PrivacyLedger

SIGMA, Q, STEPS = 1.0, 0.05, 20
SITE, STUDY = "hospital-a", "study"
ENDINGS = ("released", "error_after_training", "killed_training", "killed_trained", "killed_after_release")

events = st.lists(
    st.tuples(st.booleans(), st.sampled_from(ENDINGS)),  # (retry the same round index?, how it ends)
    min_size=1,
    max_size=10,
)


def _open(folder: Path, budget: float, reserve: int) -> PrivacyLedger:
    ledger = PrivacyLedger.open(folder, site=SITE, study=STUDY)
    ledger.bind(accountant="rdp", delta=1e-5, epsilon_budget=budget)
    ledger.set_retry_reserve(reserve)
    return ledger


def _attempt(ledger: PrivacyLedger, round_index: int, ending: str) -> bool:
    """Play one round attempt; return whether the process survived (False: killed)."""
    if ending.startswith("killed"):
        ledger._enter()
        ledger._hold_release = True
        ledger.reserve_round(round_index=round_index, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
        for _ in range(STEPS if ending != "killed_training" else STEPS // 2):
            ledger.accountant.step(noise_multiplier=SIGMA, sample_rate=Q)
        if ending != "killed_training":
            ledger.finalise_round()
        if ending == "killed_after_release":
            ledger.release_round()
        ledger._lock.release()  # the OS drops a killed process's lock
        return False
    try:
        with ledger.session(hold_release=True):
            ledger.reserve_round(round_index=round_index, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
            for _ in range(STEPS):
                ledger.accountant.step(noise_multiplier=SIGMA, sample_rate=Q)
            ledger.finalise_round()
            if ending == "error_after_training":
                raise RuntimeError("the reply could not be built")
            ledger.release_round()
    except RuntimeError:
        pass
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=events, budget=st.sampled_from([0.6, 1.0, 1.6]), reserve=st.integers(min_value=0, max_value=3))
def test_epsilon_never_exceeds_the_budget_and_never_decreases(
    schedule: list[tuple[bool, str]], budget: float, reserve: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="fedcare-ledger-prop-") as tmp:
        # Prepare
        folder = Path(tmp)
        ledger = _open(folder, budget, reserve)
        committed = [ledger.committed_epsilon()]
        round_index = 0
        # Execute
        for retry, ending in schedule:
            round_index = max(round_index, 1) if retry else round_index + 1
            try:
                alive = _attempt(ledger, round_index, ending)
            except BudgetExceededError:
                alive = True
                if ledger._depth:  # a refusal inside the kill path's open session
                    ledger._exit()
            if not alive:
                ledger = _open(folder, budget, reserve)  # the restart resolves the dead reservation
            reopened = PrivacyLedger.open(folder, site=SITE, study=STUDY)
            committed.append(reopened.committed_epsilon())
            # Assert (after every event)
            assert reopened.spent_epsilon() <= budget + 1e-9
            assert reopened.pending is None or alive
            assert committed[-1] >= committed[-2] - 1e-12, "the ε of what left the site went down"
            statuses = [r["status"] for r in reopened.rounds]
            assert statuses.count("voided") <= reserve
            assert all(r["status"] != "voided" or "released_at" not in r for r in reopened.rounds)
            released = [r for r in reopened.rounds if "released_at" in r]
            assert all(r["status"] == "completed" for r in released)
            summary = reopened.retry_summary()
            assert summary["rounds_charged"] == sum(s in ("completed", "interrupted", "failed") for s in statuses)
        # Assert (at the end): what was charged is exactly what the history holds
        final = PrivacyLedger.open(folder, site=SITE, study=STUDY)
        assert sum(r["steps_charged"] for r in final.rounds) == sum(h[2] for h in final.history)
