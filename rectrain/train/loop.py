"""The per-worker training loop, launcher- and model-family-agnostic.

:func:`run` is the whole loop (read it top to bottom): build the model with tables on ``meta``,
shard it with DMP, then per epoch train on this rank's shard with the same number of steps on
every rank, evaluate on ALL validation rows, keep the best epoch's checkpoint; finally reload the
best checkpoint, score ALL test rows, and write ``metrics.json``, ``predictions/test.parquet``
and TensorBoard events. What differs between ranking and retrieval models (loss, evaluation,
selection score, outputs) is the :class:`~rectrain.train.task.Task`'s. The launcher supplies a
:class:`~rectrain.train.env.WorkerEnv` (Ray Train: :func:`rectrain.launch.ray_launch.
ray_train_worker`; torchrun and tests: :func:`rectrain.train.env.file_env`).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from rectrain.checkpoint import load_checkpoint
from rectrain.config import JobConfig
from rectrain.data import storage
from rectrain.data.features import FeatureLayout
from rectrain.data.loader import collective_batches, prefetch, rebatch
from rectrain.data.schema import load_manifest
from rectrain.models import build_model
from rectrain.models.zch import epoch_stats as zch_epoch_stats
from rectrain.train.env import WorkerEnv
from rectrain.train.faults import fault_hook
from rectrain.train.pipeline import Stepper
from rectrain.train.resume import Checkpointer
from rectrain.train.sharding import shard_model
from rectrain.train.state import Best, EpochCarry, TrainState
from rectrain.train.task import make_task


def run(cfg: JobConfig, env: WorkerEnv) -> dict:
    """Train, validate, checkpoint and test one job on this rank (collective). Returns the final
    metrics dict (identical on every rank)."""
    t_start = time.perf_counter()
    tc = cfg.train
    torch.manual_seed(tc.seed)
    np_rng = np.random.default_rng(tc.seed + 1000 * env.rank)
    manifest = load_manifest(cfg.prepared_dir)
    layout = FeatureLayout(cfg, manifest)
    model = build_model(layout, cfg.model, sparse_device=torch.device("meta"),
                        dense_device=env.device)
    task = make_task(cfg, layout, manifest, model, env)
    planned: list = []
    dmp, optimizer, plan = shard_model(model, cfg.sharding, cfg.optim, env.device, tc, planned)
    _say(env, f"sharding plan ({env.world} ranks):\n{plan}\n{planned[0].format()}")
    stepper = Stepper(dmp, optimizer, env.device, mode=tc.pipeline, forward_loss=task.loss)
    writer = _writer(env, cfg)
    state = TrainState()
    ckpt = Checkpointer(cfg, env, dmp, optimizer, plan, layout.columns, task.selection_score)
    ckpt.restore(state)
    task.start(state.step)
    planned = tc.epochs * max(1, manifest["rows_per_split"]["train"] // (tc.batch_size * env.world))
    set_lr = lr_schedule(optimizer, cfg.optim, planned)
    fault = fault_hook(env.rank, cfg.run_dir)
    for epoch in range(state.epoch, tc.epochs):
        # ---- train: same number of steps on every rank (drop_last + MIN agreement)
        t_epoch = time.perf_counter()
        t_log, n_log, loss_sum, steps, rows = t_epoch, 0, 0.0, 0, 0
        tables = ckpt.train_tables(epoch, state) or env.shard("train").tables(epoch)
        # Arrow -> Batch conversion runs ahead in a thread; the agreement stays on this thread
        feed = prefetch((task.to_batch(t) for t in
                         rebatch(tables, tc.batch_size, True, ckpt.rng(np_rng))),
                        tc.prefetch_batches)
        first_batch = []
        batches = _mark_first((b for b, _ in collective_batches(feed, "train")), first_batch,
                              t_epoch)

        def before_step(i):
            fault(state.step)
            set_lr(state.step)

        for loss, n in stepper.steps(batches, before_step=before_step):
            state.step += 1
            steps += 1
            rows += n
            n_log += n * env.world
            loss_sum += float(loss.detach())
            ckpt.after_step(state, steps, lambda: (_global_mean(loss_sum / steps), steps))
            if tc.max_train_rows and rows >= tc.max_train_rows:
                break
            if state.step % tc.log_every == 0:
                now = time.perf_counter()
                sps = n_log / (now - t_log)
                _say(env, f"epoch {epoch} step {state.step} loss {loss_sum / steps:.4f} "
                          f"{sps:,.0f} samples/s")
                _scalars(writer, {"train/loss": loss_sum / steps, "train/samples_per_s": sps},
                         state.step)
                t_log, n_log = now, 0
        # after the max_train_rows cap the input is not drained: closing it now ends Ray Data's
        # iteration of this split (its finally tells the split coordinator, which stops the
        # epoch's reads) instead of leaving the read running beside validation
        del tables, feed
        batches.close()
        epoch_s = time.perf_counter() - t_epoch
        global_rows = rows * env.world
        state.train_seconds += epoch_s + state.carry.seconds
        state.train_samples += global_rows + state.carry.rows
        # ---- validate over ALL validation rows of all ranks
        vm = task.validate(dmp, env.shard("valid"))
        rec = {"epoch": epoch, "train_loss": _global_mean(loss_sum / max(steps, 1)),
               "train_rows": global_rows, "train_seconds": epoch_s,
               "train_samples_per_s": global_rows / max(epoch_s, 1e-9),
               "train_first_batch_seconds": _global_max(first_batch[0] if first_batch
                                                        else epoch_s),
               **task.epoch_record(vm), **zch_epoch_stats(dmp)}
        ckpt.finish_epoch_record(rec, state, steps)
        state.history.append(rec)
        _say(env, f"epoch {epoch}: train loss {rec['train_loss']:.4f} ({rec['train_rows']} rows, "
                  f"{rec['train_samples_per_s']:,.0f} samples/s) | {task.describe(vm)}")
        _scalars(writer, {**task.scalars(vm),
                          "train/epoch_samples_per_s": rec["train_samples_per_s"]}, epoch)
        env.report({k: float(x) for k, x in rec.items()})
        # ---- keep the best epoch (a NaN score ranks below any real one but still saves)
        state.epoch, state.rows_done, state.carry = epoch + 1, 0, EpochCarry()
        score = task.selection_score(vm)
        if score > state.best.score:
            state.best = Best(epoch=epoch, score=score, valid=vm)
            ckpt.save_best(state)
        ckpt.end_epoch(state)
    # ---- test with the best epoch's weights
    load_checkpoint(ckpt.best_url, dmp)
    tm, predictions, text = task.test(dmp, env.shard("test"), state.best.valid)
    _say(env, f"test (best epoch {state.best.epoch}): {text}")
    metrics = {
        **tm, "model": cfg.model.name, "best_epoch": state.best.epoch,
        "rows_per_split": manifest["rows_per_split"],
        "train_samples_per_s": state.train_samples / max(state.train_seconds, 1e-9),
        "train_seconds": state.train_seconds, "worker_seconds": time.perf_counter() - t_start,
        "world_size": env.world, "epochs": state.history,
    }
    if ckpt.warm_started:
        metrics["warm_start"] = ckpt.warm_started
    if env.rank == 0:
        storage.write_parquet(predictions, storage.join(cfg.run_dir, "predictions",
                                                        "test.parquet"))
        storage.write_json(metrics, storage.join(cfg.run_dir, "metrics.json"))
        _scalars(writer, {f"test/{k[5:]}": v for k, v in tm.items()
                          if k.startswith("test_") and isinstance(v, float)}, 0)
        writer.close()
    return metrics


def lr_schedule(optimizer, spec, planned_steps: int) -> Callable[[int], None]:
    """``set_lr(step)`` scaling every param group's initial lr by linear warm-up over
    ``spec.warmup_steps`` times ``constant`` / ``linear`` (to 0 at ``planned_steps``) /
    ``cosine`` (half-cosine to 0) decay. Fused sparse optimiser groups included."""
    base = [g["lr"] for g in optimizer.param_groups]

    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / spec.warmup_steps) if spec.warmup_steps else 1.0
        frac = min(step / max(planned_steps, 1), 1.0)
        if spec.lr_schedule == "linear":
            f *= 1.0 - frac
        elif spec.lr_schedule == "cosine":
            f *= 0.5 * (1.0 + math.cos(math.pi * frac))
        return f

    def set_lr(step: int) -> None:
        if spec.lr_schedule == "constant" and not spec.warmup_steps:
            return
        f = factor(step)
        for g, b in zip(optimizer.param_groups, base):
            g["lr"] = b * f

    return set_lr


def _say(env: WorkerEnv, msg: str) -> None:
    if env.rank == 0:
        print(f"[rectrain] {msg}", flush=True)


def _writer(env: WorkerEnv, cfg: JobConfig):
    if env.rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(storage.join(cfg.run_dir, "tensorboard"))


def _scalars(writer, values: dict[str, float], step: int) -> None:
    if writer is not None:
        for tag, v in values.items():
            writer.add_scalar(tag, v, step)


def _global_mean(x: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _global_max(x: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _mark_first(batches, first: list, t0: float):
    """Pass ``batches`` through, appending the seconds from ``t0`` to the first one to ``first``
    (an epoch's wait for its first batch: Ray Data's start-up)."""
    for b in batches:
        if not first:
            first.append(time.perf_counter() - t0)
        yield b
