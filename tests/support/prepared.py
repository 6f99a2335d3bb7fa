"""Prepared samples for the tiny job (:mod:`tests.support.tiny`) written by hand, without Ray:
single batches, tables, and whole prepared folders like ``rectrain prepare`` writes."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rectrain.data import storage
from tests.support.tiny import N_GENRES, N_ITEMS, N_USERS, SEQ_LEN


def tiny_manifest() -> dict:
    """The manifest fields the model needs for the tiny job: table sizes and dense stats."""
    return {"tables": {"user_id": N_USERS + 1, "item": N_ITEMS + 1, "age_bucket": 8,
                       "genres": N_GENRES + 1},
            "dense_stats": {"age": {"mean": 40.0, "std": 10.0}}}


def batch_table(rank: int, n: int = 12) -> pa.Table:
    """One batch of ``n`` samples (seeded by ``rank``) with every feature kind of the tiny job;
    row 0 has an empty behaviour sequence."""
    rng = np.random.default_rng(100 + rank)
    seq_lens = rng.integers(0, SEQ_LEN + 1, n)
    seq_lens[0] = 0  # an empty history on every rank
    gen_lens = rng.integers(0, 3, n)
    return pa.table({
        "user_id": rng.integers(0, N_USERS + 1, n),
        "item_id": rng.integers(1, N_ITEMS + 1, n),
        "hist_item_id": pa.array([list(rng.integers(1, N_ITEMS + 1, k)) for k in seq_lens],
                                 pa.list_(pa.int64())),
        "age_bucket": rng.integers(0, 8, n),
        "genres": pa.array([list(rng.integers(1, N_GENRES + 1, k)) for k in gen_lens],
                           pa.list_(pa.int64())),
        "age": rng.uniform(15, 70, n),
        "label": rng.integers(0, 2, n).astype(np.float32),
    })


def sample_table(start: int, n: int) -> pa.Table:
    """``n`` prepared samples (rows ``start..start+n``) with every feature kind of ``tiny_cfg``
    and a label that depends on the item (so a model can learn something)."""
    rng = np.random.default_rng(start)
    item = rng.integers(1, N_ITEMS + 1, n)
    p = 1.0 / (1.0 + np.exp(-(item % 7 - 3.0)))
    return pa.table({
        "user_id": rng.integers(0, N_USERS + 1, n),
        "item_id": item,
        "hist_item_id": pa.array([list(rng.integers(1, N_ITEMS + 1, k))
                                  for k in rng.integers(0, SEQ_LEN + 1, n)], pa.list_(pa.int64())),
        "age_bucket": rng.integers(0, 8, n),
        "genres": pa.array([list(rng.integers(1, N_GENRES + 1, k))
                            for k in rng.integers(0, 3, n)], pa.list_(pa.int64())),
        "age": rng.uniform(15, 70, n),
        "label": (rng.uniform(size=n) < p).astype(np.float32),
        "_user": rng.integers(1, N_USERS + 1, n),
        "_item": item + 99,
        "_ts": np.arange(start, start + n),
    })


def write_prepared(prepared: str, n_train: int = 400, n_valid: int = 96,
                   n_test: int = 96) -> dict:
    """A prepared folder like ``rectrain prepare`` writes (train in 3 files, valid, test,
    manifest) for ``tests.support.tiny.tiny_cfg``."""
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    off = 0
    for split, n in sizes.items():
        os.makedirs(f"{prepared}/{split}", exist_ok=True)
        cuts = [0, n // 3, 2 * n // 3, n] if split == "train" else [0, n]
        for i in range(len(cuts) - 1):
            pq.write_table(sample_table(off + cuts[i], cuts[i + 1] - cuts[i]),
                           f"{prepared}/{split}/part-{i}.parquet")
        off += n
    manifest = {**tiny_manifest(), "rows_per_split": sizes}
    storage.write_json(manifest, f"{prepared}/manifest.json")
    return manifest
