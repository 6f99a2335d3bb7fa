"""Zero-collision tables with eviction (``encoding: zch``): TorchRec's managed collisions.

A zch table is an ``EmbeddingCollection`` behind TorchRec's ``MCHManagedCollisionModule``
(``torchrec.modules.mc_modules``, wrapped in ``ManagedCollisionEmbeddingCollection``): the
samples carry raw 63-bit ids (rectrain/data/prepare/rawids.py) and the module keeps, per rank,
``_mch_sorted_raw_ids [z]`` int64 (the ids it holds, sorted; ``INT64_MAX`` = free),
``_mch_remapped_ids_mapping [z]`` int64 (the table row of each) and the policy's metadata
(``_mch_counts [z]`` for LFU, ``_mch_last_access_iter [z]`` for LRU). Every
``eviction_interval`` training steps the ids seen since the last interval are admitted into free
slots, or in place of held ids the policy ranks lower (LFU: fewer counts); ids not held share
the table's last row per shard (the **miss row**). Two held ids never share a row.

What rectrain adds (:class:`CountingMCH`): per-table counters of admitted and evicted ids and
of lookups served by the miss row (``colliding``, training only), reported per epoch by
:func:`epoch_stats`; and :func:`redistribute`, which makes a checkpoint load at another world
size correct. TorchRec's row-wise sharding routes a raw id to rank ``id // ceil((2**63-1) / W)``
and gives rank r the rows ``[r z/W, (r+1) z/W)``, so DCP's row-sliced resharding of the
buffers puts ids on ranks that no longer receive them, pointing at rows another rank holds;
:func:`redistribute` gathers the held ids with their rows (weights and fused optimiser state)
and deals them to the ranks that own them now.

Sharding: TorchRec's managed-collision sharder supports ``row_wise`` only
(``ManagedCollisionCollectionSharder.sharding_types``); the EC sharder has ``row_wise`` on CPU,
so zch sequence tables shard on CPU/gloo and on GPUs. The EBC sharder has no ``row_wise`` on
CPU, so a zch table on an ``EmbeddingBagCollection`` (a pooled feature) could not be sharded
there: rectrain supports zch on sequence tables (EC) only. TorchRec's newer
``HashZchManagedCollisionModule`` (multi-probe ZCH) is not usable on CPU: fbgemm's CPU
``zero_collision_hash`` only looks up (``Expected readonly to be true``), it never inserts.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import (DistanceLFU_EvictionPolicy, LFU_EvictionPolicy,
                                         LRU_EvictionPolicy, ManagedCollisionCollection,
                                         MCHManagedCollisionModule)

from rectrain.config.zch import ZchSpec

#: a free slot in ``_mch_sorted_raw_ids``
FREE = torch.iinfo(torch.int64).max
_COUNTERS = ("admitted", "evicted", "colliding")
#: state-dict keys of a managed-collision module that belong to the current world size (each
#: shard's output segments): a checkpoint load keeps them (TorchRec's ``validate_state``
#: asserts this shard's row range is among them)
WORLD_LOCAL_KEYS = ("._output_segments_tensor",)


def eviction_policy(spec: ZchSpec):
    """TorchRec's eviction policy object for ``spec.policy``."""
    if spec.policy == "lfu":
        return LFU_EvictionPolicy()
    if spec.policy == "lru":
        return LRU_EvictionPolicy(decay_exponent=spec.decay_exponent)
    return DistanceLFU_EvictionPolicy(decay_exponent=spec.decay_exponent)


