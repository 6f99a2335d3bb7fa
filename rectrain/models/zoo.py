"""Ranking model zoo on TorchRec embedding collections: DLRM, DCNv2, BST, AutoInt.

Every model looks its features up the way :class:`~rectrain.models.din.DIN` does (pooled side
features through an ``EmbeddingBagCollection``; the candidate item and the behaviour sequence,
which share the item table, unpooled through an ``EmbeddingCollection``), so DMP shards their
tables with the same planner and fused sparse optimisers. Dense layers come from
:mod:`rectrain.models.layers` and :mod:`rectrain.models.zoo_layers`.

All models take ``(layout, spec, sparse_device, dense_device)`` and return logits float32
``[B]``, or ``[B, 1 + K]`` with ``K`` auxiliary ordinal heads (column 0 is the label; see
:func:`~rectrain.models.din.main_logits`). With ``model.loss: mse`` column 0 is the predicted
label value (e.g. the rating). Each model's last layer is ``self.head`` (``nn.Linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from rectrain.config import ModelSpec
from rectrain.data.features import Batch, FeatureLayout
from rectrain.models.layers import MLP, TransformerEncoder
from rectrain.models.zoo_layers import (CrossNetV2, DotInteraction, SequenceEncoder,
                                        masked_mean)


@dataclass
class Embedded:
    """Looked-up inputs of one batch.

    Attributes:
        fields: per-feature vectors float32 ``[B, E]`` each: pooled features (job order), the
            candidate's query features (sources of ``model.sequence_features``), then other
            features on sequence tables (sum-pooled).
        query: the candidate's query features concatenated, ``[B, k*E]``.
        history: the behaviour sequences concatenated per step, ``[B, L, k*E]`` (padded at the
            end; padded steps are zero).
        valid: bool ``[B, L]``, True for real history steps.
        dense: float32 ``[B, D]`` (``D`` may be 0).
    """

    fields: list[torch.Tensor]
    query: torch.Tensor
    history: torch.Tensor
    valid: torch.Tensor
    dense: torch.Tensor


class FeatureEmbeddings(nn.Module):
    """The TorchRec embedding front end shared by the zoo models (tables on ``sparse_device``;
    ``torch.device("meta")`` before DMP). ``forward(batch) -> Embedded``."""

    def __init__(self, layout: FeatureLayout, spec: ModelSpec, sparse_device=None):
        super().__init__()
        self.E = layout.embedding_dim
        by_name = {f.name: f for f in layout.sequence}
        self.seqs = list(spec.sequence_features)
        self.queries = [by_name[s].source for s in self.seqs]
        self.max_len = layout.max_sequence_length
        self.n_pooled = len(layout.pooled)
        self.pooled_names = [f.name for f in layout.pooled]
        self.seq_names = [f.name for f in layout.sequence]
        self.other_seq = [n for n in self.seq_names if n not in self.queries + self.seqs]
        self.ebc = (EmbeddingBagCollection(tables=layout.ebc_tables(), device=sparse_device)
                    if layout.pooled else None)
        # no sequence table (a Criteo-style dlrm job): pooled features only
        self.ec = (EmbeddingCollection(tables=layout.ec_tables(), device=sparse_device)
                   if layout.sequence else None)
        self.n_fields = self.n_pooled + len(self.queries) + len(self.other_seq)
        self.query_dim = len(self.seqs) * self.E

    def forward(self, batch: Batch) -> Embedded:
        kjt = batch.sparse
        if self.ec is None:
            pooled = self.ebc(kjt).to_dict()
            B = batch.labels.shape[0]
            empty = batch.dense.new_zeros((B, 0, 0))
            return Embedded(fields=[pooled[n] for n in self.pooled_names],
                            query=batch.dense.new_zeros((B, 0)), history=empty,
                            valid=torch.zeros((B, 0), dtype=torch.bool, device=empty.device),
                            dense=batch.dense)
        if self.n_pooled:
            pooled_kjt, seq_kjt = kjt.split([self.n_pooled, len(self.seq_names)])
            pooled = self.ebc(pooled_kjt).to_dict()  # by name: sharded key order may differ
            fields = [pooled[n] for n in self.pooled_names]
        else:
            seq_kjt, fields = kjt, []
        seqs = self.ec(seq_kjt)
        queries = [seqs[n].to_padded_dense(desired_length=1).squeeze(1) for n in self.queries]
        history = torch.cat([seqs[n].to_padded_dense(desired_length=self.max_len)
                             for n in self.seqs], dim=2)
        steps = torch.arange(self.max_len, device=history.device)
        valid = steps.unsqueeze(0) < seqs[self.seqs[0]].lengths().unsqueeze(1)
        fields = fields + queries + [seqs[n].to_padded_dense(desired_length=self.max_len).sum(1)
                                     for n in self.other_seq]
        return Embedded(fields=fields, query=torch.cat(queries, dim=1), history=history,
                        valid=valid, dense=batch.dense)


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


def _head(in_dim: int, layout: FeatureLayout, device) -> nn.Linear:
    return nn.Linear(in_dim, 1 + len(layout.aux_thresholds), device=device)


def _out(logits: torch.Tensor, n_aux: int) -> torch.Tensor:
    return logits.squeeze(-1) if n_aux == 0 else logits


class DLRM(nn.Module):
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
        super().__init__()
        E = layout.embedding_dim
        self.emb = FeatureEmbeddings(layout, spec, sparse_device)
        k = len(self.emb.seqs)
        self.history = _history_encoder(layout, spec, k, dense_device)
        self.bottom = (MLP(layout.dense_dim, [*spec.bottom_mlp, E], "relu", device=dense_device)
                       if layout.dense_dim else None)
        n_vec = self.emb.n_fields + k + (1 if self.bottom is not None else 0)
        self.interaction = DotInteraction(n_vec)
        self.top = MLP(self.interaction.out_dim + n_vec * E, spec.mlp_hidden, "relu",
                       spec.dropout, device=dense_device)
        self.n_aux = len(layout.aux_thresholds)
        self.head = _head(self.top.out_dim, layout, dense_device)

    def forward(self, batch: Batch) -> torch.Tensor:
        e = self.emb(batch)
        vecs = list(e.fields)
        if self.history is not None:
            vecs += list(self.history(e.history, e.valid).split(self.emb.E, dim=1))
        if self.bottom is not None:
            vecs.append(self.bottom(e.dense))
        x = torch.stack(vecs, dim=1)  # [B, F, E]
        z = torch.cat([self.interaction(x), x.flatten(1)], dim=1)
        return _out(self.head(self.top(z)), self.n_aux)


class DCNv2(nn.Module):
    """DCN-V2 (Wang et al. 2021): ``x0 = [feature vectors, pooled history, dense]``, a cross
    network (:class:`~rectrain.models.zoo_layers.CrossNetV2`, full or low-rank
    ``model.cross_rank``) and a deep MLP, ``stacked`` (deep on the cross output) or ``parallel``
    (both on ``x0``, outputs concatenated) per ``model.cross_structure`` -> logit.
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec, sparse_device=None,
                 dense_device=None):
        super().__init__()
        E = layout.embedding_dim
        self.emb = FeatureEmbeddings(layout, spec, sparse_device)
        k = len(self.emb.seqs)
        self.history = _history_encoder(layout, spec, k, dense_device)
        d0 = (self.emb.n_fields + k) * E + layout.dense_dim
        self.cross = CrossNetV2(d0, spec.cross_layers, spec.cross_rank, device=dense_device)
        self.stacked = spec.cross_structure == "stacked"
        self.deep = MLP(d0, spec.mlp_hidden, "relu", spec.dropout, device=dense_device)
        out = self.deep.out_dim if self.stacked else self.deep.out_dim + d0
        self.n_aux = len(layout.aux_thresholds)
        self.head = _head(out, layout, dense_device)

    def forward(self, batch: Batch) -> torch.Tensor:
        e = self.emb(batch)
        x0 = torch.cat(e.fields + [self.history(e.history, e.valid), e.dense], dim=1)
        if self.stacked:
            z = self.deep(self.cross(x0))
        else:
            z = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return _out(self.head(z), self.n_aux)


