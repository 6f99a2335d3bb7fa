"""The training loop's state: one dataclass the loop owns and the Checkpointer saves/restores.

Everything a resumed run needs to continue as if it had never stopped lives here (the model,
the optimisers and the RNG are saved next to it by :mod:`rectrain.train.resume`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class Best:
    """The best epoch so far by the task's selection score (higher is better).

    Attributes:
        epoch: the epoch whose weights are in ``run_dir/checkpoint`` (-1: none yet).
        score: its selection score (``Task.selection_score``: validation AUC, -RMSE for
            ``loss: mse``, NDCG@10 for retrieval); ``-inf`` before the first validation.
        valid: its validation metrics, as the task computed them.
    """

    epoch: int = -1
    score: float = -math.inf
    valid: dict = field(default_factory=dict)


@dataclass
class EpochCarry:
    """The part of an epoch trained before a resume: its global rows, seconds and loss sum/count,
    so the epoch's record counts every row once."""

    rows: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    loss_n: int = 0


@dataclass
class TrainState:
    """Progress of one training run (identical on every rank).

    Attributes:
        epoch: the epoch being trained (after an epoch ends: the next one).
        step: global optimiser steps done (drives the learning-rate schedule).
        rows_done: rows of ``epoch``'s train order consumed (the resume position; non-zero only
            for a mid-epoch checkpoint, which needs the deterministic order).
        samples_seen: global train samples over all epochs (world size independent: a resume at
            another world size recomputes ``step`` from it).
        best: the best epoch (:class:`Best`).
        history: one record per finished epoch (the ``epochs`` list of ``metrics.json``).
        train_seconds, train_samples: totals over finished epochs (throughput in the metrics).
        carry: the current epoch's part trained before a resume (:class:`EpochCarry`).
    """

    epoch: int = 0
    step: int = 0
    rows_done: int = 0
    samples_seen: int = 0
    best: Best = field(default_factory=Best)
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    train_samples: int = 0
    carry: EpochCarry = field(default_factory=EpochCarry)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["best"]["score"] == -math.inf:  # JSON has no infinity
            d["best"]["score"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: ``d`` is not a saved state (checkpoints written before TrainState).
        """
        try:
            best = dict(d["best"])
            best["score"] = -math.inf if best.get("score") is None else best["score"]
            return cls(epoch=d["epoch"], step=d["step"], rows_done=d["rows_done"],
                       samples_seen=d["samples_seen"], best=Best(**best),
                       history=list(d["history"]), train_seconds=d["train_seconds"],
                       train_samples=d["train_samples"], carry=EpochCarry(**d["carry"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a rectrain TrainState (saved by an older version?): {e}") \
                from None