class CountingMCH(MCHManagedCollisionModule):
    """``MCHManagedCollisionModule`` that counts, per rank (int64 ``[1]`` buffers, not saved):
    ``_zch_admitted`` (ids that took a slot), ``_zch_evicted`` (held ids that lost theirs) and
    ``_zch_colliding`` (lookups in training mode served by the shared miss row). Same
    constructor as its parent (TorchRec rebuilds it per shard with ``type(self)(...)``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for c in _COUNTERS:
            self.register_buffer(f"_zch_{c}", torch.zeros(1, dtype=torch.int64,
                                                          device=self.device), persistent=False)

    @torch.no_grad()
    def _update_and_evict(self, uniq_ids, uniq_ids_counts, uniq_ids_metadata) -> None:
        before = self._mch_sorted_raw_ids.clone()
        super()._update_and_evict(uniq_ids, uniq_ids_counts, uniq_ids_metadata)
        after = self._mch_sorted_raw_ids
        held_before, held_after = before[before != FREE], after[after != FREE]
        self._zch_admitted += (~torch.isin(held_after, held_before)).sum()
        self._zch_evicted += (~torch.isin(held_before, held_after)).sum()

    def remap(self, features, mutate_miss_lengths: bool = True, write_weights=None):
        out = super().remap(features)
        if self.training:
            miss = self._output_global_offset + self._zch_size - 1
            for jt in out.values():
                self._zch_colliding += (jt.values() == miss).sum()
        return out


def make_sequence_ec(tables: list[EmbeddingConfig], zch: dict, device: torch.device | None):
    """The sequence tables' module: a plain ``EmbeddingCollection`` when no table is zch, else
    a ``ManagedCollisionEmbeddingCollection`` with a :class:`CountingMCH` of ``num_embeddings``
    slots per table. ``zch``: table -> its zch feature's ``FeatureSpec``.

    Raises:
        ValueError: a zch job with a sequence table that is not zch (TorchRec's
            ``ManagedCollisionCollection`` needs a managed-collision module for every table of
            its EC); names the tables.
    """
    ec = EmbeddingCollection(tables=tables, device=device)
    if not any(t.name in zch for t in tables):
        return ec
    plain = [t.name for t in tables if t.name not in zch]
    if plain:
        raise ValueError(f"features: sequence tables {plain} are not zch while "
                         f"{sorted(zch)} are; give every sequence-table source feature "
                         f"encoding: zch (one managed-collision EC holds them all)")
    mods = {t.name: CountingMCH(zch_size=t.num_embeddings, device=device or torch.device("cpu"),
                                eviction_policy=eviction_policy(zch[t.name].zch or ZchSpec()),
                                eviction_interval=(zch[t.name].zch or ZchSpec()).eviction_interval,
                                name=t.name)
            for t in tables}
    return ManagedCollisionEmbeddingCollection(ec, ManagedCollisionCollection(mods, tables))


def zch_modules(model: nn.Module) -> list[CountingMCH]:
    """Every :class:`CountingMCH` in ``model`` (sharded or not)."""
    return [m for m in model.modules() if isinstance(m, CountingMCH)]


def zch_table_names(model: nn.Module) -> list[str]:
    """Tables behind a managed-collision module (unsharded model, before DMP)."""
    return [t for m in model.modules() if isinstance(m, ManagedCollisionCollection)
            for t in m._managed_collision_modules]


def set_world(model: nn.Module, world: int) -> None:
    """Before planning: one input bucket per rank (TorchRec's planner refuses a table whose
    ``buckets()`` is not a multiple of the world size, ``enumerators._get_num_buckets``).

    Raises:
        ValueError: a table's rows are not a multiple of ``world`` (TorchRec's row-wise MC
            shards then disagree on the global size, meta-pytorch/torchrec#1591).
    """
    for m in zch_modules(model):
        if m._zch_size % world:
            raise ValueError(f"features: zch table {m._name!r} has capacity {m._zch_size}, not "
                             f"a multiple of train.num_workers = {world}; pick a capacity "
                             f"divisible by every world size you train with (e.g. 12k)")
        m._buckets = world


def _reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def epoch_stats(model: nn.Module) -> dict[str, int]:
    """Collective: per zch table, ``zch_<table>_admitted`` / ``_evicted`` / ``_colliding``
    since the last call (summed over ranks) and ``zch_<table>_held`` (ids holding a row now).
    Empty for a model without zch tables."""
    out: dict[str, int] = {}
    for m in sorted(zch_modules(model), key=lambda m: m._name or ""):
        now = torch.cat([getattr(m, f"_zch_{c}") for c in _COUNTERS]
                        + [(m._mch_sorted_raw_ids != FREE).sum().view(1)]).clone()
        now = _reduce(now).tolist()
        last = getattr(m, "_zch_reported", [0, 0, 0])
        for i, c in enumerate(_COUNTERS):
            out[f"zch_{m._name}_{c}"] = int(now[i] - last[i])
        out[f"zch_{m._name}_held"] = int(now[3])
        m._zch_reported = now[:3]
    return out


def held_ids(model: nn.Module) -> dict[str, dict[int, int]]:
    """This rank's ``{table: {raw id: table row}}`` of every zch table."""
    out = {}
    for m in zch_modules(model):
        raw, rows = m._mch_sorted_raw_ids, m._mch_remapped_ids_mapping
        keep = raw != FREE
        out[m._name] = dict(zip(raw[keep].tolist(), rows[keep].tolist()))
    return out


def _row_tensors(model: nn.Module, optimizer, table: str) -> list[torch.Tensor]:
    """This rank's row-sliced tensors of ``table``: the weight shard ``[z, E]`` and each fused
    optimiser state shard (``[z]`` or ``[z, E]``), views into the TBE's storage."""
    suffix = f"embeddings.{table}.weight"
    out = [t.local_shards()[0].tensor for k, t in model.state_dict().items()
           if k.endswith(suffix) and hasattr(t, "local_shards")]
    if optimizer is not None:
        for k, st in optimizer.state_dict()["state"].items():
            if str(k).endswith(suffix):
                out += [t.local_shards()[0].tensor for t in st.values()
                        if hasattr(t, "local_shards") and t.local_shards()]
    return out


