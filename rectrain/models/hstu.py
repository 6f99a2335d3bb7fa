"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., "Actions Speak Louder than
Words: Trillion-Parameter Sequential Transducers for Generative Recommendations", ICML 2024,
arXiv 2402.17152), as a next-item retrieval model on the shared TorchRec front end
(:class:`~rectrain.models.sparse_arch.SparseArch`, item table only).

One HSTU layer (paper eqs. 1-3; written after the public reference
``generative_recommenders/research/modeling/sequential/hstu.py``, own code):

- pointwise projection ``U, V, Q, K = Split(SiLU(W · LayerNorm(X) + b))``;
- pointwise aggregated attention ``A = SiLU(Q Kᵀ + rab) / N`` (``N`` = the longest sequence)
  with a causal mask (no softmax: the weights are not normalised over the keys, so the
  amount of matching history is kept);
  ``rab`` = learned relative position bias (+ a bias per bucket of log time difference when
  timestamps are given);
- ``Y = X + W_o · Dropout(LayerNorm(A V) ⊙ U)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rectrain.config import ModelSpec
from rectrain.data.features import FeatureLayout
from rectrain.models.base import NextItemModel
from rectrain.models.sasrec import right_align
from rectrain.models.sparse_arch import SparseArch, SparseFeatures


