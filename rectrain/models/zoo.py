"""Ranking model zoo on TorchRec embedding collections: DLRM, DCNv2, BST, AutoInt.

Every model looks its features up with :class:`~rectrain.models.sparse_arch.SparseArch`
(``self.sparse``: pooled side features through an ``EmbeddingBagCollection``; the candidate item
and the behaviour sequence, which share the item table, unpooled through an
``EmbeddingCollection``), so DMP shards their tables with the same planner and fused sparse
optimisers. Dense layers come from
:mod:`rectrain.models.layers` and :mod:`rectrain.models.zoo_layers`.

All models take ``(layout, spec, sparse_device, dense_device)`` and return logits float32
``[B]``, or ``[B, 1 + K]`` with ``K`` auxiliary ordinal heads (column 0 is the label; see
:func:`~rectrain.models.base.main_logits`). With ``model.loss: mse`` column 0 is the predicted
label value (e.g. the rating). Each model's last layer is ``self.head`` (``nn.Linear``).
"""

from __future__ import annotations

import torch
from torch import nn

from rectrain.config import ModelSpec
from rectrain.data.features import Batch, FeatureLayout
from rectrain.models.base import RankingModel
from rectrain.models.layers import MLP, TransformerEncoder, masked_mean
from rectrain.models.sparse_arch import SparseArch
from rectrain.models.zoo_layers import CrossNetV2, DotInteraction, SequenceEncoder


def _history_encoder(layout: FeatureLayout, spec: ModelSpec, k: int, dense_device=None):
    """The pooled-history encoder of DLRM, DCNv2 and AutoInt: ``model.sequence_encoder``
    (default ``mean``) over the ``k`` concatenated behaviour sequences (width ``k * E``);
    None when the job has no behaviour sequence (``k == 0``, a Criteo-style dlrm job)."""
    if not k:
        return None
    return SequenceEncoder(spec.sequence_encoder or "mean", k * layout.embedding_dim,
                           layout.max_sequence_length, kernel=spec.encoder_kernel,
                           heads=spec.attention_heads, layers=spec.attention_layers,
                           device=dense_device)


class _PooledHistoryRanker(RankingModel):
    """The front of DLRM, DCNv2 and AutoInt: ``self.sparse`` (:class:`SparseArch` over
    ``model.sequence_features``), ``self.k`` behaviour sequences and ``self.history``, their
    pooled encoder (:func:`_history_encoder`; None without a sequence)."""

    def __init__(self, layout: FeatureLayout, spec: ModelSpec, sparse_device=None,
                 dense_device=None):
        super().__init__(layout)
        self.sparse = SparseArch(layout, spec.sequence_features, sparse_device)
        self.k = len(self.sparse.seqs)
        self.history = _history_encoder(layout, spec, self.k, dense_device)


class DLRM(_PooledHistoryRanker):
    """DLRM (Naumov et al. 2019): bottom MLP on the dense features (to ``embedding_dim``), the
    feature vectors (pooled features, candidate, the history pooled by
    ``model.sequence_encoder``, default ``mean``), pairwise dot interaction (upper triangle),
    top MLP -> logit.

    Deviation: the top MLP sees ``[bottom output, interactions, feature vectors]``; the paper
    concatenates only the bottom output with the interactions, which leaves no first-order term
    when a job has no dense feature (MovieLens has none). With no behaviour sequence
    (``model.sequence_features: []``, the Criteo setting) the vectors are the pooled features
    and the bottom MLP's output.
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec, sparse_device=None,
                 dense_device=None):
        super().__init__(layout, spec, sparse_device, dense_device)
        E, k = self.E, self.k
        self.bottom = (MLP(layout.dense_dim, [*spec.bottom_mlp, E], "relu", device=dense_device)
                       if layout.dense_dim else None)
        n_vec = self.sparse.n_fields + k + (1 if self.bottom is not None else 0)
        self.interaction = DotInteraction(n_vec)
        self.top = MLP(self.interaction.out_dim + n_vec * E, spec.mlp_hidden, "relu",
                       spec.dropout, device=dense_device)
        self.head = self.label_head(self.top.out_dim, layout, dense_device)

    def forward(self, batch: Batch) -> torch.Tensor:
        e = self.sparse(batch)
        vecs = self.sparse.fields(e)
        if self.history is not None:
            vecs += list(self.history(e.history, e.valid).split(self.sparse.E, dim=1))
        if self.bottom is not None:
            vecs.append(self.bottom(e.dense))
        x = torch.stack(vecs, dim=1)  # [B, F, E]
        z = torch.cat([self.interaction(x), x.flatten(1)], dim=1)
        return self.logits(self.head(self.top(z)))


class DCNv2(_PooledHistoryRanker):
    """DCN-V2 (Wang et al. 2021): ``x0 = [feature vectors, pooled history, dense]``, a cross
    network (:class:`~rectrain.models.zoo_layers.CrossNetV2`, full or low-rank
    ``model.cross_rank``) and a deep MLP, ``stacked`` (deep on the cross output) or ``parallel``
    (both on ``x0``, outputs concatenated) per ``model.cross_structure`` -> logit.
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec, sparse_device=None,
                 dense_device=None):
        super().__init__(layout, spec, sparse_device, dense_device)
        E, k = self.E, self.k
        d0 = (self.sparse.n_fields + k) * E + layout.dense_dim
        self.cross = CrossNetV2(d0, spec.cross_layers, spec.cross_rank, device=dense_device)
        self.stacked = spec.cross_structure == "stacked"
        self.deep = MLP(d0, spec.mlp_hidden, "relu", spec.dropout, device=dense_device)
        out = self.deep.out_dim if self.stacked else self.deep.out_dim + d0
        self.head = self.label_head(out, layout, dense_device)

    def forward(self, batch: Batch) -> torch.Tensor:
        e = self.sparse(batch)
        x0 = torch.cat(self.sparse.fields(e) + [self.history(e.history, e.valid), e.dense], dim=1)
        if self.stacked:
            z = self.deep(self.cross(x0))
        else:
            z = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return self.logits(self.head(z))


