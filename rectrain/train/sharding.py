"""Sharding plan, DistributedModelParallel and the fused sparse + dense optimisers."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from rectrain.config import OptimSpec, ShardingSpec

log = logging.getLogger(__name__)

_SPARSE_OPT = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad,
               "sgd": torch.optim.SGD, "adam": torch.optim.Adam}
_DENSE_OPT = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def sharders() -> list:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
    return [m for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


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
              pg: dist.ProcessGroup | None = None) -> ShardingPlan:
    """A sharding plan from TorchRec's ``EmbeddingShardingPlanner``, each table restricted to the
    types in ``spec.types`` that its module's sharder supports on ``device`` (on CPU,
    EmbeddingBagCollection has no row_wise: such tables fall back to table_wise, logged). The plan
    is the same on every rank (``collective_plan`` plans on rank 0 and broadcasts)."""
    world = dist.get_world_size(pg) if dist.is_initialized() else 1
    constraints = {}
    for table, sharder in _table_sharders(model):
        supported = sharder.sharding_types(device.type)
        allowed = [t for t in spec.types if t in supported]
        if not allowed:
            log.warning("table %s: none of %s supported by %s on %s; using table_wise", table,
                        spec.types, type(sharder).__name__, device.type)
            allowed = ["table_wise"]
        constraints[table] = ParameterConstraints(sharding_types=allowed)
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world), kernel_config=KernelConfig(compute_device=device.type))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    if dist.is_initialized():
        return planner.collective_plan(model, sharders(), pg or dist.GroupMember.WORLD)
    return planner.plan(model, sharders())


def _table_sharders(model: nn.Module) -> list[tuple[str, object]]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    ebc_sharder, ec_sharder = sharders()
    out = []
    for m in embedding_modules(model):
        if isinstance(m, EmbeddingBagCollection):
            out += [(c.name, ebc_sharder) for c in m.embedding_bag_configs()]
        else:
            out += [(c.name, ec_sharder) for c in m.embedding_configs()]
    return out


def shard_model(model: nn.Module, spec: ShardingSpec, optim: OptimSpec,
                device: torch.device) -> tuple[DistributedModelParallel, CombinedOptimizer,
                                               ShardingPlan]:
    """Shard ``model`` (embedding modules on the ``meta`` device) with DMP.

    Returns ``(dmp, optimizer, plan)`` where ``optimizer`` combines DMP's fused sparse optimiser
    and a dense optimiser (Adam/AdamW/SGD) over every parameter that has no in-backward optimiser.
    """
    apply_sparse_optimizer(model, optim, device)
    plan = make_plan(model, spec, device)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders())
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    kwargs = {"lr": optim.dense_lr}
    if optim.dense_weight_decay:
        kwargs["weight_decay"] = optim.dense_weight_decay
    dense_opt = KeyedOptimizerWrapper(dense_params,
                                      lambda params: _DENSE_OPT[optim.dense](params, **kwargs))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense_opt]), plan
