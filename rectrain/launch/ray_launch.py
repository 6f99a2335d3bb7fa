"""The only place that knows Ray's cluster and Train APIs: local mode vs cluster, TorchTrainer."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Optional

from rectrain.config import JobConfig
from rectrain.data import storage
from rectrain.launch import worker_setup

log = logging.getLogger(__name__)


def _cluster_address(cfg: JobConfig, address: Optional[str]) -> Optional[str]:
    addr = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Ray 2.60 clusters started by `ray start` use token auth, but a client joining by address
    # does not switch to token mode by itself, and Ray reads the mode when it is first imported:
    # set it before that, when a token is at hand
    if addr and "RAY_AUTH_MODE" not in os.environ and (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or os.path.exists(os.path.expanduser("~/.ray/auth_token"))):
        os.environ["RAY_AUTH_MODE"] = "token"
    return addr


@contextlib.contextmanager
def _loopback_only():
    """While starting a local Ray, make its node IP 127.0.0.1 so that every Ray server binds
    loopback only.

    Ray 2.60's ``ray.init`` turns ``_node_ip_address="127.0.0.1"`` into the machine's routable IP
    (``services.resolve_ip_for_localhost``) and its GCS, raylet, object manager, core workers and
    agents then listen on all interfaces (``::``). Ray keeps loopback only where it disables
    clusters (``ray_constants.ENABLE_RAY_CLUSTER``, the ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
    switch, off on macOS/Windows): this flips it for the ``ray.init`` call only, so a later
    connection to a real cluster from the same process is unaffected. Checked with psutil in
    ``tests/test_submit.py::test_local_mode_listens_on_loopback_only``.
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def init_ray(cfg: JobConfig, address: Optional[str] = None) -> dict:
    """Connect to Ray; returns the cluster's resources.

    With an address (argument, ``cfg.ray.address`` or ``RAY_ADDRESS``) connect to that cluster.
    Otherwise start an embedded local Ray whose logical CPU count is
    ``num_workers * cpus_per_worker + data_cpus``: training workers reserve their CPUs and Ray
    Data keeps ``data_cpus`` for reading (with only as many CPUs as workers, Ray Data's read
    stays backpressured forever; DESIGN.md). The dashboard is off and nothing listens beyond
    127.0.0.1 in local mode, and every worker runs :func:`rectrain.launch.worker_setup.preload`
    at start (Ray's ``worker_process_setup_hook``).
    """
    addr = _cluster_address(cfg, address)
    import ray

    _configure_data_context()  # also when Ray was started by someone else
    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else each print shows twice
    # prepare re-raises the first failed task's own error; Ray's "unhandled error" echo of the
    # sibling tasks' errors would only repeat it as tracebacks
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if addr:
        ray.init(address=addr, log_to_driver=True)
    else:
        tc = cfg.train
        num_cpus = tc.num_workers * tc.cpus_per_worker + cfg.ray.data_cpus
        # address="local": always a fresh embedded instance, never a cluster some earlier
        # `ray start` left running (ray.init() with no address would join that one)
        with _loopback_only():
            ray.init(address="local", num_cpus=int(max(num_cpus, 1) + 0.999),
                     runtime_env={"worker_process_setup_hook": worker_setup.HOOK},
                     include_dashboard=True, dashboard_host="127.0.0.1",
                     log_to_driver=True, _node_ip_address="127.0.0.1",
                     configure_logging=True, logging_level=logging.WARNING)
    return ray.cluster_resources()


