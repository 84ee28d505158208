"""A site's local training in plain torch (no Flower types): DP-SGD through Opacus, or plain SGD.

:func:`train_local` runs one federated round on a site:

1. refuses the round before touching the model when its projected ε exceeds the site's budget
   (``BudgetExceededError``; the model and the ledger are left unchanged);
2. reserves the round's planned steps in the site's :class:`PrivacyLedger` (persisted);
3. trains with Opacus (Poisson sampling, per-sample clipping, Gaussian noise), Opacus charging
   the ledger's own accountant, never a fresh one; per-sample gradients come from the path
   ``privacy.grad_sample_mode`` resolves to for the model (``auto``: fedcare's ``fast`` for
   regression and the LSTM, Opacus ``ew`` for the CNN, see ``privacy.engine``);
4. finalises the round in the ledger (persisted) and only then returns, the caller's module
   holding the new weights.

A round that fails after its reservation is still charged in full, and the caller's module gets
its weights from before the round back. See ``privacy.ledger`` for the crash-safety argument and
``privacy.engine`` for the noise calibration.

FedProx: with ``proximal_mu > 0`` each optimizer step is followed by a decoupled proximal step
``w ← w − lr · μ · (w − w_global)`` toward the weights the round started from. It does not
depend on the site's data, so it costs no privacy, and it is the same with and without DP
(adding ``μ/2‖w − w_global‖²`` to the loss would not work under DP: Opacus's per-sample
gradients do not see a parameter-only term).

Randomness: without ``TrainSettings.seed`` (a deployed site) the DP noise and the Poisson
sampling of every round come from generators seeded from the operating system's entropy, and
importing this module registers :mod:`fedcare.privacy.randomness`'s reseeding of the global
generators in every forked child: two tasks forked from one warm process never share noise.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..config_base import FiniteFrozenModel
from ..models import Task
from ..privacy.engine import (
    PrivateTraining,
    make_private,
    plan_noise_multiplier,
    sample_rate_for,
    steps_per_epoch,
)
from ..privacy.errors import DPTrainingError, MissingLedgerError
from ..privacy.ledger import PrivacyLedger
from ..privacy.randomness import os_entropy_seed  # also reseeds global generators after every fork
from ..privacy.settings import PrivacySettings
from .dataset import SiteData
from .device import select_device

__all__ = ["TaskLoss", "TrainResult", "TrainSettings", "train_local"]

logger = logging.getLogger(__name__)

_NOISE_SEED_OFFSET = 0x5EED


class TrainSettings(FiniteFrozenModel):
    """Local training settings of one round (frozen; unknown fields refused).

    Attributes
    ----------
    local_epochs : int
        Passes over the site's training split per round.
    batch_size : int
        Batch size B; under DP the expected Poisson batch size (q = 1/ceil(n/B)).
    lr : float
        Learning rate.
    optimizer : {"sgd", "adam"}
        The torch optimizer (wrapped by Opacus under DP).
    weight_decay : float
        L2 weight decay of the optimizer.
    proximal_mu : float
        FedProx μ (0: plain FedAvg local training).
    clip_grad_norm : float
        Without DP: clip each batch's gradient to this L2 norm before the step
        (``torch.nn.utils.clip_grad_norm_``; 0: off). It keeps SGD on recurrent models from
        diverging on a steep batch. Under DP it is not used: the site's ``max_grad_norm`` clips
        every example's gradient already.
    seed : int or None
        Seeds Poisson sampling / shuffling and the DP noise (simulations and tests: repeatable
        runs). None, what a deployed site uses: every round draws both from the operating
        system's entropy (:func:`fedcare.privacy.randomness.os_entropy_seed`). A seed must be the
        site's own secret, never a value the coordinator sends: whoever knows it can regenerate
        the noise and remove it.
    device : str
        ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:N"``.
    """

    local_epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=0.1, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    weight_decay: float = Field(default=0.0, ge=0)
    proximal_mu: float = Field(default=0.0, ge=0)
    clip_grad_norm: float = Field(default=0.0, ge=0)
    seed: int | None = None
    device: str = "auto"


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training reports.

    Attributes
    ----------
    num_examples : int
        Training examples (what FedAvg weights by).
    loss : float
        Mean training loss over the round's batches. Not covered by DP: it is computed from the
        data without noise; report it only where that is acceptable.
    steps : int
        Optimizer steps taken.
    epsilon : float
        ε the site has spent in the study after this round (ledger total; inf without DP).
    delta : float
        δ of that ε (0 without DP).
    noise_multiplier : float
        σ used (0 without DP).
    sample_rate : float
        Poisson sample rate q (without DP: batch_size / n, for information).
    duration_s : float
        Wall time of the round, seconds.
    """

    num_examples: int
    loss: float
    steps: int
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    duration_s: float


