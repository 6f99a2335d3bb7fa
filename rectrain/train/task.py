"""The seam between the one training loop (:mod:`rectrain.train.loop`) and a model family.

A :class:`Task` says how a batch becomes a loss, how a split is evaluated, which number picks
the best epoch and what the test writes. :class:`~rectrain.train.ranking.RankingTask` serves
CTR/rating models (din, dlrm, dcnv2, bst, autoint), :class:`~rectrain.train.retrieval.
RetrievalTask` next-item/retrieval models (two_tower, sasrec); :func:`make_task` picks one by
the model's ``task`` attribute (:func:`rectrain.models.task_of`). Everything else
(sharding, the step pipeline, checkpoints, resume, fault handling, logging) is the loop's and
is the same for every task.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa
import torch

from rectrain.data.features import Batch


class Task(Protocol):
    """What the loop asks of a model family. All methods taking a source are collective (every
    rank calls them; results are identical on every rank)."""

    def to_batch(self, table: pa.Table) -> Batch:
        """Train rows (prepared-sample schema, ``B`` rows) -> the batch :meth:`loss` takes."""

    def start(self, step: int) -> None:
        """Called once before training, with the global step the run starts at (0: fresh)."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Forward ``batch`` through ``model`` (the DMP-wrapped model) -> scalar float32 loss."""

    def validate(self, model: torch.nn.Module, source) -> dict:
        """Metrics over ALL validation rows of all ranks (``source``: this rank's shard)."""

    def selection_score(self, vm: dict) -> float:
        """Higher is better; picks the best epoch (a NaN metric ranks below any real one)."""

    def epoch_record(self, vm: dict) -> dict:
        """The ``valid_*`` fields of an epoch's record in ``metrics.json``."""

    def describe(self, vm: dict) -> str:
        """A short log text of validation metrics ``vm``."""

    def scalars(self, vm: dict) -> dict[str, float]:
        """TensorBoard scalars of validation metrics ``vm`` (tag -> value)."""

    def test(self, model: torch.nn.Module, source, best_valid: dict
             ) -> tuple[dict, pa.Table, str]:
        """Score ALL test rows: ``(metrics, predictions, log text)``; ``metrics`` is merged
        into ``metrics.json``, ``predictions`` written to ``predictions/test.parquet``."""


def make_task(cfg, layout, manifest: dict, model, env) -> Task:
    """The task of ``model`` (``task_of(model)``: ``ranking`` or ``retrieval``)."""
    from rectrain.models import task_of
    from rectrain.models.base import RETRIEVAL

    if task_of(model) == RETRIEVAL:
        from rectrain.train.retrieval import RetrievalTask
        return RetrievalTask(cfg, layout, manifest, model, env)
    from rectrain.train.ranking import RankingTask
    return RankingTask(cfg, layout, manifest, model, env)
