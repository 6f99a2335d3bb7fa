"""What the training loop needs from its launcher (:class:`WorkerEnv`), and a launcher-free one
reading the prepared Parquet directly (:func:`file_env`, for torchrun and tests). The Ray Train
entry point that builds a Ray-backed :class:`WorkerEnv` is
:func:`rectrain.launch.ray_launch.ray_train_worker`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from rectrain.config import JobConfig
from rectrain.data import storage
from rectrain.data.loader import FileShard


@dataclass
class WorkerEnv:
    """What the loop needs from its launcher.

    Attributes:
        rank, world: this process's rank and the number of ranks (process group already up).
        device: ``cpu`` or ``cuda:<local rank>``.
        shard: ``shard(split) -> source`` with ``source.tables(epoch)`` yielding this rank's
            Arrow tables of that split.
        report: called on every rank with each epoch's metrics (``ray.train.report``).
    """

    rank: int
    world: int
    device: torch.device
    shard: Callable[[str], object]
    report: Callable[[dict], None] = field(default=lambda m: None)


def file_env(cfg: JobConfig, rank: int, world: int, device=None) -> WorkerEnv:
    """A :class:`WorkerEnv` reading the prepared Parquet directly (torchrun / tests)."""
    return WorkerEnv(rank=rank, world=world, device=device or torch.device("cpu"),
                     shard=lambda split: FileShard(storage.join(cfg.prepared_dir, split),
                                                   rank, world))
