"""Reusable dense layers for ranking models."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Multi-layer perceptron: ``[Linear -> activation -> Dropout] * len(hidden)``.

    Input float32 ``[..., in_dim]``, output ``[..., hidden[-1]]`` (``in_dim`` when ``hidden`` is
    empty). ``activation`` is ``"prelu"`` (DIN, Zhou et al. 2018, uses PReLU/Dice), ``"relu"`` or
    ``"sigmoid"``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, device: torch.device | None = None):
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h, device=device))
            layers.append({"relu": nn.ReLU, "prelu": nn.PReLU, "sigmoid": nn.Sigmoid}[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
            d = h
        super().__init__(*layers)
        self.out_dim = d
        if device is not None:
            self.to(device)


class TargetAttention(nn.Module):
    """DIN local activation unit (Zhou et al., "Deep Interest Network for Click-Through Rate
    Prediction", KDD 2018, Sec. 4.3).

    For query ``q`` (the candidate item) and keys ``k_t`` (the behaviour sequence), the weight of
    step t is ``w_t = MLP([q, k_t, q - k_t, q * k_t])`` (a scalar, *not* softmax-normalised, as in
    the paper) and the output is ``sum_t w_t * k_t`` over valid steps only.

    Args:
        dim: embedding dimension E.
        hidden: hidden sizes of the activation-unit MLP.

    Shapes: ``query`` float32 ``[B, E]``, ``keys`` float32 ``[B, L, E]``, ``mask`` bool
    ``[B, L]`` (True = real step). Returns ``(pooled [B, E], weights [B, L])``; padded steps have
    weight exactly 0, and a row with no valid step (empty history) pools to the zero vector.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 32), device=None):
        super().__init__()
        self.mlp = MLP(4 * dim, hidden, activation="prelu", device=device)
        self.out = nn.Linear(self.mlp.out_dim, 1, device=device)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor):
        q = query.unsqueeze(1).expand_as(keys)
        x = torch.cat([q, keys, q - keys, q * keys], dim=-1)
        w = self.out(self.mlp(x)).squeeze(-1)  # [B, L]
        w = w.masked_fill(~mask, 0.0)
        pooled = torch.bmm(w.unsqueeze(1), keys).squeeze(1)
        return pooled, w
