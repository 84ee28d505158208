"""An LSTM for clinical sequences, built on Opacus's DPLSTM so per-sample gradients are exact."""

from __future__ import annotations

import torch
from opacus.layers import DPLSTM
from torch import nn


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of ``x`` (N, T, F) within its own length, leaving padding in place."""
    n, t = x.shape[0], x.shape[1]
    steps = torch.arange(t, device=x.device).unsqueeze(0).expand(n, t)
    last = (lengths.to(x.device).long() - 1).unsqueeze(1)
    index = torch.where(steps <= last, last - steps, steps)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


class ClinicalLSTM(nn.Module):
    """LSTM classifier or regressor for variable-length clinical sequences.

    Padding never reaches the result: the forward direction reads each sequence's output at its
    last valid step, and the backward direction (when ``bidirectional``) runs a second DPLSTM on
    each sequence reversed within its own length. An optional per-step missingness mask is
    concatenated to the features.

    Parameters
    ----------
    input_size : int
        Features per time step (without the mask).
    num_classes : int
        Classes; 2 gives one logit, 1 means regression (one continuous output).
    hidden_size : int
        LSTM hidden units per direction.
    num_layers : int
        Stacked LSTM layers per direction.
    bidirectional : bool
        Also read each sequence backwards.
    use_mask : bool
        Expect a missingness mask of the same shape as the features as extra input.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int = 2,
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        use_mask: bool = False,
    ) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1 or num_layers < 1 or num_classes < 1:
            raise ValueError("input_size, hidden_size, num_layers and num_classes must be >= 1")
        self.use_mask = use_mask
        self.bidirectional = bidirectional
        self.num_classes = num_classes
        width = input_size * (2 if use_mask else 1)
        self.forward_lstm = DPLSTM(width, hidden_size, num_layers=num_layers, batch_first=True)
        self.backward_lstm = (
            DPLSTM(width, hidden_size, num_layers=num_layers, batch_first=True)
            if bidirectional
            else None
        )
        directions = 2 if bidirectional else 1
        outputs = 1 if num_classes <= 2 else num_classes
        self.head = nn.Linear(hidden_size * directions, outputs)

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return logits (or predictions) for sequences shaped (N, T, F).

        Parameters
        ----------
        x : torch.Tensor
            Padded sequences, batch first.
        lengths : torch.Tensor, optional
            Valid steps per sequence; all ``T`` when omitted.
        mask : torch.Tensor, optional
            Missingness mask shaped like ``x`` (1 observed, 0 missing); required when the
            model was built with ``use_mask``.
        """
        n, t = x.shape[0], x.shape[1]
        if lengths is None:
            lengths = torch.full((n,), t, dtype=torch.long, device=x.device)
        if self.use_mask:
            if mask is None:
                raise ValueError("this model was built with use_mask=True: pass mask=")
            x = torch.cat([x, mask.to(x.dtype)], dim=-1)
        last = (lengths.to(x.device).long() - 1).clamp(min=0)
        rows = torch.arange(n, device=x.device)
        out, _ = self.forward_lstm(x)
        h = out[rows, last]
        if self.backward_lstm is not None:
            back, _ = self.backward_lstm(reverse_within_length(x, lengths))
            h = torch.cat([h, back[rows, last]], dim=-1)
        y = self.head(h)
        return y.squeeze(-1) if self.num_classes <= 2 else y
