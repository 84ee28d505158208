"""The per-site, per-study privacy ledger: ε spent can only grow, across rounds, crashes and restarts.

One ledger per (site, study), kept by the site. It holds the Opacus accountant's full state
(``accountant.state_dict()``: the mechanism and the history of ``(noise_multiplier,
sample_rate, steps)``) and metadata (site, study, δ, accountant name, budget, rounds, noise
calibration, timestamps) and a SHA-256 checksum of all of it. The file is JSON, rewritten
atomically (temporary file in the same folder, ``fsync``, ``os.replace``, ``fsync`` of the
folder) every time it changes.

Crash safety: reserve, then finalise
------------------------------------
A round is charged *before* any of the site's data is touched:

1. :meth:`PrivacyLedger.reserve_round` checks the budget and persists a *pending* reservation of
   the round's planned steps. From then on :meth:`spent_epsilon` counts those steps, whether or
   not they have run.
2. Training runs; Opacus steps the ledger's own accountant (:attr:`PrivacyLedger.accountant`).
3. :meth:`PrivacyLedger.finalise_round` moves the round into the history (charging at least the
   reserved steps) and persists, and only then does ``train_local`` return the model.
   :meth:`abort_round` does the same for a round that failed.

If the process is killed at any moment, the file on disk is either the old or the new version
(atomic replace), and the reservation, if any, is on disk before training starts. The next
:meth:`open` (or :meth:`session`) finds the reservation of the dead process and resolves it:

- **voided** (status ``voided``, with the reason, logged as a warning) when the reservation
  provably produced no reply: it is *voidable* (made by ``reserve_round``, whose caller
  returns the model only after the round is closed; never one of :meth:`commit_round`) and was
  never *released*, and the study still has voids left (at most :attr:`retry_reserve`, the
  site policy's ``retry_rounds``; a ledger without a reserve voids nothing). Its steps are not
  charged: the noise drawn for them never left the process (docs/privacy.md, "Voided rounds").
- charged in full otherwise (status ``interrupted``): conservative, a round killed halfway costs
  its whole plan.

ε after a restart is never lower than the ε of everything that left the site, and a model update
never leaves the site without its cost on disk.

Release marker. A node that hands the update to Flower holds the round open
(``session(hold_release=True)``): :meth:`finalise_round` then keeps the trained round pending
(phase ``trained``) and :meth:`release_round`, called *before* the reply is returned to Flower,
moves it into the history, persisted. Whatever happens after that marker is on disk, the round
stays charged; a round killed before it never left the site and is voided. A held round that
the live process does not release (an error after training) is charged (``failed``): the error
reply itself leaves the site.

Retries. Every round entry records its ``attempt`` (how many entries of that round index exist
before it, plus one) and whether it is a ``retry`` (an earlier entry of the same round index was
charged: the server redid a round whose update had left the site). :meth:`retry_summary` says how
much of the reserve the study used. Voiding lowers ε only by the reservation of a round that never
left the site; the ε of everything that left (:meth:`committed_epsilon`) never decreases. A void is
written to the site's spend record *before* the ledger (``privacy.spend_record``), so that a crash
between the two leaves the ledger ahead of the record, never behind it.

An inter-process lock (``fcntl.flock`` on ``<ledger>.lock``, released by the OS when a process
dies) is held from :meth:`session` entry (or the reservation) to the end of the round, so a
second process never mistakes a live round for an interrupted one; it sees the reservation
counted in ε and leaves it alone.

The checksum detects corruption and accidental edits, not a malicious administrator of the site,
who could recompute it. A corrupt or mismatched file raises :class:`LedgerError` and is never
reset.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from opacus.accountants import IAccountant, create_accountant

from ..files import atomic_write
from .errors import (
    BudgetExceededError,
    LedgerCorruptError,
    LedgerLockedError,
    LedgerMismatchError,
)
from .spend_record import SpendRecord

try:  # POSIX; elsewhere ledgers work without the inter-process lock (logged)
    import fcntl
except ImportError:  # pragma: no cover - not on the supported platforms
    fcntl = None  # type: ignore[assignment]

__all__ = ["LEDGER_FORMAT", "LEDGER_VERSION", "PrivacyLedger", "epsilon_of", "merge_steps", "verify_site"]

logger = logging.getLogger(__name__)

LEDGER_FORMAT: Final = "fedcare.privacy-ledger"
LEDGER_VERSION: Final = 1
_SUFFIX: Final = ".ledger.json"

Entry = tuple[float, float, int]
"""One accountant history entry: (noise_multiplier, sample_rate, steps)."""

_CHARGED: Final = ("completed", "interrupted", "failed")
"""Round statuses whose steps are in the history (``voided`` and ``non_private`` are not)."""


def _now() -> str:
    """Return the current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def merge_steps(history: Sequence[Sequence[Any]], *, noise_multiplier: float, sample_rate: float,
                steps: int) -> list[Entry]:
    """Return ``history`` with ``steps`` more steps appended exactly as Opacus's ``step()`` would.

    Opacus's RDP and PRV accountants extend the last entry when (σ, q) are unchanged and append a
    new one otherwise; doing the same keeps a reserved round's ε identical to the trained one's.
    """
    out: list[Entry] = [(float(h[0]), float(h[1]), int(h[2])) for h in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(steps))
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


@lru_cache(maxsize=256)
def _epsilon_cached(history: tuple[Entry, ...], accountant: str, delta: float) -> float:
    """Return ε of ``history`` with a fresh Opacus accountant (cached: PRV is slow)."""
    acc = create_accountant(mechanism=accountant)
    acc.load_state_dict({"history": [tuple(h) for h in history], "mechanism": accountant})
    return float(acc.get_epsilon(delta=delta))


