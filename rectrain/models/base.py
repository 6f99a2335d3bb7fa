"""Output contracts of rectrain models, and the base classes that hold them.

- **Ranking** models (:class:`RankingModel`, ``task = "ranking"``: din, dlrm, dcnv2, bst,
  autoint) map a :class:`~rectrain.data.features.Batch` of ``B`` rows to logits float32 ``[B]``,
  or ``[B, 1 + K]`` with ``K`` auxiliary ordinal heads (column 0 is the label; with
  ``model.loss: mse`` it is the predicted label value, e.g. the rating). Their last layer is
  ``self.head`` (``nn.Linear``; ``init_regression_head`` sets its bias).
- **Retrieval** models (:class:`RetrievalModel`, ``task = "retrieval"``: two_tower, sasrec, hstu) map
  a batch to ``(user vectors [n_queries, d], item vectors [B, d])`` float32; the training logit
  of a (user, item) pair is ``<u, v> / model.temperature``. The sequential ones (sasrec, hstu)
  share :class:`NextItemModel`'s ``forward`` (last step or every step).

Every model embeds its batch with :class:`~rectrain.models.sparse_arch.SparseArch`
(``self.sparse``).
"""

from __future__ import annotations

import torch
from torch import nn

RANKING, RETRIEVAL = "ranking", "retrieval"


def main_logits(out: torch.Tensor) -> torch.Tensor:
    """The label's logits ``[B]`` from a ranking model's output ``[B]`` or ``[B, 1 + K]``."""
    return out if out.dim() == 1 else out[:, 0]


def label_prediction(out: torch.Tensor, regression: bool) -> torch.Tensor:
    """What a ranking model predicts for the label, float32 ``[B]`` from its output ``[B]`` or
    ``[B, 1 + K]``: the probability (sigmoid of the label logit) for ``model.loss: bce``, the
    predicted label value itself (e.g. the rating) for ``model.loss: mse`` (``regression``)."""
    logits = main_logits(out)
    return logits if regression else torch.sigmoid(logits)


class RecModel(nn.Module):
    """Base of every model: keeps the :class:`~rectrain.data.features.FeatureLayout` it was
    built for (``self.layout``) and its embedding dim ``self.E``."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self.E = layout.embedding_dim


class RankingModel(RecModel):
    """Base of the ranking models: ``task``, the label head and the output shape.

    Subclasses build ``self.head = self.label_head(in_dim, layout, device)`` last and return
    ``self.logits(self.head(x))`` from ``forward``.
    """

    task = RANKING

    def label_head(self, in_dim: int, layout, device=None) -> nn.Linear:
        """``nn.Linear(in_dim, 1 + K)``: the label logit and ``K = len(aux_thresholds)``
        auxiliary ordinal logits; also sets ``self.n_aux = K``."""
        self.n_aux = len(layout.aux_thresholds)
        return nn.Linear(in_dim, 1 + self.n_aux, device=device)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """The head's output ``[B, 1 + K]`` as the contract's ``[B]`` (``K = 0``) or
        ``[B, 1 + K]``."""
        return out.squeeze(-1) if self.n_aux == 0 else out


class RetrievalModel(RecModel):
    """Base of the retrieval models: ``task``, ``item_key`` (the candidate item feature),
    ``hist_key`` (the behaviour sequence on the same table) and ``temperature``.

    Raises:
        ValueError: see :meth:`retrieval_keys`.
    """

    task = RETRIEVAL
    temperature: float = 1.0

    def __init__(self, layout, spec):
        super().__init__(layout)
        self.retrieval_keys(layout, spec)

    def retrieval_keys(self, layout, spec) -> None:
        """Set ``item_key`` / ``hist_key`` from ``spec.item_feature`` and the first of
        ``spec.sequence_features``, checked against the layout (they must share a table).

        Raises:
            ValueError: naming the offending ``model.*`` field.
        """
        seq_by_name = {f.name: f for f in layout.sequence}
        item = spec.item_feature
        if item not in seq_by_name or seq_by_name[item].kind != "sparse":
            raise ValueError(f"model.item_feature: {item!r} must be a sparse feature on the "
                             f"table of a behaviour sequence; sequence-table features: "
                             f"{sorted(seq_by_name)}")
        hist = spec.sequence_features[0] if spec.sequence_features else None
        if hist not in seq_by_name:
            raise ValueError(f"model.sequence_features: the first must be a behaviour sequence "
                             f"on the table of {item!r}; got {list(spec.sequence_features)}")
        if seq_by_name[hist].table_name != seq_by_name[item].table_name:
            raise ValueError(f"model.sequence_features: {hist!r} must share table "
                             f"{seq_by_name[item].table_name!r} with model.item_feature {item!r}")
        self.item_key, self.hist_key = item, hist


class NextItemModel(RetrievalModel):
    """Base of the sequential next-item models (SASRec, HSTU): subclasses implement
    ``_outputs(features, n_queries, batch) -> [B, S, E]`` (per-step outputs of the behaviour
    sequence, right-aligned; ``batch`` for inputs beyond the embeddings, e.g. HSTU's
    timestamps) over ``self.sparse``; ``normalise`` (static) L2-normalises the item vectors.

    ``forward(batch, n_queries=None, all_steps=False)`` returns ``(h[:, -1] [n_queries, E],
    v [B, E])``, or with ``all_steps`` ``(h [n_queries, S, E], v)``: every step predicts the
    next item (Kang & McAuley 2018's objective).
    """

    normalise = False

    def sequence_outputs(self, batch) -> torch.Tensor:
        """Per-step outputs ``[B, S, E]`` (right-aligned; padded steps are 0)."""
        return self._outputs(self.sparse(batch), batch=batch)

    def forward(self, batch, n_queries: int | None = None, all_steps: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.sparse(batch)
        h = self._outputs(f, n_queries, batch)
        v = nn.functional.normalize(f.query, dim=-1) if self.normalise else f.query
        return (h, v) if all_steps else (h[:, -1], v)
