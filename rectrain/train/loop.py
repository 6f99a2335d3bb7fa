"""The per-worker training function, launcher-agnostic.

:func:`run` is the whole loop (read it top to bottom): build the model with tables on ``meta``,
shard it with DMP, then per epoch train on this rank's shard with the same number of steps on
every rank, evaluate on ALL validation rows, keep the best epoch's checkpoint; finally reload the
best checkpoint, score ALL test rows, and write ``metrics.json``, ``predictions/test.parquet``
and TensorBoard events. :func:`rectrain.launch.ray_launch.ray_train_worker` runs it under Ray
Train; tests and torchrun call :func:`run` with :func:`rectrain.train.env.file_env`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from rectrain.config import JobConfig
from rectrain.data import storage
from rectrain.data.features import FeatureLayout
from rectrain.data.loader import collective_batches, padded_eval_tables, prefetch, rebatch
from rectrain.data.schema import ITEM, TS, USER, load_manifest
from rectrain.models import build_model
from rectrain.models.base import main_logits
from rectrain.checkpoint import load_checkpoint, save_checkpoint
from rectrain.train.env import WorkerEnv
from rectrain.train.metrics import gather_arrays
from rectrain.train.resume import Checkpointer
from rectrain.train.objectives import (eval_metrics, init_regression_head, is_regression,
                                       main_loss, selection_score, test_extras)
from rectrain.train.pipeline import Stepper
from rectrain.train.sharding import shard_model

log = logging.getLogger("rectrain.train")


def _say(env: WorkerEnv, msg: str) -> None:
    if env.rank == 0:
        print(f"[rectrain] {msg}", flush=True)


def evaluate(model, layout: FeatureLayout, source, batch_size: int, device,
             keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Score every row of this rank's shard; collective over ranks (same step count everywhere,
    short ranks run padding rows that are discarded). Returns arrays concatenated over ALL ranks:
    ``logits``, ``labels`` and each column in ``keep``."""
    model.eval()
    out: dict[str, list] = {"logits": [], "labels": [], **{k: [] for k in keep}}
    with torch.no_grad():
        for t, n_real, _ in padded_eval_tables(source, layout, batch_size, keep, out):
            batch = layout.to_batch(t).to(device)
            logits = main_logits(model(batch))[:n_real]
            out["logits"].append(logits.float().cpu().numpy())
            out["labels"].append(batch.labels[:n_real].cpu().numpy())
    arrays = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in out.items()}
    model.train()
    return gather_arrays(arrays)


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


def fault_step(rank: int) -> int | None:
    """Fault injection for tests: ``RECTRAIN_FAULT_STEP="R:S"`` makes rank ``R`` raise
    ``RuntimeError`` when it is about to run training step ``S`` (0-based, global count), so a
    test can check that one failing rank stops the whole job with the original error. Returns
    ``S`` for this rank, or None."""
    spec = os.environ.get("RECTRAIN_FAULT_STEP")
    if not spec:
        return None
    r, s = (int(x) for x in spec.split(":"))
    return s if r == rank else None


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


