"""A study's live progress file: what the status page and ``fedcare server status`` read.

The ServerApp (through :class:`~fedcare.server.lifecycle.Study` and the strategy wrapper) keeps
``<checkpoint-dir>/progress.json`` up to date: the run, the round being played and its stage
(``starting``, ``train``, ``aggregate``, ``evaluate``, ``closed``; a SecAgg+ round's training
is its stages ``setup``, ``share-keys``, ``collect-masked-vectors``, ``unmask``), each site's ε as the site
reported it in its last train reply against the budget it reported (its ledger's), and every refusal and failure with its
reason. It holds what ``history.json`` and the audit log already hold (metrics the sites chose to
release, site names, refusal reasons), never patient values, and is written atomically (mode 0600)
so that a reader never sees half a file.

The file is written only when the study has a ``checkpoint-dir``; a study without one is not
shown with its rounds (the page still lists its Flower run).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from ..files import atomic_write
from ..models import wire

__all__ = [
    "PROGRESS_FILE",
    "Stage",
    "ProgressWriter",
    "read_progress",
]

logger = logging.getLogger(__name__)

PROGRESS_FILE: Final = "progress.json"
_KIND: Final = "fedcare-progress/1"
#: the most refusals kept in the file (the newest); the audit log and history keep all of them
MAX_REFUSALS: Final = 200

Stage = Literal["starting", "train", "setup", "share-keys", "collect-masked-vectors", "unmask", "aggregate",
                "evaluate", "closed", "completed", "stopped", "failed"]


class ProgressWriter:
    """Keep ``folder/progress.json`` up to date for one study run (a no-op without a folder).

    Parameters
    ----------
    folder : pathlib.Path or None
        The study's checkpoint folder; None writes nothing.
    study : str
        The study name.
    num_rounds : int
        Rounds the study plays in all.
    """

    def __init__(self, folder: Path | None, *, study: str, num_rounds: int) -> None:
        self.path = None if folder is None else Path(folder) / PROGRESS_FILE
        self._state: dict[str, Any] = {
            "kind": _KIND,
            "study": study,
            "run_id": None,
            "status": "running",
            "reason": None,
            "num_rounds": int(num_rounds),
            "round": 0,
            "stage": "starting",
            "rounds_complete": 0,
            "sites": {},
            "node_sites": {},
            "refusals": [],
            "started_at": time.time(),
            "updated_at": time.time(),
        }

    def start(self, *, run_id: str | None, rounds_complete: int) -> None:
        """Record that the run started (or resumed after ``rounds_complete`` rounds)."""
        self._state.update(run_id=run_id, rounds_complete=int(rounds_complete), round=int(rounds_complete) + 1)
        self._write()

    def stage(self, rnd: int, stage: Stage) -> None:
        """Record that round ``rnd`` entered ``stage``."""
        self._state.update(round=int(rnd), stage=stage)
        self._write()

    def close_round(self, record: Any, *, node_sites: Mapping[int, str] | None = None) -> None:
        """Record a complete round (a ``RoundRecord``): its sites' reported ε and budget, its refusals,
        and which Flower node reported which site name (``node_sites``)."""
        rnd = int(record.round)
        self._state["node_sites"] = {str(k): str(v) for k, v in dict(node_sites or {}).items()}
        for site, metrics in dict(record.site_train).items():
            entry = self._state["sites"].setdefault(str(site), {})
            entry.update(last_round=rnd, epsilon=_number(metrics.get(wire.EPSILON)),
                         delta=_number(metrics.get(wire.DELTA)),
                         epsilon_budget=_budget(metrics.get(wire.EPSILON_BUDGET)))
        for site in dict(record.site_evaluate):
            self._state["sites"].setdefault(str(site), {}).setdefault("last_round", rnd)
        self._add_refusals(rnd, record.refusals)
        self._state.update(round=rnd, stage="closed", rounds_complete=rnd)
        self._write()

    def end(self, status: Literal["completed", "stopped", "failed"], *, reason: str | None = None,
            refusals: list[Mapping[str, Any]] | None = None, rnd: int | None = None) -> None:
        """Record how the run ended (and the refusals of an unfinished round)."""
        if refusals:
            self._add_refusals(int(rnd if rnd is not None else self._state["round"]), refusals)
        self._state.update(status=status, stage=status, reason=reason)
        self._write()

    def _add_refusals(self, rnd: int, refusals: list[Mapping[str, Any]]) -> None:
        seen = {(r["round"], r.get("stage"), r.get("node_id"), r.get("reason")) for r in self._state["refusals"]}
        for refusal in refusals:
            item = {"round": rnd, "stage": refusal.get("stage"), "site": refusal.get("site"),
                    "node_id": refusal.get("node_id"), "code": refusal.get("code"),
                    "reason": str(refusal.get("reason", ""))}
            if (rnd, item["stage"], item["node_id"], item["reason"]) not in seen:
                self._state["refusals"].append(item)
        self._state["refusals"] = self._state["refusals"][-MAX_REFUSALS:]

    def _write(self) -> None:
        if self.path is None:
            return
        self._state["updated_at"] = time.time()
        try:
            atomic_write(self.path, json.dumps(self._state, allow_nan=False).encode(), make_parents=True)
        except OSError as err:  # the status view is not worth failing a study for
            logger.warning("could not write %s (%s): the status page will lag", self.path, err.strerror)


def _budget(value: Any) -> float | None:
    """Return a site's reported budget (None when unknown: sites send -1 before their ledger is bound)."""
    number = _number(value)
    return None if number is None or number < 0 else number


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def read_progress(folder: Path) -> dict[str, Any] | None:
    """Return ``folder/progress.json`` (None when absent, unreadable, or not a progress file)."""
    path = Path(folder) / PROGRESS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == _KIND else None
