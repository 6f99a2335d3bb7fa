"""One training step, two ways: plain (forward, loss, backward, optimiser step) or through
TorchRec's ``TrainPipelineSparseDist`` (``train.pipeline: sparse_dist``), which starts the next
batch's input distribution (the KJT all-to-all of sharded tables) before the current batch's
forward/backward, so communication overlaps compute (TorchRec, ``torchrec.distributed.
train_pipeline``).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from rectrain.data.features import Batch
from rectrain.models.base import main_logits


_BCE = nn.BCEWithLogitsLoss()


def loss_of(out: torch.Tensor, batch: Batch, aux_weight: float,
            label_loss: nn.Module = _BCE) -> torch.Tensor:
    """``label_loss`` (BCE, or MSE for ``model.loss: mse``) of the label head plus
    ``aux_weight`` × BCE of the auxiliary ordinal heads (when the model returns ``[B, 1 + K]``);
    a scalar float32 tensor."""
    loss = label_loss(main_logits(out), batch.labels)
    if out.dim() == 2:
        loss = loss + aux_weight * _BCE(out[:, 1:], batch.aux_labels)
    return loss


class Stepper:
    """Runs training steps of ``dmp`` over an iterator of :class:`Batch`.

    ``mode="plain"``: each :meth:`step` takes one batch; ``mode="sparse_dist"``: TorchRec's
    ``TrainPipelineSparseDist`` pulls batches from the iterator itself (one ahead).
    :meth:`steps` yields ``(loss, batch_size)`` per step until the iterator is exhausted; after
    that (or when the consumer stops early) the model is detached from the pipeline, so
    ``dmp(batch)`` works again for evaluation.
    ``before_step(i)`` runs before step ``i`` (e.g. the learning-rate schedule).
    ``forward_loss(model, batch) -> scalar`` runs the forward and the loss (a
    :class:`~rectrain.train.task.Task`'s ``loss``); default: BCE on the label (+ auxiliary
    heads) of a ranking model.
    """

    def __init__(self, dmp: nn.Module, optimizer, device: torch.device, aux_weight: float = 1.0,
                 mode: str = "plain",
                 forward_loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None):
        if mode not in ("plain", "sparse_dist"):
            raise ValueError(f"train.pipeline: unknown mode {mode!r}; use plain or sparse_dist")
        self.dmp, self.optimizer, self.device, self.mode = dmp, optimizer, device, mode
        self.forward_loss = forward_loss or (
            lambda model, batch: loss_of(model(batch), batch, aux_weight))
        self._pipe = None
        if mode == "sparse_dist":
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            def fwd(batch):
                loss = self.forward_loss(dmp, batch)
                return loss, (loss.detach(), batch.batch_size)

            self._pipe = TrainPipelineSparseDist(dmp, optimizer, device, custom_model_fwd=fwd)

    def steps(self, batches: Iterator[Batch], before_step: Callable[[int], None] = lambda i: None
              ) -> Iterator[tuple[torch.Tensor, int]]:
        i = 0
        if self._pipe is None:
            for batch in batches:
                batch = batch.to(self.device)
                before_step(i)
                loss = self.forward_loss(self.dmp, batch)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                i += 1
                yield loss.detach(), batch.batch_size
            return
        it = iter(batches)
        if not self._pipe._model_attached:
            self._pipe.attach(self.dmp)
        try:
            while True:
                before_step(i)
                try:
                    loss, n = self._pipe.progress(it)
                except StopIteration:
                    return
                i += 1
                yield loss, n
        finally:
            # give the model its own forward back (evaluation calls it directly); the next
            # epoch's first progress() rewrites it again
            self._pipe.detach()
            self._pipe.reset()
