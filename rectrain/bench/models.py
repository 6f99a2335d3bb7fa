"""Models for the benchmark's baselines.

- :class:`PlainDIN`: the same network as :class:`rectrain.models.din.DIN` (same
  :class:`~rectrain.models.layers.TargetAttention` and :class:`~rectrain.models.layers.MLP`, same
  table sizes) on plain ``nn.EmbeddingBag`` / ``nn.Embedding`` (``sparse=True`` gradients):
  path (a), "plain single-process PyTorch".
- :class:`PlainDLRM`: the registry's DLRM (Naumov et al. 2019, "Deep Learning Recommendation
  Model for Personalization and Recommendation Systems"; :class:`rectrain.models.zoo.DLRM`)
  on plain ``nn.EmbeddingBag`` tables, for the Criteo-shaped workload (no sequence).
- :func:`to_plain`: a :class:`~rectrain.data.features.Batch` (KJT) → the plain models' inputs,
  done before timing (the baseline gets its inputs in its own best format).
"""

from __future__ import annotations

import torch
from torch import nn

from rectrain.data.features import Batch, FeatureLayout
from rectrain.models.layers import MLP, TargetAttention

def to_plain(batch: Batch, layout: FeatureLayout) -> dict:
    """Per-feature tensors: pooled features ``(values int64 [N], offsets int64 [B])``, sequence
    features as padded ids int64 ``[B, L]`` (0 = padding) plus lengths ``[B]``, the candidate of
    each sequence table int64 ``[B]``; ``dense [B, D]``, ``labels [B]``, ``aux [B, K]``."""
    d = batch.sparse.to_dict()
    out = {"dense": batch.dense, "labels": batch.labels, "aux": batch.aux_labels}
    for f in layout.pooled:
        jt = d[f.name]
        out[f.name] = (jt.values(), jt.offsets()[:-1].long())
    for f in layout.sequence:
        jt = d[f.name]
        if f.kind == "sequence":
            L = layout.max_sequence_length
            out[f.name] = (torch.ops.fbgemm.jagged_1d_to_dense(
                jt.values(), jt.offsets(), L, 0), jt.lengths())
        else:
            out[f.name] = jt.values()
    return out


class PlainDIN(nn.Module):
    """DIN on plain PyTorch embeddings; ``forward(plain_inputs)`` → logits ``[B]`` or
    ``[B, 1 + K]`` exactly as :class:`rectrain.models.din.DIN`."""

    def __init__(self, layout: FeatureLayout, spec):
        super().__init__()
        E = layout.embedding_dim
        by_name = {f.name: f for f in layout.sequence}
        self.seqs = list(spec.sequence_features)
        self.queries = [by_name[s].source for s in self.seqs]
        self.pooled = [(f.name, f.table_name) for f in layout.pooled]
        others = [f.name for f in layout.sequence if f.name not in self.queries + self.seqs]
        if others:
            raise NotImplementedError(f"PlainDIN: extra sequence-table features {others}")
        self.table_of = {f.name: f.table_name for f in layout.sequence}
        self.bags = nn.ModuleDict({
            c.name: nn.EmbeddingBag(c.num_embeddings, E, mode=c.pooling.name.lower(),
                                    sparse=True) for c in layout.ebc_tables()})
        self.embs = nn.ModuleDict({c.name: nn.Embedding(c.num_embeddings, E, sparse=True)
                                   for c in layout.ec_tables()})
        self.attention = TargetAttention(len(self.seqs) * E, spec.attention_hidden)
        in_dim = E * (len(self.pooled) + 2 * len(self.seqs)) + layout.dense_dim
        self.mlp = MLP(in_dim, spec.mlp_hidden, activation="prelu", dropout=spec.dropout)
        self.n_aux = len(layout.aux_thresholds)
        self.head = nn.Linear(self.mlp.out_dim, 1 + self.n_aux)

    def forward(self, x: dict) -> torch.Tensor:
        parts = [self.bags[t](*x[n]) for n, t in self.pooled]
        q = torch.cat([self.embs[self.table_of[n]](x[n]) for n in self.queries], dim=1)
        keys = torch.cat([self.embs[self.table_of[n]](x[n][0]) for n in self.seqs], dim=2)
        L = keys.shape[1]
        # on the keys' device: a CPU arange against CUDA lengths fails on a GPU
        steps = torch.arange(L, device=keys.device)
        mask = steps.unsqueeze(0) < x[self.seqs[0]][1].unsqueeze(1)
        att, _ = self.attention(q, keys, mask)
        parts += [q, att]
        if x["dense"].shape[1]:
            parts.append(x["dense"])
        logits = self.head(self.mlp(torch.cat(parts, dim=1)))
        return logits.squeeze(-1) if self.n_aux == 0 else logits


class PlainDLRM(nn.Module):
    """rectrain's registry :class:`~rectrain.models.zoo.DLRM` (no behaviour sequence: the
    Criteo setting) on plain ``nn.EmbeddingBag`` tables with sparse gradients: bottom MLP on the
    dense features to ``E``, pairwise dot interaction of the pooled features and the bottom
    output (upper triangle), top MLP on ``[interactions, vectors]``; the same layers and sizes
    (``model.bottom_mlp``, ``model.mlp_hidden``) as the registry model. ``forward`` → logits
    ``[B]``."""

    def __init__(self, layout: FeatureLayout, spec):
        super().__init__()
        from rectrain.models.zoo_layers import DotInteraction

        E = layout.embedding_dim
        if layout.sequence:
            raise NotImplementedError("PlainDLRM: workloads without behaviour sequences only")
        self.names = [(f.name, f.table_name) for f in layout.pooled]
        self.bags = nn.ModuleDict({
            c.name: nn.EmbeddingBag(c.num_embeddings, E, mode=c.pooling.name.lower(),
                                    sparse=True) for c in layout.ebc_tables()})
        self.bottom = (MLP(layout.dense_dim, [*spec.bottom_mlp, E], "relu")
                       if layout.dense_dim else None)
        n_vec = len(self.names) + (1 if self.bottom is not None else 0)
        self.interaction = DotInteraction(n_vec)
        self.top = MLP(self.interaction.out_dim + n_vec * E, spec.mlp_hidden, "relu",
                       spec.dropout)
        self.n_aux = len(layout.aux_thresholds)
        self.head = nn.Linear(self.top.out_dim, 1 + self.n_aux)

    def forward(self, x: dict) -> torch.Tensor:
        vecs = [self.bags[t](*x[n]) for n, t in self.names]
        if self.bottom is not None:
            vecs.append(self.bottom(x["dense"]))
        v = torch.stack(vecs, dim=1)  # [B, F, E]
        logits = self.head(self.top(torch.cat([self.interaction(v), v.flatten(1)], dim=1)))
        return logits.squeeze(-1) if self.n_aux == 0 else logits
