"""Sharding plan, DistributedModelParallel and the fused sparse + dense optimisers."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from rectrain.config import OptimSpec, ShardingSpec, TrainSpec
from rectrain.models.zch import set_world
# sharders, embedding_modules, table_sharders, PlanError: re-exported for callers of this module
from rectrain.train.planning import (GiB, Budget, PlanError, embedding_modules,  # noqa: F401
                                     plan_tables, sharders, table_sharders)

_SPARSE_OPT = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad,
               "sgd": torch.optim.SGD, "adam": torch.optim.Adam}
_DENSE_OPT = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


#: fused TBE optimisers FBGEMM implements for CPU tables (Adam is GPU-only)
CPU_SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


def apply_sparse_optimizer(model: nn.Module, spec: OptimSpec,
                           device: torch.device = torch.device("cpu")) -> None:
    """Register the fused sparse optimiser on every embedding table (TorchRec
    ``apply_optimizer_in_backward``: the update runs inside backward, fused into the TBE kernel
    after sharding, so no dense gradient of the tables is ever materialised).

    Raises:
        ValueError: the optimiser has no fused CPU kernel (``adam`` on CPU).
    """
    if device.type == "cpu" and spec.sparse not in CPU_SPARSE_OPTIMIZERS:
        raise ValueError(f"optim.sparse: {spec.sparse!r} has no fused CPU kernel in FBGEMM; "
                         f"use one of {CPU_SPARSE_OPTIMIZERS} on CPU (adam needs GPUs)")
    kwargs = {"lr": spec.sparse_lr}
    if spec.sparse_weight_decay:
        if spec.sparse not in ("rowwise_adagrad", "adagrad", "adam"):
            raise ValueError(f"optim.sparse_weight_decay is not supported by the fused "
                             f"{spec.sparse!r} kernel; use rowwise_adagrad, adagrad or adam")
        from rectrain.compat import weight_decay_mode
        WeightDecayMode = weight_decay_mode()
        # FBGEMM's TBE ignores weight_decay unless a mode is set; L2 adds wd * w to the gradient
        # of the rows looked up in the batch (in the spirit of DIN's mini-batch aware
        # regularisation: untouched rows are not decayed)
        kwargs["weight_decay"] = spec.sparse_weight_decay
        kwargs["weight_decay_mode"] = WeightDecayMode.L2
    if spec.sparse == "rowwise_adagrad":
        kwargs["eps"] = 1e-8
    for m in embedding_modules(model):
        apply_optimizer_in_backward(_SPARSE_OPT[spec.sparse], m.parameters(), kwargs)


def make_plan(model: nn.Module, spec: ShardingSpec, device: torch.device,
              pg: dist.ProcessGroup | None = None, train: TrainSpec | None = None):
    """A sharding plan from TorchRec's ``EmbeddingShardingPlanner``
    (:func:`rectrain.train.planning.plan_tables`), each table restricted to the types in
    ``spec.types`` that its module's sharder supports on ``device`` (on CPU,
    EmbeddingBagCollection has no row_wise: such tables fall back to table_wise, logged), over a
    topology of this process group's ranks with ``train``'s memory budget
    (``memory_per_worker_gb`` host memory, ``gpu_memory_gb`` HBM; None: TorchRec's defaults) and
    batch size. The plan is the same on every rank (planned on rank 0 and broadcast).

    Returns:
        :class:`~rectrain.train.planning.PlanReport` (``.plan`` is the ``ShardingPlan``).

    Raises:
        PlanError: the tables do not fit the budget (on every rank, before any allocation).
    """
    world = dist.get_world_size(pg) if dist.is_initialized() else 1
    budget = budget_for(train, world, device.type)
    return plan_tables(model, list(spec.types), budget,
                       (pg or dist.GroupMember.WORLD) if dist.is_initialized() else None)


def budget_for(train: TrainSpec | None, world: int, device_type: str) -> Budget:
    """The planner's :class:`Budget` of a job's ``train`` section on ``world`` ranks."""
    gb = lambda x: int(x * GiB) if x is not None else None  # noqa: E731
    return Budget(world_size=world, compute_device=device_type,
                  hbm_bytes=gb(train.gpu_memory_gb) if train else None,
                  ddr_bytes=gb(train.memory_per_worker_gb) if train else None,
                  batch_size=train.batch_size if train else 512)


def shard_model(model: nn.Module, spec: ShardingSpec, optim: OptimSpec,
                device: torch.device, train: TrainSpec | None = None,
                report: list | None = None) -> tuple[DistributedModelParallel,
                                                     CombinedOptimizer, ShardingPlan]:
    """Shard ``model`` (embedding modules on the ``meta`` device) with DMP, planned for
    ``train``'s memory budget (see :func:`make_plan`); ``report``, if given, gets the
    :class:`~rectrain.train.planning.PlanReport` appended (storage per rank, perf estimates).

    Returns ``(dmp, optimizer, plan)`` where ``optimizer`` combines DMP's fused sparse optimiser
    and a dense optimiser (Adam/AdamW/SGD) over every parameter that has no in-backward optimiser.

    Raises:
        PlanError: the tables do not fit ``train.memory_per_worker_gb`` / ``gpu_memory_gb``.
    """
    apply_sparse_optimizer(model, optim, device)
    set_world(model, dist.get_world_size() if dist.is_initialized() else 1)
    planned = make_plan(model, spec, device, train=train)
    if report is not None:
        report.append(planned)
    plan = planned.plan
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders())
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    kwargs = {"lr": optim.dense_lr}
    if optim.dense_weight_decay:
        kwargs["weight_decay"] = optim.dense_weight_decay
    dense_opt = KeyedOptimizerWrapper(dense_params,
                                      lambda params: _DENSE_OPT[optim.dense](params, **kwargs))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense_opt]), plan
