"""Membership-inference audit of a trained model, used as a release gate.

Two attacks score every example of a "held-in" split (the model's training members) and a
"held-out" split (non-members, same distribution); the attack's AUC says how well it separates
them (0.5: no better than chance).

- **Loss threshold** (Yeom et al., CSF 2018): score = −loss of the model on the example.
- **LiRA, online variant** (Carlini et al., "Membership Inference Attacks From First Principles",
  IEEE S&P 2022): ``n_shadow`` shadow models are trained with the caller's recipe (``train_fn``)
  on random halves of the audit pool (held-in ∪ held-out), arranged so that every example is in
  exactly half of the shadow training sets. For each example, Gaussians are fitted to the
  logit-scaled confidence φ = log(p_y / (1 − p_y)) of the shadows that trained on it ("in") and
  of those that did not ("out"); the score is the log-likelihood ratio of the target model's φ
  under the two. Means are per example; the variance is pooled over examples by default
  ("global", what the paper recommends below ~64 shadows) or per example.

The AUC comes with a percentile bootstrap confidence interval (members and non-members resampled
separately, fixed seed). ``ReleaseGate`` blocks a release when the **upper** end of the interval
of any attack exceeds ``max_auc`` (``basis="upper"``, the default: a small audit set cannot show a
model safe), or, with ``basis="point"``, when the point estimate does.

This is an empirical test, not a guarantee: passing it says these attacks failed, not that no
attack succeeds. The formal guarantee is the DP ε (see ``docs/privacy.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

__all__ = [
    "AttackResult",
    "MembershipAuditResult",
    "ReleaseBlocked",
    "ReleaseGate",
    "TrainFn",
    "auc_with_ci",
    "lira_attack",
    "logit_confidence",
    "loss_threshold_attack",
    "membership_audit",
]

logger = logging.getLogger(__name__)

#: ``train_fn(x, y, seed) -> model``: train a fresh model from scratch with the target's recipe.
TrainFn = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]
Split = tuple[torch.Tensor, torch.Tensor]
AttackName = Literal["loss_threshold", "lira_online"]


class ReleaseBlocked(Exception):
    """Raised by ``ReleaseGate.check`` when an attack's AUC exceeds the allowed maximum."""


class AttackResult(BaseModel):
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
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

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

    def describe(self) -> str:
        """Return one line: attack, AUC and interval."""
        level = round(self.confidence * 100)
        return f"{self.attack}: AUC {self.auc:.3f} ({level}% CI {self.ci_low:.3f}–{self.ci_high:.3f})"


class MembershipAuditResult(BaseModel):
    """The attacks run in one audit (frozen)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
) -> AttackResult:
    auc, low, high = auc_with_ci(member_scores, nonmember_scores, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    labels = np.r_[np.ones(member_scores.size), np.zeros(nonmember_scores.size)]
    fpr, tpr, _ = roc_curve(labels, np.r_[member_scores, nonmember_scores])
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
    )
    logger.info("membership audit %s", result.describe())
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
    train_fn: TrainFn,
    n_shadow: int = 16,
    variance: Literal["global", "per_example"] = "global",
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    low_fpr: float = 0.01,
    seed: int = 0,
) -> AttackResult:
    """Run online LiRA with ``n_shadow`` shadow models trained by ``train_fn`` on pool halves."""
    if n_shadow < 4 or n_shadow % 2:
        raise ValueError(f"n_shadow must be even and at least 4 (got {n_shadow}); 16 or more is better")
    if variance not in ("global", "per_example"):
        raise ValueError(f"variance must be 'global' or 'per_example', got {variance!r}")
    xm, ym = _check_split("members", members)
    xn, yn = _check_split("nonmembers", nonmembers)
    pool_x, pool_y = torch.cat([xm, xn]), torch.cat([ym, yn])
    n = pool_x.shape[0]
    rng = np.random.default_rng(seed)
    # each example is in exactly half of the shadow training sets
    keep = rng.random((n_shadow, n)).argsort(axis=0) < n_shadow // 2
    shadow_phi = np.empty((n_shadow, n))
    for k in range(n_shadow):
        index = torch.from_numpy(np.flatnonzero(keep[k]))
        shadow = train_fn(pool_x[index], pool_y[index], int(rng.integers(2**31 - 1)))
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
    return _result("lira_online", score[:m], score[m:], n_bootstrap=n_bootstrap, confidence=confidence,
                   low_fpr=low_fpr, seed=seed, n_shadow=n_shadow)  # fmt: skip


def membership_audit(
    model: nn.Module,
    *,
    members: Split,
    nonmembers: Split,
    train_fn: TrainFn | None = None,
    n_shadow: int = 16,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MembershipAuditResult:
    """Run the loss-threshold attack and, given ``train_fn``, online LiRA; return both results."""
    attacks = [loss_threshold_attack(model, members=members, nonmembers=nonmembers,
                                     n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)]  # fmt: skip
    if train_fn is not None:
        attacks.append(lira_attack(model, members=members, nonmembers=nonmembers, train_fn=train_fn,
                                   n_shadow=n_shadow, n_bootstrap=n_bootstrap, confidence=confidence,
                                   seed=seed))  # fmt: skip
    else:
        logger.warning("membership audit without train_fn: LiRA skipped, only the loss attack ran")
    return MembershipAuditResult(attacks=tuple(attacks))


# ---- the gate -----------------------------------------------------------------------------------


class ReleaseGate:
    """Block a model's release when a membership-inference attack does better than allowed.

    Parameters
    ----------
    max_auc : float
        Largest attack AUC allowed, in (0.5, 1].
    basis : {"upper", "point"}
        Compare the upper end of the confidence interval (default, conservative) or the point
        estimate.
    """

    def __init__(self, *, max_auc: float = 0.6, basis: Literal["upper", "point"] = "upper") -> None:
        if not 0.5 < float(max_auc) <= 1.0:
            raise ValueError(f"max_auc must be in (0.5, 1], got {max_auc}")
        if basis not in ("upper", "point"):
            raise ValueError(f"basis must be 'upper' or 'point', got {basis!r}")
        self.max_auc = float(max_auc)
        self.basis = basis

    def __repr__(self) -> str:
        """Return the gate's settings."""
        return f"ReleaseGate(max_auc={self.max_auc}, basis={self.basis!r})"

    def failures(self, result: MembershipAuditResult | AttackResult) -> list[AttackResult]:
        """Return the attacks that exceed the limit (empty when the release may go ahead)."""
        attacks: Sequence[AttackResult] = (result,) if isinstance(result, AttackResult) else result.attacks
        value = (lambda a: a.ci_high) if self.basis == "upper" else (lambda a: a.auc)
        return [a for a in attacks if value(a) > self.max_auc]

    def check(self, result: MembershipAuditResult | AttackResult) -> None:
        """Raise ``ReleaseBlocked`` if any attack exceeds ``max_auc`` on the gate's basis."""
        failed = self.failures(result)
        if not failed:
            return
        what = "; ".join(a.describe() for a in failed)
        hint = ""
        if self.basis == "upper" and all(a.auc <= self.max_auc for a in failed):
            hint = (
                " The point estimate is below the limit but the interval is too wide to show it: "
                "audit with larger held-in and held-out splits."
            )
        raise ReleaseBlocked(
            f"release blocked: membership inference exceeds max AUC {self.max_auc:.3f} "
            f"({'upper confidence bound' if self.basis == 'upper' else 'point estimate'}): {what}.{hint} "
            "Do not release this model; retrain with more noise (higher noise multiplier / lower "
            "target ε), more data or stronger regularisation, then audit again."
        )
