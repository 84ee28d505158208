"""Opacus glue: DP-SGD with the ledger's own accountant, noise calibrated for the whole study.

:func:`make_private` is the one entry point: an ``opacus.PrivacyEngine`` whose DP optimizer's
step hook is the site's :class:`~fedcare.privacy.ledger.PrivacyLedger` accountant's
(``DPOptimizer.attach_step_hook(accountant.get_optimizer_hook_fn(...))``, Opacus's public API),
so every step charges the persistent ledger, never a fresh per-round accountant. Opacus is used
through its public API; the few uses beyond it are guarded in
:mod:`fedcare.privacy.opacus_bridge`. Sampling is
Opacus's Poisson sampling (``DPDataLoader``); clipping and noise are Opacus's ``DPOptimizer``.

Noise calibration (target-ε settings)
-------------------------------------
A study plans ``planned_rounds`` rounds of ``steps_per_round = local_epochs * int(1/q)`` steps
at sample rate ``q = 1/ceil(n/B)`` (what Opacus derives from the data loader). With a fresh
ledger the noise is Opacus's own calibration for all of them::

    σ = get_noise_multiplier(target_epsilon=ε, target_delta=δ, sample_rate=q,
                             steps=planned_rounds * steps_per_round, accountant=...)

so ε after all planned rounds equals the target (within Opacus's 0.01 tolerance, never above
it). σ is stored in the ledger and reused every round while the plan (ε, δ, accountant, q,
steps per round, planned rounds) is unchanged and still reaches at most the target; otherwise
(the plan changed, or an interrupted round was charged) σ is recalibrated over the *remaining*
rounds, ``max(planned_rounds - rounds_charged, 1)``, on top of the ε already in the ledger, by
the same bisection Opacus uses. A site that is not sampled every round thus adds more noise than
it strictly needs: conservative. The budget check of the ledger stays the hard stop.

Per-sample gradients (``grad_sample_mode``)
-------------------------------------------
Opacus's ``"hooks"``, ``"ew"`` (torch ExpandedWeights), ``"functorch"``, ``"ghost"`` (fast
gradient / ghost clipping: Opacus then also returns a wrapped criterion, which
:class:`PrivateTraining` carries), or fedcare's ``"fast"`` (:mod:`fedcare.privacy.fast_grad`:
exact closed-form / fused per-sample gradients for the regression and LSTM families, with
Opacus's own Poisson loader, noise and accountant hook). ``"auto"`` picks per model what
``BENCHMARKS.md`` ("DP step time") measured fastest, see :func:`resolve_grad_sample_mode`:
``fast`` where :func:`~fedcare.privacy.fast_grad.supports_fast_grad`, ``hooks`` for other
recurrent models, ``ew`` for models made only of ExpandedWeights layers (the GroupNorm CNN),
``hooks`` otherwise; never ``ghost`` or ``functorch``. Every path charges the same accountant
with the same (σ, q, steps), so ε does not depend on the mode.

Empty Poisson batches still take a (pure noise) step, so the released sequence of updates does
not depend on whether a batch was empty: :meth:`PrivateTraining.empty_step` skips the forward
pass (``ew`` refuses a batch of 0), hands the optimizer zero-row per-sample gradients (or a zero
clipped sum, ``fast``/``ghost``) and steps: Gaussian noise is added and the accountant takes
exactly one step, as Opacus ``hooks`` does for an empty batch.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier
from opacus.grad_sample import AbstractGradSampleModule
from opacus.layers.dp_rnn import DPRNNBase, DPRNNCellBase
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from ..models.exchange import unwrap
from .errors import BudgetExceededError, UnsupportedModuleError
from .fast_grad import FastGradSampleModule, make_private_fast, supports_fast_grad
from .ledger import epsilon_of, merge_steps
from .opacus_bridge import fast_clipped_sum_supported, strip_per_sample_leftovers

if TYPE_CHECKING:
    from .ledger import PrivacyLedger
    from .settings import PrivacySettings

__all__ = [
    "EPSILON_TOLERANCE",
    "GRAD_SAMPLE_MODES",
    "OPACUS_MODES",
    "PrivateTraining",
    "calibrate_noise_multiplier",
    "make_private",
    "plan_noise_multiplier",
    "resolve_grad_sample_mode",
    "sample_rate_for",
    "steps_per_epoch",
]

logger = logging.getLogger(__name__)

EPSILON_TOLERANCE = 0.01
"""Bisection tolerance on ε, as in ``opacus.accountants.utils.get_noise_multiplier``."""

OPACUS_MODES = ("hooks", "ew", "functorch", "ghost")
"""Opacus 1.6 ``grad_sample_mode`` values fedcare passes through."""

GRAD_SAMPLE_MODES = (*OPACUS_MODES, "fast")
"""Per-sample gradient paths :func:`make_private` accepts besides ``"auto"``."""

_EW_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Embedding,
)
"""Layers torch's ExpandedWeights (Opacus ``"ew"``) computes per-sample gradients for."""

