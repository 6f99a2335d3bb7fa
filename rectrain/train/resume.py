"""Periodic checkpoints, resume at the exact step, and the fault-injection hook.

:class:`Checkpointer` is what the training loop (``rectrain/train/loop.py``) calls:

- ``restore()`` at start: loads the checkpoint named by ``checkpoint.resume`` (``latest``, a URL,
  or ``auto`` = latest if any) into the sharded model and both optimisers (DCP reshards to the
  current world size and plan) and returns the loop's progress (epoch, step, best epoch,
  history, totals) and the data position;
- ``train_tables(epoch)`` gives this rank's train tables for the epoch, starting at the saved
  position when ``checkpoint.every_n_steps`` is set (deterministic order,
  :class:`~rectrain.data.order.GlobalOrder`), or ``None`` to keep Ray Data's streaming order;
- ``after_step(...)`` saves every ``every_n_steps`` global steps; ``end_epoch(...)`` saves after
  validation; both keep the newest ``keep_last`` checkpoints;
- ``finish_epoch_record(rec)`` adds the rows/time/loss of the part of an epoch trained before a
  resume, so ``metrics.json``'s per-epoch ``train_rows`` counts every row of the epoch once.

Checkpoint folders: ``run_dir/checkpoints/step-<8 digits>`` (atomic, see
:mod:`rectrain.checkpoint`). ``meta.json`` holds ``progress``: ``epoch`` and ``rows_done``
(the data position: rows of that epoch's permutation consumed), ``step``, ``samples_seen``, the
epoch's partial loss/rows/seconds, ``best``, ``history``, totals, the world size and each rank's
torch RNG state (restored when the world size is unchanged, so dropout continues identically).

With a different world size the step counter is recomputed as ``samples_seen // (W' * B)`` so the
learning-rate schedule continues at the same fraction of the samples.
"""

from __future__ import annotations

import logging
import math
import os
import re

import numpy as np
import torch
import torch.distributed as dist

from rectrain.data import storage
from rectrain.data.order import GlobalOrder
from rectrain.checkpoint import is_complete, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

