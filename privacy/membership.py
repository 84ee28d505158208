"""Membership-inference audit of a trained model, used as a release gate.

Two attacks score every example of a "held-in" split (the model's training members) and a
"held-out" split (non-members, same distribution); the attack's AUC says how well it separates
them (0.5: no better than chance).

- **Loss threshold** (Yeom et al., CSF 2018): score = −loss of the model on the example.
- **LiRA, online variant** (Carlini et al., "Membership Inference Attacks From First Principles",
  IEEE S&P 2022): ``n_shadow`` shadow models are trained with the caller's recipe (``train_fn``)
  on random halves of the audit pool (held-in ∪ held-out), in complementary pairs, so that every
  shadow trains on exactly half of the pool and every example is in exactly half of the shadow
  training sets. For each example, Gaussians are fitted to the
  logit-scaled confidence φ = log(p_y / (1 − p_y)) of the shadows that trained on it ("in") and
  of those that did not ("out"); the score is the log-likelihood ratio of the target model's φ
  under the two. Means are per example; the variance is pooled over examples by default
  ("global", what the paper recommends below ~64 shadows) or per example.

Shadows must be trained the way the target was: ``train_fn`` trains one model centrally on the
shadow's half of the pool (an approximation for a federated target); ``shadow_trainer`` instead
receives the pool indices of the shadow's half and a seed and trains the model however the target
was trained (the simulation path runs a whole shadow federation, ``simulations.membership_audit``). Every
result says how its shadows were trained (``shadow_training``).

The AUC comes with a percentile bootstrap confidence interval (members and non-members resampled
separately, fixed seed), and the ROC curve's true-positive rate at low false-positive rates
(0.1 % and 1 % by default; a rate below 1 / non-members cannot be resolved and says so).

``ReleaseGate`` gives one of three verdicts:

- ``"block"``: an attack's AUC exceeds ``max_auc`` (the **upper** end of the interval with
  ``basis="upper"``, the default; the point estimate with ``basis="point"``), and the audit is
  large enough to trust that (see below) or the excess is shown outright (the interval's lower
  end is above ``max_auc``);
- ``"inconclusive"``: the audit is too small for the gate's limit. The minimum detectable AUC
  excess (:func:`min_detectable_auc_excess`: ``(z_{(1+c)/2} + z_power) · SE₀``, with SE₀ the
  Hanley–McNeil standard error of an AUC of 0.5 for these member / non-member counts) is larger
  than ``max_auc − 0.5``: the audit cannot tell a model that leaks nothing (AUC 0.5) from one at
  the limit with the interval's confidence ``c`` and the gate's ``power``. Never a pass;
- ``"pass"``: otherwise.

This is an empirical test, not a guarantee: passing it says these attacks failed, not that no
attack succeeds. The formal guarantee is the DP ε (see ``docs/privacy.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from ..config_base import FrozenModel

__all__ = [
    "LOW_FPRS",
    "AttackResult",
    "GateDecision",
    "MembershipAuditResult",
    "ReleaseBlocked",
    "ReleaseGate",
    "ReleaseInconclusive",
    "ShadowTrainer",
    "TprAtFpr",
    "TrainFn",
    "Verdict",
    "auc_standard_error",
    "auc_with_ci",
    "lira_attack",
    "logit_confidence",
    "loss_threshold_attack",
    "membership_audit",
    "min_detectable_auc_excess",
]

logger = logging.getLogger(__name__)

#: ``train_fn(x, y, seed) -> model``: train a fresh model from scratch with the target's recipe.
TrainFn = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]
#: ``shadow_trainer(pool_index, seed) -> model``: train a fresh model the way the target was trained,
#: on the audit-pool examples ``pool_index`` (indices into members followed by non-members) plus
#: whatever else the target trained on that is not in the pool.
ShadowTrainer = Callable[[np.ndarray, int], nn.Module]
Split = tuple[torch.Tensor, torch.Tensor]
AttackName = Literal["loss_threshold", "lira_online"]
Verdict = Literal["pass", "block", "inconclusive"]

#: False-positive rates at which every attack reports its true-positive rate.
LOW_FPRS: tuple[float, ...] = (0.001, 0.01)
POOLED_SHADOWS = "pooled: each shadow trained centrally with the recipe on its half of the audit pool"


class ReleaseBlocked(Exception):
    """Raised by ``ReleaseGate.check`` when an attack's AUC exceeds the allowed maximum."""