def epsilon_of(history: Sequence[Sequence[Any]], *, accountant: str, delta: float) -> float:
    """Return the ε Opacus's ``accountant`` gives for ``history`` at ``delta`` (0 when empty)."""
    entries = tuple((float(h[0]), float(h[1]), int(h[2])) for h in history if int(h[2]) > 0)
    if not entries:
        return 0.0
    return _epsilon_cached(entries, accountant, float(delta))


def _steps_by_key(history: Sequence[Entry]) -> dict[tuple[float, float], int]:
    """Return total steps per (σ, q) in ``history``."""
    out: dict[tuple[float, float], int] = {}
    for nm, sr, steps in history:
        out[(nm, sr)] = out.get((nm, sr), 0) + steps
    return out


def _finite(value: float) -> float | None:
    """Return ``value``, or None when infinite (JSON has no infinity)."""
    return None if math.isinf(value) else value


def _slug(text: str) -> str:
    """Return a file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:48] or "x"


def _checksum(payload: dict[str, Any]) -> str:
    """Return the SHA-256 of ``payload``'s canonical JSON."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (:func:`fedcare.files.atomic_write`, mode 0600)."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False).encode("utf-8"))


class _FileLock:
    """An exclusive ``flock`` on a file; the OS releases it when the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Return whether this object holds the lock."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if free; return whether it is now held."""
        if self._fd is not None:
            return True
        if fcntl is None:  # pragma: no cover
            logger.warning("no inter-process lock on this platform: run one trainer per ledger")
            self._fd = -1
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self, timeout_s: float) -> None:
        """Take the lock, waiting up to ``timeout_s``; raise :class:`LedgerLockedError` after."""
        deadline = time.monotonic() + timeout_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise LedgerLockedError(
                    f"privacy ledger lock {self.path} is held by another process (training for "
                    f"the same site and study) after waiting {timeout_s:g} s; wait for it to "
                    "finish, or stop the stuck process. Do not delete the ledger."
                )
            time.sleep(0.05)

    def release(self) -> None:
        """Release the lock if held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class PrivacyLedger:
    """The privacy a site has spent in one study, persisted so ε never restarts or decreases.

    Build with :meth:`open` (a folder; the file is ``path_for(folder, site=, study=)``) or
    :meth:`in_memory` (experiments only: nothing persists). ``accountant``, ``delta`` and
    ``epsilon_budget`` are the study's terms: fixed by the first DP round (:meth:`bind`), then
    any different accountant or δ is refused, and the budget can only be lowered.

    Parameters
    ----------
    site, study : str
        Whose ledger this is.
    path : pathlib.Path or None
        The ledger file; None keeps it in memory.
    accountant : {"rdp", "prv"}, optional
        Opacus accountant of the study.
    delta : float, optional
        δ of the study.
    epsilon_budget : float, optional
        The site's total ε for the study.
    lock_timeout_s : float
        How long a round waits for another process holding the same ledger.
    """

    def __init__(  # noqa: PLR0913 - the study's terms
        self,
        *,
        site: str,
        study: str,
        path: Path | None,
        accountant: str | None = None,
        delta: float | None = None,
        epsilon_budget: float | None = None,
        lock_timeout_s: float = 60.0,
    ) -> None:
        if not site or not study:
            raise ValueError("a privacy ledger needs a non-empty site and study name")
        self._site = site
        self._study = study
        self._path = path
        self._accountant_name: str | None = accountant
        self._delta: float | None = delta
        self._budget: float | None = epsilon_budget
        self._history: list[Entry] = []
        self._pending: dict[str, Any] | None = None
        self._rounds: list[dict[str, Any]] = []
        self._releases: list[dict[str, Any]] = []  # other mechanisms' releases (count, evaluation)
        self._calibration: dict[str, Any] | None = None
        self._retry_reserve: int | None = None  # the site policy's retry_rounds (None: no voids)
        self._hold_release = False  # this process hands updates to Flower: release_round marks it
        self._created_at = _now()
        self._updated_at = self._created_at
        self._live: IAccountant | None = None
        self._lock = _FileLock(path.with_name(path.name[: -len(_SUFFIX)] + ".lock")) if path else None
        self._lock_timeout_s = lock_timeout_s
        self._depth = 0
        self._reservation_opened_session = False

    # ------------------------------------------------------------------ construction

    @staticmethod
    def path_for(directory: Path | str, *, site: str, study: str) -> Path:
        """Return the ledger file of (site, study) in ``directory``."""
        digest = hashlib.sha256(f"{site}\0{study}".encode()).hexdigest()[:12]
        return Path(directory) / f"{_slug(site)}__{_slug(study)}__{digest}{_SUFFIX}"

    @staticmethod
    def candidate_paths(directory: Path | str, *, site: str) -> list[Path]:
        """Return the ledger files in ``directory`` whose name may belong to ``site``, sorted.

        Chosen by file name alone (``path_for``'s site prefix), so a folder shared by many sites
        is not read whole; the caller still checks the owner recorded inside each file.
        """
        return sorted(Path(directory).glob(f"{_slug(site)}__*{_SUFFIX}"))

    @classmethod
    def open(
        cls,
        directory: Path | str,
        *,
        site: str,
        study: str,
        accountant: str | None = None,
        delta: float | None = None,
        epsilon_budget: float | None = None,
        lock_timeout_s: float = 60.0,
    ) -> PrivacyLedger:
        """Open the (site, study) ledger in ``directory``: a new one if absent, else the file's.

        A file for another site, study, accountant or δ raises :class:`LedgerMismatchError`; an
        unreadable one :class:`LedgerCorruptError`. A reservation left by a dead process is
        voided or charged in full (see the module docstring) and persisted.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = cls.path_for(directory, site=site, study=study)
        ledger = cls(
            site=site,
            study=study,
            path=path,
            accountant=accountant,
            delta=delta,
            epsilon_budget=epsilon_budget,
            lock_timeout_s=lock_timeout_s,
        )
        if path.exists():
            ledger._apply_state(ledger._read_file(), source=str(path))
            if ledger._pending is not None and ledger._lock is not None and ledger._lock.try_acquire():
                try:  # we hold the lock, so the process that reserved is gone
                    ledger._reload()
                    if ledger._pending is not None:
                        ledger._resolve_dead_reservation()
                finally:
                    ledger._lock.release()
        else:
            logger.info("new privacy ledger for site %r, study %r at %s", site, study, path)
        ledger._check_spend_record(all_studies=True)  # a deleted / rolled-back ledger stops the site
        return ledger

    @classmethod
    def in_memory(
        cls,
        *,
        site: str,
        study: str,
        accountant: str | None = None,
        delta: float | None = None,
        epsilon_budget: float | None = None,
    ) -> PrivacyLedger:
        """Return a ledger that is never written to disk (tests, baselines; ε does not survive)."""
        logger.warning(
            "in-memory privacy ledger for site %r, study %r: ε is NOT persisted and restarts with "
            "the process; use PrivacyLedger.open for real sites", site, study,
        )
        return cls(site=site, study=study, path=None, accountant=accountant, delta=delta,
                   epsilon_budget=epsilon_budget)

    # ------------------------------------------------------------------ read-only views

    @property
    def site(self) -> str:
        """Return the site's name."""
        return self._site

    @property
    def study(self) -> str:
        """Return the study's name."""
        return self._study

    @property
    def path(self) -> Path | None:
        """Return the ledger file (None in memory)."""
        return self._path

    @property
    def accountant_name(self) -> str | None:
        """Return the study's accountant (None until the first DP round)."""
        return self._accountant_name

    @property
    def delta(self) -> float | None:
        """Return the study's δ (None until the first DP round)."""
        return self._delta

    @property
    def epsilon_budget(self) -> float | None:
        """Return the site's ε budget for the study (None until bound)."""
        return self._budget

    @property
    def history(self) -> list[Entry]:
        """Return the committed accountant history (without a pending reservation)."""
        return list(self._history)

    @property
    def pending(self) -> dict[str, Any] | None:
        """Return the pending reservation, if a round is running (or was killed)."""
        return copy.deepcopy(self._pending)

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """Return the charged rounds, oldest first."""
        return copy.deepcopy(self._rounds)

    @property
    def rounds_completed(self) -> int:
        """Return the number of rounds that trained to the end under DP."""
        return sum(1 for r in self._rounds if r["status"] == "completed")

    @property
    def rounds_charged(self) -> int:
        """Return the number of DP rounds charged (completed, interrupted or failed; not voided)."""
        return sum(1 for r in self._rounds if r["status"] in _CHARGED)

    @property
    def retry_reserve(self) -> int | None:
        """Return the study's retry reserve (the site policy's ``retry_rounds``; None: never set, no voids)."""
        return self._retry_reserve

    def set_retry_reserve(self, rounds: int) -> None:
        """Set the retry reserve (persisted with the next write); it also bounds the voids of the study."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"the retry reserve is a number of rounds >= 0, got {rounds!r}")
        if self._retry_reserve is not None and rounds != self._retry_reserve:
            logger.warning("site %r study %r: retry reserve changed from %d to %d rounds",
                           self._site, self._study, self._retry_reserve, rounds)
        self._retry_reserve = rounds

    def retry_summary(self) -> dict[str, int]:
        """Return the study's rounds charged, voided and retried, and the retry reserve used and left.

        ``retries`` counts charged entries of a round index that was already charged (the server
        redid a round whose update had left the site); each uses one round of the reserve.
        """
        charged = [r for r in self._rounds if r["status"] in _CHARGED]
        retries = len(charged) - len({int(r["round"]) for r in charged})
        reserve = self._retry_reserve or 0
        return {
            "rounds_charged": len(charged),
            "rounds_voided": sum(1 for r in self._rounds if r["status"] == "voided"),
            "retries": retries,
            "retry_reserve": reserve,
            "retry_reserve_left": max(reserve - retries, 0),
        }

    @property
    def calibration(self) -> dict[str, Any] | None:
        """Return the stored noise calibration of the study (see ``privacy.engine``)."""
        return copy.deepcopy(self._calibration)

    @property
    def accountant(self) -> IAccountant:
        """Return the ledger's live Opacus accountant (what ``PrivacyEngine`` steps while training)."""
        self._require_terms()
        if self._live is None:
            self._live = create_accountant(mechanism=self._accountant_name)
            self._live.load_state_dict(self._accountant_state(self._history))
        return self._live

    def _require_terms(self) -> None:
        """Refuse DP accounting before accountant and δ are bound."""
        if self._accountant_name is None or self._delta is None:
            raise LedgerMismatchError(
                f"ledger of site {self._site!r}, study {self._study!r} has no accountant / δ yet; "
                "call bind(accountant=..., delta=..., epsilon_budget=...) first"
            )

    def _accountant_state(self, history: Sequence[Entry]) -> dict[str, Any]:
        """Return an Opacus accountant state_dict for ``history``."""
        return {"history": [tuple(h) for h in history], "mechanism": self._accountant_name}

    # ------------------------------------------------------------------ ε

    def _has_non_private_round(self) -> bool:
        """Return whether a round released a model trained without DP."""
        return any(r["status"] == "non_private" for r in self._rounds)

    def _charged_history(self) -> list[Entry]:
        """Return the committed history plus the pending reservation (its trained steps once trained)."""
        if self._pending is None:
            return list(self._history)
        p = self._pending
        if p.get("history_after") is not None:
            return [(float(h[0]), float(h[1]), int(h[2])) for h in p["history_after"]]
        return merge_steps(self._history, noise_multiplier=p["noise_multiplier"],
                           sample_rate=p["sample_rate"], steps=p["steps"])

    def spent_epsilon(self) -> float:
        """Return ε spent in the study: DP-SGD (with a pending reservation) plus every other release.

        Basic composition: :meth:`training_epsilon` (inf after a non-DP round) plus
        :meth:`release_epsilon`. Every budget check uses this total.
        """
        return self.training_epsilon() + self.release_epsilon()

    def committed_epsilon(self) -> float:
        """Return ε of everything that left (or may have left) the site: :meth:`spent_epsilon` without a pending round.

        This is the value that never decreases: a void only ever removes a pending reservation.
        """
        releases = self.release_epsilon()
        if self._has_non_private_round():
            return math.inf
        if not self._history:
            return releases
        self._require_terms()
        return epsilon_of(self._history, accountant=self._accountant_name, delta=self._delta) + releases  # type: ignore[arg-type]

    def training_epsilon(self) -> float:
        """Return the DP-SGD accountant's ε, counting a pending reservation in full (inf after a non-DP round)."""
        if self._has_non_private_round():
            return math.inf
        history = self._charged_history()
        if not history:
            return 0.0
        self._require_terms()
        return epsilon_of(history, accountant=self._accountant_name, delta=self._delta)  # type: ignore[arg-type]

    def projected_epsilon(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Return the DP-SGD ε if a round of ``steps`` steps at (σ, q) were added (releases not included)."""
        if self._has_non_private_round():
            return math.inf
        self._require_terms()
        acc = create_accountant(mechanism=self._accountant_name)  # a copy; never the live one
        acc.load_state_dict(self._accountant_state(self._charged_history()))
        history = merge_steps(acc.history, noise_multiplier=noise_multiplier,
                              sample_rate=sample_rate, steps=steps)
        return epsilon_of(history, accountant=self._accountant_name, delta=self._delta)  # type: ignore[arg-type]

    def check_round(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Return the study's projected ε after the round (DP-SGD plus other releases); raise if over budget.

        :meth:`projected_epsilon` is the DP-SGD part only (what the noise calibration targets);
        the budget check adds :meth:`release_epsilon` (basic composition).
        """
        if self._budget is None:
            raise LedgerMismatchError(
                f"ledger of site {self._site!r}, study {self._study!r} has no ε budget; bind one "
                "before training"
            )
        projected = self.projected_epsilon(noise_multiplier=noise_multiplier,
                                           sample_rate=sample_rate, steps=steps) + self.release_epsilon()
        if projected > self._budget:
            raise BudgetExceededError(
                site=self._site, study=self._study, spent=self.spent_epsilon(),
                projected=projected, budget=self._budget, delta=self._delta or 0.0, steps=steps,
            )
        return projected

    # ------------------------------------------------------------------ other mechanisms' releases

    @property
    def releases(self) -> list[dict[str, Any]]:
        """Return the releases of mechanisms other than DP-SGD (count, evaluation), oldest first."""
        return copy.deepcopy(self._releases)

    def release_epsilon(self, mechanism: str | None = None) -> float:
        """Return the ε charged by releases (of ``mechanism`` only, when given); exact releases add none.

        An exact (non-DP) release has ``epsilon = None``: it is listed, never counted as ε, and
        the privacy report says its records have no guarantee.
        """
        return float(sum(
            r["epsilon"] for r in self._releases
            if r["epsilon"] is not None and (mechanism is None or r["mechanism"] == mechanism)
        ))

    def release_count(self, mechanism: str) -> int:
        """Return how many releases of ``mechanism`` the ledger holds."""
        return sum(1 for r in self._releases if r["mechanism"] == mechanism)

    def record_release(self, *, mechanism: str, epsilon: float | None, **details: Any) -> dict[str, Any]:
        """Charge one release of another mechanism (its own entry) and persist it before it is released.

        Parameters
        ----------
        mechanism : str
            What was released (``count``, ``evaluation``, ``evaluation-exact``).
        epsilon : float or None
            Its ε (pure ε-DP, composed by summation); None for an exact release (no guarantee).
        **details :
            JSON values stored with the entry (sensitivity, noise scale, stored noisy value).

        Returns
        -------
        dict
            The entry as stored.
        """
        if not mechanism or (epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0)):
            raise ValueError(f"a release needs a mechanism name and ε > 0 (or None), got {mechanism!r}, {epsilon!r}")
        entry = {"mechanism": str(mechanism), "epsilon": None if epsilon is None else float(epsilon),
                 "at": _now(), **copy.deepcopy(details)}
        with self.session():
            self._releases.append(entry)
            self._persist()
        logger.info("site %r study %r: %s release charged (ε=%s); study ε now %.4f", self._site,
                    self._study, mechanism, "exact, none" if epsilon is None else f"{epsilon:g}",
                    self.spent_epsilon())
        return copy.deepcopy(entry)

    # ------------------------------------------------------------------ terms

    def bind(self, *, accountant: str, delta: float, epsilon_budget: float) -> None:
        """Fix the study's terms on first use; refuse another accountant or δ, or a higher budget."""
        if self._accountant_name is not None and self._accountant_name != accountant:
            raise LedgerMismatchError(
                f"ledger of site {self._site!r}, study {self._study!r} accounts with "
                f"{self._accountant_name!r}, the settings ask for {accountant!r}; one study keeps "
                "one accountant: restore the setting, or start a new study"
            )
        if self._delta is not None and not math.isclose(self._delta, delta, rel_tol=1e-12):
            raise LedgerMismatchError(
                f"ledger of site {self._site!r}, study {self._study!r} is at δ={self._delta:g}, "
                f"the settings ask for δ={delta:g}; one study keeps one δ: restore the setting, "
                "or start a new study"
            )
        if self._budget is not None and epsilon_budget > self._budget:
            raise LedgerMismatchError(
                f"the ε budget of site {self._site!r} for study {self._study!r} was "
                f"{self._budget:g} when the study started; the settings now ask for "
                f"{epsilon_budget:g}. A budget is never raised within a study: restore the "
                "setting, or start a new study with a budget approved by the ethics board"
            )
        if self._budget is not None and epsilon_budget < self._budget:
            logger.warning("ε budget of site %r for study %r lowered from %g to %g",
                           self._site, self._study, self._budget, epsilon_budget)
        if self._accountant_name is None:
            self._live = None
        self._accountant_name = accountant
        self._delta = float(delta)
        self._budget = float(epsilon_budget)

    def set_calibration(self, calibration: dict[str, Any]) -> None:
        """Store the noise calibration (persisted with the next reservation)."""
        self._calibration = copy.deepcopy(calibration)

    # ------------------------------------------------------------------ sessions and rounds

    @contextlib.contextmanager
    def session(self, *, hold_release: bool = False) -> Iterator[PrivacyLedger]:
        """Hold the ledger for one round: take the inter-process lock and reload the file.

        A reservation found on entry was left by a dead process: it is voided or charged in full
        (module docstring). A reservation still pending on exit (the round neither finalised,
        released nor aborted) is aborted, i.e. charged in full.

        ``hold_release`` (outermost session only): the caller hands the update to Flower itself;
        a finalised round stays pending until :meth:`release_round`, which must be called before
        the reply is returned.
        """
        outermost = self._depth == 0
        self._enter()
        if outermost:
            self._hold_release = bool(hold_release)
        try:
            yield self
        finally:
            try:
                self._exit()
            finally:
                if outermost:
                    self._hold_release = False

    def _enter(self) -> None:
        """Enter a session level; the outermost takes the lock, reloads and folds a dead reservation."""
        if self._depth == 0:
            if self._lock is not None:
                self._lock.acquire(self._lock_timeout_s)
            try:
                self._reload()
                if self._pending is not None:
                    self._resolve_dead_reservation()
            except BaseException:
                if self._lock is not None:
                    self._lock.release()
                raise
        self._depth += 1

    def _exit(self) -> None:
        """Leave a session level; the outermost aborts an open round and releases the lock."""
        self._depth -= 1
        if self._depth == 0:
            try:
                if self._pending is not None:
                    trained = self._pending.get("phase") == "trained"
                    self.abort_round(reason="the trained round was not handed to Flower (an error after "
                                     "training; the error reply left the site)" if trained else
                                     "the round was neither finalised nor aborted")
            finally:
                if self._lock is not None:
                    self._lock.release()

    def reserve_round(self, *, round_index: int, noise_multiplier: float, sample_rate: float,
                      steps: int, _voidable: bool = True) -> float:
        """Check the budget and persist a reservation of ``steps`` steps; return the projected ε.

        Raises :class:`BudgetExceededError` (nothing recorded) when the round would exceed the
        budget. Until :meth:`finalise_round` / :meth:`abort_round`, ε counts the reservation.
        """
        if steps < 1:
            raise ValueError(f"a round reserves at least one step, got {steps}")
        opened = self._depth == 0
        self._enter()
        reserved = False
        try:
            if self._pending is not None:
                raise LedgerMismatchError(
                    f"a round ({self._pending['round']}) is already reserved in this ledger; "
                    "finalise or abort it first"
                )
            projected = self.check_round(noise_multiplier=noise_multiplier,
                                         sample_rate=sample_rate, steps=steps)
            self._pending = {
                "round": int(round_index),
                "noise_multiplier": float(noise_multiplier),
                "sample_rate": float(sample_rate),
                "steps": int(steps),
                "reserved_at": _now(),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "phase": "training",
                "voidable": bool(_voidable),
                "hold": self._hold_release,
            }
            reserved = True
            self._persist()
        except BaseException:
            if reserved:  # the write failed: what is on disk (old or new) is folded on next entry
                self._pending = None
            self._depth -= 1
            if self._depth == 0 and self._lock is not None:
                self._lock.release()
            raise
        if opened:  # the reservation holds the lock until finalise_round / abort_round
            self._reservation_opened_session = True
        else:  # inside the caller's session, which holds the lock
            self._depth -= 1
        self.accountant.load_state_dict(self._accountant_state(self._history))
        logger.info(
            "site %r study %r: reserved round %d (%d steps, σ=%.4f, q=%.5f); ε after it ≤ %.4f",
            self._site, self._study, round_index, steps, noise_multiplier, sample_rate, projected,
        )
        return projected

    def _close_round(self, status: str, *, steps_outside: bool = False) -> float:
        """Move the pending round into the history (charging at least its reservation); persist.

        ``steps_outside``: the round's steps were taken without the live accountant
        (:meth:`commit_round`), so all reserved steps count as done.
        """
        if self._pending is None:
            raise LedgerMismatchError("no round is reserved in this ledger; call reserve_round first")
        p = self._pending
        if p.get("phase") == "trained":  # counted at finalise_round: charge exactly that
            self._history = [(float(h[0]), float(h[1]), int(h[2])) for h in p["history_after"]]
            self._pending = None
            return self._append_closed(p, status, done=int(p["steps_done"]), charged=int(p["steps_charged"]))
        history, done, charged = self._trained_history(p, steps_outside=steps_outside)
        self._history = history
        self._pending = None
        return self._append_closed(p, status, done=done, charged=charged)

    def _trained_history(self, p: dict[str, Any], *, steps_outside: bool) -> tuple[list[Entry], int, int]:
        """Return (history with the round charged, steps done, steps charged) from the live accountant."""
        key = (p["noise_multiplier"], p["sample_rate"])
        before = _steps_by_key(self._history)
        after = _steps_by_key([tuple(h) for h in self.accountant.history])  # type: ignore[misc]
        done = p["steps"] if steps_outside else after.get(key, 0) - before.get(key, 0)
        foreign = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before) if k != key}
        foreign = {k: v for k, v in foreign.items() if v != 0}
        charged = max(done, p["steps"])
        if done > p["steps"] or foreign:
            logger.error(
                "site %r study %r round %d: the accountant took %d steps at the reserved (σ, q) "
                "(reserved %d) and %s elsewhere; charging the larger amounts",
                self._site, self._study, p["round"], done, p["steps"], foreign or "none",
            )
        history = merge_steps(self._history, noise_multiplier=key[0], sample_rate=key[1], steps=charged)
        for (nm, sr), extra in foreign.items():
            if extra > 0:
                history = merge_steps(history, noise_multiplier=nm, sample_rate=sr, steps=extra)
        return history, done, charged

    def _round_entry(self, p: dict[str, Any], status: str, **fields: Any) -> dict[str, Any]:
        """Return a round entry for the reservation ``p`` with its attempt number and retry flag."""
        same = [r for r in self._rounds if int(r["round"]) == int(p["round"])]
        return {
            "round": p["round"], "status": status, "noise_multiplier": p["noise_multiplier"],
            "sample_rate": p["sample_rate"], "steps_reserved": p["steps"], **fields,
            "attempt": len(same) + 1, "retry": any(r["status"] in _CHARGED for r in same),
            "started_at": p["reserved_at"], "finished_at": _now(),
        }

    def _append_closed(self, p: dict[str, Any], status: str, *, done: int, charged: int) -> float:
        """Record the closed round ``p`` (history already updated), persist; return ε."""
        epsilon = self.spent_epsilon()
        entry = self._round_entry(p, status, steps_done=done, steps_charged=charged,
                                  epsilon_after=_finite(epsilon))
        if p.get("released_at"):
            entry["released_at"] = p["released_at"]
        if entry["retry"]:
            logger.warning("site %r study %r: round %d charged again (attempt %d: its earlier attempt left the "
                           "site); retry reserve used %d of %d", self._site, self._study, p["round"],
                           entry["attempt"], self.retry_summary()["retries"] + 1, self._retry_reserve or 0)
        self._rounds.append(entry)
        self._persist()
        self.accountant.load_state_dict(self._accountant_state(self._history))
        if self._reservation_opened_session:
            self._reservation_opened_session = False
            self._exit()
        return epsilon

    def finalise_round(self) -> float:
        """Record the reserved round as completed (charging ≥ its reservation), persist; return ε.

        In a session with ``hold_release`` the round stays pending (phase ``trained``, its steps
        counted) until :meth:`release_round`.
        """
        p = self._pending
        if p is not None and p.get("hold") and p.get("phase") == "training":
            history, done, charged = self._trained_history(p, steps_outside=False)
            p.update(phase="trained", history_after=[list(h) for h in history], steps_done=done,
                     steps_charged=charged)
            self._persist()
            self.accountant.load_state_dict(self._accountant_state(self._history))
            epsilon = self.spent_epsilon()
            logger.info("site %r study %r: round %d trained; ε after it %.4f of %g once released",
                        self._site, self._study, p["round"], epsilon, self._budget or math.nan)
            return epsilon
        epsilon = self._close_round("completed")
        logger.info("site %r study %r: ε spent %.4f of %g", self._site, self._study, epsilon,
                    self._budget or math.nan)
        return epsilon

    def release_round(self) -> float:
        """Mark the trained round as handed to Flower (persisted before the reply is returned); return ε.

        From then on the round is charged whatever happens (the update may have left the site).
        """
        p = self._pending
        if p is None or p.get("phase") != "trained":
            raise LedgerMismatchError(
                "no trained round is waiting to be released in this ledger; call release_round after "
                "finalise_round inside session(hold_release=True)"
            )
        p["released_at"] = _now()
        epsilon = self._close_round("completed")
        logger.info("site %r study %r: round %d released; ε spent %.4f of %g", self._site, self._study,
                    p["round"], epsilon, self._budget or math.nan)
        return epsilon

    def abort_round(self, *, reason: str) -> float:
        """Record the reserved round as failed, still charging its full reservation; return ε."""
        logger.warning("site %r study %r: round %s failed (%s); its reserved steps stay charged",
                       self._site, self._study, self._pending and self._pending["round"], reason)
        return self._close_round("failed")

    def commit_round(self, *, round_index: int, noise_multiplier: float, sample_rate: float,
                     steps: int) -> float:
        """Check, record and persist a round of ``steps`` steps in one go; return ε after it.

        For steps that did not go through :attr:`accountant` (``train_local`` uses
        :meth:`reserve_round` / :meth:`finalise_round` instead).
        """
        with self.session():
            self.reserve_round(round_index=round_index, noise_multiplier=noise_multiplier,
                               sample_rate=sample_rate, steps=steps, _voidable=False)
            return self._close_round("completed", steps_outside=True)

    def record_non_private_round(self, *, round_index: int) -> None:
        """Record (and persist) that a round released a model trained WITHOUT DP: ε becomes inf."""
        with self.session():
            now = _now()
            self._rounds.append({
                "round": int(round_index), "status": "non_private", "noise_multiplier": None,
                "sample_rate": None, "steps_reserved": 0, "steps_done": 0, "steps_charged": 0,
                "epsilon_after": None, "started_at": now, "finished_at": now,
            })
            self._persist()
        logger.warning("site %r study %r: round %d trained WITHOUT DP; the study has no ε bound now",
                       self._site, self._study, round_index)

    def _may_void(self, p: dict[str, Any]) -> str | None:
        """Return why the dead reservation ``p`` cannot be voided, or None when it can."""
        if not p.get("voidable", False):
            return "it was not made by a training round (or by an older fedcare)"
        if p.get("released_at"):
            return "its update was handed to Flower"
        if self._retry_reserve is None:
            return "the study has no retry reserve (site policy retry_rounds)"
        voided = sum(1 for r in self._rounds if r["status"] == "voided")
        if voided >= self._retry_reserve:
            return f"the study already voided {voided} round(s), its retry reserve"
        return None

    def _resolve_dead_reservation(self) -> None:
        """Void a dead process's reservation that provably produced no reply, else charge it in full; persist."""
        assert self._pending is not None
        p = self._pending
        why_not = self._may_void(p)
        if why_not is None:
            self._void_pending(p)
        else:
            self._fold_pending_as_interrupted(why_not)

    def _void_pending(self, p: dict[str, Any]) -> None:
        """Void the reservation ``p`` of a dead process: not charged, recorded with the reason, persisted."""
        reason = (
            f"the node process (pid {p.get('pid')} on {p.get('host')}) died while the round was "
            f"{'trained but not yet handed to Flower' if p.get('phase') == 'trained' else 'training'}: "
            "its update never left the site"
        )
        logger.warning("site %r study %r: round %d VOIDED (%d reserved steps not charged): %s",
                       self._site, self._study, p["round"], p["steps"], reason)
        self._pending = None
        self._rounds.append(self._round_entry(
            p, "voided", steps_done=None, steps_charged=0, epsilon_after=_finite(self.spent_epsilon()),
            reason=reason,
        ))
        self._live = None
        self._persist(decreasing=True)

    def _fold_pending_as_interrupted(self, why_not_voided: str) -> None:
        """Charge a reservation left by a dead process in full and persist it."""
        assert self._pending is not None
        p = self._pending
        logger.warning(
            "site %r study %r: round %d was interrupted (reserved %s by pid %s on %s); its %d "
            "reserved steps are charged in full (not voided: %s)",
            self._site, self._study, p["round"], p["reserved_at"], p.get("pid"), p.get("host"),
            p["steps"], why_not_voided,
        )
        if p.get("phase") == "trained":  # counted at finalise_round (≥ the reservation)
            self._history = [(float(h[0]), float(h[1]), int(h[2])) for h in p["history_after"]]
            charged = int(p["steps_charged"])
        else:
            self._history = merge_steps(self._history, noise_multiplier=p["noise_multiplier"],
                                        sample_rate=p["sample_rate"], steps=p["steps"])
            charged = int(p["steps"])
        self._pending = None
        self._rounds.append(self._round_entry(
            p, "interrupted", steps_done=None, steps_charged=charged,
            epsilon_after=_finite(self.spent_epsilon()), reason=f"not voided: {why_not_voided}",
        ))
        self._live = None
        self._persist()

    # ------------------------------------------------------------------ state and files

    def state_dict(self) -> dict[str, Any]:
        """Return the ledger's full state (JSON-ready, with its checksum)."""
        payload: dict[str, Any] = {
            "kind": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "site": self._site,
            "study": self._study,
            "accountant": self._accountant_name,
            "delta": self._delta,
            "epsilon_budget": self._budget,
            "accountant_state": {
                "mechanism": self._accountant_name,
                "history": [list(h) for h in self._history],
            },
            "pending": copy.deepcopy(self._pending),
            "rounds": copy.deepcopy(self._rounds),
            "rounds_completed": self.rounds_completed,
            "calibration": copy.deepcopy(self._calibration),
            "created_at": self._created_at,
            "updated_at": self._updated_at,
        }
        if self._releases:  # absent while empty: ledgers without releases keep their old form
            payload["releases"] = copy.deepcopy(self._releases)
        if self._retry_reserve is not None:  # absent until set: older ledgers keep their form
            payload["retry_reserve"] = self._retry_reserve
        payload["checksum"] = _checksum(payload)
        return payload

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; refuse another kind, site, study or terms, or a lower ε."""
        before = self.spent_epsilon() if (self._history or self._rounds or self._pending or self._releases) else 0.0
        snapshot = self.state_dict()
        self._apply_state(state, source="state_dict")
        if self.spent_epsilon() < before:
            self._apply_state(snapshot, source="snapshot")
            raise LedgerMismatchError(
                f"refusing a ledger state that lowers ε spent from {before:.4f}: a ledger only grows"
            )

    def _read_file(self) -> dict[str, Any]:
        """Read and parse the ledger file."""
        assert self._path is not None
        try:
            text = self._path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LedgerCorruptError(self._path, f"not UTF-8 text: {exc}") from None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LedgerCorruptError(self._path, f"invalid JSON: {exc}") from None
        if not isinstance(state, dict):
            raise LedgerCorruptError(self._path, "the top level is not a JSON object")
        return state

    def _reload(self) -> None:
        """Replace the in-memory state by the file's (no-op in memory or when absent)."""
        if self._path is not None and self._path.exists():
            self._apply_state(self._read_file(), source=str(self._path))
        self._check_spend_record(all_studies=False)

    def _apply_state(self, state: dict[str, Any], *, source: str) -> None:
        """Validate ``state`` and make it the ledger's."""
        where = self._path if source != "state_dict" else "state_dict"
        if not isinstance(state, dict) or state.get("kind") != LEDGER_FORMAT:
            kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise LedgerMismatchError(
                f"{source} is not a fedcare privacy ledger (kind {kind!r}, expected "
                f"{LEDGER_FORMAT!r}); point the node at its privacy ledger folder"
            )
        if state.get("version") != LEDGER_VERSION:
            raise LedgerMismatchError(
                f"{source} is ledger version {state.get('version')!r}; this fedcare reads version "
                f"{LEDGER_VERSION}: upgrade fedcare, never edit the ledger"
            )
        body = {k: v for k, v in state.items() if k != "checksum"}
        try:
            expected = _checksum(body)
        except (TypeError, ValueError) as exc:
            raise LedgerCorruptError(where, f"unserialisable content: {exc}") from None
        if state.get("checksum") != expected:
            raise LedgerCorruptError(where, "checksum mismatch: the file was changed outside fedcare")
        if state.get("site") != self._site or state.get("study") != self._study:
            raise LedgerMismatchError(
                f"{source} is the ledger of site {state.get('site')!r}, study "
                f"{state.get('study')!r}, not of site {self._site!r}, study {self._study!r}; "
                "check the node's site name and ledger folder. The file was left untouched"
            )
        accountant = state.get("accountant")
        delta = state.get("delta")
        if accountant is not None and self._accountant_name is not None and accountant != self._accountant_name:
            raise LedgerMismatchError(
                f"{source} accounts with {accountant!r}, this site asks for "
                f"{self._accountant_name!r}; one study keeps one accountant"
            )
        if delta is not None and self._delta is not None and not math.isclose(delta, self._delta, rel_tol=1e-12):
            raise LedgerMismatchError(
                f"{source} is at δ={delta:g}, this site asks for δ={self._delta:g}; one study "
                "keeps one δ"
            )
        try:
            acc_state = state["accountant_state"]
            history = [(float(h[0]), float(h[1]), int(h[2])) for h in acc_state["history"]]
            if history and acc_state.get("mechanism") != accountant:
                raise ValueError("accountant_state mechanism differs from the ledger's accountant")
            pending = state.get("pending")
            if pending is not None:
                pending = dict(pending)
                for k in ("round", "noise_multiplier", "sample_rate", "steps", "reserved_at"):
                    if k not in pending:
                        raise ValueError(f"pending reservation lacks {k!r}")
            rounds = [dict(r) for r in state["rounds"]]
            for r in rounds:
                if r.get("status") not in (*_CHARGED, "voided", "non_private"):
                    raise ValueError(f"unknown round status {r.get('status')!r}")
            budget = state.get("epsilon_budget")
            retry_reserve = state.get("retry_reserve")
            if retry_reserve is not None and (isinstance(retry_reserve, bool) or not isinstance(retry_reserve, int)
                                              or retry_reserve < 0):
                raise ValueError(f"malformed retry_reserve {retry_reserve!r}")
            releases = [dict(r) for r in state.get("releases", [])]
            for r in releases:
                eps = r.get("epsilon")
                if not isinstance(r.get("mechanism"), str) or not (
                    eps is None or (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0)
                ):
                    raise ValueError(f"malformed release entry {r.get('mechanism')!r}")
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise LedgerCorruptError(where, f"malformed content: {exc}") from None
        if self._budget is not None and budget is not None:
            budget = min(float(budget), self._budget)
        elif budget is None:
            budget = self._budget
        if accountant is not None:
            self._accountant_name = accountant
        if delta is not None:
            self._delta = float(delta)
        self._budget = None if budget is None else float(budget)
        self._history = history
        self._pending = pending
        self._rounds = rounds
        self._calibration = state.get("calibration")
        self._releases = releases
        self._retry_reserve = retry_reserve
        self._created_at = state.get("created_at", self._created_at)
        self._updated_at = state.get("updated_at", self._updated_at)
        self._live = None

    def _check_spend_record(self, *, all_studies: bool) -> None:
        """Raise ``LedgerRollbackError`` when a ledger of this site is missing or below its spend record.

        ``all_studies``: check every study the site's record names (at open), else this one only.
        See ``privacy.spend_record``.
        """
        if self._path is None:
            return
        directory = self._path.parent

        def epsilon_now(study: str) -> float | None:
            if study == self._study:
                return self.spent_epsilon() if self._path is not None and self._path.exists() else None
            if not all_studies:
                return math.inf  # that study is checked when its own ledger is opened
            path = self.path_for(directory, site=self._site, study=study)
            if not path.exists():
                return None
            other = PrivacyLedger(site=self._site, study=study, path=path)
            other._apply_state(other._read_file(), source=str(path))
            return other.spent_epsilon()

        SpendRecord(directory, site=self._site).check(epsilon_now)

    def _persist(self, *, decreasing: bool = False) -> None:
        """Write the ledger atomically and append the write to the site's spend record (no-op in memory).

        The record line follows the file, so a crash between the two leaves the ledger ahead of
        the record; ``decreasing`` (a void) puts the line first, for the same reason.
        """
        self._updated_at = _now()
        if self._path is None:
            return
        state = self.state_dict()
        record = SpendRecord(self._path.parent, site=self._site)
        if decreasing:
            record.append(study=self._study, epsilon=self.spent_epsilon(), ledger_sha256=state["checksum"])
        _atomic_write_json(self._path, state)
        if not decreasing:  # after the file: privacy.spend_record
            record.append(study=self._study, epsilon=self.spent_epsilon(), ledger_sha256=state["checksum"])

    def __repr__(self) -> str:
        """Return a summary (never patient data)."""
        return (
            f"PrivacyLedger(site={self._site!r}, study={self._study!r}, path={self._path}, "
            f"rounds={len(self._rounds)}, pending={self._pending is not None})"
        )


def verify_site(directory: Path | str, *, site: str) -> dict[str, float]:
    """Verify a site's ledgers against its spend record before the node starts; return ε per study.

    Every study the record names must have its ledger with at least the recorded ε (else
    :class:`~fedcare.privacy.errors.LedgerRollbackError`); ledgers of the site that the record does
    not name yet (written before the record existed) are adopted: their current ε is appended.
    """
    directory = Path(directory)
    record = SpendRecord(directory, site=site)
    known = record.last_by_study()
    spent: dict[str, float] = {}
    for path in PrivacyLedger.candidate_paths(directory, site=site):
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            owner, study = str(state["site"]), str(state["study"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            continue  # not this site's, or corrupt: opening it for a round refuses it
        if owner != site or study in known:
            continue
        ledger = PrivacyLedger.open(directory, site=site, study=study)
        spent[study] = ledger.spent_epsilon()
        state = ledger.state_dict()
        record.append(study=study, epsilon=spent[study], ledger_sha256=str(state["checksum"]))
        logger.info("spend record of site %r: adopted the existing ledger of study %r", site, study)
    for study in record.last_by_study():
        spent[study] = PrivacyLedger.open(directory, site=site, study=study).spent_epsilon()
    return spent