#: ``step:rank:marker`` — rank ``rank`` calls ``os._exit(1)`` after global step ``step`` unless
#: the file ``marker`` exists (it is created first, so the restarted worker does not fail again).
#: For fault-tolerance tests only.
FAULT_ENV = "RECTRAIN_TEST_FAULT"
_STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoints_url(run_dir: str) -> str:
    return storage.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete periodic checkpoints of a run as ``(step, url)``, oldest first."""
    root = checkpoints_url(run_dir)
    fs, path = storage.url_to_fs(root)
    if not fs.exists(path):
        return []
    out = []
    for p in fs.ls(path, detail=False):
        m = _STEP_DIR.search(p.rstrip("/"))
        if m:
            url = storage.join(root, p.rstrip("/").rsplit("/", 1)[-1])
            if is_complete(url):
                out.append((int(m.group(1)), url))
    return sorted(out)


def resolve_resume(run_dir: str, resume: str | None) -> str | None:
    """The checkpoint URL ``resume`` names: ``latest``/``auto`` = newest complete one under
    ``run_dir/checkpoints`` (``auto``: None when there is none), a run directory (its latest),
    or a checkpoint URL.

    Raises:
        FileNotFoundError: ``latest`` with no complete checkpoint, or a URL that holds none.
    """
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        ckpts = list_checkpoints(run_dir)
        if ckpts:
            return ckpts[-1][1]
        if resume == "auto":
            return None
        raise FileNotFoundError(f"--resume latest: no complete checkpoint under "
                                f"{checkpoints_url(run_dir)}")
    if is_complete(resume):
        return resume
    ckpts = list_checkpoints(resume)
    if ckpts:
        return ckpts[-1][1]
    raise FileNotFoundError(f"--resume {resume}: neither a complete checkpoint (meta.json) nor a "
                            f"run directory with checkpoints/step-*")


def prepare_run(cfg):
    """Driver side, before workers start: a fresh run (``checkpoint.resume`` None) deletes the
    run directory's old checkpoints (periodic and best) and sets ``resume='auto'``, so that a worker group
    restarted by Ray Train after a failure resumes from this run's latest checkpoint.
    ``latest``/URL are resolved now (a missing checkpoint fails before any worker starts).
    Returns a copy of ``cfg`` with the resolved ``checkpoint.resume``."""
    cfg = cfg.model_copy(deep=True)
    ck = cfg.checkpoint
    if ck.resume is None:
        _remove_old_run(cfg.run_dir)
        ck.resume = "auto"
    elif ck.resume != "auto":
        ck.resume = resolve_resume(cfg.run_dir, ck.resume)
    return cfg


def _remove_old_run(run_dir: str) -> None:
    """A fresh run replaces an earlier run's checkpoints in the same run directory (periodic
    ones and the best one), so that neither is ever resumed from or adopted as best."""
    for name in ("checkpoints", "checkpoint", "checkpoint.tmp"):
        storage.remove(storage.join(run_dir, name))


def _rank_states(obj, world: int) -> list:
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class Checkpointer:
    """Periodic checkpoints and resume for one rank of :func:`rectrain.train.loop.run`."""

    def __init__(self, cfg, env, dmp, optimizer, plan, columns: list[str]):
        self.cfg, self.env, self.dmp, self.optimizer, self.plan = cfg, env, dmp, optimizer, plan
        self.spec = cfg.checkpoint
        self.root = checkpoints_url(cfg.run_dir)
        self.batch = cfg.train.batch_size
        self.deterministic = self.spec.every_n_steps is not None
        self.order = (GlobalOrder(storage.join(cfg.prepared_dir, "train"), cfg.train.seed,
                                  columns) if self.deterministic else None)
        self.start_epoch, self.start_row = 0, 0
        self.carry = {"rows": 0, "seconds": 0.0, "loss_sum": 0.0, "loss_n": 0}
        self.samples_seen = 0
        self._epoch, self._rows_start, self._steps = 0, 0, 0
        self._t_epoch = 0.0
        self.fault = os.environ.get(FAULT_ENV)

    # ---------------------------------------------------------------- restore
    def restore(self) -> tuple[int, dict | None]:
        """Load the checkpoint ``checkpoint.resume`` names (collective). Returns
        ``(start_epoch, progress)``; ``progress`` is None on a fresh start, else a dict with
        ``best``, ``history``, ``step``, ``train_seconds``, ``train_samples`` for the loop."""
        if self.spec.resume is None:  # fresh run (torchrun / tests): old checkpoints go
            if self.env.rank == 0:
                _remove_old_run(self.cfg.run_dir)
            if dist.is_initialized():
                dist.barrier()
            return 0, None
        url = resolve_resume(self.cfg.run_dir, self.spec.resume)
        if url is None:
            return 0, None
        meta = load_checkpoint(url, self.dmp, self.optimizer)
        p = meta["progress"]
        env = self.env
        self.start_epoch, self.start_row = p["epoch"], p["rows_done"]
        if self.start_row and not self.deterministic:
            raise ValueError(f"{url}: saved mid-epoch (row {self.start_row} of epoch "
                             f"{self.start_epoch}); resuming it needs checkpoint.every_n_steps "
                             f"(the deterministic train order) to be set")
        self.samples_seen = p["samples_seen"]
        self.carry = dict(p["carry"])
        same_world = p["world_size"] == env.world
        step = p["step"] if same_world else self.samples_seen // (self.batch * env.world)
        if same_world and p.get("rng"):
            torch.set_rng_state(torch.tensor(np.frombuffer(bytes.fromhex(p["rng"][env.rank]),
                                                           dtype=np.uint8).copy()))
        else:
            torch.manual_seed(self.cfg.train.seed + 7919 * (step + 1) + env.rank)
        best = dict(p["best"])
        best_url = storage.join(self.cfg.run_dir, "checkpoint")
        if is_complete(best_url):
            bm = storage.read_json(storage.join(best_url, "meta.json"))
            auc = bm.get("valid", {}).get("auc", float("nan"))
            score = -0.5 if math.isnan(auc) else auc
            if score > best["score"]:  # a later best was committed just before a crash
                best = {"auc": auc, "score": score, "epoch": bm["epoch"]}
        elif best["epoch"] >= 0:  # resumed from another run: its best weights are not here
            best = {"auc": float("nan"), "score": -1.0, "epoch": -1}
        if env.rank == 0:
            print(f"[rectrain] resumed from {url}: epoch {self.start_epoch}, row "
                  f"{self.start_row} of the epoch, step {step} (saved with "
                  f"{p['world_size']} workers, now {env.world})", flush=True)
        return self.start_epoch, {
            "best": best, "history": p["history"], "step": step,
            "train_seconds": p["train_seconds"] + self.carry["seconds"],
            "train_samples": p["train_samples"] + self.carry["rows"]}

    # ---------------------------------------------------------------- data
    def train_tables(self, epoch: int):
        """This rank's train tables for ``epoch`` in the deterministic order (from the saved
        row when resuming inside it), or None in streaming mode (use the Ray Data shard)."""
        import time
        self._t_epoch = time.perf_counter()
        self._epoch, self._steps = epoch, 0
        if epoch != self.start_epoch:
            self.carry = {"rows": 0, "seconds": 0.0, "loss_sum": 0.0, "loss_n": 0}
        self._rows_start = self.start_row if epoch == self.start_epoch else 0
        if not self.deterministic:
            return None
        return self.order.batches(epoch, self._rows_start, self.env.rank, self.env.world,
                                  self.batch)

    def rng(self, np_rng):
        """The block-shuffle generator for ``rebatch``: None in deterministic order (the rows are
        already permuted; nothing random left to restore)."""
        return None if self.deterministic else np_rng

    # ---------------------------------------------------------------- saving
    def _progress(self, epoch: int, rows_done: int, step: int, best, history, train_seconds,
                  train_samples, carry) -> dict:
        rng = _rank_states(torch.get_rng_state().numpy().tobytes().hex(), self.env.world)
        return {"epoch": epoch, "rows_done": rows_done, "step": step,
                "samples_seen": self.samples_seen, "world_size": self.env.world,
                "batch_size": self.batch, "deterministic_order": self.deterministic,
                "best": best, "history": history, "train_seconds": train_seconds,
                "train_samples": train_samples, "carry": carry, "rng": rng}

    def _save(self, step: int, progress: dict) -> str:
        url = storage.join(self.root, f"step-{step:08d}")
        save_checkpoint(url, self.dmp, self.optimizer, meta={
            "epoch": progress["epoch"], "step": step, "progress": progress,
            "world_size": self.env.world, "plan": str(self.plan),
            "config": self.cfg.model_dump(mode="json")})
        if self.env.rank == 0:
            self._prune()
        if dist.is_initialized():
            dist.barrier()
        return url

    def _prune(self) -> None:
        done = list_checkpoints(self.cfg.run_dir)
        for _, url in done[:-self.spec.keep_last]:
            storage.remove(url)
        fs, path = storage.url_to_fs(self.root)
        for p in fs.ls(path, detail=False):  # leftovers of crashed saves
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".tmp") or (_STEP_DIR.search(name)
                                         and not is_complete(storage.join(self.root, name))):
                storage.remove(storage.join(self.root, name))

    def _global_loss(self, loss_sum: float, loss_n: int) -> float:
        t = torch.tensor([loss_sum / max(loss_n, 1)], dtype=torch.float64)
        if dist.is_initialized() and self.env.world > 1:
            dist.all_reduce(t)
            t /= self.env.world
        return float(t.item())

    def after_step(self, epoch: int, step: int, loss_sum: float, loss_n: int,
                   progress) -> None:
        """Call after every optimiser step with the epoch's running loss sum/count on this rank
        and ``progress() -> (best, history, train_seconds, train_samples)``. Saves every
        ``every_n_steps`` steps; runs the fault-injection hook."""
        import time
        self._steps += 1
        self.samples_seen += self.batch * self.env.world
        n = self.spec.every_n_steps
        if n and step % n == 0:
            rows = self._rows_start + self._steps * self.batch * self.env.world
            mean = self._global_loss(loss_sum, loss_n)
            carry = {"rows": self.carry["rows"] + self._steps * self.batch * self.env.world,
                     "seconds": self.carry["seconds"] + time.perf_counter() - self._t_epoch,
                     "loss_sum": self.carry["loss_sum"] + mean * loss_n,
                     "loss_n": self.carry["loss_n"] + loss_n}
            best, history, secs, samples = progress()
            self._save(step, self._progress(epoch, rows, step, best, history, secs, samples,
                                             carry))
        if self.fault:
            f_step, f_rank, marker = self.fault.split(":", 2)
            if step == int(f_step) and self.env.rank == int(f_rank) and not storage.exists(marker):
                storage.write_json({"step": step, "rank": self.env.rank}, marker)
                print(f"[rectrain] fault injection: rank {self.env.rank} exits after step "
                      f"{step}", flush=True)
                os._exit(1)

    def finish_epoch_record(self, rec: dict) -> None:
        """Add the epoch's part trained before a resume to the loop's epoch record (in place):
        ``train_rows`` (global rows of the epoch), ``train_seconds``, ``train_samples_per_s``,
        ``train_loss``; adds ``train_rows_dropped`` (deterministic order: the tail no full
        global batch covers) and ``resumed_at_row``."""
        c = self.carry
        if c["loss_n"]:
            n = self._steps
            rec["train_loss"] = (c["loss_sum"] + rec["train_loss"] * n) / (c["loss_n"] + n)
        rec["train_rows"] += c["rows"]
        rec["train_seconds"] += c["seconds"]
        rec["train_samples_per_s"] = rec["train_rows"] / max(rec["train_seconds"], 1e-9)
        rec["resumed_at_row"] = self._rows_start
        if self.deterministic:
            rec["train_rows_dropped"] = self.order.num_rows - self._rows_start - \
                self._steps * self.batch * self.env.world

    def end_epoch(self, epoch: int, step: int, best, history, train_seconds,
                  train_samples) -> None:
        """Checkpoint after the epoch's validation (position: start of the next epoch)."""
        self.carry = {"rows": 0, "seconds": 0.0, "loss_sum": 0.0, "loss_n": 0}
        self.start_row = 0
        if self.spec.at_epoch_end:
            self._save(step, self._progress(epoch + 1, 0, step, best, history, train_seconds,
                                            train_samples, self.carry))
