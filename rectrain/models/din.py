"""Deep Interest Network on TorchRec embedding modules."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from rectrain.config import ModelSpec
from rectrain.data.features import Batch, FeatureLayout
from rectrain.models.layers import MLP, TargetAttention


class DIN(nn.Module):
    """Deep Interest Network (Zhou et al., KDD 2018) over TorchRec embedding collections.

    - Pooled side features (user id, demographics, multi-hot genres, ...) go through an
      ``EmbeddingBagCollection`` -> ``[B, E * n_pooled]``.
    - The candidate item (``query_feature``) and the behaviour sequence (``sequence_feature``)
      share the item table in an ``EmbeddingCollection`` (sequence embeddings, unpooled); the
      candidate attends over the sequence with :class:`TargetAttention` (masked padding).
    - ``[pooled, candidate, attention output, other sequence-table features (sum-pooled), dense]``
      -> MLP (PReLU) -> one logit.

    Embedding modules are created on ``sparse_device`` (use ``torch.device("meta")`` before
    sharding with DistributedModelParallel); dense layers on ``dense_device``.

    ``forward(batch)`` returns logits float32 ``[B]``; ``forward_with_attention`` also returns the
    attention weights ``[B, L]``.
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec,
                 sparse_device: torch.device | None = None,
                 dense_device: torch.device | None = None):
        super().__init__()
        E = layout.embedding_dim
        self.layout = layout
        self.query = spec.query_feature
        self.seq = spec.sequence_feature
        self.max_len = layout.max_sequence_length
        self.n_pooled = len(layout.pooled)
        self.pooled_names = [f.name for f in layout.pooled]
        self.seq_names = [f.name for f in layout.sequence]
        self.other_seq = [n for n in self.seq_names if n not in (self.query, self.seq)]
        self.ebc = (EmbeddingBagCollection(tables=layout.ebc_tables(), device=sparse_device)
                    if layout.pooled else None)
        self.ec = EmbeddingCollection(tables=layout.ec_tables(), device=sparse_device)
        self.attention = TargetAttention(E, spec.attention_hidden, device=dense_device)
        self.mean_history = spec.mean_history
        self.fm = spec.fm
        # recency embedding P[r], r = 0 for the most recent step (dense parameter, Adam)
        self.position = (nn.Parameter(torch.zeros(self.max_len, E, device=dense_device))
                         if spec.position_embedding else None)
        in_dim = E * (self.n_pooled + 2 + len(self.other_seq) + int(self.mean_history)) \
            + layout.dense_dim
        self.mlp = MLP(in_dim, spec.mlp_hidden, activation="prelu", dropout=spec.dropout,
                       device=dense_device)
        self.head = nn.Linear(self.mlp.out_dim, 1, device=dense_device)

    def forward_with_attention(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        kjt = batch.sparse
        n_seq = len(self.seq_names)
        if self.n_pooled:
            pooled_kjt, seq_kjt = kjt.split([self.n_pooled, n_seq])
            # by name: a sharded EBC may order its output keys differently from the unsharded one
            pooled = self.ebc(pooled_kjt).to_dict()
            parts = [pooled[n] for n in self.pooled_names]
        else:
            seq_kjt, parts = kjt, []
        seqs = self.ec(seq_kjt)
        q = seqs[self.query].to_padded_dense(desired_length=1).squeeze(1)  # [B, E]
        hist = seqs[self.seq]
        keys = hist.to_padded_dense(desired_length=self.max_len)  # [B, L, E]
        steps = torch.arange(self.max_len, device=keys.device)
        mask = steps.unsqueeze(0) < hist.lengths().unsqueeze(1)  # [B, L]
        if self.position is not None:
            # keys are left-aligned: step t of a length-n history is n - 1 - t steps back
            recency = (hist.lengths().unsqueeze(1) - 1 - steps.unsqueeze(0)).clamp(min=0)
            keys = keys + self.position[recency] * mask.unsqueeze(-1)
        att, weights = self.attention(q, keys, mask)
        parts += [q, att]
        if self.mean_history:
            n = hist.lengths().clamp(min=1).unsqueeze(1).to(keys.dtype)
            parts.append(keys.sum(1) / n)  # padding rows are zeros; empty history -> zeros
        for name in self.other_seq:
            jt = seqs[name]
            parts.append(jt.to_padded_dense(desired_length=self.max_len).sum(1))
        if batch.dense.shape[1]:
            parts.append(batch.dense)
        logits = self.head(self.mlp(torch.cat(parts, dim=1))).squeeze(-1)
        if self.fm:
            # FM second-order term over field embeddings (Rendle 2010; DeepFM, Guo et al. 2017)
            fields = torch.stack([p for p in parts if p.shape[1] == keys.shape[2]], dim=1)
            logits = logits + 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(1)
        return logits, weights

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.forward_with_attention(batch)[0]