class AutoInt(_PooledHistoryRanker):
    """AutoInt (Song et al., "AutoInt: Automatic Feature Interaction Learning via Self-Attentive
    Neural Networks", CIKM 2019): every field is one ``embedding_dim`` vector (sparse features,
    the candidate, the pooled history, and each dense feature ``j`` as ``x_j * v_j``), multi-head
    self-attention over the fields (:class:`~rectrain.models.layers.TransformerEncoder`, no
    padding: every field is present), flattened, then an MLP (AutoInt+ with a deep part) ->
    logit.
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec, sparse_device=None,
                 dense_device=None):
        super().__init__(layout, spec, sparse_device, dense_device)
        E, k = self.E, self.k
        self.dense_vectors = (nn.Parameter(torch.randn(layout.dense_dim, E, device=dense_device)
                                           * 0.01) if layout.dense_dim else None)
        n = self.sparse.n_fields + k + layout.dense_dim
        self.attention = TransformerEncoder(E, heads=spec.attention_heads,
                                            layers=spec.attention_layers, dropout=0.0,
                                            max_len=0, device=dense_device)
        self.mlp = MLP(n * E, spec.mlp_hidden, "relu", spec.dropout, device=dense_device)
        self.head = self.label_head(self.mlp.out_dim, layout, dense_device)

    def forward(self, batch: Batch) -> torch.Tensor:
        e = self.sparse(batch)
        h = self.history(e.history, e.valid)
        vecs = self.sparse.fields(e) + list(h.split(self.sparse.E, dim=1))
        x = torch.stack(vecs, dim=1)  # [B, F, E]
        if self.dense_vectors is not None:
            x = torch.cat([x, e.dense.unsqueeze(-1) * self.dense_vectors], dim=1)
        x = x + self.attention(x)  # residual, as AutoInt's interacting layer
        return self.logits(self.head(self.mlp(x.flatten(1))))


class BST(RankingModel):
    """Behavior Sequence Transformer (Chen et al., "Behavior Sequence Transformer for
    E-commerce Recommendation in Alibaba", DLP-KDD 2019): the candidate item is appended to the
    behaviour sequence (right after its last real step), a transformer runs over the sequence
    with learned position embeddings (position = distance to the candidate, so the candidate is
    0, the latest behaviour 1, ...), and ``[other features, candidate, the candidate's output,
    masked mean of all outputs, dense]`` -> MLP -> logit. The transformer's dropout is
    ``min(model.dropout, 0.1)`` (``model.dropout`` applies to the MLP).

    ``model.sequence_encoder`` other than ``transformer`` (``cnn``, ``gru``, ``lstm``,
    ``mean``) replaces the transformer: that encoder runs over the same history + candidate
    sequence and its pooled vector replaces the two transformer outputs.
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec, sparse_device=None,
                 dense_device=None):
        super().__init__(layout)
        E = self.E
        self.sparse = SparseArch(layout, spec.sequence_features, sparse_device)
        D = self.sparse.query_dim
        L = layout.max_sequence_length + 1
        self.kind = spec.sequence_encoder or "transformer"
        if self.kind == "transformer":
            self.positions = nn.Embedding(L, D, device=dense_device)
            self.encoder = TransformerEncoder(D, heads=spec.attention_heads,
                                              layers=spec.attention_layers,
                                              dropout=min(spec.dropout, 0.1), max_len=0,
                                              device=dense_device)
            seq_out = 2 * D
        else:
            self.encoder = SequenceEncoder(self.kind, D, L, kernel=spec.encoder_kernel,
                                           heads=spec.attention_heads,
                                           layers=spec.attention_layers, device=dense_device)
            seq_out = D
        in_dim = self.sparse.n_fields * E + seq_out + layout.dense_dim
        self.mlp = MLP(in_dim, spec.mlp_hidden, "prelu", spec.dropout, device=dense_device)
        self.head = self.label_head(self.mlp.out_dim, layout, dense_device)

    def forward(self, batch: Batch) -> torch.Tensor:
        e = self.sparse(batch)
        B, L, D = e.history.shape
        lengths = e.valid.sum(1)  # [B]
        seq = torch.cat([e.history * e.valid.unsqueeze(-1), e.history.new_zeros(B, 1, D)], dim=1)
        # the candidate goes right after the last real step: index lengths[b]
        seq = seq.scatter(1, lengths.view(B, 1, 1).expand(B, 1, D), e.query.unsqueeze(1))
        steps = torch.arange(L + 1, device=seq.device).unsqueeze(0)
        valid = steps <= lengths.unsqueeze(1)  # [B, L + 1]
        if self.kind == "transformer":
            dist = (lengths.unsqueeze(1) - steps).clamp(min=0)
            y = self.encoder(seq + self.positions(dist), valid)
            target = y.gather(1, lengths.view(B, 1, 1).expand(B, 1, D)).squeeze(1)
            seq_parts = [target, masked_mean(y, valid)]
        else:
            seq_parts = [self.encoder(seq, valid)]
        x = torch.cat(self.sparse.fields(e) + seq_parts + [e.dense], dim=1)
        return self.logits(self.head(self.mlp(x)))