class AutoInt(nn.Module):
    """AutoInt (Song et al., "AutoInt: Automatic Feature Interaction Learning via Self-Attentive
    Neural Networks", CIKM 2019): every field is one ``embedding_dim`` vector (sparse features,
    the candidate, the pooled history, and each dense feature ``j`` as ``x_j * v_j``), multi-head
    self-attention over the fields (:class:`~rectrain.models.layers.TransformerEncoder`, no
    padding: every field is present), flattened, then an MLP (AutoInt+ with a deep part) ->
    logit.
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec, sparse_device=None,
                 dense_device=None):
        super().__init__()
        E = layout.embedding_dim
        self.emb = FeatureEmbeddings(layout, spec, sparse_device)
        k = len(self.emb.seqs)
        self.history = _history_encoder(layout, spec, k, dense_device)
        self.dense_vectors = (nn.Parameter(torch.randn(layout.dense_dim, E, device=dense_device)
                                           * 0.01) if layout.dense_dim else None)
        n = self.emb.n_fields + k + layout.dense_dim
        self.attention = TransformerEncoder(E, heads=spec.attention_heads,
                                            layers=spec.attention_layers, dropout=0.0,
                                            max_len=0, device=dense_device)
        self.mlp = MLP(n * E, spec.mlp_hidden, "relu", spec.dropout, device=dense_device)
        self.n_aux = len(layout.aux_thresholds)
        self.head = _head(self.mlp.out_dim, layout, dense_device)

    def forward(self, batch: Batch) -> torch.Tensor:
        e = self.emb(batch)
        h = self.history(e.history, e.valid)
        vecs = e.fields + list(h.split(self.emb.E, dim=1))
        x = torch.stack(vecs, dim=1)  # [B, F, E]
        if self.dense_vectors is not None:
            x = torch.cat([x, e.dense.unsqueeze(-1) * self.dense_vectors], dim=1)
        x = x + self.attention(x)  # residual, as AutoInt's interacting layer
        return _out(self.head(self.mlp(x.flatten(1))), self.n_aux)


class BST(nn.Module):
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
        super().__init__()
        E = layout.embedding_dim
        self.emb = FeatureEmbeddings(layout, spec, sparse_device)
        D = self.emb.query_dim
        L = layout.max_sequence_length + 1
        self.kind = spec.sequence_encoder or "transformer"
        if self.kind == "transformer":
            self.positions = nn.Embedding(L, D, device=dense_device)
            self.encoder = TransformerEncoder(D, heads=spec.attention_heads,
                                              layers=spec.attention_layers, dropout=min(spec.dropout, 0.1), max_len=0, device=dense_device)
            seq_out = 2 * D
        else:
            self.encoder = SequenceEncoder(self.kind, D, L, kernel=spec.encoder_kernel,
                                           heads=spec.attention_heads,
                                           layers=spec.attention_layers, device=dense_device)
            seq_out = D
        in_dim = self.emb.n_fields * E + seq_out + layout.dense_dim
        self.mlp = MLP(in_dim, spec.mlp_hidden, "prelu", spec.dropout, device=dense_device)
        self.n_aux = len(layout.aux_thresholds)
        self.head = _head(self.mlp.out_dim, layout, dense_device)

    def forward(self, batch: Batch) -> torch.Tensor:
        e = self.emb(batch)
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
        x = torch.cat(e.fields + seq_parts + [e.dense], dim=1)
        return _out(self.head(self.mlp(x)), self.n_aux)