def log_time_buckets(dt: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """int64 bucket of each time difference ``dt`` (any int/float tensor, seconds):
    ``floor(ln(max(|dt|, 1)) / 0.301)`` clamped to ``[0, num_buckets]``: one bucket per factor
    of ``e^0.301 ≈ 1.35`` (the reference's bucketisation, 128 buckets there)."""
    b = torch.log(dt.abs().to(torch.float32).clamp(min=1.0)) / 0.301
    return b.long().clamp(0, num_buckets)


class RelativeBias(nn.Module):
    """The attention bias ``rab`` of HSTU: one learned scalar per relative position ``j - i``
    (``2 S - 1`` of them), plus, with ``time_buckets > 0`` and timestamps, one per bucket of
    ``log |t_next(i) - t_j|`` (:func:`log_time_buckets`), where ``t_next(i)`` is the time of the
    item query step ``i`` predicts: step ``i + 1``'s time, and for the last step
    ``query_time`` (the time of the event asked for, e.g. the row's own ``_ts``; without it
    the last step's own time). As the reference's
    ``RelativeBucketedTimeAndPositionBasedBias`` (generative-recommenders,
    ``research/modeling/sequential/hstu.py``), which puts the target's timestamp after the
    history: so step ``i`` reads the time of step ``i + 1`` (never its item), and no time
    after it.

    ``forward(timestamps=None, query_time=None)``: ``timestamps`` int64 ``[B, N]``
    (``N = steps``; seconds, aligned with the steps, most recent last; padded steps any
    value: they are masked), ``query_time`` int64 ``[B]`` or None. Returns float32
    ``[1, N, N]`` (position only) or ``[B, N, N]``.
    """

    def __init__(self, steps: int, time_buckets: int = 0, device=None):
        super().__init__()
        self.steps, self.time_buckets = steps, time_buckets
        self.pos = nn.Parameter(torch.empty(2 * steps - 1, device=device).normal_(0, 0.02))
        self.time = (nn.Parameter(torch.empty(time_buckets + 1, device=device).normal_(0, 0.02))
                     if time_buckets else None)
        i = torch.arange(steps, device=device)
        # index of j - i in self.pos (a buffer of fixed size: TorchRec's fx trace of the forward
        # cannot build or slice a tensor by a traced shape)
        self.register_buffer("offset", i.unsqueeze(0) - i.unsqueeze(1) + steps - 1,
                             persistent=False)

    def forward(self, timestamps: torch.Tensor | None = None,
                query_time: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.pos[self.offset].unsqueeze(0)
        if timestamps is None or self.time is None:
            return bias
        last = timestamps[:, -1:] if query_time is None else query_time.unsqueeze(1)
        nxt = torch.cat([timestamps[:, 1:], last.to(timestamps.dtype)], dim=1)  # [B, N]
        buckets = log_time_buckets(nxt.unsqueeze(2) - timestamps.unsqueeze(1), self.time_buckets)
        return bias + self.time[buckets]


class HSTULayer(nn.Module):
    """One HSTU layer over right- or left-aligned padded sequences.

    Args:
        dim: model width ``D`` (the item embedding dim).
        heads: attention heads ``H``.
        qk_dim / v_dim: per-head width of ``Q, K`` / of ``U, V``.
        steps: the sequence length ``N`` (size of the relative position bias and the divisor
            of the attention weights; shorter sequences are padded to ``N``).
        dropout: on ``LayerNorm(A V) ⊙ U`` before the output projection.
        time_buckets: > 0 adds the relative time bias (used when ``forward`` gets timestamps).

    ``forward(x, valid, timestamps=None, query_time=None)``: ``x`` float32 ``[B, N, D]``,
    ``valid`` bool ``[B, N]`` (True = real step, right-aligned), ``timestamps`` int64 ``[B, N]``
    and ``query_time`` int64 ``[B]`` or None (see :class:`RelativeBias`). Returns float32
    ``[B, N, D]``; step ``t`` sees the items of steps ``<= t`` only (and the times up to step
    ``t + 1``'s, the time of the item it predicts); padded steps are exactly 0 and never
    influence real ones; an empty sequence gives zeros.
    """

    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int, steps: int,
                 dropout: float = 0.0, time_buckets: int = 0, device=None):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim, self.steps = heads, qk_dim, v_dim, steps
        self.norm_in = nn.LayerNorm(dim, device=device)
        self.uvqk = nn.Linear(dim, 2 * heads * (v_dim + qk_dim), device=device)
        self.rab = RelativeBias(steps, time_buckets, device=device)
        self.norm_attn = nn.LayerNorm(heads * v_dim, device=device)
        self.out = nn.Linear(heads * v_dim, dim, device=device)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.uvqk.weight, std=0.02)
        nn.init.zeros_(self.uvqk.bias)
        nn.init.xavier_uniform_(self.out.weight)
        self.register_buffer("causal", torch.ones(steps, steps, dtype=torch.bool,
                                                  device=device).tril(), persistent=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor,
                timestamps: torch.Tensor | None = None,
                query_time: torch.Tensor | None = None) -> torch.Tensor:
        H, dqk, dv = self.heads, self.qk_dim, self.v_dim
        u, v, q, k = torch.split(F.silu(self.uvqk(self.norm_in(x))),
                                 [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        scores = torch.einsum("bihd,bjhd->bhij", q.unflatten(-1, (H, dqk)),
                              k.unflatten(-1, (H, dqk)))  # [B, H, N, N]
        scores = scores + self.rab(timestamps, query_time).unsqueeze(1)
        allowed = (self.causal.unsqueeze(0) & valid.unsqueeze(1)).unsqueeze(1)
        # divided by the longest length, as the reference does (not by each row's)
        attn = F.silu(scores) / self.steps * allowed.to(x.dtype)  # [B, H, N, N]
        av = torch.einsum("bhij,bjhd->bihd", attn, v.unflatten(-1, (H, dv))).flatten(2)
        y = x + self.out(self.dropout(self.norm_attn(av) * u))
        return y * valid.unsqueeze(-1).to(x.dtype)


class HSTU(NextItemModel):
    """Next-item model: a stack of :class:`HSTULayer` over the behaviour sequence.

    The history (up to ``S = spec.seq_max_len`` most recent item ids, most recent last) is
    embedded with the item table, scaled by ``sqrt(E)``, right-aligned, given learned absolute
    position embeddings and dropout (the reference's input preprocessing), and run through
    ``spec.seq_layers`` HSTU layers and a final LayerNorm. The output at the last step is the
    user vector ``u [B, E]``; the item vector ``v [B, E]`` is the row's item embedding from the
    **same** table. With ``spec.temperature`` set both are L2-normalised and the training logit
    is ``<u, v> / temperature`` (the reference's cosine similarity); unset: ``<u, v>``.

    With ``spec.time_bias`` the layers add the relative time bias (:class:`RelativeBias`,
    ``spec.time_buckets`` log buckets) from ``batch.timestamps`` (the history's event times,
    right-aligned with the items) and ``batch.event_time``: step ``s`` uses the time of step
    ``s + 1``, the last step the row's own event time, i.e. the time of the item it predicts
    (the target's time, as the reference appends it; known when the request is made). The
    prepared folder must hold ``_hist_ts`` (prepare with ``time_bias`` on).

    ``forward(batch, n_queries=None, all_steps=False)`` returns ``(u [n_queries, E],
    v [B, E])`` float32 (the user side for the first ``n_queries`` rows; all by default); with
    ``all_steps=True`` the first element is every step's output ``[n_queries, S, E]`` (step
    ``s`` predicts the item at ``s + 1``, see :func:`rectrain.models.sasrec.next_item_targets`);
    :meth:`sequence_outputs` the per-step outputs ``[B, S, E]``. An empty history gives
    ``u = 0``.

    Raises:
        ValueError: ``seq_heads`` does not divide ``embedding_dim`` (when ``hstu_qk_dim`` /
            ``hstu_v_dim`` are unset), or the item / history features are wrong (see
            :meth:`RetrievalModel.retrieval_keys`).
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec,
                 sparse_device: torch.device | None = None,
                 dense_device: torch.device | None = None):
        super().__init__(layout, spec)
        E, H = self.E, spec.seq_heads
        if (spec.hstu_qk_dim is None or spec.hstu_v_dim is None) and E % H:
            raise ValueError(f"model.seq_heads: {H} does not divide model.embedding_dim {E} "
                             f"(or set model.hstu_qk_dim and model.hstu_v_dim)")
        self.steps = min(spec.seq_max_len or layout.max_sequence_length,
                         layout.max_sequence_length)
        self.time_bias = spec.time_bias  # static: the fx trace follows one branch
        self.normalise = spec.temperature is not None
        self.temperature = spec.temperature if self.normalise else 1.0
        self.sparse = SparseArch(layout, [self.hist_key], sparse_device,
                                 queries=[self.item_key], pooled=False)
        self.positions = nn.Embedding(self.steps, E, device=dense_device)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.layers = nn.ModuleList(
            HSTULayer(E, H, spec.hstu_qk_dim or E // H, spec.hstu_v_dim or E // H, self.steps,
                      dropout=spec.seq_dropout,
                      time_buckets=spec.time_buckets if spec.time_bias else 0,
                      device=dense_device)
            for _ in range(spec.seq_layers))
        self.norm = nn.LayerNorm(E, device=dense_device)
        self.dropout = nn.Dropout(spec.seq_dropout)

    def _outputs(self, f: SparseFeatures, n_queries: int | None = None,
                 batch=None) -> torch.Tensor:
        lengths = f.valid[:n_queries].sum(1)
        x, valid = right_align(f.history[:n_queries], lengths)
        x, valid = x[:, -self.steps:], valid[:, -self.steps:]  # the most recent steps
        if n_queries == 0:  # item vectors only (test the argument, not the tensor: fx trace)
            return x
        ts = now = None
        if self.time_bias:
            ts, _ = right_align(batch.timestamps[:n_queries].unsqueeze(-1), lengths)
            ts, now = ts[:, -self.steps:, 0], batch.event_time[:n_queries]
        keep = valid.unsqueeze(-1).to(x.dtype)
        x = self.dropout((x * math.sqrt(x.shape[-1]) + self.positions.weight) * keep)
        for layer in self.layers:
            x = layer(x, valid, ts, now)
        x = self.norm(x) * keep
        return F.normalize(x, dim=-1) if self.normalise else x
