"""``features[].zch``: settings of a feature with ``encoding: zch`` (TorchRec managed collisions).

The table (``capacity`` rows) sits behind TorchRec's ``MCHManagedCollisionModule``
(``torchrec.modules.mc_modules``): raw 64-bit ids are remapped to rows without collisions among
the ids it holds, and a policy decides which held ids give their row to newcomers
(rectrain/models/zch.py; docs/data.md, "zch").
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ZchSpec(BaseModel):
    """Eviction settings of one managed-collision table."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["lfu", "lru", "distance_lfu"] = Field(
        "lfu", description="which held ids lose their row when newcomers arrive: lfu = the "
                           "least counted (TorchRec LFU_EvictionPolicy), lru = the least "
                           "recently seen (LRU_EvictionPolicy), distance_lfu = counts decayed by "
                           "the steps since last seen (DistanceLFU_EvictionPolicy)")
    eviction_interval: int = Field(
        1, ge=1, description="training steps between admissions/evictions (ids seen in between "
                             "are pooled; until admitted they share the table's miss row)")
    decay_exponent: float = Field(
        1.0, gt=0, description="lru / distance_lfu: exponent of the steps since last seen")


def check_zch(job, retrieval_models: tuple[str, ...]) -> None:
    """Rules of ``encoding: zch`` a job can break before any worker starts (``job``: a
    :class:`rectrain.config.JobConfig`; ``retrieval_models``: the model names that rank every
    item row, passed in so this module does not import the model configs); the model and sharder would otherwise raise them on
    every worker after Ray's start-up (rectrain/models/zch.py, rectrain/models/sparse_arch.py).

    Raises:
        ValueError: naming the ``features.<i>`` (or ``model.name``) field: a zch table no
            sequence feature shares (pooled: no CPU row-wise sharder), a zch job with a sequence
            table that is not zch, a capacity that some world size of the job (``train.
            min_workers`` .. ``train.num_workers``) does not divide (torchrec#1591), a retrieval
            model (full ranking enumerates item rows), a match ``category`` over a zch item
            (its per-item category lookup is indexed by item row).
    """
    feats = job.features
    zch = {f.table_name: i for i, f in enumerate(feats) if f.encoding == "zch"}
    if not zch:
        return
    first = min(zch.values())
    if job.model.name in retrieval_models:
        raise ValueError(f"model.name: {job.model.name} ranks every item row, which encoding zch "
                         f"(features.{first}: {feats[first].name!r}) does not map to items; use "
                         f"a ranking model or encoding vocab")
    seq_tables = {f.table_name for f in feats if f.kind == "sequence"}
    for table, i in zch.items():
        if table not in seq_tables:
            raise ValueError(f"features.{i}.encoding: zch on {feats[i].name!r}, whose table "
                             f"{table!r} no sequence feature shares (a pooled zch table cannot "
                             f"be sharded on CPU); use encoding hash or vocab, or a sequence on it")
    plain = sorted(seq_tables - set(zch))
    if plain:
        raise ValueError(f"features: sequence tables {plain} are not zch while {sorted(zch)} "
                         f"are; give every sequence-table source feature encoding: zch (one "
                         f"managed-collision EC holds them all)")
    tc = job.train
    worlds = range(tc.min_workers or tc.num_workers, tc.num_workers + 1)
    for table, i in zch.items():
        cap = feats[i].capacity
        bad = [w for w in worlds if cap % w]
        if bad:
            lcm = math.lcm(*worlds)
            which = (f"train.num_workers = {tc.num_workers}" if len(worlds) == 1 else
                     f"a world size of train.min_workers..num_workers = {worlds[0]}.."
                     f"{worlds[-1]}")
            raise ValueError(f"features.{i}.capacity: {cap} is not a multiple of {bad[0]}, "
                             f"{which} (TorchRec's row-wise zch shards need it, "
                             f"meta-pytorch/torchrec#1591); e.g. capacity: "
                             f"{lcm * max(1, cap // lcm)}")
    for i, f in enumerate(feats):
        if f.kind == "match" and f.category:
            seq = next((g for g in feats if g.name == f.source), None)
            cand = next((g for g in feats if seq is not None and g.name == seq.source), None)
            if cand is not None and cand.table_name in zch:
                raise ValueError(f"features.{i}.category: a category match looks categories up "
                                 f"by item row, and {cand.name!r} has encoding zch (raw ids); "
                                 f"drop category or use encoding vocab")
