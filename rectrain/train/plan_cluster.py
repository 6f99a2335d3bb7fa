"""``rectrain plan``: a job's sharding plan for a cluster that is not here (or for the job's own
workers), from TorchRec's planner with its own storage and perf estimators, without devices.

The model is built with every parameter on ``meta`` and planned with
``EmbeddingShardingPlanner.plan`` (not ``collective_plan``) on a ``Topology`` of
``NODES x GPUS`` ranks; nothing is allocated and no process group is needed. Table sizes come
from the prepared manifest when there is one, else from the job itself: every sparse feature
then needs ``encoding: hash`` (table rows = ``hash_buckets + 1``), as in
``jobs/criteo_tb_plan.yaml``.

Device table :data:`DEVICES` (per GPU; capacities in GB = 10^9 bytes as the datasheets state
them, bandwidths in GB/s):

- ``H100``: H100 SXM5 80 GB, HBM3 3.35 TB/s, NVLink 4 900 GB/s (NVIDIA H100 Tensor Core GPU
  datasheet); one 400 Gb/s ConnectX-7 NIC per GPU = 50 GB/s across nodes and 2 TB host memory per
  8 GPUs (NVIDIA DGX H100 user guide).
- ``H200``: H200 SXM 141 GB, HBM3e 4.8 TB/s, NVLink 900 GB/s (NVIDIA H200 datasheet); NICs and
  host memory as DGX H100 (NVIDIA DGX H200 user guide).
- ``A100``: A100 SXM4 80 GB, HBM2e 2.039 TB/s, NVLink 3 600 GB/s (NVIDIA A100 datasheet); one
  200 Gb/s HDR NIC per GPU = 25 GB/s, 2 TB host memory per 8 GPUs (NVIDIA DGX A100 user guide).
- ``A100-40``: A100 SXM4 40 GB, 1.555 TB/s; otherwise as ``A100`` (1 TB host memory).

NVLink figures are the per-GPU aggregate (both directions), the convention of TorchRec's own
``INTRA_NODE_BANDWIDTH`` (600 GB/s for A100).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rectrain.config import JobConfig
from rectrain.train.planning import Budget, PlanReport, plan_tables

GB = 10 ** 9


@dataclass(frozen=True)
class Device:
    """One GPU type: ``hbm_gb`` per GPU, ``hbm_bw_gbs``, ``intra_gbs`` (NVLink per GPU),
    ``inter_gbs`` (network per GPU), ``host_gb`` host memory per GPU."""

    hbm_gb: float
    hbm_bw_gbs: float
    intra_gbs: float
    inter_gbs: float
    host_gb: float


DEVICES = {
    "H100": Device(80, 3350, 900, 50, 250),
    "H200": Device(141, 4800, 900, 50, 250),
    "A100": Device(80, 2039, 600, 25, 250),
    "A100-40": Device(40, 1555, 600, 25, 125),
}


@dataclass(frozen=True)
class ClusterSpec:
    """``NODES x GPUS:TYPE`` (e.g. ``2x8:H200``) with the device's figures, overridable."""

    nodes: int
    gpus: int
    device: str
    hbm_gb: float
    intra_gbs: float
    inter_gbs: float
    hbm_bw_gbs: float
    host_gb: float

    @property
    def world(self) -> int:
        return self.nodes * self.gpus

    def budget(self, batch_size: int) -> Budget:
        """The planner's budget (bandwidths in bytes/ms, TorchRec's unit)."""
        return Budget(world_size=self.world, compute_device="cuda", local_world_size=self.gpus,
                      hbm_bytes=int(self.hbm_gb * GB), ddr_bytes=int(self.host_gb * GB),
                      intra_host_bw=self.intra_gbs * GB / 1000,
                      inter_host_bw=self.inter_gbs * GB / 1000,
                      hbm_mem_bw=self.hbm_bw_gbs * GB / 1000, batch_size=batch_size)


def parse_topology(text: str, hbm_gb: float | None = None, intra_gbs: float | None = None,
                   inter_gbs: float | None = None) -> ClusterSpec:
    """``"2x8:H100"`` -> :class:`ClusterSpec`; the keyword figures override the device table's.

    Raises:
        ValueError: not ``NODESxGPUS:TYPE``, or an unknown type without all three overrides.
    """
    m = re.fullmatch(r"(\d+)x(\d+):([A-Za-z0-9-]+)", text.strip())
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ValueError(f"--topology: expected NODESxGPUS:TYPE such as 2x8:H100, got {text!r}")
    nodes, gpus, kind = int(m[1]), int(m[2]), m[3].upper()
    d = DEVICES.get(kind)
    if d is None and None in (hbm_gb, intra_gbs, inter_gbs):
        raise ValueError(f"--topology: unknown device type {m[3]!r} (known: "
                         f"{', '.join(DEVICES)}); or give --hbm-gb, --intra-gbs and --inter-gbs")
    d = d or Device(hbm_gb, 2000, intra_gbs, inter_gbs, 250)
    return ClusterSpec(nodes, gpus, kind, hbm_gb or d.hbm_gb, intra_gbs or d.intra_gbs,
                       inter_gbs or d.inter_gbs, d.hbm_bw_gbs, d.host_gb)


