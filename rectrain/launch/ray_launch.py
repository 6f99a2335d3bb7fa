"""The only place that knows Ray's cluster and Train APIs: local mode vs cluster, TorchTrainer."""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from rectrain.config import JobConfig
from rectrain.data import storage

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


def init_ray(cfg: JobConfig, address: Optional[str] = None) -> dict:
    """Connect to Ray; returns the cluster's resources.

    With an address (argument, ``cfg.ray.address`` or ``RAY_ADDRESS``) connect to that cluster.
    Otherwise start an embedded local Ray whose logical CPU count is
    ``num_workers * cpus_per_worker + data_cpus``: training workers reserve their CPUs and Ray
    Data keeps ``data_cpus`` for reading (with only as many CPUs as workers, Ray Data's read
    stays backpressured forever; DESIGN.md). The dashboard is off and nothing listens beyond
    127.0.0.1 in local mode.
    """
    addr = _cluster_address(cfg, address)
    import ray

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
        ray.init(address="local", num_cpus=int(max(num_cpus, 1) + 0.999), include_dashboard=True,
                 dashboard_host="127.0.0.1",
                 log_to_driver=True, _node_ip_address="127.0.0.1",
                 configure_logging=True, logging_level=logging.WARNING)
    from ray.data import DataContext
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray.cluster_resources()


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
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rectrain.data.features import FeatureLayout
    from rectrain.data.prepare import ITEM, TS, USER, load_manifest
    from rectrain.train.loop import ray_train_worker

    resources = init_ray(cfg, address)
    tc = cfg.train
    use_gpu = tc.use_gpu if tc.use_gpu is not None else resources.get("GPU", 0) >= tc.num_workers
    manifest = load_manifest(cfg.prepared_dir)
    layout = FeatureLayout(cfg, manifest)
    datasets = {}
    for split in ("train", "valid", "test"):
        url = storage.join(cfg.prepared_dir, split)
        cols = layout.columns + ([USER, ITEM, TS] if split != "train" else [])
        ds = ray.data.read_parquet(url, columns=cols)
        if split == "train":
            ds = ds.randomize_block_order()
        datasets[split] = ds
    storage.remove(storage.join(cfg.run_dir, "metrics.json"))
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // tc.num_workers) if not address else None
    trainer = TorchTrainer(
        train_loop_per_worker=ray_train_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "threads": threads},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        datasets=datasets,
        dataset_config=_exact_split_config(),
        run_config=RunConfig(name=cfg.name, storage_path=os.path.abspath(
            storage.join(cfg.run_dir, "ray")) if "://" not in cfg.run_dir else None),
    )
    t0 = time.perf_counter()
    trainer.fit()
    url = storage.join(cfg.run_dir, "metrics.json")
    if not storage.exists(url):
        raise RuntimeError(f"training finished without writing {url}; see the worker logs above")
    metrics = storage.read_json(url)
    metrics["train_wall_seconds"] = time.perf_counter() - t0  # incl. Ray Train start-up
    storage.write_json(metrics, url)
    return metrics