def _configure_data_context() -> None:
    """This process's Ray Data settings for every dataset rectrain creates."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray 2.60's Parquet DataSourceV2 starts every execution (every epoch) with a ListFiles
    # step that took 7-10 s of wall time (0.16 s CPU) for 125 local files on 2 cores, before
    # the first block; the V1 datasource gave its first block in 0.1-0.6 s on the same files
    # (first batch of epoch 1 of a 2M-row Criteo run: 11.9 s -> 0.3 s; README "Benchmarks")
    ctx.use_datasource_v2 = False


def _exact_split_config():
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


def train(cfg: JobConfig, address: Optional[str] = None) -> dict:
    """Run the training job with Ray Train's ``TorchTrainer`` and return ``metrics.json``.

    Each split of the prepared samples is a Ray Dataset streamed to the workers
    (``streaming_split``, exact). gloo on CPU, nccl when every worker gets a GPU.
    """
    _cluster_address(cfg, address)
    import ray
    import ray.data
    from ray.data import FileShuffleConfig
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rectrain.data.features import FeatureLayout
    from rectrain.data.schema import ITEM, TS, USER, load_manifest
    from rectrain.train.resume import prepare_run

    storage.require_shared(cfg.prepared_dir, "prepared_dir")
    storage.require_shared(cfg.run_dir, "run_dir")
    resources = init_ray(cfg, address)
    cfg = prepare_run(cfg)  # fresh run: clear old checkpoints; retries resume from the latest
    tc = cfg.train
    use_gpu = tc.use_gpu if tc.use_gpu is not None else resources.get("GPU", 0) >= tc.num_workers
    manifest = load_manifest(cfg.prepared_dir)
    layout = FeatureLayout(cfg, manifest)
    datasets = {}
    # with checkpoint.every_n_steps the workers read train in a deterministic order themselves
    for split in ("train", "valid", "test")[1 if cfg.checkpoint.every_n_steps else 0:]:
        url = storage.join(cfg.prepared_dir, split)
        cols = layout.columns + ([USER, ITEM, TS] if split != "train" else [])
        path, fs = storage.ray_paths(url)
        # train: files in a seeded order that changes every epoch (FileShuffleConfig reseeds
        # per execution), streamed, in place of randomize_block_order() (an all-to-all
        # operator; replacing it did not change the first-batch wait, which was Ray Data's
        # file listing, see _configure_data_context). Rows are already globally shuffled by
        # prepare and each block is permuted again by the loader (loader.rebatch).
        shuffle = FileShuffleConfig(seed=tc.seed) if split == "train" else None
        datasets[split] = ray.data.read_parquet(path, columns=cols, filesystem=fs,
                                                shuffle=shuffle)
    storage.remove(storage.join(cfg.run_dir, "metrics.json"))
    storage.remove(storage.join(cfg.run_dir, "workers"))
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // tc.num_workers) if not address else None
    trainer = TorchTrainer(
        train_loop_per_worker=ray_train_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "threads": threads,
                           "env": {k: v for k, v in os.environ.items()
                                   if k.startswith("RECTRAIN_")}},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=worker_resources(cfg, use_gpu),
                                     placement_strategy=tc.placement_strategy),
        datasets=datasets,
        dataset_config=_exact_split_config(),
        run_config=RunConfig(name=cfg.name, storage_path=os.path.abspath(
            storage.join(cfg.run_dir, "ray")) if "://" not in cfg.run_dir else None,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures)),
    )
    t0 = time.perf_counter()
    trainer.fit()
    url = storage.join(cfg.run_dir, "metrics.json")
    if not storage.exists(url):
        raise RuntimeError(f"training finished without writing {url}; see the worker logs above")
    metrics = storage.read_json(url)
    metrics["train_wall_seconds"] = time.perf_counter() - t0  # incl. Ray Train start-up
    metrics["workers"] = read_placement(cfg.run_dir)
    metrics["num_nodes"] = len({w["node_id"] for w in metrics["workers"]})
    storage.write_json(metrics, url)
    return metrics


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
    env = WorkerEnv(
        rank=rank, world=ctx.get_world_size(), device=ray.train.torch.get_device(),
        shard=lambda split: RayShard(ray.train.get_dataset_shard(split)),
        report=lambda m: ray.train.report(m))
    run(config_from_dict(config["job"]), env)


def read_placement(run_dir: str) -> list[dict]:
    """The ``workers/rank_*.json`` records of a run, by rank (empty if none were written)."""
    fs, path = storage.url_to_fs(storage.join(run_dir, "workers"))
    if not fs.exists(path):
        return []
    recs = [storage.read_json(storage.join(run_dir, "workers", os.path.basename(f)))
            for f in fs.glob(path.rstrip("/") + "/rank_*.json")]
    return sorted(recs, key=lambda r: r["rank"])