class ReleaseInconclusive(ReleaseBlocked):
    """Raised by ``ReleaseGate.check`` when the audit is too small to test the gate's limit.

    A subclass of :class:`ReleaseBlocked`: code that catches only ``ReleaseBlocked`` still refuses
    the release (fail closed).
    """


class TprAtFpr(FrozenModel):
    """The attack's true-positive rate at one false-positive rate of its ROC curve (frozen).

    Attributes
    ----------
    fpr : float
        The false-positive rate.
    tpr : float
        The largest TPR of the ROC curve at an FPR of at most ``fpr``.
    resolvable : bool
        Whether the non-member set can show this rate: at least ``1 / fpr`` non-members. When
        false, ``tpr`` is the TPR at zero false positives (the finest rate the audit resolves).
    """

    fpr: float = Field(gt=0, lt=1)
    tpr: float = Field(ge=0, le=1)
    resolvable: bool


class AttackResult(FrozenModel):
    """One attack's outcome (frozen).

    Attributes
    ----------
    attack : str
        ``loss_threshold`` or ``lira_online``.
    auc, ci_low, ci_high : float
        ROC AUC (members positive) and its bootstrap confidence interval.
    confidence : float
        Level of the interval (0.95).
    tpr_at_low_fpr : float
        True-positive rate at ``low_fpr`` false-positive rate (Carlini et al.'s headline figure).
    n_members, n_nonmembers : int
        Sizes of the held-in and held-out splits.
    n_bootstrap, seed : int
        Bootstrap resamples and the seed used.
    n_shadow : int or None
        Shadow models (LiRA only).
    tpr_at_fpr : tuple of TprAtFpr
        TPR at each of :data:`LOW_FPRS` (0.1 % and 1 %).
    shadow_training : str or None
        How the LiRA shadows were trained (federated like the target, or pooled).
    """

    attack: AttackName
    auc: float = Field(ge=0, le=1)
    ci_low: float = Field(ge=0, le=1)
    ci_high: float = Field(ge=0, le=1)
    confidence: float = Field(gt=0, lt=1)
    low_fpr: float = Field(gt=0, lt=1)
    tpr_at_low_fpr: float = Field(ge=0, le=1)
    n_members: int = Field(ge=1)
    n_nonmembers: int = Field(ge=1)
    n_bootstrap: int = Field(ge=0)
    seed: int
    n_shadow: int | None = None
    tpr_at_fpr: tuple[TprAtFpr, ...] = ()
    shadow_training: str | None = Field(default=None, max_length=300)

    def describe(self) -> str:
        """Return one line: attack, AUC and interval."""
        level = round(self.confidence * 100)
        return f"{self.attack}: AUC {self.auc:.3f} ({level}% CI {self.ci_low:.3f}–{self.ci_high:.3f})"

    def describe_tpr(self) -> str:
        """Return the TPR at each low FPR, e.g. ``TPR 0.000 at 0.1% FPR (unresolved), 0.050 at 1% FPR``."""
        parts = [f"{p.tpr:.3f} at {p.fpr:.1%} FPR".replace(".0%", "%") + ("" if p.resolvable else " (unresolved)")
                 for p in self.tpr_at_fpr]  # fmt: skip
        return "TPR " + ", ".join(parts) if parts else f"TPR {self.tpr_at_low_fpr:.3f} at {self.low_fpr:.1%} FPR"


