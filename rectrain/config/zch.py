"""``features[].zch``: settings of a feature with ``encoding: zch`` (TorchRec managed collisions).

The table (``capacity`` rows) sits behind TorchRec's ``MCHManagedCollisionModule``
(``torchrec.modules.mc_modules``): raw 64-bit ids are remapped to rows without collisions among
the ids it holds, and a policy decides which held ids give their row to newcomers
(rectrain/models/zch.py; docs/data.md, "zch").
"""

from __future__ import annotations

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