_RECURRENT: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase, DPRNNBase, DPRNNCellBase)


def _is_recurrent(module: nn.Module) -> bool:
    """Return whether ``module`` contains a recurrent layer (``ew`` is no faster there)."""
    return any(isinstance(m, _RECURRENT) for m in module.modules())


def _ew_compatible(module: nn.Module) -> bool:
    """Return whether every trainable parameter sits directly in an ExpandedWeights layer.

    Exact types only: a subclass may use its parameters in a forward ExpandedWeights cannot see.
    """
    found = False
    for sub in module.modules():
        if any(p.requires_grad for p in sub.parameters(recurse=False)):
            if type(sub) not in _EW_LAYERS:
                return False
            found = True
    return found


def resolve_grad_sample_mode(mode: str, *, module: nn.Module | None = None) -> str:
    """Return the per-sample gradient path for a setting; ``"auto"`` picks it for ``module``.

    ``"auto"`` (the measured fastest valid path, ``BENCHMARKS.md`` "DP step time"):
    ``"fast"`` when :func:`~fedcare.privacy.fast_grad.supports_fast_grad` (linear / logistic
    regression, ClinicalLSTM on plain DPLSTMs); ``"hooks"`` for any other recurrent model;
    ``"ew"`` when every trainable layer is one torch's ExpandedWeights supports (the GroupNorm
    CNN: Conv2d, GroupNorm, Linear); ``"hooks"`` otherwise. Never ``"ghost"`` or
    ``"functorch"`` (slower on every family measured). Explicit modes are returned unchanged.

    Raises
    ------
    ValueError
        Unknown mode, or ``"auto"`` without ``module`` (the choice depends on the model).
    """
    if mode == "auto":
        if module is None:
            raise ValueError("grad_sample_mode 'auto' depends on the model: pass module=")
        if supports_fast_grad(module) and fast_clipped_sum_supported():
            return "fast"
        if _is_recurrent(module):
            return "hooks"
        if _ew_compatible(module):
            return "ew"
        return "hooks"
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"unknown grad_sample_mode {mode!r}; known: auto, {', '.join(GRAD_SAMPLE_MODES)}")
    return mode


def sample_rate_for(*, num_examples: int, batch_size: int) -> float:
    """Return Opacus's Poisson sample rate for a loader of ``batch_size``: ``1 / ceil(n / B)``."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples}, {batch_size}")
    return 1 / math.ceil(num_examples / batch_size)


def steps_per_epoch(*, sample_rate: float) -> int:
    """Return the steps Opacus's ``DPDataLoader`` takes per epoch: ``int(1 / sample_rate)``."""
    return int(1 / sample_rate)