class TaskLoss(nn.Module):
    """The training loss of a task: BCE with logits (binary), cross-entropy (multiclass), MSE.

    ``reduction`` is an attribute Opacus's ghost clipping switches to ``"none"`` to get
    per-sample losses.
    """

    def __init__(self, task: Task, reduction: str = "mean") -> None:
        super().__init__()
        if task not in ("binary", "multiclass", "regression"):
            raise ValueError(f"unknown task {task!r}; known: binary, multiclass, regression")
        self.task = task
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the loss of ``output`` (model output) against ``target``."""
        if output.shape[0] != target.shape[0]:
            raise ValueError(f"model output has {output.shape[0]} rows, targets {target.shape[0]}")
        if self.task == "multiclass":
            if output.dim() != 2:
                raise ValueError(f"a multiclass model must output (N, C) logits, got {tuple(output.shape)}")
            return F.cross_entropy(output, target.long(), reduction=self.reduction)
        if output.dim() != 1:
            raise ValueError(
                f"a {self.task} model must output one value per example, shape (N,); got "
                f"{tuple(output.shape)}"
            )
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(output, target.to(output.dtype), reduction=self.reduction)
        return F.mse_loss(output, target.to(output.dtype), reduction=self.reduction)


def _make_optimizer(model: nn.Module, train: TrainSettings) -> torch.optim.Optimizer:
    """Return the torch optimizer ``train`` names over ``model``'s trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay)


def _proximal_step(
    params: list[nn.Parameter], anchor: list[torch.Tensor] | None, *, lr: float, mu: float
) -> None:
    """Move ``params`` toward ``anchor`` by ``lr * mu * (w - anchor)`` (FedProx, decoupled)."""
    if anchor is None:
        return
    with torch.no_grad():
        for p, g in zip(params, anchor, strict=True):
            p.sub_(lr * mu * (p - g))


