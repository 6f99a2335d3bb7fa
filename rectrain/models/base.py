"""Output contracts of rectrain models.

- **Ranking** models (``task = "ranking"``: din, dlrm, dcnv2, bst, autoint) map a
  :class:`~rectrain.data.features.Batch` of ``B`` rows to logits float32 ``[B]``, or
  ``[B, 1 + K]`` with ``K`` auxiliary ordinal heads (column 0 is the label; with
  ``model.loss: mse`` it is the predicted label value, e.g. the rating).
- **Retrieval** models (``task = "retrieval"``: two_tower, sasrec) map a batch to
  ``(user vectors [n_queries, d], item vectors [B, d])`` float32; the training logit of a
  (user, item) pair is ``<u, v> / model.temperature``.
"""

from __future__ import annotations

import torch

RANKING, RETRIEVAL = "ranking", "retrieval"


def main_logits(out: torch.Tensor) -> torch.Tensor:
    """The label's logits ``[B]`` from a ranking model's output ``[B]`` or ``[B, 1 + K]``."""
    return out if out.dim() == 1 else out[:, 0]


def task_of(model_or_cls) -> str:
    """``"ranking"`` or ``"retrieval"``: the model class's ``task`` attribute (default
    ranking)."""
    return getattr(model_or_cls, "task", RANKING)
