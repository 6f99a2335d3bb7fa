"""Multi-process gloo jobs for tests (:func:`spawn`, the suite's one spawn helper) and helpers
that gather a sharded model's state across ranks."""

from __future__ import annotations

import os
import queue
import time

import numpy as np
import torch.multiprocessing as mp

from tests.support.ports import free_port


def _entry(fn, rank, world, port, args, q):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q.put((rank, fn(rank, world, *args)))
    except Exception as e:  # noqa: BLE001 -- report it instead of hanging the parent
        import traceback
        q.put((rank, RuntimeError(f"rank {rank}: {e}\n{traceback.format_exc()}")))
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout: float = 400) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; returns the results
    by rank. Raises the first worker's error (or a timeout / exit-code error)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, r = q.get(timeout=2)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"workers failed: exit codes {dead}")
                continue
            if isinstance(r, BaseException):
                raise r
            results[rank] = r
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def in_process(fn, *args):
    """``fn(0, 1, *args)`` on one gloo rank in this process: :func:`spawn` with ``world=1``
    without a process start (seconds: torch and TorchRec imported again)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        return fn(0, 1, *args)
    finally:
        dist.destroy_process_group()


def copy_into_shards(dmp, full: dict) -> None:
    """Copy an unsharded model's state dict ``full`` into the DMP's local shards (each shard
    takes its ``shard_offsets`` slice) and plain tensors, so both start from the same weights."""
    import torch

    with torch.no_grad():
        for key, t in dmp.state_dict().items():
            if hasattr(t, "local_shards"):
                for s in t.local_shards():
                    (r0, c0), (nr, nc) = s.metadata.shard_offsets, s.metadata.shard_sizes
                    s.tensor.copy_(full[key][r0:r0 + nr, c0:c0 + nc])
            else:
                t.copy_(full[key])


def local_shards(dmp, optimizer) -> dict:
    """This rank's embedding shards and fused-optimiser state shards as NumPy copies (tensors
    sent through a queue would share memory with a process that exits):
    ``{key: [(row_offset, col_offset, array)]}`` (keys ``model/<name>``, ``optim/<name>``)."""
    out: dict = {}
    for key, t in dmp.state_dict().items():
        if hasattr(t, "local_shards"):
            out["model/" + key] = [(*s.metadata.shard_offsets[:2], s.tensor.detach().numpy().copy())
                                   for s in t.local_shards()]
    for pkey, st in optimizer.state_dict()["state"].items():
        for name, t in st.items():
            if hasattr(t, "local_shards"):
                out[f"optim/{pkey}/{name}"] = [
                    (s.metadata.shard_offsets[0],
                     s.metadata.shard_offsets[1] if len(s.metadata.shard_offsets) > 1 else 0,
                     s.tensor.detach().numpy().copy()) for s in t.local_shards()]
    return out


def assemble(per_rank: list[dict]) -> dict:
    """Full tensors from :func:`local_shards` of every rank (each element covered once)."""
    keys = set().union(*per_rank)
    full = {}
    for k in keys:
        parts = [p for r in per_rank for p in r.get(k, [])]
        rows = max(r0 + t.shape[0] for r0, _, t in parts)
        if parts[0][2].ndim == 1:
            out = np.full((rows,), np.nan, dtype=np.float32)
            for r0, _, t in parts:
                out[r0:r0 + t.shape[0]] = t
        else:
            cols = max(c0 + t.shape[1] for _, c0, t in parts)
            out = np.full((rows, cols), np.nan, dtype=np.float32)
            for r0, c0, t in parts:
                out[r0:r0 + t.shape[0], c0:c0 + t.shape[1]] = t
        full[k] = out
    return full


def run_one_rank(job: dict) -> dict:
    """``rectrain.train.loop.run`` of a job dict on one gloo rank in this process (no Ray);
    returns the run's metrics."""
    import torch.distributed as dist

    from rectrain.config import config_from_dict
    from rectrain.train import loop
    from rectrain.train.env import file_env

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        cfg = config_from_dict(job)
        return loop.run(cfg, file_env(cfg, 0, 1))
    finally:
        dist.destroy_process_group()
