"""Two-tower retrieval model (Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large
Corpus Item Recommendations", RecSys 2019) on TorchRec embedding collections, and the
log-Q-corrected in-batch sampled softmax it is trained with.

Retrieval models (this one and :class:`rectrain.models.sasrec.SASRec`, both
:class:`~rectrain.models.base.RetrievalModel`, ``task = "retrieval"``) map a
:class:`~rectrain.data.features.Batch` to ``(user_vectors [B, d], item_vectors [B, d])``: the query side of each row and the embedding of
the row's own item. Scores are ``<u, v> / temperature``. The training loop
(:mod:`rectrain.train.retrieval`) evaluates them by ranking every item of the corpus.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rectrain.config import ModelSpec
from rectrain.data.features import Batch, FeatureLayout
from rectrain.models.base import RetrievalModel
from rectrain.models.layers import MLP, masked_mean
from rectrain.models.sparse_arch import SparseArch


class TwoTower(RetrievalModel):
    """Two-tower retrieval model.

    - **User tower**: ``[pooled user features (user id, demographics...; EmbeddingBagCollection),
      mean of the behaviour sequence's item embeddings (EmbeddingCollection, item table)]``
      the query-side dense columns (plain dense features, text features' history means)]``
      -> MLP (ReLU) -> Linear -> L2-normalised ``u [B, d]``.
    - **Item tower**: ``[item id embedding (same item table), pooled item side features
      (genres, release year...), the item's text vectors (``text_embedding`` features)]``
      -> MLP (ReLU) -> Linear -> L2-normalised ``v [B, d]``. The text vector gives an item
      never seen in train (its id row untrained) a vector from its content, so it can still
      be retrieved. Columns split by :meth:`FeatureLayout.dense_sides`.

    ``d = spec.tower_hidden[-1]``; score = ``<u, v> / spec.temperature`` (cosine similarity with
    temperature, Yi et al. 2019 Sec. 4). Item table shared between the history and the item
    tower. Embedding modules on ``sparse_device`` (``meta`` before DMP sharding).

    ``forward(batch, n_queries=None)`` returns ``(u [n_queries, d], v [B, d])`` float32 (the
    user tower runs on the first ``n_queries`` rows only; all rows by default).

    Raises:
        ValueError: the item feature / history / user or item feature lists do not fit the
            layout (names the ``model.*`` field).
    """

    def __init__(self, layout: FeatureLayout, spec: ModelSpec,
                 sparse_device: torch.device | None = None,
                 dense_device: torch.device | None = None):
        super().__init__(layout, spec)
        E = self.E
        pooled = [f.name for f in layout.pooled]
        for i, n in enumerate(spec.item_features):
            if n not in pooled:
                raise ValueError(f"model.item_features.{i}: {n!r} is not a pooled feature "
                                 f"(pooled: {pooled})")
        self.item_pooled = list(spec.item_features)
        self.user_pooled = (list(spec.user_features) if spec.user_features is not None
                            else [n for n in pooled if n not in self.item_pooled])
        for i, n in enumerate(self.user_pooled):
            if n not in pooled:
                raise ValueError(f"model.user_features.{i}: {n!r} is not a pooled feature "
                                 f"(pooled: {pooled})")
        self.temperature = spec.temperature
        self.sparse = SparseArch(layout, [self.hist_key], sparse_device, queries=[self.item_key])
        *hidden, d = spec.tower_hidden
        user_cols, item_cols = layout.dense_sides()
        # index buffers: static widths, so TorchRec's fx trace (sparse-dist) can follow them
        self.register_buffer("user_dense", torch.tensor(user_cols, dtype=torch.long,
                                                        device=dense_device), persistent=False)
        self.register_buffer("item_dense", torch.tensor(item_cols, dtype=torch.long,
                                                        device=dense_device), persistent=False)
        self.n_user_dense, self.n_item_dense = len(user_cols), len(item_cols)
        u_in = E * (len(self.user_pooled) + 1) + len(user_cols)
        v_in = E * (len(self.item_pooled) + 1) + len(item_cols)
        self.user_mlp = MLP(u_in, hidden, activation="relu", dropout=spec.dropout,
                            device=dense_device)
        self.user_out = nn.Linear(self.user_mlp.out_dim, d, device=dense_device)
        self.item_mlp = MLP(v_in, hidden, activation="relu", dropout=spec.dropout,
                            device=dense_device)
        self.item_out = nn.Linear(self.item_mlp.out_dim, d, device=dense_device)

    def forward(self, batch: Batch, n_queries: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.sparse(batch)
        q = slice(None, n_queries)
        u_parts = [f.pooled[n][q] for n in self.user_pooled]
        u_parts.append(masked_mean(f.history[q], f.valid[q]))
        if self.n_user_dense:  # static, so TorchRec's fx trace (sparse-dist) can follow it
            u_parts.append(f.dense[q].index_select(1, self.user_dense))
        v_parts = [f.query] + [f.pooled[n] for n in self.item_pooled]  # item id [B, E] first
        if self.n_item_dense:
            v_parts.append(f.dense.index_select(1, self.item_dense))
        u = self.user_out(self.user_mlp(torch.cat(u_parts, dim=1)))
        v = self.item_out(self.item_mlp(torch.cat(v_parts, dim=1)))
        return F.normalize(u, dim=1), F.normalize(v, dim=1)


def in_batch_softmax_loss(u: torch.Tensor, v: torch.Tensor, item_ids: torch.Tensor,
                          temperature: float = 1.0, log_q: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """In-batch sampled softmax with log-Q correction (Yi et al., RecSys 2019, Eq. 3-4).

    Row ``i``'s positive is its own item ``v_i``; the other rows' items are the negatives. With
    ``s_ij = <u_i, v_j> / temperature`` and ``q_j`` the probability of sampling item ``j`` (its
    frequency among training positives: an item enters a batch as often as it is a positive),
    the corrected logit is ``s_ij - log q_j`` and the loss is the mean over rows of
    ``-log softmax_j(s_ij - log q_j)[j = i]``. Columns ``j != i`` that hold the same item as row
    ``i`` (accidental hits) are masked out, so an item is never its own negative.

    Args:
        u, v: float ``[B, d]`` query and item vectors.
        item_ids: int64 ``[B]`` item of each row (for the accidental-hit mask).
        temperature: divides the dot products.
        log_q: float ``[B]`` ``log q`` of each row's item, or None (no correction).

    Returns:
        scalar float32 loss (nats).
    """
    logits = u @ v.t() / temperature
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(u), device=u.device))
