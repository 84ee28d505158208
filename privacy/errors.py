"""Exceptions and the warning category of fedcare's differential privacy.

One exception type per failure; every message says what to do next. ``PrivacyError`` is the
base: catching it (never ``Exception``) is how a caller refuses a round that would break a
privacy precondition.
"""

from __future__ import annotations

import logging
import math
import warnings

__all__ = [
    "log_privacy_warning",
    "warn_privacy",
    "BudgetExceededError",
    "DPTrainingError",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerLockedError",
    "LedgerMismatchError",
    "LedgerRollbackError",
    "MissingLedgerError",
    "PrivacyError",
    "PrivacyWarning",
    "SpendRecordCorruptError",
    "UnsupportedModuleError",
]


class PrivacyWarning(UserWarning):
    """Settings or events that weaken privacy (DP off, large ε, large δ); never silenced wholesale."""


#: (site, study, message) of every PRIVACY WARNING this process has logged (warn_privacy)
_LOGGED: set[tuple[str | None, str | None, str]] = set()


def warn_privacy(
    message: str,
    *,
    logger: logging.Logger,
    site: str | None = None,
    study: str | None = None,
    stacklevel: int = 3,
) -> None:
    """Warn loudly that privacy is weakened: log ``PRIVACY WARNING: message`` and raise a ``PrivacyWarning``.

    A caller that names the ``site`` and/or ``study`` the warning is about gets the log line
    once per ``(site, study, message)`` in a process (a setting that holds for a whole study is
    not repeated every round); without either, every call logs. The ``PrivacyWarning`` is
    raised every time, so a caller or a test that records warnings always sees it (Python's
    own filters decide how often it is displayed).
    """
    log_privacy_warning(message, logger=logger, site=site, study=study)
    warnings.warn(message, PrivacyWarning, stacklevel=stacklevel)


def log_privacy_warning(message: str, *, logger: logging.Logger, site: str | None = None, study: str | None = None) -> bool:
    """Log ``PRIVACY WARNING: message``, once per ``(site, study, message)`` when either is named; return whether it logged.

    The log half of :func:`warn_privacy`, for a place that logs without raising a warning
    (a configuration parsed several times in one process, e.g. ``server.config.RunConfig``).
    """
    key = (site, study, message)
    if site is not None or study is not None:
        if key in _LOGGED:
            return False
        _LOGGED.add(key)
    logger.warning("PRIVACY WARNING: %s", message)
    return True


class PrivacyError(Exception):
    """Base class of every privacy failure; a round that raises it must not release a model."""


def _fmt(value: float) -> str:
    """Format an ε for a message."""
    return "infinite (no DP guarantee)" if math.isinf(value) else f"{value:.4f}"


class BudgetExceededError(PrivacyError):
    """The round would take the site's ε for the study past its budget; it was refused untouched.

    Parameters
    ----------
    site, study : str
        Whose ledger refused.
    spent : float
        ε already spent in the study (from the ledger).
    projected : float
        ε the study would reach after this round.
    budget : float
        The site's total ε budget for the study.
    delta : float
        The δ all ε values refer to.
    steps : int
        DP-SGD steps the round would take.
    reason : str, optional
        Extra context (e.g. "the target ε is already spent").
    """

    def __init__(
        self,
        *,
        site: str,
        study: str,
        spent: float,
        projected: float,
        budget: float,
        delta: float,
        steps: int,
        reason: str = "",
    ) -> None:
        self.site = site
        self.study = study
        self.spent = spent
        self.projected = projected
        self.budget = budget
        self.delta = delta
        self.steps = steps
        extra = f" ({reason})" if reason else ""
        super().__init__(
            f"privacy budget of site {site!r} for study {study!r} would be exceeded{extra}: "
            f"ε spent so far {_fmt(spent)}, after this round of {steps} DP-SGD steps it would be "
            f"{_fmt(projected)}, budget {_fmt(budget)} (all at δ={delta:g}). The round was "
            "refused before any training; the model and the ledger are unchanged. To go on: plan "
            "fewer rounds or local epochs, raise the noise (a larger noise_multiplier or a lower "
            "target_epsilon per study), or start a new study with a new budget approved by the "
            "ethics board. Never delete or reset the ledger to get round this."
        )


class LedgerError(PrivacyError):
    """The privacy ledger cannot be used as it is; it is never reset or overwritten to carry on."""


class LedgerCorruptError(LedgerError):
    """The ledger file is unreadable, malformed or fails its checksum."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = path
        super().__init__(
            f"privacy ledger {path} is corrupt ({problem}). Do NOT delete it: it is the record "
            "of the privacy this site has spent, and without it ε would restart at zero. Stop "
            "training for this study, keep the file, and restore it from a backup or have the "
            "site's data protection officer inspect it."
        )


class LedgerMismatchError(LedgerError):
    """The ledger belongs to another site, study, accountant or δ, or a setting contradicts it."""


class LedgerRollbackError(LedgerError):
    """A ledger file is missing or holds less ε than the site's spend record shows (deleted or rolled back)."""


class SpendRecordCorruptError(LedgerError):
    """The site's spend record (``privacy.spend_record``) is malformed, breaks its hash chain or forks from its copy."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = path
        super().__init__(
            f"spend record {path} is corrupt ({problem}). The site refuses to train until it is repaired: "
            "do NOT delete it (it is what proves how much ε this site spent); restore it from a backup or "
            "from its copy (FEDCARE_SPEND_RECORD_COPY), or have the site's data protection officer inspect it."
        )


class LedgerLockedError(LedgerError):
    """Another process holds the ledger (it is training for the same site and study)."""


class MissingLedgerError(PrivacyError):
    """DP training was asked for without a ledger: ε would not persist across rounds."""


class UnsupportedModuleError(PrivacyError):
    """The model has layers Opacus cannot compute per-sample gradients for (BatchNorm, nn.LSTM)."""


class DPTrainingError(PrivacyError):
    """Opacus did not do what the ledger reserved (steps, sample rate): the round is charged and failed."""
