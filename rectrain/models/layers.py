"""Reusable dense layers for ranking models."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``[B, L, D]`` over valid steps (``valid`` bool ``[B, L]``) -> ``[B, D]``;
    an empty row gives zeros."""
    w = valid.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


class Dice(nn.Module):
    """Dice activation (Zhou et al., "Deep Interest Network", KDD 2018, Sec. 4.3, eq. 9):
    ``f(s) = p(s) * s + (1 - p(s)) * alpha * s`` with ``p(s) = sigmoid((s - E[s]) /
    sqrt(Var[s] + eps))``, a PReLU whose rectifier point follows the data.

    ``E[s]``/``Var[s]`` are per-channel batch statistics in training and their running averages
    in eval (``nn.BatchNorm1d(dim, affine=False)`` over every leading position, e.g. ``B * L``
    attention steps, padded ones included as in DeepCTR's ``Dice``); ``alpha`` is learned per
    channel (init 0). Input float32 ``[..., dim]`` -> same shape.
    """

    def __init__(self, dim: int, eps: float = 1e-8, device: torch.device | None = None):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, affine=False, device=device)
        self.alpha = nn.Parameter(torch.zeros(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.bn(x.reshape(-1, x.shape[-1]))).reshape(x.shape)
        return p * x + (1.0 - p) * self.alpha * x


class MLP(nn.Sequential):
    """Multi-layer perceptron: ``[Linear -> activation -> Dropout] * len(hidden)``.

    Input float32 ``[..., in_dim]``, output ``[..., hidden[-1]]`` (``in_dim`` when ``hidden`` is
    empty). ``activation`` is ``"prelu"``, ``"dice"`` (:class:`Dice`; DIN, Zhou et al. 2018, uses
    PReLU/Dice), ``"relu"`` or ``"sigmoid"``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, device: torch.device | None = None):
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h, device=device))
            layers.append(Dice(h) if activation == "dice" else
                          {"relu": nn.ReLU, "prelu": nn.PReLU, "sigmoid": nn.Sigmoid}[activation]())
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
        activation: the activation-unit MLP's activation, ``"prelu"`` or ``"dice"`` (the paper's;
            its batch statistics are taken over the valid steps only).

    Shapes: ``query`` float32 ``[B, E]``, ``keys`` float32 ``[B, L, E]``, ``mask`` bool
    ``[B, L]`` (True = real step). Returns ``(pooled [B, E], weights [B, L])``; padded steps have
    weight exactly 0, and a row with no valid step (empty history) pools to the zero vector.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 32), device=None,
                 activation: str = "prelu"):
        super().__init__()
        self.dice = activation == "dice"
        self.mlp = MLP(4 * dim, hidden, activation=activation, device=device)
        self.out = nn.Linear(self.mlp.out_dim, 1, device=device)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor):
        q = query.unsqueeze(1).expand_as(keys)
        x = torch.cat([q, keys, q - keys, q * keys], dim=-1)
        if self.dice:  # only valid steps: Dice's batch statistics must not see padding
            w = x.new_zeros(mask.shape)
            w[mask] = self.out(self.mlp(x[mask])).squeeze(-1)
        else:
            w = self.out(self.mlp(x)).squeeze(-1)  # [B, L]
            w = w.masked_fill(~mask, 0.0)
        pooled = torch.bmm(w.unsqueeze(1), keys).squeeze(1)
        return pooled, w


def attention_mask(valid: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Boolean "may attend" mask ``[B, L, L]`` for self-attention over padded sequences.

    ``valid`` bool ``[B, L]`` (True = real step). Query ``i`` may attend key ``j`` when key ``j``
    is valid and, with ``causal``, ``j <= i``. A query that would see no key at all (a padded
    step, or every step of an empty sequence) is allowed to attend to itself, so softmax never
    sees an all-masked row (which gives NaN); such outputs are zeroed by the caller.
    """
    L = valid.shape[1]
    allowed = valid.unsqueeze(1).expand(-1, L, -1)  # [B, Lq, Lk]
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=valid.device)
    empty = ~allowed.any(-1, keepdim=True)  # [B, L, 1]
    return allowed | (empty & eye)


class TransformerEncoder(nn.Module):
    """Stack of pre-norm transformer blocks (Vaswani et al. 2017) over padded sequences, with
    padding and optional causal masks: the self-attention block of BST (Chen et al. 2019),
    SASRec (Kang & McAuley 2018) and AutoInt (Song et al. 2019, over feature fields).

    Built on ``torch.nn.TransformerEncoderLayer`` (``batch_first``, ``norm_first``). Optional
    learned absolute position embeddings (``max_len`` > 0).

    Shapes: ``x`` float32 ``[B, L, D]``, ``valid`` bool ``[B, L]`` (True = real step; None =
    all valid). Returns ``[B, L, D]``; padded steps are exactly 0 and never influence valid
    steps; an empty sequence gives all zeros, never NaN. With ``causal`` step t sees only
    steps <= t. Raises ``ValueError`` if ``D`` is not divisible by ``heads``.
    """

    def __init__(self, dim: int, heads: int = 2, layers: int = 1, ff_mult: int = 4,
                 dropout: float = 0.0, causal: bool = False, max_len: int = 0, device=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"TransformerEncoder: dim {dim} not divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ff_mult * dim, dropout=dropout,
                                       batch_first=True, norm_first=True, device=device)
            for _ in range(layers))
        self.positions = nn.Embedding(max_len, dim, device=device) if max_len else None
        self.norm = nn.LayerNorm(dim, device=device)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        if valid is None:
            valid = torch.ones(B, L, dtype=torch.bool, device=x.device)
        if self.positions is not None:
            x = x + self.positions(torch.arange(L, device=x.device)).unsqueeze(0)
        allowed = attention_mask(valid, self.causal)
        # per-sample mask for nn.MultiheadAttention: [B * heads, L, L], True = blocked
        blocked = (~allowed).repeat_interleave(self.heads, dim=0)
        keep = valid.unsqueeze(-1).to(x.dtype)
        x = x * keep
        for block in self.blocks:
            x = block(x, src_mask=blocked) * keep
        return self.norm(x) * keep