class MembershipAuditResult(FrozenModel):
    """The attacks run in one audit (frozen)."""

    attacks: tuple[AttackResult, ...] = Field(min_length=1)

    def worst(self) -> AttackResult:
        """Return the attack with the highest upper confidence bound."""
        return max(self.attacks, key=lambda a: (a.ci_high, a.auc))


# ---- scores -------------------------------------------------------------------------------------


def _check_split(name: str, split: Split) -> Split:
    try:
        x, y = split
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (x, y) of tensors") from None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a pair (x, y) of torch tensors")
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"{name}: x and y need the same number of examples, at least 2 (got {x.shape[0]}, {y.shape[0]})")
    return x, y.reshape(-1)


@torch.no_grad()
def logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> np.ndarray:
    """Return φ = log(p_y / (1 − p_y)) per example, computed stably from the model's logits.

    Outputs shaped (N,) or (N, 1) are binary logits (label 1 = positive); (N, C≥2) are class
    logits. The per-example cross-entropy loss is ``softplus(−φ)`` in both cases.
    """
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, x.shape[0], batch_size):
            out = model(x[start : start + batch_size]).detach().to(torch.float64)
            yb = y[start : start + batch_size].to(torch.long)
            if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
                z = out.reshape(-1)
                if not bool(((yb == 0) | (yb == 1)).all()):
                    raise ValueError("a model with one output logit needs labels 0 or 1")
                parts.append(torch.where(yb == 1, z, -z))
            elif out.ndim == 2:
                if int(yb.min()) < 0 or int(yb.max()) >= out.shape[1]:
                    raise ValueError(f"labels must be in 0..{out.shape[1] - 1} for a model with {out.shape[1]} outputs")
                true = out.gather(1, yb[:, None]).squeeze(1)
                others = out.scatter(1, yb[:, None], float("-inf"))
                parts.append(true - torch.logsumexp(others, dim=1))
            else:
                raise ValueError(f"model output of shape {tuple(out.shape)} is not classification logits")
        return torch.cat(parts).numpy()
    finally:
        model.train(was_training)


def _losses_from_phi(phi: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, -phi)  # softplus(−φ) = cross-entropy