def _gather(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


@torch.no_grad()
def redistribute(model: nn.Module, optimizer=None) -> dict[str, int]:
    """Collective, after a DCP load: make each zch table's state consistent with this world
    size. A rank whose held ids all route to it and point at its rows only re-sorts them
    (TorchRec's ``validate_state``); otherwise (a checkpoint of another world size) every rank
    gathers the held ids (raw id, row, policy metadata) and the table's rows (weights and
    optimiser state, once per table), keeps the ids routed to it (``id // ceil(H / W)``, H =
    ``input_hash_size``), the ``z - 1`` highest-ranked by the policy's metadata if more, and
    writes them to its rows ``[o, o + n)`` in id order. Returns, per table, the ids dropped for
    want of room (also added to ``_zch_evicted``).
    """
    dropped: dict[str, int] = {}
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    for m in sorted(zch_modules(model), key=lambda m: m._name or ""):
        o, z = m._output_global_offset, m._zch_size
        raw, rows = m._mch_sorted_raw_ids, m._mch_remapped_ids_mapping
        held = raw != FREE
        block = (m._input_hash_size + world - 1) // world
        foreign = (((raw[held] // block) != rank).any()
                   | ((rows[held] < o) | (rows[held] >= o + z)).any())
        if not int(_reduce(foreign.to(torch.int64).view(1)).item()):
            m._sort_mch_buffers()
            continue
        meta_names = sorted(m._mch_metadata)
        mine = {"raw": raw[held].numpy(), "row": rows[held].numpy(),
                **{n: m._mch_metadata[n][held].numpy() for n in meta_names}}
        entries = _gather(mine)
        tensors = _row_tensors(model, optimizer, m._name)
        parts = _gather((o, [t.detach().numpy().copy() for t in tensors]))
        g = {k: np.concatenate([e[k] for e in entries]) for k in mine}
        sel = np.flatnonzero(g["raw"] // block == rank)
        if meta_names:  # the policy's ranking: highest metadata (counts / last access) first
            sel = sel[np.argsort(-g[meta_names[0]][sel], kind="stable")]
        dropped[m._name] = int(max(0, len(sel) - (z - 1)))
        sel = sel[: z - 1]
        sel = sel[np.argsort(g["raw"][sel], kind="stable")]
        n = len(sel)
        new_raw = torch.full((z,), FREE, dtype=torch.int64)
        new_raw[:n] = torch.from_numpy(g["raw"][sel])
        raw.copy_(new_raw)
        rows.copy_(torch.arange(o, o + z, dtype=torch.int64))
        for name in meta_names:
            buf = torch.zeros(z, dtype=torch.int64)
            buf[:n] = torch.from_numpy(g[name][sel])
            m._mch_metadata[name].copy_(buf)
        src_rows = g["row"][sel]
        for j, t in enumerate(tensors):
            full = _assemble([(off, arrs[j]) for off, arrs in parts])
            t[:n].copy_(torch.from_numpy(full[src_rows]).to(t.dtype))
        m._zch_evicted += dropped[m._name]
    return dropped


def _assemble(parts: Iterable[tuple[int, np.ndarray]]) -> np.ndarray:
    """A table's full rows from ``(row offset, rows)`` shards."""
    parts = list(parts)
    n = max(off + a.shape[0] for off, a in parts)
    full = np.zeros((n, *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
    for off, a in parts:
        full[off:off + a.shape[0]] = a
    return full


def _sharded_cpu_class():
    from torchrec.distributed.mc_embedding import ShardedManagedCollisionEmbeddingCollection

    class CpuEvictShardedMCEC(ShardedManagedCollisionEmbeddingCollection):
        """TorchRec's sharded MC-EC whose eviction reset also runs on CPU: TorchRec resets an
        evicted row's weights and optimiser state with FBGEMM's ``reset_weight_momentum``,
        which has no CPU kernel in fbgemm-gpu-cpu 1.8 (``NotImplementedError: Could not run
        'fbgemm::reset_weight_momentum' with arguments from the 'CPU' backend``); on CPU the
        same reset is done on the TBE's row views (optimiser state 0, weights re-drawn by the
        table's ``init_fn``, as TorchRec does after its reset)."""

        def _evict(self, evictions_per_table) -> None:
            if self._device.type != "cpu":
                return super()._evict(evictions_per_table)
            with torch.no_grad():
                for table, idx in evictions_per_table.items():
                    if idx is None or idx.numel() == 0:
                        continue
                    tbe, lt = self._table_to_tbe_and_index[table]
                    t, idx = int(lt[0]), idx.long()
                    w = tbe.split_embedding_weights()[t]
                    init_fn = self._embedding_module._table_name_to_config[table].init_fn
                    w[idx] = (init_fn(w[idx]) if init_fn is not None
                              else torch.empty_like(w[idx]).uniform_(
                                  -(1 / w.shape[0]) ** 0.5, (1 / w.shape[0]) ** 0.5))
                    for s in tbe.split_optimizer_states()[t]:
                        s[idx] = 0
    return CpuEvictShardedMCEC


def mc_ec_sharder():
    """TorchRec's ``ManagedCollisionEmbeddingCollectionSharder``, sharding into
    :func:`_sharded_cpu_class`'s module (eviction resets that also work on CPU)."""
    from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder

    cls = _sharded_cpu_class()

    class Sharder(ManagedCollisionEmbeddingCollectionSharder):
        def shard(self, module, params, env, device=None, module_fqn=None):
            return cls(module, params, ec_sharder=self._e_sharder, mc_sharder=self._mc_sharder,
                       env=env, device=device or torch.device("cuda"))
    return Sharder()