@functools.lru_cache(maxsize=256)
def _fresh_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    epsilon_tolerance: float,
) -> float:
    """Return Opacus's ``get_noise_multiplier`` for a fresh study, memoised.

    The search is deterministic and costs seconds (PRV: tens of seconds); sites and baselines
    with the same plan (every virtual hospital of an IID simulation) share one result.
    """
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )
    )


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior_history: Sequence[Sequence[Any]] = (),
    epsilon_tolerance: float = EPSILON_TOLERANCE,
) -> float:
    """Return σ so that ``prior_history`` plus ``steps`` steps at (σ, q) reaches ε ≤ target.

    With no prior history this is exactly Opacus's ``get_noise_multiplier``; with one, the same
    bisection runs on the combined history. Raises ``ValueError`` when the target cannot be
    reached (the prior history alone spends it).
    """
    if not prior_history:
        return _fresh_noise_multiplier(
            target_epsilon, delta, sample_rate, steps, accountant, epsilon_tolerance
        )

    def eps(sigma: float) -> float:
        history = merge_steps(prior_history, noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        return epsilon_of(history, accountant=accountant, delta=delta)

    if epsilon_of(prior_history, accountant=accountant, delta=delta) >= target_epsilon - epsilon_tolerance:
        raise ValueError("the privacy budget is too low: the history already spends the target ε")
    eps_high, sigma_low, sigma_high = math.inf, 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high *= 2
        eps_high = eps(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ValueError("the privacy budget is too low")
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        e = eps(sigma)
        if e < target_epsilon:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return sigma_high


def plan_noise_multiplier(
    *,
    privacy: PrivacySettings,
    ledger: PrivacyLedger,
    sample_rate: float,
    steps_per_round: int,
    planned_rounds: int,
    round_index: int,
) -> float:
    """Return this round's σ: the fixed one, or the study's calibration (see the module docstring).

    Stores a new calibration in ``ledger`` (persisted with the round's reservation). Raises
    :class:`BudgetExceededError` when the target ε is already spent. The ledger must be bound
    to ``privacy``'s terms.
    """
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    assert privacy.target_epsilon is not None
    target = float(privacy.target_epsilon)
    plan = {
        "target_epsilon": target,
        "delta": float(privacy.delta),
        "accountant": privacy.accountant,
        "sample_rate": float(sample_rate),
        "steps_per_round": int(steps_per_round),
        "planned_rounds": int(planned_rounds),
    }
    charged = ledger.rounds_charged
    remaining = max(planned_rounds - charged, 1)
    stored = ledger.calibration
    if stored is not None and stored.get("plan") == plan:
        sigma = float(stored["noise_multiplier"])
        final = ledger.projected_epsilon(noise_multiplier=sigma, sample_rate=sample_rate,
                                         steps=remaining * steps_per_round)
        if final <= target:
            return sigma
        logger.warning(
            "site %r study %r: the stored noise (σ=%.4f) would end the study at ε=%.4f > target "
            "%g (a round was interrupted or redone): recalibrating over %d remaining rounds",
            ledger.site, ledger.study, sigma, final, target, remaining,
        )
    elif stored is not None:
        logger.warning("site %r study %r: the training plan changed (%s -> %s): recalibrating the noise",
                       ledger.site, ledger.study, stored.get("plan"), plan)
    try:
        sigma = calibrate_noise_multiplier(
            target_epsilon=target,
            delta=privacy.delta,
            sample_rate=sample_rate,
            steps=remaining * steps_per_round,
            accountant=privacy.accountant,
            prior_history=ledger.history,
        )
    except ValueError as exc:
        spent = ledger.spent_epsilon()
        raise BudgetExceededError(
            site=ledger.site, study=ledger.study, spent=spent, projected=math.inf,
            budget=ledger.epsilon_budget or target, delta=privacy.delta, steps=steps_per_round,
            reason=f"no noise level reaches the target ε={target:g} any more: {exc}",
        ) from None
    ledger.set_calibration({
        "plan": plan,
        "noise_multiplier": sigma,
        "remaining_rounds": remaining,
        "rounds_charged_before": charged,
        "calibrated_at_round": int(round_index),
    })
    logger.info(
        "site %r study %r: σ=%.4f calibrated for %d remaining rounds × %d steps (q=%.5f) to reach "
        "ε=%g at δ=%g (%s)", ledger.site, ledger.study, sigma, remaining, steps_per_round,
        sample_rate, target, privacy.delta, privacy.accountant,
    )
    return sigma


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns: train with these, then call :meth:`close`.

    Attributes
    ----------
    module : torch.nn.Module
        Opacus's ``GradSampleModule`` (or, mode ``"fast"``, fedcare's ``FastGradSampleModule``)
        around the caller's module (shares its parameters).
    optimizer : opacus.optimizers.DPOptimizer
        Clips (or, ``"fast"``/``"ghost"``, takes the clipped sum), adds noise and steps the
        ledger's accountant.
    data_loader : torch.utils.data.DataLoader
        Opacus's Poisson ``DPDataLoader``.
    criterion : callable
        The loss to call as ``criterion(output, target)``; Opacus's ghost-clipping wrapper in
        ``"ghost"`` mode.
    noise_multiplier, sample_rate : float
        σ and q Opacus uses (and charges).
    steps_per_epoch : int
        Batches per pass of :attr:`data_loader`.
    grad_sample_mode : str
        The resolved mode: ``"hooks"``, ``"ew"``, ``"functorch"``, ``"ghost"`` or ``"fast"``.
    """

    module: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader
    criterion: Callable[..., Any]
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    grad_sample_mode: str
    closed: bool = False

    def empty_step(self) -> None:
        """Take a step for an empty Poisson batch: zero clipped sum, noise added, step charged.

        Call it instead of the forward pass (``"ew"`` refuses a batch of 0). The optimizer gets
        zero-row per-sample gradients (``p.grad_sample`` of shape ``(0, *p.shape)``), or a zero
        clipped sum in ``p.grad`` for the ``"fast"``/``"ghost"`` optimizer, and steps: Gaussian
        noise is added and the accountant takes exactly one step, as with Opacus ``"hooks"``.
        """
        params = [p for p in self.optimizer.params]
        if isinstance(self.optimizer, DPOptimizerFastGradientClipping):
            for p in params:
                p.grad = torch.zeros_like(p)
        else:
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()

    def close(self) -> None:
        """Remove Opacus's hooks and attributes from the caller's module (it keeps its weights)."""
        if self.closed:
            return
        self.closed = True
        if isinstance(self.module, FastGradSampleModule):  # no hooks; drop per-sample leftovers
            strip_per_sample_leftovers(unwrap(self.module).modules())
            return
        if isinstance(self.module, AbstractGradSampleModule):
            inner = self.module.to_standard_module()  # Opacus's own: hooks and attributes removed
            strip_per_sample_leftovers(inner.modules())


def make_private(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    criterion: nn.Module,
    accountant: IAccountant,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "auto",
    noise_generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Make ``module`` private with ``opacus.PrivacyEngine``, charging ``accountant`` (the ledger's).

    Parameters
    ----------
    module : torch.nn.Module
        The caller's model (not yet wrapped); Opacus-incompatible layers are refused.
    optimizer : torch.optim.Optimizer
        Optimizer over ``module``'s parameters.
    data_loader : torch.utils.data.DataLoader
        A plain loader with the batch size B; Opacus replaces it by Poisson sampling at
        ``q = 1/len(data_loader)``.
    criterion : torch.nn.Module
        The loss, with a ``reduction`` attribute ("mean").
    accountant : opacus.accountants.IAccountant
        The ledger's live accountant (``PrivacyLedger.accountant``).
    noise_multiplier, max_grad_norm : float
        σ and the clipping norm C.
    grad_sample_mode : {"auto", "hooks", "ew", "functorch", "ghost", "fast"}
        See :func:`resolve_grad_sample_mode`; ``"fast"`` needs a model
        :func:`~fedcare.privacy.fast_grad.supports_fast_grad` accepts.
    noise_generator : torch.Generator, optional
        Seeded generator for the noise (on the parameters' device); None: torch's global RNG.
    """
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors)
        raise UnsupportedModuleError(
            f"{type(module).__name__} cannot be trained with DP-SGD: {listed}. Use GroupNorm "
            "instead of BatchNorm and opacus.layers.DPLSTM instead of nn.LSTM (fedcare's model "
            "families already do)"
        )
    mode = resolve_grad_sample_mode(grad_sample_mode, module=module)
    if mode == "fast" and not supports_fast_grad(module):
        raise UnsupportedModuleError(
            f"grad_sample_mode 'fast' has no exact per-sample gradient path for "
            f"{type(module).__name__} (only linear/logistic regression and ClinicalLSTM on plain "
            "DPLSTMs): use 'auto', 'hooks' or 'ew'"
        )
    engine = PrivacyEngine(accountant=accountant.mechanism(), secure_mode=False)
    common: dict[str, Any] = dict(
        module=module,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        loss_reduction="mean",
        poisson_sampling=True,
        noise_generator=noise_generator,
    )
    dp_criterion: Callable[..., Any] = criterion
    if mode == "fast":  # Opacus's loader, optimizer (noise) and this accountant's step hook
        private_module, dp_optimizer, dp_loader = make_private_fast(engine, **common)
    elif mode == "ghost":
        private_module, dp_optimizer, dp_criterion, dp_loader = engine.make_private(
            criterion=criterion, grad_sample_mode=mode, **common
        )
    else:
        private_module, dp_optimizer, dp_loader = engine.make_private(grad_sample_mode=mode, **common)
    # the ledger's accountant takes every step (Opacus's public hook, as make_private attaches
    # its own engine's): the engine's throwaway accountant is never charged
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=1 / len(dp_loader)))
    return _private_training(private_module, dp_optimizer, dp_loader, dp_criterion,
                             noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             mode=mode, requested=grad_sample_mode, accountant=accountant)


def _private_training(
    private_module: nn.Module,
    dp_optimizer: DPOptimizer,
    dp_loader: DataLoader,
    dp_criterion: Callable[..., Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    mode: str,
    requested: str,
    accountant: IAccountant,
) -> PrivateTraining:
    """Log what :func:`make_private` set up and return it as a :class:`PrivateTraining`."""
    sample_rate = float(dp_loader.sample_rate)
    logger.info(
        "DP-SGD with Opacus: per-sample gradients %s (%s requested) for %s, σ=%.4f, C=%g, q=%.5f, "
        "%d steps per epoch, accountant %s",
        mode, requested, type(unwrap(private_module)).__name__, noise_multiplier, max_grad_norm,
        sample_rate, len(dp_loader), accountant.mechanism(),
    )
    return PrivateTraining(
        module=private_module,
        optimizer=dp_optimizer,
        data_loader=dp_loader,
        criterion=dp_criterion,
        noise_multiplier=float(noise_multiplier),
        sample_rate=sample_rate,
        steps_per_epoch=len(dp_loader),
        grad_sample_mode=mode,
    )