def _rank_auc(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
    """Return the ROC AUC of each row (Mann-Whitney U with mid-ranks; equals ``roc_auc_score``)."""
    ranks = rankdata(np.concatenate([members, nonmembers], axis=1), axis=1)
    n_m, n_n = members.shape[1], nonmembers.shape[1]
    return (ranks[:, :n_m].sum(axis=1) - n_m * (n_m + 1) / 2.0) / (n_m * n_n)


def auc_with_ci(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Return (AUC, low, high): sklearn ROC AUC, members positive, percentile bootstrap interval.

    The point estimate is ``sklearn.metrics.roc_auc_score``; the bootstrap resamples members and
    non-members separately and computes the same statistic vectorised (Mann-Whitney U).
    """
    member_scores = np.asarray(member_scores, dtype=np.float64)
    nonmember_scores = np.asarray(nonmember_scores, dtype=np.float64)
    if not (np.isfinite(member_scores).all() and np.isfinite(nonmember_scores).all()):
        raise ValueError("attack scores must be finite")
    labels = np.r_[np.ones(member_scores.size), np.zeros(nonmember_scores.size)]
    auc = float(roc_auc_score(labels, np.r_[member_scores, nonmember_scores]))
    if n_bootstrap == 0:
        return auc, auc, auc
    rng = np.random.default_rng(seed)
    stats = np.empty(n_bootstrap)
    chunk = max(1, 2_000_000 // labels.size)  # bound memory: resamples per vectorised batch
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        m = rng.choice(member_scores, (size, member_scores.size), replace=True)
        n = rng.choice(nonmember_scores, (size, nonmember_scores.size), replace=True)
        stats[start : start + size] = _rank_auc(m, n)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return auc, float(low), float(high)


def _result(
    attack: AttackName,
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    *,
    n_bootstrap: int,
    confidence: float,
    low_fpr: float,
    seed: int,
    n_shadow: int | None = None,
    shadow_training: str | None = None,
) -> AttackResult:
    auc, low, high = auc_with_ci(member_scores, nonmember_scores, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    labels = np.r_[np.ones(member_scores.size), np.zeros(nonmember_scores.size)]
    fpr, tpr, _ = roc_curve(labels, np.r_[member_scores, nonmember_scores], drop_intermediate=False)
    at = tuple(
        TprAtFpr(fpr=rate, tpr=float(tpr[fpr <= rate].max()), resolvable=nonmember_scores.size * rate >= 1.0)
        for rate in LOW_FPRS
    )
    result = AttackResult(
        attack=attack,
        auc=auc,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        low_fpr=low_fpr,
        tpr_at_low_fpr=float(tpr[fpr <= low_fpr].max()),
        n_members=member_scores.size,
        n_nonmembers=nonmember_scores.size,
        n_bootstrap=n_bootstrap,
        seed=seed,
        n_shadow=n_shadow,
        tpr_at_fpr=at,
        shadow_training=shadow_training,
    )
    logger.info("membership audit %s; %s", result.describe(), result.describe_tpr())
    return result


# ---- attacks ------------------------------------------------------------------------------------


def loss_threshold_attack(
    model: nn.Module,
    *,
    members: Split,
    nonmembers: Split,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    low_fpr: float = 0.01,
    seed: int = 0,
) -> AttackResult:
    """Run the loss-threshold attack (Yeom et al.): score = −loss; return its AUC with a CI."""
    xm, ym = _check_split("members", members)
    xn, yn = _check_split("nonmembers", nonmembers)
    scores_m = -_losses_from_phi(logit_confidence(model, xm, ym))
    scores_n = -_losses_from_phi(logit_confidence(model, xn, yn))
    return _result("loss_threshold", scores_m, scores_n, n_bootstrap=n_bootstrap, confidence=confidence,
                   low_fpr=low_fpr, seed=seed)  # fmt: skip


def _gaussian_logpdf(x: np.ndarray, mean: np.ndarray, sd: np.ndarray | float) -> np.ndarray:
    return -0.5 * ((x - mean) / sd) ** 2 - np.log(sd)


def lira_attack(
    model: nn.Module,
    *,
    members: Split,
    nonmembers: Split,
    train_fn: TrainFn | None = None,
    shadow_trainer: ShadowTrainer | None = None,
    shadow_training: str | None = None,
    n_shadow: int = 16,
    variance: Literal["global", "per_example"] = "global",
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    low_fpr: float = 0.01,
    seed: int = 0,
) -> AttackResult:
    """Run online LiRA with ``n_shadow`` shadows on pool halves, trained by ``shadow_trainer`` or ``train_fn``.

    Give exactly one: ``shadow_trainer(pool_index, seed)`` trains a shadow the way the target was
    trained (e.g. a whole federation), ``train_fn(x, y, seed)`` trains one centrally on the half.
    ``shadow_training`` describes how (stored in the result; a default names the pooled mode).
    """
    if (train_fn is None) == (shadow_trainer is None):
        raise ValueError("give exactly one of train_fn (pooled shadows) and shadow_trainer (shadows trained like the target)")
    if n_shadow < 4 or n_shadow % 2:
        raise ValueError(f"n_shadow must be even and at least 4 (got {n_shadow}); 16 or more is better")
    if variance not in ("global", "per_example"):
        raise ValueError(f"variance must be 'global' or 'per_example', got {variance!r}")
    xm, ym = _check_split("members", members)
    xn, yn = _check_split("nonmembers", nonmembers)
    pool_x, pool_y = torch.cat([xm, xn]), torch.cat([ym, yn])
    n = pool_x.shape[0]
    rng = np.random.default_rng(seed)
    # complementary pairs: every shadow trains on exactly half of the pool (a shadow federation has
    # the target's size) and every example is in exactly half of the shadow training sets
    keep = np.empty((n_shadow, n), dtype=bool)
    for j in range(n_shadow // 2):
        keep[2 * j] = rng.permutation(n) < n // 2
        keep[2 * j + 1] = ~keep[2 * j]
    shadow_phi = np.empty((n_shadow, n))
    for k in range(n_shadow):
        index = np.flatnonzero(keep[k])
        shadow_seed = int(rng.integers(2**31 - 1))
        if shadow_trainer is not None:
            shadow = shadow_trainer(index, shadow_seed)
        else:
            assert train_fn is not None
            rows = torch.from_numpy(index)
            shadow = train_fn(pool_x[rows], pool_y[rows], shadow_seed)
        logger.debug("LiRA shadow %d of %d trained", k + 1, n_shadow)
        shadow_phi[k] = logit_confidence(shadow, pool_x, pool_y)
    target_phi = logit_confidence(model, pool_x, pool_y)

    half = n_shadow // 2
    phi_in = shadow_phi.T[keep.T].reshape(n, half)  # (n, half): shadows that trained on example i
    phi_out = shadow_phi.T[~keep.T].reshape(n, half)
    mu_in, mu_out = phi_in.mean(axis=1), phi_out.mean(axis=1)
    floor = 1e-4
    if variance == "global":
        sd_in = max(float(np.std(phi_in - mu_in[:, None])), floor)
        sd_out = max(float(np.std(phi_out - mu_out[:, None])), floor)
    else:
        sd_in = np.maximum(phi_in.std(axis=1, ddof=1), floor)
        sd_out = np.maximum(phi_out.std(axis=1, ddof=1), floor)
    score = _gaussian_logpdf(target_phi, mu_in, sd_in) - _gaussian_logpdf(target_phi, mu_out, sd_out)
    m = xm.shape[0]
    label = shadow_training or (POOLED_SHADOWS if shadow_trainer is None else "trained by the caller's shadow_trainer")
    return _result("lira_online", score[:m], score[m:], n_bootstrap=n_bootstrap, confidence=confidence,
                   low_fpr=low_fpr, seed=seed, n_shadow=n_shadow, shadow_training=label)  # fmt: skip


def membership_audit(
    model: nn.Module,
    *,
    members: Split,
    nonmembers: Split,
    train_fn: TrainFn | None = None,
    shadow_trainer: ShadowTrainer | None = None,
    shadow_training: str | None = None,
    n_shadow: int = 16,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MembershipAuditResult:
    """Run the loss-threshold attack and, given ``shadow_trainer`` or ``train_fn``, online LiRA."""
    attacks = [loss_threshold_attack(model, members=members, nonmembers=nonmembers,
                                     n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)]  # fmt: skip
    if train_fn is not None or shadow_trainer is not None:
        attacks.append(lira_attack(model, members=members, nonmembers=nonmembers, train_fn=train_fn,
                                   shadow_trainer=shadow_trainer, shadow_training=shadow_training,
                                   n_shadow=n_shadow, n_bootstrap=n_bootstrap, confidence=confidence,
                                   seed=seed))  # fmt: skip
    else:
        logger.warning("membership audit without shadows: LiRA skipped, only the loss attack ran")
    return MembershipAuditResult(attacks=tuple(attacks))


# ---- the gate -----------------------------------------------------------------------------------


def auc_standard_error(auc: float, n_members: int, n_nonmembers: int) -> float:
    """Return the Hanley–McNeil (1982) standard error of an AUC estimated from these counts.

    ``SE² = (A(1−A) + (n₁−1)(Q₁−A²) + (n₀−1)(Q₂−A²)) / (n₁ n₀)`` with ``Q₁ = A / (2−A)`` and
    ``Q₂ = 2A² / (1+A)`` (Radiology 143:29–36, eq. 1); ``n₁`` members (positives), ``n₀`` non-members.
    """
    if n_members < 1 or n_nonmembers < 1:
        raise ValueError(f"need at least one member and one non-member (got {n_members}, {n_nonmembers})")
    if not 0.0 <= auc <= 1.0:
        raise ValueError(f"auc must be in [0, 1], got {auc}")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc**2 / (1.0 + auc)
    var = (auc * (1 - auc) + (n_members - 1) * (q1 - auc**2) + (n_nonmembers - 1) * (q2 - auc**2)) / (
        n_members * n_nonmembers
    )
    return float(np.sqrt(max(var, 0.0)))


def min_detectable_auc_excess(
    n_members: int, n_nonmembers: int, *, confidence: float = 0.95, power: float = 0.8
) -> float:
    """Return the smallest AUC excess over 0.5 an audit of this size detects: ``(z_{(1+c)/2} + z_power)·SE₀``.

    ``SE₀`` is :func:`auc_standard_error` at AUC 0.5 (no leakage). An audit whose gate limit is
    ``max_auc`` can tell AUC 0.5 from AUC ``max_auc`` at the interval's ``confidence`` and with
    ``power`` only when ``max_auc − 0.5`` is at least this value: below it, a model that leaks
    nothing fails the upper-bound test more often than ``1 − power``, and a point estimate near the
    limit is indistinguishable from chance.
    """
    if not 0.0 < confidence < 1.0 or not 0.5 <= power < 1.0:
        raise ValueError(f"confidence must be in (0, 1) and power in [0.5, 1) (got {confidence}, {power})")
    z = float(norm.ppf((1.0 + confidence) / 2.0) + norm.ppf(power))
    return z * auc_standard_error(0.5, n_members, n_nonmembers)


class GateDecision(FrozenModel):
    """The release gate's verdict on one audit (frozen).

    Attributes
    ----------
    verdict : {"pass", "block", "inconclusive"}
        What the gate decided; only ``"pass"`` lets a release go ahead without an override.
    max_auc, basis, power : float, str, float
        The gate's settings.
    min_detectable_excess : float
        The largest minimum detectable AUC excess over the attacks (see
        :func:`min_detectable_auc_excess`), to compare with ``max_auc − 0.5``.
    blocking : tuple of str
        The attacks that exceeded ``max_auc`` (block) or could not be judged (inconclusive).
    reason : str
        One sentence saying why, and what to do next.
    """

    verdict: Verdict
    max_auc: float = Field(gt=0.5, le=1)
    basis: Literal["upper", "point"]
    power: float = Field(ge=0.5, lt=1)
    min_detectable_excess: float = Field(ge=0)
    blocking: tuple[str, ...] = ()
    reason: str

    @property
    def passed(self) -> bool:
        """Return whether the verdict is ``"pass"``."""
        return self.verdict == "pass"


class ReleaseGate:
    """Decide a model's release from its membership-inference audit: pass, block or inconclusive.

    Parameters
    ----------
    max_auc : float
        Largest attack AUC allowed, in (0.5, 1].
    basis : {"upper", "point"}
        Compare the upper end of the confidence interval (default, conservative) or the point
        estimate.
    power : float
        Power the audit must have to tell AUC 0.5 from ``max_auc`` (default 0.8); an audit with
        less is ``"inconclusive"``.
    """

    def __init__(self, *, max_auc: float = 0.6, basis: Literal["upper", "point"] = "upper", power: float = 0.8) -> None:
        if not 0.5 < float(max_auc) <= 1.0:
            raise ValueError(f"max_auc must be in (0.5, 1], got {max_auc}")
        if basis not in ("upper", "point"):
            raise ValueError(f"basis must be 'upper' or 'point', got {basis!r}")
        if not 0.5 <= float(power) < 1.0:
            raise ValueError(f"power must be in [0.5, 1), got {power}")
        self.max_auc = float(max_auc)
        self.basis = basis
        self.power = float(power)

    def __repr__(self) -> str:
        """Return the gate's settings."""
        return f"ReleaseGate(max_auc={self.max_auc}, basis={self.basis!r}, power={self.power})"

    def failures(self, result: MembershipAuditResult | AttackResult) -> list[AttackResult]:
        """Return the attacks whose AUC (on the gate's basis) exceeds the limit."""
        attacks: Sequence[AttackResult] = (result,) if isinstance(result, AttackResult) else result.attacks
        value = (lambda a: a.ci_high) if self.basis == "upper" else (lambda a: a.auc)
        return [a for a in attacks if value(a) > self.max_auc]

    def min_detectable_excess(self, attack: AttackResult) -> float:
        """Return the attack audit's minimum detectable AUC excess at its confidence and the gate's power."""
        return min_detectable_auc_excess(attack.n_members, attack.n_nonmembers, confidence=attack.confidence,
                                         power=self.power)  # fmt: skip

    def decide(self, result: MembershipAuditResult | AttackResult) -> GateDecision:
        """Return the verdict: block, inconclusive (audit too small for ``max_auc``) or pass."""
        attacks: Sequence[AttackResult] = (result,) if isinstance(result, AttackResult) else result.attacks
        room = self.max_auc - 0.5
        mde = {a.attack: self.min_detectable_excess(a) for a in attacks}
        small = [a for a in attacks if mde[a.attack] > room]
        blocking = [a for a in self.failures(result) if a not in small or a.ci_low > self.max_auc]
        settings = dict(max_auc=self.max_auc, basis=self.basis, power=self.power,
                        min_detectable_excess=max(mde.values()))  # fmt: skip
        if blocking:
            what = "; ".join(a.describe() for a in blocking)
            hint = ""
            if self.basis == "upper" and all(a.auc <= self.max_auc for a in blocking):
                hint = (" The point estimate is below the limit but the interval is too wide to show it: "
                        "audit with larger held-in and held-out splits.")  # fmt: skip
            reason = (
                f"release blocked: membership inference exceeds max AUC {self.max_auc:.3f} "
                f"({'upper confidence bound' if self.basis == 'upper' else 'point estimate'}): {what}.{hint} "
                "Do not release this model; retrain with more noise (higher noise multiplier / lower "
                "target ε), more data or stronger regularisation, then audit again."
            )
            return GateDecision(verdict="block", blocking=tuple(a.attack for a in blocking), reason=reason, **settings)
        if small:
            a = max(small, key=lambda x: mde[x.attack])
            reason = (
                f"release inconclusive: the audit ({a.n_members} members, {a.n_nonmembers} non-members) "
                f"detects an AUC excess of {mde[a.attack]:.3f} at {a.confidence:.0%} confidence and "
                f"{self.power:.0%} power, more than the {room:.3f} the limit max AUC {self.max_auc:.3f} "
                "allows, so it cannot show the model below the limit (nor above it). Audit on more "
                "held-out patients, or raise max_auc knowingly; to release anyway, give an explicit, "
                "logged override."
            )
            return GateDecision(verdict="inconclusive", blocking=tuple(x.attack for x in small), reason=reason, **settings)
        return GateDecision(verdict="pass", reason=f"release gate passed (max AUC {self.max_auc:.3f}, "
                            f"{'upper 95% bound' if self.basis == 'upper' else 'point estimate'})", **settings)  # fmt: skip

    def check(self, result: MembershipAuditResult | AttackResult) -> GateDecision:
        """Return the decision when it is a pass; raise ``ReleaseBlocked`` or ``ReleaseInconclusive`` otherwise."""
        decision = self.decide(result)
        if decision.verdict == "block":
            raise ReleaseBlocked(decision.reason)
        if decision.verdict == "inconclusive":
            raise ReleaseInconclusive(decision.reason)
        return decision
