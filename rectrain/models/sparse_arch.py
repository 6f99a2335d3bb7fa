"""The TorchRec sparse front end of every rectrain model: :class:`SparseArch`.

A batch's ``KeyedJaggedTensor`` holds the pooled features' keys first, then the keys on
sequence tables (:attr:`FeatureLayout.sparse_keys`). ``SparseArch`` splits it, looks the pooled
keys up in an ``EmbeddingBagCollection`` and the sequence-table keys (behaviour sequences and the
candidate features they share a table with) in an ``EmbeddingCollection``, and returns one
:class:`SparseFeatures`. Named after TorchRec's ``SparseArch`` (torchrec.models.dlrm): the
models' dense layers sit on top of it, and DistributedModelParallel finds and shards its nested
EBC/EC (state-dict keys ``sparse.ebc.embedding_bags.<table>.weight``,
``sparse.ec.embeddings.<table>.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from rectrain.data.features import Batch, FeatureLayout
from rectrain.models.zch import make_sequence_ec


@dataclass
class SparseFeatures:
    """Looked-up inputs of one batch of ``B`` rows (all float32 unless said).

    Attributes:
        pooled: pooled feature name -> ``[B, E]`` (by name: a sharded EBC may order its output
            keys differently from the unsharded one).
        queries: the candidate's query features (one per behaviour sequence), ``[B, E]`` each.
        query: ``queries`` concatenated, ``[B, k*E]`` (``[B, 0]`` without sequence tables).
        history: the behaviour sequences concatenated per step, ``[B, L, k*E]``, padded at the
            end with zeros.
        valid: bool ``[B, L]``, True for real history steps (all sequences of one event have
            the same length: they are built from the same events).
        other: the other features on sequence tables, sum-pooled, ``[B, E]`` each.
        dense: the batch's dense features ``[B, D]`` (``D`` may be 0).
    """

    pooled: dict[str, torch.Tensor]
    queries: list[torch.Tensor]
    query: torch.Tensor
    history: torch.Tensor
    valid: torch.Tensor
    other: list[torch.Tensor]
    dense: torch.Tensor


class SparseArch(nn.Module):
    """Pooled and sequence embeddings of a batch.

    Args:
        layout: the job's features (tables from :meth:`FeatureLayout.ebc_tables` /
            :meth:`FeatureLayout.ec_tables`).
        sequence_features: behaviour sequences making up ``history`` (``model.sequence_features``).
        sparse_device: device of the tables (``torch.device("meta")`` before DMP sharding).
        queries: candidate features making up ``query``; default: each sequence's ``source``
            (the feature it shares a table with, e.g. ``item_id`` for ``hist_item_id``).
        pooled: False skips the EBC (a model that ignores pooled features, e.g. SASRec; their
            keys are still split off the KJT).

    ``forward(batch) -> SparseFeatures``. With no sequence table (a Criteo-style dlrm job,
    ``sequence_features`` empty) there is no EC; ``query``/``history``/``valid`` are empty
    (``[B, 0]``, ``[B, 0, 0]``, ``[B, 0]``).

    Raises:
        ValueError: a name in ``sequence_features`` / ``queries`` is not a feature on a sequence
            table (names the ``model.*`` field).
    """

    def __init__(self, layout: FeatureLayout, sequence_features: Sequence[str],
                 sparse_device: torch.device | None = None,
                 queries: Sequence[str] | None = None, pooled: bool = True):
        super().__init__()
        by_name = {f.name: f for f in layout.sequence}
        for i, s in enumerate(sequence_features):
            if s not in by_name or by_name[s].kind != "sequence":
                raise ValueError(f"model.sequence_features.{i}: {s!r} is not a behaviour sequence "
                                 f"(sequence-table features: {sorted(by_name)})")
        self.seqs = list(sequence_features)
        self.queries = (list(queries) if queries is not None
                        else [by_name[s].source for s in self.seqs])
        for n in self.queries:
            if n not in by_name:
                raise ValueError(f"candidate feature {n!r} (model.item_feature) is not on a "
                                 f"sequence table (sequence-table features: {sorted(by_name)})")
        self.E = layout.embedding_dim
        self.max_len = layout.max_sequence_length
        self.n_pooled = len(layout.pooled)
        self.pooled_names = [f.name for f in layout.pooled]
        self.seq_names = [f.name for f in layout.sequence]
        self.other_seq = [n for n in self.seq_names if n not in self.queries + self.seqs]
        self.ebc = (EmbeddingBagCollection(tables=layout.ebc_tables(), device=sparse_device)
                    if layout.pooled and pooled else None)
        zch = getattr(layout, "zch_tables", {})
        pooled_zch = sorted({f.table_name for f in layout.pooled} & set(zch))
        if pooled_zch:
            raise ValueError(f"features: zch tables {pooled_zch} are pooled (no behaviour "
                             f"sequence shares them); encoding zch is for sequence tables "
                             f"(rectrain/models/zch.py says why)")
        # zch: a ManagedCollisionEmbeddingCollection, whose forward returns (embeddings, None)
        self.zch = bool(zch) and bool(layout.sequence)
        self.ec = (make_sequence_ec(layout.ec_tables(), zch, sparse_device)
                   if layout.sequence else None)
        #: feature vectors of :meth:`fields`: pooled, queries, other sequence-table features
        self.n_fields = self.n_pooled + len(self.queries) + len(self.other_seq)
        self.query_dim = len(self.queries) * self.E

    def fields(self, f: SparseFeatures) -> list[torch.Tensor]:
        """Every feature as one ``[B, E]`` vector: pooled (job order), the candidate's query
        features, the other sequence-table features (:attr:`n_fields` of them)."""
        return [f.pooled[n] for n in self.pooled_names] + f.queries + f.other

    def forward(self, batch: Batch) -> SparseFeatures:
        kjt = batch.sparse
        # static branches (attributes, not data) keep the model fx-traceable (train pipeline)
        if self.ec is None:
            pooled = self.ebc(kjt).to_dict() if self.ebc is not None else {}
            B = batch.labels.shape[0]
            return SparseFeatures(
                pooled=pooled, queries=[], query=batch.dense.new_zeros((B, 0)),
                history=batch.dense.new_zeros((B, 0, 0)),
                valid=torch.zeros((B, 0), dtype=torch.bool, device=batch.dense.device),
                other=[], dense=batch.dense)
        if self.n_pooled:
            pooled_kjt, seq_kjt = kjt.split([self.n_pooled, len(self.seq_names)])
            pooled = self.ebc(pooled_kjt).to_dict() if self.ebc is not None else {}
        else:
            seq_kjt, pooled = kjt, {}
        seqs = self.ec(seq_kjt)
        if self.zch:
            seqs = seqs[0]
        queries = [seqs[n].to_padded_dense(desired_length=1).squeeze(1) for n in self.queries]
        history = torch.cat([seqs[n].to_padded_dense(desired_length=self.max_len)
                             for n in self.seqs], dim=2)
        steps = torch.arange(self.max_len, device=history.device)
        valid = steps.unsqueeze(0) < seqs[self.seqs[0]].lengths().unsqueeze(1)
        other = [seqs[n].to_padded_dense(desired_length=self.max_len).sum(1)
                 for n in self.other_seq]
        return SparseFeatures(pooled=pooled, queries=queries, query=torch.cat(queries, dim=1),
                              history=history, valid=valid, other=other, dense=batch.dense)
