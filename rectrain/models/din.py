"""Deep Interest Network on the shared TorchRec front end."""

from __future__ import annotations

import torch

from rectrain.config import ModelSpec
from rectrain.data.features import Batch, FeatureLayout
from rectrain.models.base import RankingModel
from rectrain.models.layers import MLP, TargetAttention
from rectrain.models.sparse_arch import SparseArch
from rectrain.models.zoo_layers import SequenceEncoder


class DIN(RankingModel):
    """Deep Interest Network (Zhou et al., KDD 2018) over TorchRec embedding collections.

    - Pooled side features (user id, demographics, multi-hot genres, ...) go through the
      :class:`~rectrain.models.sparse_arch.SparseArch`'s ``EmbeddingBagCollection`` ->
      ``[B, E]`` each.
    - Each behaviour sequence in ``sequence_features`` shares a table with its source feature
      in the ``EmbeddingCollection`` (sequence embeddings, unpooled). The query is the
      concatenation of the source features' embeddings for the candidate (e.g. item id and
      genre, ``[B, k*E]``), the keys the concatenation of the sequences' embeddings
      (``[B, L, k*E]``), as DIN concatenates goods and category ids; the query attends over
      the keys with :class:`TargetAttention` (masked padding).
    - ``[pooled, candidate, attention output, other sequence-table features (sum-pooled), dense]``
      -> MLP (PReLU) -> one logit. ``model.attention_activation`` / ``model.mlp_activation``
      ``dice`` use the paper's Dice (:class:`~rectrain.models.layers.Dice`) instead of PReLU.
    - With ``model.sequence_encoder`` (``mean``/``cnn``/``gru``/``lstm``/``transformer``), the
      encoder's vector for the history (:class:`~rectrain.models.zoo_layers.SequenceEncoder`)
      is one more MLP input next to the attention output (target attention is kept).

    Embedding modules are created on ``sparse_device`` (use ``torch.device("meta")`` before
    sharding with DistributedModelParallel); dense layers on ``dense_device``.

    ``forward(batch)`` returns logits float32 ``[B]``, or ``[B, 1 + K]`` with ``K`` auxiliary
    ordinal heads (column 0 is the label; see :func:`~rectrain.models.base.main_logits`);
    ``forward_with_attention`` also returns the attention weights ``[B, L]``.
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec,
                 sparse_device: torch.device | None = None,
                 dense_device: torch.device | None = None):
        super().__init__(layout)
        E = self.E
        self.sparse = SparseArch(layout, spec.sequence_features, sparse_device)
        D = self.sparse.query_dim
        self.attention = TargetAttention(D, spec.attention_hidden, device=dense_device,
                                         activation=spec.attention_activation)
        in_dim = E * self.sparse.n_fields + D + layout.dense_dim
        # optional history encoder (model.sequence_encoder): its output is an extra MLP input
        # next to the target-attention output (attention stays; None = the original DIN)
        self.history_encoder = None
        if getattr(spec, "sequence_encoder", None):
            self.history_encoder = SequenceEncoder(
                spec.sequence_encoder, D, layout.max_sequence_length, kernel=spec.encoder_kernel,
                heads=spec.attention_heads, layers=spec.attention_layers, device=dense_device)
            in_dim += D
        self.mlp = MLP(in_dim, spec.mlp_hidden, activation=spec.mlp_activation,
                       dropout=spec.dropout, device=dense_device)
        self.head = self.label_head(self.mlp.out_dim, layout, dense_device)

    def forward_with_attention(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.sparse(batch)
        att, weights = self.attention(f.query, f.history, f.valid)
        parts = [f.pooled[n] for n in self.sparse.pooled_names] + [f.query, att]
        if self.history_encoder is not None:
            parts.append(self.history_encoder(f.history, f.valid))
        parts += f.other
        if self.layout.dense_dim:  # static: lets torch.fx trace the model (train pipeline)
            parts.append(f.dense)
        return self.logits(self.head(self.mlp(torch.cat(parts, dim=1)))), weights

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.forward_with_attention(batch)[0]
