"""Cost of the at-the-door check (:mod:`rectrain.data.door`) beside the train step, in ONE run.

For each job (default the MovieLens DIN and DLRM jobs), one process builds a batch of ``B``
random rows in the job's prepared-sample schema (tables of ``--table-rows`` ids, behaviour
sequences of the job's full length), then times, interleaved over ``--reps`` repetitions:

- ``to_batch`` with the check (the default) and without it (``layout.check_at_door = False``);
- one unsharded train step on that batch (forward, BCE on the label head, backward, Adam step)
  of the job's model, the reference the check's cost is reported against (a sharded DMP step
  costs more, so the share reported is an upper bound).

Usage: ``python -m rectrain.bench.door_cost [--batch 512] [--reps 200] [JOB.yaml ...]``;
prints one JSON object per job (medians in milliseconds, ``check_share_of_step``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow as pa
import torch

from rectrain.bench.trainstep import bench_config  # noqa: F401  (the benchmark's config reader)


def _batch(layout, n: int, rows: int, rng: np.random.Generator) -> pa.Table:
    cols = {}
    for f in layout.pooled + layout.sequence:
        size = layout.num_embeddings[f.table_name]
        if f.kind == "sparse":
            cols[f.name] = pa.array(rng.integers(0, size, n))
        else:
            k = layout.max_sequence_length if f.kind == "sequence" else 3
            lengths = rng.integers(0, k + 1, n)
            offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
            cols[f.name] = pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(rng.integers(1, size, int(offsets[-1]))))
    for f in layout.dense:
        cols[f.name] = pa.array(rng.normal(size=n))
    cols["label"] = pa.array(rng.integers(0, 2, n).astype(np.float32))
    if layout.aux_thresholds or layout.regression:
        cols["label_value"] = pa.array(rng.integers(1, 6, n).astype(np.float32))
    return pa.table(cols)


def measure(job_path: str, batch: int = 512, reps: int = 200, table_rows: int = 2000) -> dict:
    from rectrain.config import load_config
    from rectrain.data.features import FeatureLayout
    from rectrain.models import build_model
    from rectrain.models.base import main_logits

    cfg = load_config(job_path)
    feats = [f for f in cfg.features if f.kind not in ("dense", "text_embedding", "match")]
    manifest = {"tables": {f.table_name: table_rows for f in feats},
                "dense_stats": {f.name: {"mean": 0.0, "std": 1.0}
                                for f in cfg.features if f.kind == "dense"}}
    layout = FeatureLayout(cfg, manifest)
    table = _batch(layout, batch, table_rows, np.random.default_rng(0))
    model = build_model(layout, cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        b = layout.to_batch(table)
        loss = loss_fn(main_logits(model(b)), b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def to_batch(check: bool):
        layout.check_at_door = check
        layout.to_batch(table)
        layout.check_at_door = True

    for _ in range(5):
        step()
        to_batch(True)
        to_batch(False)
    times = {"to_batch_checked": [], "to_batch_unchecked": [], "train_step": []}
    fns = [("to_batch_checked", lambda: to_batch(True)),
           ("to_batch_unchecked", lambda: to_batch(False)), ("train_step", step)]
    order = np.random.default_rng(1)
    for _ in range(reps):
        # interleaved in a random order per repetition: drift in machine load hits all three
        # alike, and none is always the first after a train step (cold caches)
        for i in order.permutation(3):
            name, fn = fns[i]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    check = med["to_batch_checked"] - med["to_batch_unchecked"]
    return {"job": job_path, "model": cfg.model.name, "batch": batch, "reps": reps,
            "threads": torch.get_num_threads(), **{f"{k}_ms": round(v, 4) for k, v in med.items()},
            "check_ms": round(check, 4),
            "to_batch_ratio_checked_over_unchecked": round(
                med["to_batch_checked"] / med["to_batch_unchecked"], 3),
            "check_share_of_step": round(check / med["train_step"], 4)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rectrain.bench.door_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", nargs="*", default=["jobs/movielens_din.yaml",
                                               "jobs/movielens_dlrm.yaml"])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--table-rows", type=int, default=2000)
    a = p.parse_args(argv)
    for job in a.jobs:
        print(json.dumps(measure(job, a.batch, a.reps, a.table_rows)), flush=True)


if __name__ == "__main__":
    main()
