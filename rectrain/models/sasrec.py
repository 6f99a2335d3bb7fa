"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018) on the shared
TorchRec front end (:class:`~rectrain.models.sparse_arch.SparseArch`, item table only), with the
shared :class:`~rectrain.models.layers.TransformerEncoder`."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rectrain.config import ModelSpec
from rectrain.data.encode import positions_in_lists
from rectrain.data.features import FeatureLayout
from rectrain.models.base import NextItemModel
from rectrain.models.layers import TransformerEncoder
from rectrain.models.sparse_arch import SparseArch, SparseFeatures


def right_align(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's ``lengths[b]`` leading steps to the end of the row.

    ``x`` ``[B, L, E]`` left-aligned (valid steps first, as ``to_padded_dense`` gives),
    ``lengths`` int ``[B]``. Returns ``(y [B, L, E], valid bool [B, L])`` where the most recent
    step of every row sits at position ``L - 1`` (as SASRec pads on the left), so learned
    position embeddings count back from the most recent item.
    """
    B, L, _ = x.shape
    steps = torch.arange(L, device=x.device).unsqueeze(0)  # [1, L]
    shift = (L - lengths.to(torch.long)).unsqueeze(1)  # [B, 1]
    valid = steps >= shift
    src = (steps - shift).clamp(min=0)  # [B, L]
    y = torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    return y * valid.unsqueeze(-1).to(x.dtype), valid


class SASRec(NextItemModel):
    """Causal transformer over the behaviour sequence predicting the next item.

    The history (item ids of the up-to-``L`` previous events, most recent last) is embedded with
    the item table, scaled by ``sqrt(E)``, right-aligned, given learned position embeddings and
    run through ``spec.seq_layers`` pre-norm causal self-attention blocks
    (:class:`TransformerEncoder`, padding masked). The output at the last step is the user
    vector ``u [B, E]``; the item vector ``v [B, E]`` is the row's item embedding from the
    **same** table (input and output embeddings shared, as in the paper), and the score of an
    item is ``<u, v>``. Only the item table is used; pooled side features in the batch are
    ignored (the paper's model uses item ids only).

    ``forward(batch, n_queries=None)`` returns ``(u [n_queries, E], v [B, E])`` float32 (the
    user side only for the first ``n_queries`` rows; all rows by default); with
    ``all_steps=True`` the first element is every step's output ``[n_queries, S, E]`` (training
    with the paper's objective: step ``s`` predicts the item at step ``s + 1``, the last step the
    row's own item; see :func:`next_item_targets`);
    :meth:`sequence_outputs` the per-step outputs ``[B, S, E]`` (``S = spec.seq_max_len``, the
    most recent steps) (step ``t`` sees steps ``<= t`` only). An empty history
    gives ``u = 0``.
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec,
                 sparse_device: torch.device | None = None,
                 dense_device: torch.device | None = None):
        super().__init__(layout, spec)
        E = self.E
        self.max_len = layout.max_sequence_length
        self.steps = min(spec.seq_max_len or self.max_len, self.max_len)
        self.temperature = 1.0
        # the paper's model uses item ids only: no EBC for the pooled features
        self.sparse = SparseArch(layout, [self.hist_key], sparse_device,
                                 queries=[self.item_key], pooled=False)
        self.encoder = TransformerEncoder(E, heads=spec.seq_heads, layers=spec.seq_layers,
                                          dropout=spec.seq_dropout, causal=True,
                                          max_len=self.steps, device=dense_device)
        self.dropout = nn.Dropout(spec.seq_dropout)

    def _outputs(self, f: SparseFeatures, n_queries: int | None = None,
                 batch=None) -> torch.Tensor:
        x = f.history[:n_queries]  # [B, L, E]
        x, valid = right_align(x, f.valid[:n_queries].sum(1))
        x, valid = x[:, -self.steps:], valid[:, -self.steps:]  # the most recent steps
        if n_queries == 0:  # item vectors only: nn.MultiheadAttention needs B > 0 (test the
            # argument, not the tensor, so TorchRec's fx trace of the forward can follow it)
            return x
        x = self.dropout(x * math.sqrt(x.shape[-1]))
        return self.encoder(x, valid)


def next_item_targets(hist: "pa.ListArray", items: np.ndarray, steps: int) -> np.ndarray:
    """int64 ``[B, S]`` next-item target of each step of the right-aligned last ``S = steps``
    history items: step ``s`` -> the history item at step ``s + 1``, the last step -> ``items``
    (the row's own item); 0 where step ``s`` holds no history item (padding). Vectorised over
    the list offsets of ``hist`` (Arrow ``list<int64>``, most recent last)."""
    hist = hist.combine_chunks() if isinstance(hist, pa.ChunkedArray) else hist
    offsets = hist.offsets.to_numpy()
    values = hist.flatten().to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    m = np.minimum(lengths, steps)  # items kept per row (the most recent)
    B = len(lengths)
    ids = np.zeros((B, steps + 1), dtype=np.int64)  # right-aligned history, then the item
    within = positions_in_lists(m)
    rows = np.repeat(np.arange(B), m)
    src = np.repeat(offsets[1:] - offsets[0] - m, m) + within
    ids[rows, np.repeat(steps - m, m) + within] = values[src]
    ids[:, steps] = items
    out = ids[:, 1:].copy()
    out[ids[:, :steps] == 0] = 0
    return out
