"""The one place where rectrain bridges the versions of its stack it supports.

Supported triples (torch / torchrec / fbgemm-gpu), on Python 3.11 and 3.12:

- 2.13 / 1.8 / 1.8: the pins of ``scripts/setup.sh`` (``fbgemm-gpu-cpu`` or CUDA ``fbgemm-gpu``);
- 2.11 / 1.6 / 1.6: an air-gapped GPU node's preinstalled torch 2.11.0+cu130 with
  ``torchrec==1.6.1`` and ``fbgemm-gpu==1.6.0`` carried as wheels (``benchmarks/gpu/``).

The pins live in the set-up script; nothing here asserts a version at import time. Every API
rectrain uses was compared between torchrec 1.6.1 and 1.8.0 (the signatures of DMP, the planner,
``TopologyFactory``/``TrainerConfig``/``KernelConfig``, ``ParameterConstraints``,
``apply_optimizer_in_backward``, the keyed optimisers, ``RowWiseAdagrad``,
``TrainPipelineSparseDist``, EBC/EC, the embedding configs and ``KeyedJaggedTensor``): 1.8 only
adds keyword arguments rectrain does not pass. The one difference that reaches rectrain is in
FBGEMM: ``WeightDecayMode`` moved to ``fbgemm_gpu.tbe.config.optimizer_config`` (1.8); 1.6 has
it only in ``fbgemm_gpu.split_table_batched_embeddings_ops_training`` (1.8 re-exports it there).

``python -m rectrain.compat`` prints the versions found and checks that every name rectrain
imports from torchrec/fbgemm resolves (exit 1 naming the first that does not).
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

#: ``(module, attribute)`` rectrain imports from torchrec/fbgemm-gpu (``python -m rectrain.compat``
#: checks each; keep in step with the imports of rectrain/train/sharding.py, planning.py,
#: pipeline.py, models/ and data/features.py)
USED_NAMES = (
    ("torchrec.distributed", "DistributedModelParallel"),
    ("torchrec.distributed.embedding", "EmbeddingCollectionSharder"),
    ("torchrec.distributed.embeddingbag", "EmbeddingBagCollectionSharder"),
    ("torchrec.distributed.planner", "EmbeddingShardingPlanner"),
    ("torchrec.distributed.planner", "ParameterConstraints"),
    ("torchrec.distributed.planner.proposers", "GreedyProposer"),
    ("torchrec.distributed.planner.proposers", "GridSearchProposer"),
    ("torchrec.distributed.planner.proposers", "UniformProposer"),
    ("torchrec.distributed.planner.storage_reservations", "HeuristicalStorageReservation"),
    ("torchrec.distributed.planner.types", "HardwareConfig"),
    ("torchrec.distributed.planner.types", "KernelConfig"),
    ("torchrec.distributed.planner.types", "PlannerError"),
    ("torchrec.distributed.planner.types", "PlannerErrorType"),
    ("torchrec.distributed.planner.types", "Stats"),
    ("torchrec.distributed.planner.types", "Topology"),
    ("torchrec.distributed.planner.types", "TopologyFactory"),
    ("torchrec.distributed.planner.types", "TrainerConfig"),
    ("torchrec.distributed.train_pipeline", "TrainPipelineSparseDist"),
    ("torchrec.distributed.types", "ShardingPlan"),
    ("torchrec.modules.embedding_configs", "DataType"),
    ("torchrec.modules.embedding_configs", "EmbeddingBagConfig"),
    ("torchrec.modules.embedding_configs", "EmbeddingConfig"),
    ("torchrec.modules.embedding_configs", "PoolingType"),
    ("torchrec.modules.embedding_modules", "EmbeddingBagCollection"),
    ("torchrec.modules.embedding_modules", "EmbeddingCollection"),
    ("torchrec.optim.apply_optimizer_in_backward", "apply_optimizer_in_backward"),
    ("torchrec.optim.keyed", "CombinedOptimizer"),
    ("torchrec.optim.keyed", "KeyedOptimizerWrapper"),
    ("torchrec.optim.optimizers", "in_backward_optimizer_filter"),
    ("torchrec.optim.rowwise_adagrad", "RowWiseAdagrad"),
    ("torchrec.sparse.jagged_tensor", "KeyedJaggedTensor"),
    ("torchrec.streamable", "Pipelineable"),
)


def version_tuple(v: str) -> tuple[int, ...]:
    """``"2.11.0+cu130"`` -> ``(2, 11, 0)``; ``"1.6.0rc1"`` -> ``(1, 6, 0)`` (leading digits of
    each dot-separated field, at most three fields)."""
    out = []
    for field in v.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in field:
            if not ch.isdigit():
                break
            digits += ch
        out.append(int(digits or 0))
    return tuple(out)


def dist_version(name: str) -> str | None:
    """Installed version of distribution ``name`` (None when absent). fbgemm's CPU build is the
    distribution ``fbgemm-gpu-cpu`` with the same ``fbgemm_gpu`` package."""
    names = ("fbgemm-gpu", "fbgemm-gpu-cpu") if name == "fbgemm-gpu" else (name,)
    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return None


def stack_versions() -> dict:
    """Python, torch (with its CUDA build), torchrec, fbgemm-gpu, tensordict, pydantic and ray
    versions as strings (None where a package is absent); no import of torchrec/ray."""
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda}
    for n in ("torchrec", "fbgemm-gpu", "tensordict", "pydantic", "ray"):
        out[n.replace("-", "_")] = dist_version(n)
    return out


def weight_decay_mode():
    """FBGEMM's ``WeightDecayMode`` enum (``.L2`` adds ``wd * w`` to the looked-up rows' gradient).

    fbgemm-gpu 1.8: ``fbgemm_gpu.tbe.config.optimizer_config``; 1.6:
    ``fbgemm_gpu.split_table_batched_embeddings_ops_training`` (where 1.8 re-exports it).

    Raises:
        ImportError: neither module defines it (fbgemm-gpu older than 1.6 or missing).
    """
    for mod in ("fbgemm_gpu.tbe.config.optimizer_config",
                "fbgemm_gpu.split_table_batched_embeddings_ops_training"):
        try:
            return getattr(importlib.import_module(mod), "WeightDecayMode")
        except (ImportError, AttributeError):
            continue
    raise ImportError("fbgemm_gpu: WeightDecayMode found neither in "
                      "fbgemm_gpu.tbe.config.optimizer_config (1.8) nor in "
                      "fbgemm_gpu.split_table_batched_embeddings_ops_training (1.6)")


def check_names(names=USED_NAMES) -> list[str]:
    """Resolve every ``(module, attribute)``; returns the ones that fail as
    ``"module.attribute: error"`` strings (empty when all resolve)."""
    bad = []
    for mod, attr in names:
        try:
            getattr(importlib.import_module(mod), attr)
        except Exception as e:  # noqa: BLE001 - report every failure, not only ImportError
            bad.append(f"{mod}.{attr}: {type(e).__name__}: {e}")
    try:
        weight_decay_mode()
    except ImportError as e:
        bad.append(str(e))
    return bad


def main() -> int:
    import json

    print(json.dumps(stack_versions()), flush=True)
    bad = check_names()
    for b in bad:
        print(f"rectrain.compat: missing {b}", file=sys.stderr)
    if not bad:
        print(f"rectrain.compat: all {len(USED_NAMES) + 1} torchrec/fbgemm names resolve")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
