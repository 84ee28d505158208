"""Exact per-sample gradients in one ordinary backward pass, for the regression and LSTM families.

Opacus computes per-sample gradients with per-layer hooks; for fedcare's smallest models (one
``nn.Linear``) the hook machinery costs more than the model, and for ``ClinicalLSTM`` Opacus's
``DPLSTM`` runs a Python loop over time steps with hooks on every step. This module computes the
*same* per-sample gradients faster, and leaves everything else to Opacus:

* sampling, noise and accounting stay Opacus's: :func:`make_private_fast` calls
  ``PrivacyEngine.make_private(..., grad_sample_mode="ghost", wrap_model=False)`` to get the
  Poisson data loader, Opacus's ``DPOptimizerFastGradientClipping`` (it adds Gaussian noise of
  std ``noise_multiplier * max_grad_norm`` to ``p.grad``, divides by the expected batch size and
  takes the accountant's step) and the accountant hook, removes Opacus's ghost-clipping hooks,
  and wraps the model in :class:`FastGradSampleModule`. That reliance on Opacus's optimizer is
  guarded (:mod:`fedcare.privacy.opacus_bridge`, ``fast-clipped-sum``, fails closed): on an
  Opacus whose optimizer fedcare does not recognise, this path refuses to run.
* :class:`FastGradSampleModule`'s forward records what the backward pass needs; an ordinary
  ``loss.backward()`` then computes every example's gradient, clips it to ``max_grad_norm``
  exactly as Opacus's flat clipping does (``min(1, C / (||g_i|| + 1e-6))`` over the whole
  model) and stores the clipped sum in ``p.grad`` -- what Opacus's ghost clipping would leave
  there after its second backward pass.
* **Linear / logistic regression**: the model's only parameters are one ``nn.Linear``
  ``z = x W^T + b``; the per-sample gradient is closed form, ``(dL_i/dz_i) x_i^T`` for ``W`` and
  ``dL_i/dz_i`` for ``b``, with norm ``||dL_i/dz_i|| * ||[x_i, 1]||``; the layer's backward
  returns the clipped sums directly (one small matmul, no per-sample tensor).
* **ClinicalLSTM**: each DPLSTM layer is run as one fused ``torch.lstm`` call. The input
  projection ``u_t = W_ih x_t + b_ih + b_hh`` is computed outside the fused kernel, which then
  runs with an identity input matrix, so the gradient autograd returns for ``u`` is exactly the
  gate pre-activation gradient ``delta_t`` of every example and step. The per-sample gradients
  follow as ``sum_t delta_t x_t^T`` (``W_ih``), ``sum_t delta_t h_{t-1}^T`` (``W_hh``) and
  ``sum_t delta_t`` (both biases); the head is a linear layer on the last valid output. The
  parameters are those of the model's own DPLSTMs (same names, same state_dict), so a model
  trained this way is the same ``ClinicalLSTM`` the federation exchanges.

The per-sample gradients equal Opacus's ``grad_sample_mode="hooks"`` ones to float32 rounding
(``tests/test_fast_grad.py`` checks them, and the clipped sum, to 1e-5).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from opacus import PrivacyEngine
from opacus.layers import DPLSTM
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.nn import functional as F

from ..models.exchange import unwrap
from ..models.lstm import ClinicalLSTM, reverse_within_length
from ..models.regression import LinearRegression, LogisticRegression
from .opacus_bridge import lean_fast_clipping_optimizer, require_fast_clipped_sum

logger = logging.getLogger(__name__)

LossReduction = Literal["mean", "sum"]


class UnsupportedModelError(TypeError):
    """Raised when :class:`FastGradSampleModule` is given a model it has no exact path for."""


def supports_fast_grad(model: nn.Module) -> bool:
    """Return whether ``model`` (wrapped or not) has an exact fast per-sample gradient path."""
    inner = unwrap(model)
    if isinstance(inner, (LinearRegression, LogisticRegression)):
        return True
    if isinstance(inner, ClinicalLSTM):
        return all(
            lstm is None or _lstm_is_supported(lstm)
            for lstm in (inner.forward_lstm, inner.backward_lstm)
        )
    return False


def _lstm_is_supported(lstm: nn.Module) -> bool:
    """Return whether a DPLSTM has the plain layout the fused path reproduces."""
    return (
        isinstance(lstm, DPLSTM)
        and lstm.batch_first
        and not lstm.bidirectional
        and lstm.bias
        and lstm.proj_size == 0
        and (lstm.dropout == 0 or lstm.num_layers == 1)
    )


class FastGradSampleModule(nn.Module):
    """Wrap a supported fedcare model so that ``loss.backward()`` leaves the clipped gradient sum.

    After ``loss.backward()``, ``p.grad`` holds ``sum_i min(1, C / (||g_i|| + 1e-6)) g_i`` where
    ``g_i`` is example ``i``'s gradient of its own loss over all trainable parameters (flat
    clipping, as Opacus). Train with the optimizer from :func:`make_private_fast` (Opacus's
    ``DPOptimizerFastGradientClipping``), which adds the noise, scales and accounts.
    Autograd never computes the summed, unclipped gradient: the LSTM path uses the parameters
    detached, the regression path's linear layer has a backward that returns the clipped sums.

    Parameters
    ----------
    module : nn.Module
        ``LinearRegression``, ``LogisticRegression`` or ``ClinicalLSTM`` (built on DPLSTM),
        optionally inside an Opacus wrapper.
    max_grad_norm : float
        The clipping bound ``C`` for each example's whole gradient.
    loss_reduction : {"mean", "sum"}
        How the training loss reduces over the batch; must match ``make_private``.
    keep_grad_sample : bool
        Also store each parameter's per-sample gradients as ``p.grad_sample`` (for checks;
        the LSTM path materialises them anyway, the regression path only when asked).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        max_grad_norm: float,
        loss_reduction: LossReduction = "mean",
        keep_grad_sample: bool = False,
    ) -> None:
        super().__init__()
        inner = unwrap(module)
        if not supports_fast_grad(inner):
            raise UnsupportedModelError(
                f"no fast per-sample gradient path for {type(inner).__name__}: use Opacus's "
                "grad_sample_mode 'hooks', 'ghost' or 'ew' for this model"
            )
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self._module = inner  # fedcare's unwrap() and Opacus look for ``_module``
        self.max_grad_norm = float(max_grad_norm)
        self.loss_reduction = loss_reduction
        self.keep_grad_sample = keep_grad_sample
        self.per_sample_gradient_norms: torch.Tensor | None = None
        self._pending = 0
        self._samples: list[tuple[nn.Parameter, torch.Tensor]] = []

    def forward(self, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        """Return the model's output; while training with gradients on, record for backward."""
        if not (self.training and torch.is_grad_enabled()):
            return self._module(*inputs, **kwargs)
        if inputs[0].shape[0] == 0:  # an empty Poisson batch: nothing to clip, zero gradient
            self._store_clipped_sum([(p, p.new_zeros((0, *p.shape))) for p in self._params()])
            return self._module(*inputs, **kwargs).detach().requires_grad_(True)
        self._samples = []
        if isinstance(self._module, ClinicalLSTM):
            return self._lstm_forward(*inputs, **kwargs)
        return self._linear_forward(*inputs)

    def _params(self) -> list[nn.Parameter]:
        """Return the trainable parameters, in the module's order."""
        return [p for p in self._module.parameters() if p.requires_grad]

    def _scale(self, n: int) -> float:
        """Return the factor that turns a batch-loss gradient into per-example loss gradients."""
        return float(n) if self.loss_reduction == "mean" else 1.0

    def _clip_coefficients(self, norms: torch.Tensor) -> torch.Tensor:
        """Return Opacus's flat clipping factors ``min(1, C / (norm + 1e-6))``."""
        self.per_sample_gradient_norms = norms.detach()
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

    @staticmethod
    def _add_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
        """Accumulate ``grad`` into ``param.grad`` as autograd would."""
        if param.grad is None:
            param.grad = grad.detach().view_as(param)
        else:
            param.grad.add_(grad.view_as(param))

    def _collect(self, samples: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        """Take one hook's per-sample gradients; clip and sum once the last hook has run."""
        self._samples.extend(samples)
        self._pending -= 1
        if self._pending == 0:
            collected, self._samples = self._samples, []
            self._store_clipped_sum(collected)

    def _store_clipped_sum(self, samples: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        """Clip every example's whole gradient and add the clipped sum to ``p.grad``."""
        if self.keep_grad_sample:
            for p, gs in samples:
                p.grad_sample = gs  # type: ignore[attr-defined]
        n = samples[0][1].shape[0]
        if n == 0:
            self.per_sample_gradient_norms = samples[0][1].new_zeros((0,))
            for p, _ in samples:
                self._add_grad(p, torch.zeros_like(p))
            return
        norms = torch.stack([gs.reshape(n, -1).norm(2, dim=1) for _, gs in samples], dim=1)
        coef = self._clip_coefficients(norms.norm(2, dim=1))
        for p, gs in samples:
            self._add_grad(p, torch.einsum("i,i...->...", coef, gs))

    # ------------------------------------------------------------------ regression
    def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward of Linear/LogisticRegression; its backward leaves the clipped sum in p.grad."""
        layer: nn.Linear = self._module.linear  # type: ignore[assignment]
        self._pending = 1
        z = _ClippedLinear.apply(x.detach(), layer.weight, layer.bias, self)
        if isinstance(self._module, LinearRegression):
            return z.squeeze(-1)
        return z.squeeze(-1) if self._module.num_classes == 2 else z

    def _linear_clipped_grads(
        self, x: torch.Tensor, grad: torch.Tensor, has_bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the clipped sums for ``W`` and ``b`` from inputs ``x`` and ``dL/dz``."""
        # example i's gradient is (s g_i) [x_i, 1]^T with g_i = dL/dz_i and s the loss scale;
        # its norm is s ||g_i|| ||[x_i, 1]||, so no per-sample tensor is needed
        scale = self._scale(x.shape[0])
        xa = F.pad(x, (0, 1), value=1.0) if has_bias else x
        if self.keep_grad_sample:
            layer: nn.Linear = self._module.linear  # type: ignore[assignment]
            gs = (grad * scale).unsqueeze(2) * xa.unsqueeze(1)
            layer.weight.grad_sample = gs[..., : x.shape[1]]  # type: ignore[attr-defined]
            if has_bias:
                layer.bias.grad_sample = gs[..., -1]  # type: ignore[attr-defined]
        norms = torch.linalg.vector_norm(grad, dim=1).mul_(torch.linalg.vector_norm(xa, dim=1))
        if scale != 1.0:
            norms.mul_(scale)
        coef = self._clip_coefficients(norms)
        if scale != 1.0:
            coef = coef.mul_(scale)
        full = (grad * coef.unsqueeze(1)).t() @ xa  # (K, F [+ 1]): the clipped sum
        self._pending = 0
        if has_bias:
            return full[:, : x.shape[1]], full[:, -1]
        return full, None

    # ------------------------------------------------------------------ LSTM
    def _lstm_forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward of ClinicalLSTM with fused LSTM layers and per-sample gradient hooks."""
        model: ClinicalLSTM = self._module  # type: ignore[assignment]
        n, t = x.shape[0], x.shape[1]
        if lengths is None:
            lengths = torch.full((n,), t, dtype=torch.long, device=x.device)
        x = x.detach()
        if model.use_mask:
            if mask is None:
                raise ValueError("this model was built with use_mask=True: pass mask=")
            x = torch.cat([x, mask.to(x.dtype)], dim=-1)
        scale = self._scale(n)
        lstms = [model.forward_lstm] + ([model.backward_lstm] if model.backward_lstm else [])
        self._pending = 1 + sum(lstm.num_layers for lstm in lstms)
        last = (lengths.to(x.device).long() - 1).clamp(min=0)
        rows = torch.arange(n, device=x.device)
        h = _fused_dplstm(model.forward_lstm, x, scale, self._collect)[rows, last]
        if model.backward_lstm is not None:
            back = _fused_dplstm(
                model.backward_lstm, reverse_within_length(x, lengths), scale, self._collect
            )
            h = torch.cat([h, back[rows, last]], dim=-1)
        head = model.head
        y = F.linear(h, head.weight.detach(), head.bias.detach())
        h_saved = h.detach()

        def head_hook(grad: torch.Tensor) -> None:
            g = grad * scale if scale != 1.0 else grad  # (N, K): dL_i/dy_i
            self._collect([(head.weight, g.unsqueeze(2) * h_saved.unsqueeze(1)), (head.bias, g)])

        y.register_hook(head_hook)
        return y.squeeze(-1) if model.num_classes <= 2 else y


class _ClippedLinear(torch.autograd.Function):
    """``z = x W^T + b`` whose backward returns the per-example-clipped gradient sums."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        owner: FastGradSampleModule,
    ) -> torch.Tensor:
        """Return ``F.linear(x, weight, bias)``, saving ``x`` for the backward pass."""
        ctx.save_for_backward(x)
        ctx.owner = owner
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        """Return clipped sums for ``weight`` and ``bias`` (nothing for ``x``)."""
        (x,) = ctx.saved_tensors
        gw, gb = ctx.owner._linear_clipped_grads(x, grad, ctx.has_bias)
        return None, gw, gb, None


_EYES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _eye(size: int, like: torch.Tensor) -> torch.Tensor:
    """Return a cached identity matrix of ``size`` with ``like``'s dtype and device."""
    key = (size, like.dtype, like.device)
    eye = _EYES.get(key)
    if eye is None:
        eye = _EYES[key] = torch.eye(size, dtype=like.dtype, device=like.device)
    return eye


def _fused_dplstm(
    lstm: DPLSTM,
    x: torch.Tensor,
    scale: float,
    collect: Callable[[list[tuple[nn.Parameter, torch.Tensor]]], None],
) -> torch.Tensor:
    """Run ``lstm`` (a DPLSTM's own parameters) as fused layers; return its output (N, T, H).

    A hook on each layer's gate input ``u`` hands that layer's per-sample gradients to
    ``collect`` during the backward pass.
    """
    out = x
    for layer in range(lstm.num_layers):
        w_ih: nn.Parameter = getattr(lstm, f"weight_ih_l{layer}")
        w_hh: nn.Parameter = getattr(lstm, f"weight_hh_l{layer}")
        b_ih: nn.Parameter = getattr(lstm, f"bias_ih_l{layer}")
        b_hh: nn.Parameter = getattr(lstm, f"bias_hh_l{layer}")
        inp = out
        # gate pre-activations from the input, for all steps at once
        u = F.linear(inp, w_ih.detach(), b_ih.detach() + b_hh.detach())
        if not u.requires_grad:
            u.requires_grad_(True)
        zeros = inp.new_zeros((1, inp.shape[0], w_hh.shape[1]))
        out, _, _ = torch.lstm(
            u,
            (zeros, zeros),
            [_eye(u.shape[-1], u), w_hh.detach()],
            False,  # has_biases: they are in u
            1,  # num_layers
            0.0,  # dropout
            True,  # train
            False,  # bidirectional
            True,  # batch_first
        )

        def hook(
            delta: torch.Tensor,
            inp: torch.Tensor = inp.detach(),
            out: torch.Tensor = out.detach(),
            params: tuple[nn.Parameter, ...] = (w_ih, w_hh, b_ih, b_hh),
        ) -> None:
            d = delta * scale if scale != 1.0 else delta  # (N, T, 4H) per-example gate grads
            d_t = d.transpose(1, 2)  # (N, 4H, T)
            h_prev = F.pad(out[:, :-1], (0, 0, 1, 0))  # h_{t-1}, zeros at t=0
            db = d.sum(dim=1)
            w_ih_, w_hh_, b_ih_, b_hh_ = params
            collect(
                [
                    (w_ih_, torch.bmm(d_t, inp)),
                    (w_hh_, torch.bmm(d_t, h_prev)),
                    (b_ih_, db),
                    (b_hh_, db),
                ]
            )

        u.register_hook(hook)
    return out


class _SumCriterion(nn.Module):
    """A placeholder criterion for ``make_private(grad_sample_mode="ghost")``; never called."""

    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, *args: Any) -> torch.Tensor:  # pragma: no cover - never called
        """Refuse to be used: train with the model's ordinary criterion."""
        raise RuntimeError("make_private_fast's placeholder criterion must not be called")


def make_private_fast(
    engine: PrivacyEngine,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    loss_reduction: LossReduction = "mean",
    poisson_sampling: bool = True,
    noise_generator: torch.Generator | None = None,
) -> tuple[FastGradSampleModule, Any, torch.utils.data.DataLoader]:
    """Make a supported model private with Opacus's loader, optimizer and accountant, fast grads.

    Calls ``engine.make_private(..., grad_sample_mode="ghost", wrap_model=False)`` (Poisson
    sampling, ``DPOptimizerFastGradientClipping`` with noise std ``noise_multiplier *
    max_grad_norm``, the accountant's step hook), removes the ghost-clipping hooks it attached
    to ``module``, and returns :class:`FastGradSampleModule` in their place.

    Raises
    ------
    UnsupportedModelError
        When ``module`` has no fast path.
    fedcare.privacy.opacus_bridge.UnsupportedOpacusError
        When the installed Opacus is not one whose fast-gradient-clipping optimizer fedcare
        knows (the noise of this path relies on it).

    Returns
    -------
    tuple
        ``(module, optimizer, data_loader)``: train with the returned module and the model's
        ordinary criterion (``reduction=loss_reduction``): ``loss.backward()`` then
        ``optimizer.step()``. The module's parameters are the original model's.
    """
    if not supports_fast_grad(module):
        raise UnsupportedModelError(
            f"no fast per-sample gradient path for {type(unwrap(module)).__name__}: use "
            "Opacus's grad_sample_mode 'hooks', 'ghost' or 'ew' for this model"
        )
    require_fast_clipped_sum()
    inner = unwrap(module)
    hooks, dp_optimizer, _criterion, dp_loader = engine.make_private(
        module=inner,
        optimizer=optimizer,
        criterion=_SumCriterion(loss_reduction),
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        loss_reduction=loss_reduction,
        poisson_sampling=poisson_sampling,
        noise_generator=noise_generator,
        grad_sample_mode="ghost",
        wrap_model=False,
    )
    hooks.cleanup()  # our module computes the clipped sum; Opacus's hooks must not run
    if type(dp_optimizer) is not DPOptimizerFastGradientClipping:  # pragma: no cover
        raise TypeError(
            f"expected Opacus's DPOptimizerFastGradientClipping, got {type(dp_optimizer)}: "
            "check the installed Opacus version"
        )
    # same settings (noise multiplier, generator, expected batch size, accountant hook), built
    # with Opacus's public constructor -- only ``accumulate`` differs (guarded; else Opacus's own)
    dp_optimizer = lean_fast_clipping_optimizer(dp_optimizer)
    fast = FastGradSampleModule(inner, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction)
    logger.info(
        "fast per-sample gradients for %s; Opacus adds noise and accounts", type(inner).__name__
    )
    return fast, dp_optimizer, dp_loader
