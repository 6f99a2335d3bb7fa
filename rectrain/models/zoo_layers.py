"""Interaction layers and sequence encoders of the ranking model zoo (DLRM, DCNv2, BST, AutoInt,
and DIN's optional history encoder).

Sequences follow rectrain's convention: ``[B, L, D]`` float32 padded at the end, with ``valid``
bool ``[B, L]`` (True = a real step); a row may have no valid step at all (a user's first event).
Every layer here gives exactly the same output whatever the padded steps contain, and a finite
(zero) encoding for an empty sequence, never NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from rectrain.models.layers import TransformerEncoder, masked_mean

#: names accepted by ``model.sequence_encoder`` (see :class:`SequenceEncoder`)
SEQUENCE_ENCODERS = ("mean", "cnn", "gru", "lstm", "transformer")


def masked_max(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``x`` ``[B, L, D]`` over valid steps -> ``[B, D]``; an empty row
    gives zeros (its gradient is zero too)."""
    neg = torch.finfo(x.dtype).min
    m = x.masked_fill(~valid.unsqueeze(-1), neg).max(1).values
    return torch.where(valid.any(1, keepdim=True), m, torch.zeros_like(m))


class DotInteraction(nn.Module):
    """DLRM's feature interaction (Naumov et al., "Deep Learning Recommendation Model for
    Personalization and Recommendation Systems", 2019, Sec. 2-3): pairwise dot products of the
    feature vectors, keeping the strict upper triangle (each pair once, no self products).

    ``x`` float32 ``[B, F, E]`` (F feature vectors, the bottom-MLP output among them) ->
    ``[B, F * (F - 1) / 2]``, pairs in row-major order ``(0,1), (0,2), ..., (F-2,F-1)``.
    """

    def __init__(self, num_features: int):
        super().__init__()
        rows, cols = torch.triu_indices(num_features, num_features, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_dim = int(rows.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.bmm(x, x.transpose(1, 2))  # [B, F, F]
        return z[:, self.rows, self.cols]


class CrossNetV2(nn.Module):
    """Cross network of DCN-V2 (Wang et al., "DCN V2: Improved Deep & Cross Network and Practical
    Lessons for Web-scale Learning to Rank Systems", WWW 2021, Eq. 1):
    ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``, with full ``W_l`` (``[D, D]``) or, when ``rank``
    is set, the low-rank ``W_l = U_l V_l^T`` (``U, V``: ``[D, rank]``; the paper's Eq. 2 without
    the mixture of experts).

    ``x0`` float32 ``[B, D]`` -> ``[B, D]``.
    """

    def __init__(self, dim: int, layers: int = 3, rank: Optional[int] = None, device=None):
        super().__init__()
        self.rank = rank
        if rank:
            self.v = nn.ModuleList(nn.Linear(dim, rank, bias=False, device=device)
                                   for _ in range(layers))
            self.u = nn.ModuleList(nn.Linear(rank, dim, device=device) for _ in range(layers))
        else:
            self.w = nn.ModuleList(nn.Linear(dim, dim, device=device) for _ in range(layers))
        self.layers = layers
        self.out_dim = dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for i in range(self.layers):
            wx = self.u[i](self.v[i](x)) if self.rank else self.w[i](x)
            x = x0 * wx + x
        return x


class SequenceEncoder(nn.Module):
    """Encode a padded behaviour sequence into one vector, ``kind`` one of
    :data:`SEQUENCE_ENCODERS`:

    - ``mean``: masked mean pooling (no parameters).
    - ``cnn``: 1-D convolution over steps (kernel ``kernel``, "same" padding, ReLU; padded steps
      are zeroed before and after, so they equal the convolution's own zero padding) then masked
      max pooling (Kim 2014-style text CNN over items; Caser, Tang & Wang 2018, uses
      convolutions over the recent-item sequence).
    - ``gru`` / ``lstm``: a one-layer recurrent net over the valid steps only
      (``pack_padded_sequence``); the output is the last valid step's hidden state (GRU4Rec,
      Hidasi et al. 2016; DIEN's interest extractor, Zhou et al. 2019).
    - ``transformer``: :class:`~rectrain.models.layers.TransformerEncoder` (padding mask,
      learned positions) then masked mean pooling (BST, Chen et al. 2019).

    Shapes: ``x`` float32 ``[B, L, D]``, ``valid`` bool ``[B, L]`` with the valid steps first
    (rectrain pads at the end). Returns float32 ``[B, D]``; an empty sequence gives zeros.

    Raises:
        ValueError: unknown ``kind``.
    """

    def __init__(self, kind: str, dim: int, max_len: int, kernel: int = 3, heads: int = 2,
                 layers: int = 1, dropout: float = 0.0, device=None):
        super().__init__()
        if kind not in SEQUENCE_ENCODERS:
            raise ValueError(f"sequence encoder {kind!r} unknown; known: {SEQUENCE_ENCODERS}")
        self.kind = kind
        self.out_dim = dim
        if kind == "cnn":
            self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, device=device)
        elif kind in ("gru", "lstm"):
            cls = nn.GRU if kind == "gru" else nn.LSTM
            self.rnn = cls(dim, dim, batch_first=True, device=device)
        elif kind == "transformer":
            self.encoder = TransformerEncoder(dim, heads=heads, layers=layers, dropout=dropout,
                                              max_len=max_len, device=device)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        keep = valid.unsqueeze(-1).to(x.dtype)
        x = x * keep  # padded steps carry nothing, whatever the lookup returned
        if self.kind == "mean":
            return masked_mean(x, valid)
        if self.kind == "cnn":
            h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
            return masked_max(h, valid)
        if self.kind == "transformer":
            return masked_mean(self.encoder(x, valid), valid)
        lengths = valid.sum(1)
        # pack needs length >= 1: empty rows run one (zeroed) step and are zeroed afterwards
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, h = self.rnn(packed)
        h = (h[0] if self.kind == "lstm" else h)[-1]  # [B, D], last layer's final state
        return h * (lengths > 0).unsqueeze(-1).to(h.dtype)
