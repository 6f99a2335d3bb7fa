"""Memory-aware sharding plans: TorchRec's ``EmbeddingShardingPlanner`` over a ``Topology`` built
from the job's memory budget (or from a cluster that is not here), and a report of where every
shard goes, its storage and the planner's perf estimate.

- :func:`topology` builds the planner's ``Topology`` (TorchRec ``TopologyFactory``) from a
  :class:`Budget`: per-rank HBM (``train.gpu_memory_gb``) and host memory
  (``train.memory_per_worker_gb``) capacities, ranks per node and the interconnect bandwidths.
- :func:`plan_tables` runs the planner (``plan`` in one process, or on rank 0 and broadcast to
  every rank of a process group) and returns a :class:`PlanReport`; a job whose tables do not fit
  raises :class:`PlanError` (naming the largest table, its bytes and the budget) on every rank.

Storage reservation: TorchRec's ``HeuristicalStorageReservation`` (15 % of HBM, plus 6 × the
dense parameters and 20 × the batch's KJT bytes per rank, from its source); on CPU the 15 %
margin is taken from host memory too (TorchRec applies it to HBM only), since there the tables
share the worker's memory with Python, Ray Data blocks and the dense model.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.proposers import (GreedyProposer, GridSearchProposer,
                                                    UniformProposer)
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (HardwareConfig, KernelConfig, PlannerError,
                                                PlannerErrorType, Stats, Topology,
                                                TopologyFactory, TrainerConfig)
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

GiB = 1024 ** 3
#: TorchRec's default reservation margin (EmbeddingPlannerBase
#: ``heuristical_storage_reservation_percentage``)
RESERVE_FRACTION = 0.15
#: most sharding-option combinations TorchRec's GridSearchProposer tries (else it stands aside)
GRID_MAX = 1000


def sharders() -> list:
    """TorchRec's EBC and EC sharders (the modules rectrain models shard), and the
    managed-collision EC sharder (zch tables, row_wise only)."""
    from rectrain.models.zch import mc_ec_sharder
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder(), mc_ec_sharder()]


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Every EmbeddingBagCollection / EmbeddingCollection in ``model``."""
    return [m for m in model.modules()
            if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


def table_sharders(model: nn.Module) -> list[tuple[str, object]]:
    """``(table name, sharder of its module)`` for every embedding table of ``model``."""
    ebc_sharder, ec_sharder = sharders()[:2]
    out = []
    for m in embedding_modules(model):
        if isinstance(m, EmbeddingBagCollection):
            out += [(c.name, ebc_sharder) for c in m.embedding_bag_configs()]
        else:
            out += [(c.name, ec_sharder) for c in m.embedding_configs()]
    return out


class PlanError(ValueError):
    """No sharding plan fits the budget (raised on every rank, before any table is allocated)."""


@dataclass(frozen=True)
class Budget:
    """What the planner may use. Capacities are per rank in bytes, bandwidths in bytes/ms
    (TorchRec's unit); None takes TorchRec's default (HBM 32 GiB, DDR 128 GiB, NVLink-class
    600 GB/s within a node, 12.5 GB/s across nodes; ``torchrec.distributed.planner.constants``).
    """

    world_size: int
    compute_device: str = "cpu"
    local_world_size: int | None = None
    hbm_bytes: int | None = None
    ddr_bytes: int | None = None
    intra_host_bw: float | None = None
    inter_host_bw: float | None = None
    hbm_mem_bw: float | None = None
    batch_size: int = 512


def topology(b: Budget) -> Topology:
    """The planner's ``Topology`` for ``b`` (TorchRec ``TopologyFactory.create_topology``)."""
    bws = (b.intra_host_bw, b.inter_host_bw, b.hbm_mem_bw)
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=b.world_size, local_world_size=b.local_world_size,
                      hbm_cap_bytes=b.hbm_bytes, ddr_cap_bytes=b.ddr_bytes),
        hardware_config=HardwareConfig(intra_host_bw=b.intra_host_bw,
                                       inter_host_bw=b.inter_host_bw, hbm_mem_bw=b.hbm_mem_bw),
        kernel_config=KernelConfig(compute_device=b.compute_device,
                                   use_hardware_based_bandwidth=any(x is not None for x in bws)))


class _Reservation(HeuristicalStorageReservation):
    """TorchRec's heuristic reservation; on CPU its margin is also taken from host memory."""

    def __init__(self, dense_bytes: int) -> None:
        with warnings.catch_warnings():  # its FutureWarning is about dry runs without a dense
            warnings.simplefilter("ignore", FutureWarning)  # estimate: we pass one
            super().__init__(percentage=RESERVE_FRACTION, dense_tensor_estimate=dense_bytes)

    def reserve(self, topology, batch_size, module, sharders, constraints=None):
        out = super().reserve(topology, batch_size, module, sharders, constraints)
        if out.compute_device == "cpu":
            for d in out.devices:
                d.storage.ddr = int((1 - RESERVE_FRACTION) * d.storage.ddr)
            self._last_reserved_topology = copy.deepcopy(out)
        return out


