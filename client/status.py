"""A hospital's own view: ``fedcare node status`` (its privacy ledger per study, its pinned apps).

Everything comes from the node's own files, read through :mod:`fedcare.privacy.ledger` (each
study's ledger, checked against the site's spend record as a round would check it) and the site
policy (:func:`fedcare.privacy.policy.load_policy`): ε spent per study (DP-SGD and releases), the
study's budget, the reserve the policy sets aside for the count and DP evaluations, what remains,
the recent rounds with their status, the rounds that did not complete (interrupted or failed:
they are charged in full), and the app hashes the node runs. It never shows a patient value: no
count, no statistic a release carried, only ε and round bookkeeping.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..privacy.errors import PrivacyError
from ..privacy.ledger import PrivacyLedger
from ..privacy.policy import SitePolicy, load_policy
from ..privacy.release_mechanisms import release_reserve

__all__ = ["StudyStatus", "NodeStatus", "node_status"]

logger = logging.getLogger(__name__)

#: rounds listed per study (the newest)
RECENT_ROUNDS = 5


@dataclass(frozen=True)
class StudyStatus:
    """One study's ledger, summarised (ε only, never data).

    Attributes
    ----------
    study : str
        The study name.
    spent, training, releases : float
        ε spent in all, by DP-SGD, by the count and evaluation releases.
    budget : float or None
        The study's ε budget bound in the ledger (None before its first DP round).
    reserve : float or None
        ε the policy sets aside for the count and DP evaluations (None without a policy).
    remaining : float or None
        ``budget - spent`` (never below 0).
    rounds_completed, rounds_charged : int
        DP rounds trained to the end; DP rounds charged (completed, interrupted or failed).
    recent : list of dict
        The newest rounds: ``round``, ``status``, ``epsilon_after``, ``finished_at``.
    not_completed : list of dict
        Rounds charged without completing (``interrupted`` or ``failed``).
    pending : int or None
        The round being trained now (or left by a process that died), if any.
    error : str or None
        Why the ledger could not be read (e.g. a rolled-back ledger).
    """

    study: str
    spent: float = 0.0
    training: float = 0.0
    releases: float = 0.0
    budget: float | None = None
    reserve: float | None = None
    remaining: float | None = None
    rounds_completed: int = 0
    rounds_charged: int = 0
    recent: list[dict[str, Any]] = field(default_factory=list)
    not_completed: list[dict[str, Any]] = field(default_factory=list)
    pending: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class NodeStatus:
    """A site's status: each study's ledger and the apps the node runs."""

    site: str
    ledger_dir: Path
    studies: list[StudyStatus]
    pinned_apps: list[str] | None
    policy_file: Path | None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "site": self.site,
            "ledger_dir": str(self.ledger_dir),
            "policy_file": None if self.policy_file is None else str(self.policy_file),
            "pinned_apps": self.pinned_apps,
            "studies": [s.__dict__ for s in self.studies],
        }


def _round_view(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry.get(k) for k in ("round", "status", "epsilon_after", "finished_at")}


def _studies_in(directory: Path, site: str) -> list[str]:
    studies = set()
    for path in PrivacyLedger.candidate_paths(directory, site=site):
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if str(state["site"]) == site:
                studies.add(str(state["study"]))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            logger.warning("ledger file %s is unreadable; `fedcare node start` will refuse it", path.name)
    return sorted(studies)


def _study_status(directory: Path, site: str, study: str, policy: SitePolicy | None) -> StudyStatus:
    reserve = None if policy is None else release_reserve(policy)
    try:
        ledger = PrivacyLedger.open(directory, site=site, study=study)
    except (PrivacyError, OSError, ValueError) as err:
        return StudyStatus(study=study, reserve=reserve, error=str(err))
    spent, budget = ledger.spent_epsilon(), ledger.epsilon_budget
    rounds = ledger.rounds
    pending = ledger.pending
    return StudyStatus(
        study=study,
        spent=spent,
        training=ledger.training_epsilon(),
        releases=ledger.release_epsilon(),
        budget=budget,
        reserve=reserve,
        remaining=None if budget is None else max(0.0, budget - spent),
        rounds_completed=ledger.rounds_completed,
        rounds_charged=ledger.rounds_charged,
        recent=[_round_view(r) for r in rounds[-RECENT_ROUNDS:]],
        not_completed=[_round_view(r) for r in rounds if r["status"] in ("interrupted", "failed")],
        pending=None if pending is None else int(pending["round"]),
    )


def node_status(ledger_dir: Path, *, site: str, policy_file: Path | None = None) -> NodeStatus:
    """Return the site's status from its ledger folder (and its policy file, when given).

    Raises
    ------
    FileNotFoundError
        When ``ledger_dir`` does not exist.
    fedcare.privacy.policy.PolicyError
        When the policy file is invalid.
    """
    directory = Path(ledger_dir)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"ledger folder {directory} not found: pass the node's --ledger-dir (default STATE/ledger "
            "of `fedcare node start`)"
        )
    policy = None if policy_file is None else load_policy(policy_file)
    studies = [_study_status(directory, site, study, policy) for study in _studies_in(directory, site)]
    pinned = None if policy is None or policy.allowed_app_hashes is None else list(policy.allowed_app_hashes)
    return NodeStatus(site=site, ledger_dir=directory, studies=studies, pinned_apps=pinned, policy_file=policy_file)