def run(cfg: JobConfig, env: WorkerEnv) -> dict:
    """Train, validate, checkpoint and test one job on this rank (collective). Returns the final
    metrics dict (identical on every rank)."""
    from rectrain.models import MODELS
    if getattr(MODELS.get(cfg.model.name), "task", "ranking") == "retrieval":
        from rectrain.train.retrieval import run_retrieval  # two-tower, SASRec: full ranking
        return run_retrieval(cfg, env)
    t_start = time.perf_counter()
    tc = cfg.train
    torch.manual_seed(tc.seed)
    np_rng = np.random.default_rng(tc.seed + 1000 * env.rank)
    manifest = load_manifest(cfg.prepared_dir)
    layout = FeatureLayout(cfg, manifest)
    model = build_model(layout, cfg.model, sparse_device=torch.device("meta"),
                        dense_device=env.device)
    dmp, optimizer, plan = shard_model(model, cfg.sharding, cfg.optim, env.device)
    _say(env, f"sharding plan ({env.world} ranks):\n{plan}")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    label_loss = main_loss(cfg)  # BCE, or MSE on label_value with model.loss: mse

    def train_loss(out, batch):
        loss = label_loss(main_logits(out), batch.labels)
        if out.dim() == 2:  # auxiliary ordinal heads
            loss = loss + cfg.model.aux_weight * loss_fn(out[:, 1:], batch.aux_labels)
        return loss

    def on_batch(batch):
        if step == 0 and is_regression(cfg):  # output bias starts at the first batch's mean
            init_regression_head(dmp, batch.labels)

    stepper = Stepper(dmp, optimizer, env.device, cfg.model.aux_weight, tc.pipeline,
                      loss=train_loss, on_batch=on_batch)
    writer = None
    if env.rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(storage.join(cfg.run_dir, "tensorboard"))
    ckpt_url = storage.join(cfg.run_dir, "checkpoint")
    planned = tc.epochs * max(1, manifest["rows_per_split"]["train"] // (tc.batch_size * env.world))
    set_lr = lr_schedule(optimizer, cfg.optim, planned)
    best = {"auc": float("nan"), "score": -math.inf, "epoch": -1}
    history = []
    step = 0
    train_seconds = 0.0
    train_samples = 0
    ckpt = Checkpointer(cfg, env, dmp, optimizer, plan, layout.columns)
    start_epoch, resumed = ckpt.restore()
    if resumed:
        best, history, step = resumed["best"], resumed["history"], resumed["step"]
        train_seconds, train_samples = resumed["train_seconds"], resumed["train_samples"]
    fault_at = fault_step(env.rank)
    for epoch in range(start_epoch, tc.epochs):
        # ---- train: same number of steps on every rank (drop_last + MIN agreement)
        t_epoch = time.perf_counter()
        t_log, n_log, loss_sum, loss_n, rows = t_epoch, 0, 0.0, 0, 0
        tables = ckpt.train_tables(epoch) or env.shard("train").tables(epoch)
        # Arrow -> Batch conversion runs ahead in a thread; the agreement stays on this thread
        feed = prefetch((layout.to_batch(t.select(layout.columns)) for t in
                         rebatch(tables, tc.batch_size, True, ckpt.rng(np_rng))),
                        tc.prefetch_batches)
        first_batch = []
        batches = _mark_first((b for b, _ in collective_batches(feed, "train")), first_batch,
                              t_epoch)

        def before_step(i):
            if step == fault_at:
                raise RuntimeError(f"injected fault on rank {env.rank} at step {step} "
                                   f"(RECTRAIN_FAULT_STEP)")
            set_lr(step)

        for loss, n in stepper.steps(batches, before_step=before_step):
            step += 1
            rows += n
            n_log += n * env.world
            loss_sum += float(loss.detach())
            loss_n += 1
            ckpt.after_step(epoch, step, loss_sum, loss_n,
                            lambda b=best, h=history, s=train_seconds, n=train_samples:
                            (b, h, s, n))
            if tc.max_train_rows and rows >= tc.max_train_rows:
                break
            if step % tc.log_every == 0:
                now = time.perf_counter()
                sps = n_log / (now - t_log)
                _say(env, f"epoch {epoch} step {step} loss {loss_sum / loss_n:.4f} "
                          f"{sps:,.0f} samples/s")
                if writer:
                    writer.add_scalar("train/loss", loss_sum / loss_n, step)
                    writer.add_scalar("train/samples_per_s", sps, step)
                t_log, n_log = now, 0
        epoch_s = time.perf_counter() - t_epoch
        first_batch_s = first_batch[0] if first_batch else epoch_s
        train_seconds += epoch_s
        global_rows = rows * env.world
        train_samples += global_rows
        # ---- validate over ALL validation rows of all ranks
        v = evaluate(dmp, layout, env.shard("valid"), tc.eval_batch_size, env.device)
        vm = eval_metrics(cfg, v)
        rec = {"epoch": epoch, "train_loss": loss_sum / max(loss_n, 1), "train_rows": global_rows,
               "train_seconds": epoch_s, "train_samples_per_s": global_rows / max(epoch_s, 1e-9),
               "train_first_batch_seconds": _global_max(first_batch_s),
               "valid_auc": vm["auc"], "valid_logloss": vm["logloss"], "valid_rows": vm["rows"]}
        if is_regression(cfg):
            rec.update(valid_rmse=vm["rmse"], valid_mae=vm["mae"])
        rec["train_loss"] = _global_mean(rec["train_loss"])
        ckpt.finish_epoch_record(rec)
        history.append(rec)
        _say(env, f"epoch {epoch}: train loss {rec['train_loss']:.4f} "
                  f"({global_rows} rows, {rec['train_samples_per_s']:,.0f} samples/s) | "
                  f"valid AUC {vm['auc']:.4f} logloss {vm['logloss']:.4f} ({vm['rows']} rows)")
        if writer:
            writer.add_scalar("valid/auc", vm["auc"], epoch)
            writer.add_scalar("valid/logloss", vm["logloss"], epoch)
            writer.add_scalar("train/epoch_samples_per_s", rec["train_samples_per_s"], epoch)
        env.report({k: float(x) for k, x in rec.items()})
        # a NaN AUC (one class only in valid) ranks below any real one but still checkpoints
        score = selection_score(cfg, vm)
        if score > best["score"]:
            best = {"auc": vm["auc"], "score": score, "epoch": epoch}
            save_checkpoint(ckpt_url, dmp, optimizer, meta={
                "epoch": epoch, "step": step, "valid": vm, "world_size": env.world,
                "plan": str(plan), "config": cfg.model_dump(mode="json")})
        ckpt.end_epoch(epoch, step, best, history, train_seconds, train_samples)
    # ---- test with the best epoch's weights
    load_checkpoint(ckpt_url, dmp)
    keep = (USER, ITEM, TS)
    te = evaluate(dmp, layout, env.shard("test"), tc.eval_batch_size, env.device, keep=keep)
    tm = eval_metrics(cfg, te)
    _say(env, f"test (best epoch {best['epoch']}): AUC {tm['auc']:.4f} logloss "
              f"{tm['logloss']:.4f} NE {tm['ne']:.4f} ({tm['rows']} rows)")
    metrics = {
        "test_auc": tm["auc"], "test_logloss": tm["logloss"], "test_ne": tm["ne"],
        "test_rows": tm["rows"], "best_epoch": best["epoch"], "best_valid_auc": best["auc"],
        "rows_per_split": manifest["rows_per_split"],
        "train_samples_per_s": train_samples / max(train_seconds, 1e-9),
        "train_seconds": train_seconds, "worker_seconds": time.perf_counter() - t_start,
        "world_size": env.world, "epochs": history,
    }
    metrics.update(test_extras(cfg, te, te[USER]))
    metrics["model"] = cfg.model.name
    if is_regression(cfg):
        _say(env, f"test RMSE {metrics['test_rmse']:.4f} MAE {metrics['test_mae']:.4f}")
    if env.rank == 0:
        probs = 1.0 / (1.0 + np.exp(-te["logits"].astype(np.float64)))
        if is_regression(cfg):  # the predicted label value (e.g. rating), not a probability
            probs = te["logits"].astype(np.float64)
        pred = pa.table({"user_id": te[USER], "item_id": te[ITEM], "timestamp": te[TS],
                         "label": te["labels"].astype(np.float32), "score": probs})
        storage.write_parquet(pred, storage.join(cfg.run_dir, "predictions", "test.parquet"))
        storage.write_json(metrics, storage.join(cfg.run_dir, "metrics.json"))
        writer.add_scalar("test/auc", tm["auc"], 0)
        writer.add_scalar("test/logloss", tm["logloss"], 0)
        writer.close()
    return metrics
