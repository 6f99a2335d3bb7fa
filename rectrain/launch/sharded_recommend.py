"""``recommend`` path ``sharded`` on Ray Train: a worker group of ``recommend.workers`` ranks
(default: the ranking run's ``train.num_workers``) started by the training's own launcher
(:func:`rectrain.launch.ray_launch.fit`: ``TorchTrainer``, gloo on CPU, nccl when every worker
gets a GPU; the same locally and on a cluster), each rank running
:func:`rectrain.serve.sharded.score_rank` behind a :class:`~rectrain.train.env.WorkerEnv`.
The ranks write the block files themselves; their per-block stats come back as one JSON file
per rank under ``out/_sharded/<run id>/`` (removed once read)."""

from __future__ import annotations

import logging
import math
import os
import time

from rectrain.config.sections import RecommendSpec
from rectrain.data import storage


def run_sharded(spec: RecommendSpec, out: str, todo: list[tuple[int, int, int]],
                address: str | None, bar, ph) -> list[dict]:
    """Score the blocks ``todo`` on the ranking model's shards; returns their stats (as
    :func:`rectrain.serve.recommend.do_block`'s). ``bar``: a tqdm updated when the group ends;
    ``ph``: :class:`rectrain.serve.timing.Phases` (``ray_init_s``, ``blocks_s``, ``write_s``,
    ``shard_load_s``: the slowest rank's loading of the runs and its shards).

    Raises:
        ray.train.TrainingFailedError: a rank failed (no retry: the blocks already written
            stay, and a rerun resumes from them).
    """
    if not todo:
        return []
    from rectrain.launch.cluster import connect
    from rectrain.launch.ray_launch import fit, worker_resources
    from rectrain.serve.recommend import run_config
    from rectrain.serve.sharded import world_of

    cfg = run_config(spec.ranking_run)
    world = world_of(spec, cfg)
    with ph("ray_init_s"):  # a local Ray gets a CPU per rank at least (as init_ray sizes it)
        res = connect(address, num_cpus=max(math.ceil(world * cfg.train.cpus_per_worker),
                                            os.cpu_count() or 1))
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else \
        res.get("GPU", 0) >= world
    # Ray Train workers run in their own working directory: local paths made absolute here
    out = storage.absolute(out)
    spec = spec.model_copy(update={k: storage.absolute(getattr(spec, k)) for k in
                                   ("ranking_run", "retrieval_run", "reference", "out")})
    run_id = f"{os.getpid()}-{time.time_ns()}"
    work = storage.join(out, "_sharded", run_id)
    local = "://" not in out
    t = time.perf_counter()
    fit(sharded_worker,
        {"spec": spec.model_dump(mode="json"), "out": out, "blocks": [list(b) for b in todo],
         "stats": work, "threads": max(1, (os.cpu_count() or 1) // world) if not address
         else None, "env": {k: v for k, v in os.environ.items() if k.startswith("RECTRAIN_")}},
        num_workers=world, datasets={}, name=f"recommend-{run_id}",
        storage_path=os.path.abspath(storage.join(work, "ray")) if local else None,
        resources_per_worker=worker_resources(cfg, use_gpu), use_gpu=use_gpu,
        placement_strategy=cfg.train.placement_strategy)
    stats = [s for r in range(world)
             for s in storage.read_json(storage.join(work, f"rank_{r}.json"))]
    storage.remove(storage.join(out, "_sharded"))
    bar.update(sum(s["users"] for s in stats))
    ph.add("blocks_s", time.perf_counter() - t)
    ph.add("shard_load_s", max((s.get("load_ms", 0) for s in stats), default=0) / 1000)
    ph.add("write_s", sum(s["write_ms"] for s in stats) / 1000)
    return stats


def sharded_worker(config: dict) -> None:
    """Entry point for ``TorchTrainer(train_loop_per_worker=...)``: this rank's
    :class:`~rectrain.train.env.WorkerEnv` (rank, world, device from Ray Train; no dataset
    shards) and :func:`rectrain.serve.sharded.score_rank`; its stats written to
    ``config["stats"]/rank_<r>.json``."""
    import ray.train
    import ray.train.torch
    import torch

    from rectrain.serve.sharded import score_rank
    from rectrain.train.env import WorkerEnv

    # FBGEMM logs every table's constructor arguments at INFO on the root logger
    logging.getLogger().setLevel(logging.WARNING)
    os.environ.update(config.get("env") or {})  # RECTRAIN_* of the driver (fault hooks)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    env = WorkerEnv(rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                    device=ray.train.torch.get_device(), shard=_no_shard)
    stats = score_rank(RecommendSpec(**config["spec"]), config["out"],
                       [tuple(b) for b in config["blocks"]], env)
    storage.write_json(stats, storage.join(config["stats"], f"rank_{env.rank}.json"))


def _no_shard(split: str):
    raise RuntimeError(f"the sharded recommend workers read no dataset shard ({split!r})")


def rank_summary(stats: list[dict]) -> list[dict]:
    """Per rank that ran blocks: ``rank``, ``blocks``, ``forwards`` (collective forward calls,
    equal on every rank) and ``padding_forwards`` (those on padding only), by rank."""
    return [{"rank": s["rank"], "blocks": s["rank_blocks"], "forwards": s["forwards"],
             "padding_forwards": s["padding_forwards"]}
            for s in sorted((s for s in stats if "rank" in s), key=lambda s: s["rank"])]
