"""Deep Interest Network on TorchRec embedding modules."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from rectrain.config import ModelSpec
from rectrain.data.features import Batch, FeatureLayout
from rectrain.models.layers import MLP, TargetAttention
from rectrain.models.zoo_layers import SequenceEncoder


class DIN(nn.Module):
    """Deep Interest Network (Zhou et al., KDD 2018) over TorchRec embedding collections.

    - Pooled side features (user id, demographics, multi-hot genres, ...) go through an
      ``EmbeddingBagCollection`` -> ``[B, E * n_pooled]``.
    - Each behaviour sequence in ``sequence_features`` shares a table with its source feature
      in an ``EmbeddingCollection`` (sequence embeddings, unpooled). The query is the
      concatenation of the source features' embeddings for the candidate (e.g. item id and
      genre, ``[B, k*E]``), the keys the concatenation of the sequences' embeddings
      (``[B, L, k*E]``), as DIN concatenates goods and category ids; the query attends over
      the keys with :class:`TargetAttention` (masked padding).
    - ``[pooled, candidate, attention output, other sequence-table features (sum-pooled), dense]``
      -> MLP (PReLU) -> one logit.
    - With ``model.sequence_encoder`` (``mean``/``cnn``/``gru``/``lstm``/``transformer``), the
      encoder's vector for the history (:class:`~rectrain.models.zoo_layers.SequenceEncoder`)
      is one more MLP input next to the attention output (target attention is kept).

    Embedding modules are created on ``sparse_device`` (use ``torch.device("meta")`` before
    sharding with DistributedModelParallel); dense layers on ``dense_device``.

    ``forward(batch)`` returns logits float32 ``[B]``, or ``[B, 1 + K]`` with ``K`` auxiliary
    ordinal heads (column 0 is the label; see :func:`~rectrain.models.base.main_logits`); ``forward_with_attention``
    also returns the attention weights ``[B, L]``.
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec,
                 sparse_device: torch.device | None = None,
                 dense_device: torch.device | None = None):
        super().__init__()
        E = layout.embedding_dim
        self.layout = layout
        by_name = {f.name: f for f in layout.sequence}
        self.seqs = list(spec.sequence_features)
        self.queries = [by_name[s].source for s in self.seqs]
        k = len(self.seqs)
        self.max_len = layout.max_sequence_length
        self.n_pooled = len(layout.pooled)
        self.pooled_names = [f.name for f in layout.pooled]
        self.seq_names = [f.name for f in layout.sequence]
        self.other_seq = [n for n in self.seq_names if n not in self.queries + self.seqs]
        self.ebc = (EmbeddingBagCollection(tables=layout.ebc_tables(), device=sparse_device)
                    if layout.pooled else None)
        self.ec = EmbeddingCollection(tables=layout.ec_tables(), device=sparse_device)
        self.attention = TargetAttention(k * E, spec.attention_hidden, device=dense_device)
        in_dim = E * (self.n_pooled + 2 * k + len(self.other_seq)) + layout.dense_dim
        # optional history encoder (model.sequence_encoder): its output is an extra MLP input
        # next to the target-attention output (attention stays; None = the original DIN)
        self.history_encoder = None
        if getattr(spec, "sequence_encoder", None):
            self.history_encoder = SequenceEncoder(
                spec.sequence_encoder, k * E, self.max_len, kernel=spec.encoder_kernel,
                heads=spec.attention_heads, layers=spec.attention_layers, device=dense_device)
            in_dim += k * E
        self.mlp = MLP(in_dim, spec.mlp_hidden, activation="prelu", dropout=spec.dropout,
                       device=dense_device)
        self.n_aux = len(layout.aux_thresholds)
        self.head = nn.Linear(self.mlp.out_dim, 1 + self.n_aux, device=dense_device)

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
        q = torch.cat([seqs[n].to_padded_dense(desired_length=1).squeeze(1)
                       for n in self.queries], dim=1)  # [B, k*E]
        keys = torch.cat([seqs[n].to_padded_dense(desired_length=self.max_len)
                          for n in self.seqs], dim=2)  # [B, L, k*E]
        steps = torch.arange(self.max_len, device=keys.device)
        # sequences of one event all have the same length (built from the same events)
        mask = steps.unsqueeze(0) < seqs[self.seqs[0]].lengths().unsqueeze(1)  # [B, L]
        att, weights = self.attention(q, keys, mask)
        parts += [q, att]
        if self.history_encoder is not None:
            parts.append(self.history_encoder(keys, mask))
        for name in self.other_seq:
            jt = seqs[name]
            parts.append(jt.to_padded_dense(desired_length=self.max_len).sum(1))
        if self.layout.dense_dim:  # static: lets torch.fx trace the model (train pipeline)
            parts.append(batch.dense)
        logits = self.head(self.mlp(torch.cat(parts, dim=1)))
        return (logits.squeeze(-1) if self.n_aux == 0 else logits), weights

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.forward_with_attention(batch)[0]
