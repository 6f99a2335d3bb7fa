"""Ray Train for rectrain: :func:`train` runs a job's training with ``TorchTrainer`` (built by
:func:`fit`, which the benchmarks use too) and :func:`ray_train_worker` is its per-worker entry
point. Connecting to Ray is :mod:`rectrain.launch.cluster`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Callable, Optional

from rectrain.config import JobConfig
from rectrain.data import storage
from rectrain.launch import quiet
from rectrain.launch.cluster import check_cluster_cpus, cluster_address, init_ray

__all__ = ["fit", "init_ray", "ray_train_worker", "read_blocks", "read_placement", "train",
           "worker_resources"]


def exact_split_config():
    """A Ray Train ``DataConfig`` that splits ``train`` with ``equal=True`` (rows balanced across
    workers; at most ``world - 1`` rows of an epoch left out, and every rank still agrees on the
    step count in ``collective_batches``) and every other split with ``equal=False``, which
    never drops a row, so evaluation scores each row exactly once."""
    from ray.train import DataConfig

    class ExactSplitDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=name == "train")):
                    output[i][name] = split
            return output

    return ExactSplitDataConfig()


#: fewest rows a Ray Data read block of an evaluation split should hold (see :func:`read_blocks`)
MIN_BLOCK_ROWS = 65_536
#: fewest rows a read block of the train split should hold (see :func:`read_blocks`)
TRAIN_BLOCK_ROWS = 131_072


def read_blocks(rows: int, batch_size: int, workers: int, split: str = "train") -> int:
    """``override_num_blocks`` for ``ray.data.read_parquet`` of a split of ``rows`` rows read by
    ``workers`` training workers.

    - ``train``: blocks of about ``max(TRAIN_BLOCK_ROWS, 8 * batch_size)`` rows, at least 2
      per worker (the exact split, ``streaming_split(equal=True)``, evens the rows out);
    - any other split: blocks of about ``max(MIN_BLOCK_ROWS, 8 * batch_size)`` rows, at least
      4 per worker, so that ``streaming_split(equal=False)`` (evaluation) still spreads a small
      split over the workers.

    Every block costs a few hundredths of a CPU second per epoch whatever its size (a read
    task, an object in the store, the split coordinator's scheduling steps and hand-off): on
    the DIN benchmark (2 workers, 2 cores) an epoch of 409,600 rows took a median 1.86 Ray
    CPU-s in 8 blocks and 1.55 in 4; at 2,048,000 rows 15 blocks beat both 31 and 8 (too few
    to keep the read ahead of the workers) (docs/benchmarks.md, "Ray Data's delivery
    alone"). Ray Data's own choice (at least
    ``DataContext.read_op_min_num_blocks`` = 200 blocks) cut those 25 files of 16,384 rows into
    150 blocks of 2,730 rows, 2.6 CPU-s per epoch. The read still caps a block at
    ``DataContext.target_max_block_size`` bytes, so wide rows do not make one block too large
    for memory. The rows and the exact split are the same whatever the count; only their
    grouping into blocks (and so the streaming order and each block's shuffle) changes.

    Raises:
        ValueError: negative ``rows`` (a broken manifest's ``rows_per_split``), or a ``split``
            other than train, valid and test (a misspelt train would get evaluation's
            blocks and no error).
    """
    if rows < 0:
        raise ValueError(f"read_blocks: {rows} rows of split {split!r}; a row count is >= 0")
    if split not in ("train", "valid", "test"):
        raise ValueError(f"read_blocks: unknown split {split!r} (train, valid or test)")
    workers = max(workers, 1)
    if split == "train":
        return max(2 * workers, rows // max(TRAIN_BLOCK_ROWS, 8 * batch_size))
    return max(4 * workers, rows // max(MIN_BLOCK_ROWS, 8 * batch_size))


def train(cfg: JobConfig, address: Optional[str] = None) -> dict:
    """Run the training job with Ray Train's ``TorchTrainer`` and return ``metrics.json``.

    Each split of the prepared samples is a Ray Dataset streamed to the workers
    (``streaming_split``, exact). gloo on CPU, nccl when every worker gets a GPU.
    """
    joined = cluster_address(address, cfg)
    import ray.data
    from ray.data import FileShuffleConfig

    from rectrain.data.door import check_footers
    from rectrain.data.schema import LABEL
    from rectrain.data.features import FeatureLayout
    from rectrain.data.schema import ITEM, TS, USER, empty_split_reason, load_manifest
    from rectrain.train.attempt import promote, start_attempt
    from rectrain.train.resume import prepare_run

    storage.require_shared(cfg.prepared_dir, "prepared_dir")
    storage.require_shared(cfg.run_dir, "run_dir")
    # what can fail without Ray fails before its start-up (tens of seconds): an unusable
    # prepared folder, a resume naming nothing
    manifest = load_manifest(cfg.prepared_dir)
    reason = empty_split_reason(manifest["rows_per_split"], cfg.dataset.split.model_dump(),
                                manifest.get("rows_used", sum(manifest["rows_per_split"].values())),
                                cfg.prepared_dir)
    if reason:
        raise ValueError(reason)
    cfg = prepare_run(cfg)  # resolves checkpoint.resume (a missing checkpoint fails here)
    layout = FeatureLayout(cfg, manifest)
    # the streaming read cannot name a file (and drops a missing column): footers (columns,
    # types, same schema, id statistics) checked here first
    check_footers(cfg.prepared_dir, layout.bounds, ("train", "valid", "test"), LABEL,
                  layout.columns)
    resources = init_ray(cfg, address)
    if joined:  # a local Ray is sized for the job (init_ray); a cluster must be checked
        check_cluster_cpus(cfg)
    run_dir = cfg.run_dir
    # the workers write into an attempt folder, promoted into run_dir only on success; a
    # restarted worker group resumes from the attempt's own latest checkpoint (resume: auto)
    cfg, attempt = start_attempt(cfg)
    tc = cfg.train
    use_gpu = tc.use_gpu if tc.use_gpu is not None else resources.get("GPU", 0) >= tc.num_workers
    datasets = {}
    # with checkpoint.every_n_steps (a deterministic order) or train.input: files the workers
    # read train themselves
    own_train = bool(cfg.checkpoint.every_n_steps) or tc.input == "files"
    for split in ("train", "valid", "test")[1 if own_train else 0:]:
        url = storage.join(cfg.prepared_dir, split)
        cols = list(dict.fromkeys(layout.columns + ([USER, ITEM, TS] if split != "train" else [])))
        path, fs = storage.ray_paths(url)
        # train: files in a seeded order that changes every epoch (FileShuffleConfig reseeds
        # per execution), streamed, in place of randomize_block_order() (an all-to-all
        # operator; replacing it did not change the first-batch wait, which was Ray Data's
        # file listing, see cluster._configure_data_context). Rows are already globally shuffled by
        # prepare and each block is permuted again by the loader (loader.rebatch).
        shuffle = FileShuffleConfig(seed=tc.seed) if split == "train" else None
        blocks = read_blocks(manifest["rows_per_split"].get(split, 0), tc.batch_size,
                             tc.num_workers, split)
        datasets[split] = ray.data.read_parquet(path, columns=cols, filesystem=fs,
                                                shuffle=shuffle, override_num_blocks=blocks)
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // tc.num_workers) if not address else None
    t0 = time.perf_counter()
    try:
        _fit_job(cfg, datasets, threads, use_gpu, layout.columns)
    except BaseException:
        print(f"[rectrain] the run failed: {run_dir} keeps the last good run's outputs; this "
              f"attempt's files are in {attempt} (resume it with --resume {attempt})",
              file=sys.stderr, flush=True)
        raise
    url = storage.join(cfg.run_dir, "metrics.json")
    if not storage.exists(url):
        raise RuntimeError(f"training finished without writing {url}; see the worker logs above")
    metrics = storage.read_json(url)
    metrics["train_wall_seconds"] = time.perf_counter() - t0  # incl. Ray Train start-up
    # an elastic restart on fewer workers leaves the lost ranks' records behind
    metrics["workers"] = read_placement(cfg.run_dir)[:metrics["world_size"]]
    metrics["num_nodes"] = len({w["node_id"] for w in metrics["workers"]})
    storage.write_json(metrics, url)
    promote(attempt, run_dir)
    return metrics


def _fit_job(cfg: JobConfig, datasets: dict, threads: Optional[int], use_gpu: bool,
             columns: list[str]) -> None:
    tc = cfg.train
    fit(ray_train_worker,
        {"job": cfg.model_dump(mode="json"), "threads": threads, "columns": columns,
         "env": {k: v for k, v in os.environ.items() if k.startswith("RECTRAIN_")}},
        num_workers=tc.num_workers, min_workers=tc.min_workers, datasets=datasets,
        name=cfg.name,
        storage_path=os.path.abspath(storage.join(cfg.run_dir, "ray"))
        if "://" not in cfg.run_dir else None,
        resources_per_worker=worker_resources(cfg, use_gpu), use_gpu=use_gpu,
        placement_strategy=tc.placement_strategy, max_failures=cfg.checkpoint.max_failures)


def fit(worker: Callable[[dict], None], config: dict, *, num_workers: int, datasets: dict,
        name: str, storage_path: Optional[str], resources_per_worker: Optional[dict] = None,
        use_gpu: bool = False, placement_strategy: str = "PACK", max_failures: int = 0,
        min_workers: Optional[int] = None):
    """Run ``worker(config)`` in ``num_workers`` Ray Train workers (``TorchTrainer.fit``) and
    return Ray Train's ``Result``. With ``min_workers < num_workers`` the worker group is
    elastic (Train V2's ``ScalingConfig(num_workers=(min, max))``, ``ElasticScalingPolicy``):
    a restart after a failure starts as many workers as the cluster's nodes still fit, at
    least ``min_workers`` (it waits for that many). ``datasets`` (name -> Ray Dataset) reach
    the workers through :func:`exact_split_config` (``ray.train.get_dataset_shard(name)``); the process group is
    gloo on CPU, nccl with GPUs. Needs a connected Ray (:func:`init_ray`).

    Raises:
        ray.train.TrainingFailedError: a worker failed more than ``max_failures`` times.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker=worker, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=elastic_size(num_workers, min_workers),
                                     use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker,
                                     placement_strategy=placement_strategy),
        datasets=datasets, dataset_config=exact_split_config(),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             logging_config=quiet.train_logging_config()))
    with _noting_sigint() as interrupted:
        try:
            return trainer.fit()
        finally:
            if interrupted:  # Ray Train's handler aborted the run: report it as a Ctrl-C
                raise KeyboardInterrupt  # noqa: B012 - replaces Ray's SystemExit/error


@contextlib.contextmanager
def _noting_sigint():
    """Within the block, a SIGINT handler that Ray Train's ``fit`` installs (it aborts the run
    gracefully, then ends with ``SystemExit`` or an error, exit status 1) is wrapped so that the
    signal is noted first: the yielded list is non-empty after a Ctrl-C, and :func:`fit` raises
    ``KeyboardInterrupt`` (the CLI prints one line, exit status 130)."""
    import signal

    seen: list[int] = []
    install = signal.signal

    def chained(sig, handler):
        if sig == signal.SIGINT and callable(handler):
            inner = handler

            def handler(signum, frame):
                seen.append(signum)
                return inner(signum, frame)
        return install(sig, handler)

    before = signal.getsignal(signal.SIGINT)
    signal.signal = chained
    try:
        yield seen
    finally:
        signal.signal = install
        if threading.current_thread() is threading.main_thread():
            install(signal.SIGINT, before)


def elastic_size(num_workers: int, min_workers: Optional[int]):
    """``ScalingConfig.num_workers``: ``(min_workers, num_workers)`` (elastic) when
    ``min_workers`` is below ``num_workers``, else the fixed ``num_workers``."""
    if min_workers is not None and min_workers < num_workers:
        return (min_workers, num_workers)
    return num_workers


def worker_resources(cfg: JobConfig, use_gpu: bool) -> dict:
    """Ray Train ``ScalingConfig.resources_per_worker`` from the job: ``CPU`` =
    ``train.cpus_per_worker``, ``GPU`` = ``train.gpus_per_worker`` (default 1) when GPUs are used,
    ``memory`` = ``train.memory_per_worker_gb`` in bytes, plus ``train.resources_per_worker``
    (custom node resources)."""
    tc = cfg.train
    res: dict = {"CPU": tc.cpus_per_worker}
    if use_gpu:
        res["GPU"] = tc.gpus_per_worker or 1.0
    if tc.memory_per_worker_gb:
        res["memory"] = int(tc.memory_per_worker_gb * 2**30)
    res.update(tc.resources_per_worker)
    return res


def ray_train_worker(config: dict) -> None:
    """Entry point for ``TorchTrainer(train_loop_per_worker=...)``: record where this rank runs
    (``RUN_DIR/workers/rank_<r>.json`` with rank, local/node rank, Ray node id, node IP, hostname
    and pid, read back into ``metrics.json["workers"]`` by :func:`train`), build the Ray-backed
    :class:`~rectrain.train.env.WorkerEnv` and run :func:`rectrain.train.loop.run`."""
    import socket

    import ray
    import ray.train
    import ray.train.torch
    import torch

    from rectrain.config import config_from_dict
    from rectrain.data.file_stream import FileStream
    from rectrain.data.loader import RayShard
    from rectrain.train.env import WorkerEnv
    from rectrain.train.loop import run

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    storage.write_json({
        "rank": rank, "local_rank": ctx.get_local_rank(), "node_rank": ctx.get_node_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
        "pid": os.getpid()}, storage.join(config["job"]["run_dir"], "workers",
                                          f"rank_{rank}.json"))
    # FBGEMM logs every table's constructor arguments at INFO on the root logger
    logging.getLogger().setLevel(logging.WARNING)
    os.environ.update(config.get("env") or {})  # RECTRAIN_* of the driver (e.g. RECTRAIN_FAULT)
    threads = config.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    cfg = config_from_dict(config["job"])
    world = ctx.get_world_size()
    # made once: the loop asks for the train shard every epoch, and a FileStream reads every
    # file's footer when it is made
    own_train = (FileStream(storage.join(cfg.prepared_dir, "train"), rank, world,
                            config.get("columns"), cfg.train.seed)
                 if cfg.train.input == "files" and cfg.checkpoint.every_n_steps is None else None)

    def shard(split: str):
        if split == "train" and own_train is not None:
            return own_train
        return RayShard(ray.train.get_dataset_shard(split),
                        timeout_s=cfg.train.batch_timeout_s, split=split)

    env = WorkerEnv(rank=rank, world=world, device=ray.train.torch.get_device(), shard=shard,
                    report=lambda m: ray.train.report(m))
    run(cfg, env)


def read_placement(run_dir: str) -> list[dict]:
    """The ``workers/rank_*.json`` records of a run, by rank (empty if none were written)."""
    fs, path = storage.url_to_fs(storage.join(run_dir, "workers"))
    if not fs.exists(path):
        return []
    recs = [storage.read_json(storage.join(run_dir, "workers", os.path.basename(f)))
            for f in fs.glob(path.rstrip("/") + "/rank_*.json")]
    return sorted(recs, key=lambda r: r["rank"])