def _digest(model: nn.Module) -> int:
    """Return a 63-bit digest of the model's parameters and buffers (the round's starting point)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "big") >> 1


def _generators(
    seed: int | None, device: torch.device, *stream: int
) -> tuple[torch.Generator, torch.Generator]:
    """Return (sampling, noise) generators for ``seed`` and ``stream``; from OS entropy if no seed.

    Without a seed (a deployed site) both generators are seeded from the operating system's
    entropy on every call, never from torch's global generator: a process forked from a warm
    parent (``client.warm_exec``) would otherwise draw the parent's noise again in every task.

    With an explicit seed, ``stream`` (round index, digest of the starting weights) is mixed in
    so that two DP rounds never share noise unless they are the very same computation: the same
    noise added to two different gradient sums would reveal their difference. A round retried
    after a crash from the same global model repeats exactly (same output, nothing new
    released), which is what makes a resumed federation equal an uninterrupted one. The round
    index and the starting weights are chosen by the coordinator; mixing them in is safe only
    because the seed itself is the site's secret (node config ``seed``, or a simulation's), which
    the coordinator never sets nor sees: with a known seed the noise of every round is known.
    """
    if seed is None:
        sampling = torch.Generator().manual_seed(os_entropy_seed())
        return sampling, torch.Generator(device=device).manual_seed(os_entropy_seed())
    words = np.random.SeedSequence([int(seed), *map(int, stream)]).generate_state(2, dtype=np.uint64)
    sampling = torch.Generator().manual_seed(int(words[0] >> np.uint64(1)))
    noise = torch.Generator(device=device).manual_seed(
        int(words[1] >> np.uint64(1)) ^ _NOISE_SEED_OFFSET
    )
    return sampling, noise


def _train_plain(
    model: nn.Module, data: SiteData, train: TrainSettings, device: torch.device,
    criterion: TaskLoss, anchor: list[torch.Tensor] | None,
) -> tuple[float, int]:
    """Train without DP; return (mean loss, steps)."""
    sampling, _ = _generators(train.seed, device)
    loader = DataLoader(data.train.dataset(), batch_size=train.batch_size, shuffle=True, generator=sampling)
    optimizer = _make_optimizer(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    total, count, steps = 0.0, 0, 0
    for _ in range(train.local_epochs):
        for batch in loader:
            *inputs, target = (t.to(device) for t in batch)
            optimizer.zero_grad()
            loss = criterion(model(*inputs), target)
            loss.backward()
            if train.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(params, train.clip_grad_norm)
            optimizer.step()
            _proximal_step(params, anchor, lr=train.lr, mu=train.proximal_mu)
            total += float(loss.detach()) * len(target)
            count += len(target)
            steps += 1
    return (total / count if count else math.nan), steps


def train_local(
    model: nn.Module,
    data: SiteData,
    *,
    train: TrainSettings,
    privacy: PrivacySettings,
    ledger: PrivacyLedger | None,
    planned_rounds: int,
    round_index: int,
) -> TrainResult:
    """Train ``model`` in place for one round on ``data``'s training split; return what happened.

    Parameters
    ----------
    model : torch.nn.Module
        The caller's (unwrapped) module; it holds the new weights afterwards.
    data : SiteData
        The site's data; only ``data.train`` is used.
    train : TrainSettings
        Local training settings.
    privacy : PrivacySettings
        The site's DP settings.
    ledger : PrivacyLedger or None
        The site's ledger for the study; required with DP. Without DP, when given, the round is
        recorded as non-private (ε becomes infinite for the study).
    planned_rounds : int
        Rounds the study plans in total (the noise is calibrated on them).
    round_index : int
        The server's round number (recorded in the ledger).

    Raises
    ------
    BudgetExceededError
        Before any training, when the round would take ε past the budget.
    MissingLedgerError
        DP enabled without a ledger.
    """
    started = time.perf_counter()
    if planned_rounds < 1:
        raise ValueError(f"planned_rounds must be >= 1, got {planned_rounds}")
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    n = len(data.train)
    if n == 0:
        raise ValueError(f"site {data.name!r} has no training examples; check its manifest's split")
    device = select_device(train.device)
    model.to(device)
    privacy.warn_if_weak(num_examples=n, site=data.name, study=ledger.study if ledger is not None else None)
    criterion = TaskLoss(data.task)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if train.proximal_mu > 0 else None

    if not privacy.enabled:
        if ledger is not None:  # charged (as unbounded) before the update exists
            ledger.record_non_private_round(round_index=round_index)
        loss, steps = _train_plain(model, data, train, device, criterion, anchor)
        return TrainResult(
            num_examples=n, loss=loss, steps=steps,
            epsilon=ledger.spent_epsilon() if ledger is not None else math.inf, delta=0.0,
            noise_multiplier=0.0, sample_rate=min(1.0, train.batch_size / n),
            duration_s=time.perf_counter() - started,
        )

    if ledger is None:
        raise MissingLedgerError(
            "DP training needs the site's privacy ledger (PrivacyLedger.open(folder, site=..., "
            "study=...)): without one ε would restart at zero every round"
        )
    sample_rate = sample_rate_for(num_examples=n, batch_size=train.batch_size)
    per_epoch = steps_per_epoch(sample_rate=sample_rate)
    steps = per_epoch * train.local_epochs
    with ledger.session():
        ledger.bind(accountant=privacy.accountant, delta=privacy.delta, epsilon_budget=privacy.budget)
        sigma = plan_noise_multiplier(
            privacy=privacy, ledger=ledger, sample_rate=sample_rate, steps_per_round=steps,
            planned_rounds=planned_rounds, round_index=round_index,
        )
        ledger.check_round(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sampling, noise = _generators(train.seed, device, round_index, _digest(model))
        loader = DataLoader(data.train.dataset(), batch_size=train.batch_size, generator=sampling)
        private = make_private(
            module=model,
            optimizer=_make_optimizer(model, train),
            data_loader=loader,
            criterion=criterion,
            accountant=ledger.accountant,
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
            grad_sample_mode=privacy.grad_sample_mode,
            noise_generator=noise,
        )
        try:
            if private.sample_rate != sample_rate or private.steps_per_epoch != per_epoch:
                raise DPTrainingError(
                    f"Opacus samples at q={private.sample_rate} with {private.steps_per_epoch} steps "
                    f"per epoch, the plan says q={sample_rate}, {per_epoch}; nothing was trained or "
                    "charged: report this (Opacus version?)"
                )
            ledger.reserve_round(round_index=round_index, noise_multiplier=sigma,
                                 sample_rate=sample_rate, steps=steps)
            try:
                loss, done = _train_dp(private, train, device, params, anchor)
                if done != steps:
                    raise DPTrainingError(f"took {done} DP-SGD steps, reserved {steps}")
            except BaseException as exc:
                ledger.abort_round(reason=f"{type(exc).__name__}: {exc}"[:300])
                private.close()
                model.load_state_dict(initial)
                raise
            try:
                epsilon = ledger.finalise_round()
            except BaseException:  # the reservation is on disk; the update must not survive
                model.load_state_dict(initial)
                raise
        finally:
            private.close()
    return TrainResult(
        num_examples=n, loss=loss, steps=done, epsilon=epsilon, delta=float(privacy.delta),
        noise_multiplier=sigma, sample_rate=sample_rate, duration_s=time.perf_counter() - started,
    )


def _train_dp(
    private: PrivateTraining, train: TrainSettings, device: torch.device, params: list[nn.Parameter],
    anchor: list[torch.Tensor] | None,
) -> tuple[float, int]:
    """Run the DP-SGD loop Opacus prepared; return (mean loss over non-empty batches, steps)."""
    module, optimizer = private.module, private.optimizer
    module.train()
    total, count, steps = 0.0, 0, 0
    for _ in range(train.local_epochs):
        for batch in private.data_loader:
            *inputs, target = (t.to(device) for t in batch)
            optimizer.zero_grad()
            if len(target) == 0:
                # an empty Poisson batch still releases a noisy step charged to the ledger; no
                # forward pass (Opacus "ew" refuses a batch of 0)
                private.empty_step()
            else:
                loss = private.criterion(module(*inputs), target)
                loss.backward()
                optimizer.step()
                total += float(loss.item()) * len(target)
                count += len(target)
            _proximal_step(params, anchor, lr=train.lr, mu=train.proximal_mu)
            steps += 1
    optimizer.zero_grad()
    return (total / count if count else math.nan), steps