class _Capture(Stats):
    """A TorchRec ``Stats`` that keeps the chosen sharding options (shards with rank, storage
    and perf) instead of printing the planner's table."""

    def __init__(self) -> None:
        self.best_plan: list = []

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals,
            num_plans, run_time, best_plan, *args, **kwargs) -> None:
        self.best_plan = list(best_plan or [])


@dataclass
class PlanReport:
    """A sharding plan and the planner's own estimates for it.

    Attributes:
        plan: TorchRec ``ShardingPlan`` (what DMP takes).
        shards: one dict per shard: ``table``, ``sharding_type``, ``compute_kernel``, ``rank``,
            ``rows``, ``cols``, ``hbm_bytes``, ``ddr_bytes`` (weights + optimiser state + I/O
            buffers, TorchRec's storage estimate), ``perf_ms`` (forward + backward compute and
            comms of the shard for one step at ``batch_size`` per rank, TorchRec's estimate),
            ``comms_ms``.
        capacity: per rank ``(hbm_bytes, ddr_bytes)`` of the topology.
        available: per rank ``(hbm_bytes, ddr_bytes)`` left for tables after the reservation.
        budget: the :class:`Budget` planned for.
        tables: table -> ``rows``, ``dim``, ``features`` (feature count), ``pooling`` (ids per
            sample over its features, TorchRec's input lengths), ``pooled`` (EBC vs EC).
    """

    plan: ShardingPlan
    shards: list[dict]
    capacity: list[tuple[int, int]]
    available: list[tuple[int, int]]
    budget: Budget
    tables: dict[str, dict] = field(default_factory=dict)

    def storage_per_rank(self) -> list[dict]:
        """Per rank: ``hbm_bytes``, ``ddr_bytes`` of its shards, ``perf_ms`` (sum over them)."""
        out = [{"rank": r, "hbm_bytes": 0, "ddr_bytes": 0, "perf_ms": 0.0, "comms_ms": 0.0}
               for r in range(self.budget.world_size)]
        for s in self.shards:
            o = out[s["rank"]]
            for k in ("hbm_bytes", "ddr_bytes", "perf_ms", "comms_ms"):
                o[k] += s[k]
        return out

    def step_ms(self) -> float:
        """The planner's estimated embedding step time (ms): the slowest rank's summed shard
        perf, which is what TorchRec's partitioner balances. Covers the sharded embedding
        modules' lookups and input/output all-to-alls, not the dense layers."""
        return max((r["perf_ms"] for r in self.storage_per_rank()), default=0.0)

    def format(self) -> str:
        """Shards by table, then storage per rank against what is available for tables after
        the reservation and the capacity (GiB; on GPUs HBM and host memory, where TorchRec's
        UVM kernels keep tables that HBM cannot hold)."""
        gpu = self.budget.compute_device != "cpu"
        tiers = [("HBM", "hbm_bytes", 0), ("DDR", "ddr_bytes", 1)] if gpu else \
            [("DDR", "ddr_bytes", 1)]
        head = "".join(f" {t} GiB" for t, _, _ in tiers)
        lines = [f"table            type               kernel             rank       rows x cols "
                 f"{head}  est. ms"]
        for s in sorted(self.shards, key=lambda s: (s["table"], s["rank"])):
            gib = "".join(f" {s[k] / GiB:7.3f}" for _, k, _ in tiers)
            lines.append(f"{s['table']:<16} {s['sharding_type']:<18} {s['compute_kernel']:<18} "
                         f"{s['rank']:>4} {s['rows']:>10} x {s['cols']:<5}{gib} "
                         f"{s['perf_ms']:8.3f}")
        lines.append("storage per rank (GiB): used / available for tables / capacity")
        for r in self.storage_per_rank():
            i = r["rank"]
            use = "   ".join(f"{t} {r[k] / GiB:8.3f} / {self.available[i][j] / GiB:8.3f} / "
                           f"{self.capacity[i][j] / GiB:8.2f}" for t, k, j in tiers)
            lines.append(f"  rank {i:>3}: {use}   est. {r['perf_ms']:.3f} ms")
        lines.append(f"estimated embedding step time: {self.step_ms():.3f} ms (slowest rank; "
                     f"batch {self.budget.batch_size} per rank, TorchRec's perf model)")
        return "\n".join(lines)


def constraints_for(model: nn.Module, types: list[str], device_type: str) -> dict:
    """Per table the sharding types of ``types`` its module's sharder supports on
    ``device_type``; a table with none gets ``table_wise`` (on CPU TorchRec's EBC sharder has
    no row_wise: table_wise, column_wise, table_column_wise; its EC sharder has table_wise,
    row_wise, column_wise)."""
    import logging

    out = {}
    for table, sharder in table_sharders(model):
        supported = sharder.sharding_types(device_type)
        allowed = [t for t in types if t in supported]
        if not allowed:
            logging.getLogger(__name__).warning(
                "table %s: none of %s supported by %s on %s; using table_wise", table, types,
                type(sharder).__name__, device_type)
            allowed = ["table_wise"]
        out[table] = ParameterConstraints(sharding_types=allowed)
    from rectrain.models.zch import zch_table_names
    for table in zch_table_names(model):  # TorchRec's managed-collision sharder: row_wise only
        # on CPU its sharder also offers fused_uvm_caching, which the perf estimator rejects
        out[table] = ParameterConstraints(
            sharding_types=["row_wise"],
            compute_kernels=["fused"] if device_type == "cpu" else None)
    return out