def declared_manifest(cfg: JobConfig) -> dict:
    """The manifest fields the model needs, from ``cfg.prepared_dir``'s manifest when it exists,
    else from the job: table rows = ``hash_buckets + 1`` of hashed features (``capacity + 1``
    of vocab features with a capacity), dense stats 0/1.

    Raises:
        ValueError: no manifest and a sparse feature with ``encoding: vocab`` (its table size is
            known only after prepare), naming the ``features.<i>`` field.
    """
    from rectrain.data import storage
    from rectrain.data.schema import load_manifest

    if storage.exists(storage.join(cfg.prepared_dir, "manifest.json")):
        return load_manifest(cfg.prepared_dir)
    tables: dict[str, int] = {}
    for i, f in enumerate(cfg.features):
        if f.kind in ("sparse", "multi_hot"):
            if f.encoding != "hash" and f.capacity is None:
                raise ValueError(f"features.{i}: feature {f.name!r} has encoding vocab and "
                                 f"{cfg.prepared_dir} has no manifest.json, so its table size "
                                 f"is unknown: run rectrain prepare, or declare the size with "
                                 f"a capacity or with encoding: hash and hash_buckets")
            rows = (f.hash_buckets + 1 if f.encoding == "hash" else
                    f.capacity if f.encoding == "zch" else f.capacity + 1)
            tables[f.table_name] = max(tables.get(f.table_name, 0), rows)
        elif f.kind == "text_embedding":
            raise ValueError(f"features.{i}: text_embedding features need prepared data")
    return {"tables": tables,
            "dense_stats": {f.name: {"mean": 0.0, "std": 1.0} for f in cfg.features
                            if f.kind == "dense"}}


def plan_job(cfg: JobConfig, cluster: ClusterSpec | None = None,
             batch_size: int | None = None, types: list[str] | None = None) -> PlanReport:
    """Plan ``cfg``'s tables for ``cluster`` (None: the job's own ``train.num_workers`` workers,
    GPUs if ``train.use_gpu`` else CPU, with ``train.memory_per_worker_gb`` /
    ``gpu_memory_gb``), ``batch_size`` per rank (default
    ``train.batch_size``), ``types`` (default ``sharding.types``). In-process, no devices.

    Raises:
        PlanError: the tables do not fit (names the table, its bytes and the budget).
        ValueError: see :func:`declared_manifest`.
    """
    from rectrain.data.features import FeatureLayout
    from rectrain.models import build_model
    from rectrain.models.zch import set_world
    from rectrain.train.sharding import apply_sparse_optimizer, budget_for

    meta = torch.device("meta")
    model = build_model(FeatureLayout(cfg, declared_manifest(cfg)), cfg.model,
                        sparse_device=meta, dense_device=meta)
    b = batch_size or cfg.train.batch_size
    if cluster is None:  # train.use_gpu None (GPUs if the cluster has them) plans for CPU
        budget = budget_for(cfg.train.model_copy(update={"batch_size": b}),
                            cfg.train.num_workers, "cuda" if cfg.train.use_gpu else "cpu")
    else:
        budget = cluster.budget(b)
    # zch tables: one input bucket per rank, as the workers set it (else TorchRec's planner
    # refuses "uneven buckets per rank")
    set_world(model, budget.world_size)
    # the fused sparse optimiser's state is part of each shard's storage estimate
    apply_sparse_optimizer(model, cfg.optim, torch.device(budget.compute_device))
    return plan_tables(model, list(types or cfg.sharding.types), budget)


def alltoall_bytes(report: PlanReport) -> dict:
    """Bytes the plan's embedding all-to-alls move per training step, from the shards' sizes
    (``B`` = batch per rank x ranks, fp32 embeddings, int64 ids + int32 lengths; pooling factor
    = TorchRec's ``input_lengths``, 1 id per feature by default):

    - input: every feature's ids and lengths to the ranks holding its table's shards (all
      column shards get them; row shards split them);
    - forward output: table_wise / column_wise pooled ``[B, cols]`` per feature; row_wise the
      partial sums of every shard (reduce-scatter); unpooled (EC) tables one vector per id;
    - backward: the same volume as the forward output (gradients of the embeddings);

    each counted ``(W - 1) / W`` (the share that leaves a rank). Returns ``total`` bytes per
    step, ``per_rank`` (total / W) and the split ``input``, ``output`` (forward + backward).
    """
    W = report.budget.world_size
    B = report.budget.batch_size * W
    off = (W - 1) / W
    by_table: dict[str, list[dict]] = {}
    for s in report.shards:
        by_table.setdefault(s["table"], []).append(s)
    inp = out = 0.0
    for name, shards in by_table.items():
        t = report.tables[name]
        F, p = t["features"], t["pooling"]
        st = shards[0]["sharding_type"]
        ids = B * (p * 8 + F * 4)
        inp += ids * (len(shards) if "column" in st else 1) * off
        vec = B * 4 * (F if t["pooled"] else p)
        cols = sum(s["cols"] for s in shards) if "row" not in st else t["dim"] * len(shards)
        out += 2 * vec * cols * off
    return {"total": inp + out, "per_rank": (inp + out) / W, "input": inp, "output": out}


def comm_seconds(per_rank_bytes: float, cluster: ClusterSpec) -> float:
    """Seconds to move ``per_rank_bytes`` per rank in an all-to-all: the share for peers on
    the same node at NVLink speed, the rest at the per-GPU network speed (no overlap)."""
    W, G = cluster.world, cluster.gpus
    if W == 1:
        return 0.0
    intra, inter = (G - 1) / (W - 1), (W - G) / (W - 1)
    return per_rank_bytes * (intra / (cluster.intra_gbs * GB) + inter / (cluster.inter_gbs * GB))