def plan_tables(model: nn.Module, types: list[str], budget: Budget,
                pg: dist.ProcessGroup | None = None) -> PlanReport:
    """Plan ``model``'s embedding tables (on ``meta`` or anywhere) for ``budget``.

    With ``pg`` the planner runs on rank 0 and its report (or error) is broadcast, so every rank
    gets the same plan or raises the same :class:`PlanError`.

    Raises:
        PlanError: the tables do not fit the budget (TorchRec ``PlannerError``), naming the
            largest table, its estimated bytes, and the budget per rank and in total.
    """
    def run():
        try:
            return _plan(model, types, budget, sharders())
        except PlannerError as e:
            return PlanError(_explain(e, model, budget))

    if pg is not None and dist.get_world_size(pg) > 1:
        box = [run() if dist.get_rank(pg) == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0), group=pg)
        out = box[0]
    else:
        out = run()
    if isinstance(out, PlanError):
        raise out
    return out


def _plan(model, types, budget: Budget, sharder_list) -> PlanReport:
    topo = topology(budget)
    stats = _Capture()
    reservation = _Reservation(_dense_estimate(model))
    planner = EmbeddingShardingPlanner(
        topology=topo, batch_size=budget.batch_size, storage_reservation=reservation,
        constraints=constraints_for(model, types, budget.compute_device), stats=[stats],
        # TorchRec's proposers, grid search capped at GRID_MAX combinations (its default
        # 10,000 spent 30 s on 4 tables x 9 GPU options on 16 ranks here)
        proposer=[GridSearchProposer(max_proposals=GRID_MAX), GreedyProposer(),
                  GreedyProposer(use_depth=False), UniformProposer()])
    plan = planner.plan(model, sharder_list)
    reserved = reservation.last_reserved_topology or topo
    shards = []
    for so in stats.best_plan:
        for sh in so.shards:
            shards.append({
                "table": so.name, "sharding_type": so.sharding_type,
                "compute_kernel": so.compute_kernel, "rank": sh.rank,
                "rows": sh.size[0], "cols": sh.size[1],
                "hbm_bytes": sh.storage.hbm, "ddr_bytes": sh.storage.ddr,
                "perf_ms": sh.perf.total,
                "comms_ms": sh.perf.fwd_comms + sh.perf.bwd_comms})
    tables = {so.name: {"rows": so.tensor.shape[0], "dim": so.tensor.shape[1],
                        "features": len(so.input_lengths), "pooling": sum(so.input_lengths),
                        "pooled": so.is_pooled} for so in stats.best_plan}
    return PlanReport(plan=plan, shards=shards,
                      capacity=[(d.storage.hbm, d.storage.ddr) for d in topo.devices],
                      available=[(d.storage.hbm, d.storage.ddr) for d in reserved.devices],
                      budget=budget, tables=tables)


def _dense_estimate(model: nn.Module) -> int:
    """TorchRec's dense heuristic (6 x parameter bytes: weights, optimiser state, DDP buffers)
    over the parameters outside the embedding modules, counted from shapes (works on meta)."""
    emb = {id(p) for m in embedding_modules(model) for p in m.parameters()}
    return max(1, 6 * sum(p.numel() * p.element_size() for p in model.parameters()
                          if id(p) not in emb))


def _explain(e: PlannerError, model: nn.Module, budget: Budget) -> str:
    """A PlannerError as a sentence naming the largest table, its bytes and the budget."""
    if getattr(e, "error_type", None) != PlannerErrorType.INSUFFICIENT_STORAGE:
        return f"sharding plan: TorchRec's planner found no plan: {e}"
    sizes = {}
    for m in embedding_modules(model):
        for name, p in m.named_parameters():
            sizes[name.split(".")[-2]] = p.numel() * p.element_size()
    name, nbytes = max(sizes.items(), key=lambda kv: kv[1])
    gpu = budget.compute_device != "cpu"
    field_ = "train.gpu_memory_gb" if gpu else "train.memory_per_worker_gb"
    cap = budget.hbm_bytes if gpu else budget.ddr_bytes
    cap_txt = f"{cap / GiB:.3g} GiB" if cap is not None else "TorchRec's default"
    return (f"{field_}: the embedding tables do not fit {budget.world_size} rank(s) x {cap_txt} "
            f"({'HBM' if gpu else 'host memory'}); largest table {name!r}: {nbytes:,} bytes "
            f"({nbytes / GiB:.3g} GiB) of weights alone, all tables {sum(sizes.values()):,} "
            f"bytes, before optimiser state and the {RESERVE_FRACTION:.0%} + dense + batch "
            f"reservation per rank. Raise {field_} (rectrain plan: --hbm-gb or the "
            f"topology) or train.num_workers, or lower "
            f"model.embedding_dim / the table's rows (TorchRec: {str(e).splitlines()[0]})")
