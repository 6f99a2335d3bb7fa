"""Ray Data's split coordinator over several epochs at size (issue: large-scale proof, item 5):
does each epoch start slower, or the coordinator's memory grow, epoch after epoch?

Makes (or reuses) the ``rectrain bench scale`` log of ``--events`` events (50 per user, 100,000
items; :func:`rectrain.bench.synth_jobs.job_dict`) and its prepared samples (leave-last-out,
sequences of 20), then reads the whole train split ``--epochs`` times through rectrain's
training input path with no model (:func:`rectrain.bench.ingest.run_ray_ingest`: ``read_parquet``
with training's blocks → exact ``streaming_split`` into 2 Ray Train workers → local shuffle →
``to_batch``). Per epoch: wall seconds, the wait for the first batch (the streaming executor's
start), rows/s, and the resident memory (MiB) of the split coordinator, the workers and the
driver at the epoch's end (:func:`rectrain.bench.proctree.rss_by_title`; RSS counts the object
store's shared pages in every process that maps them).

Run: ``PYTHONPATH=. python benchmarks/split_memory.py --events 10000000 --epochs 3 --out
benchmarks/results/split_memory`` (work data under ``--work``; writes ``split_memory.json`` and
``split_memory.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

TITLES = ("ray::SplitCoordinator", "ray::RayTrainWorker", "driver")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/rectrain-split-memory")
    ap.add_argument("--out", default="benchmarks/results/split_memory")
    a = ap.parse_args()

    from rectrain.bench import report
    from rectrain.bench.ingest import run_ray_ingest
    from rectrain.bench.scale import EVENTS_PER_USER, _run_stage
    from rectrain.bench.synth_jobs import DIN, FEATURES, job_dict
    from rectrain.bench.workloads import Workload

    work = os.path.join(a.work, f"e{a.events}")
    os.makedirs(work, exist_ok=True)
    job = job_dict(work, a.events // EVENTS_PER_USER, 100_000, a.events)
    made = {}
    for stage, marker in (("synth", "raw/events"), ("prepare", "prepared/manifest.json")):
        if not os.path.exists(os.path.join(work, marker)):
            r = _run_stage(stage, {"job": job, "work": work}, os.path.join(work, f"{stage}.log"))
            if r["exit_code"]:
                sys.exit(f"{stage} failed (exit {r['exit_code']}): see {work}/{stage}.log")
            made[stage] = round(r["wall_s"], 1)
    with open(os.path.join(work, "prepared", "manifest.json")) as f:
        rows = json.load(f)["rows_per_split"]["train"]
    wl = Workload(name=f"scale_e{a.events}", prepared_dir=os.path.join(work, "prepared"),
                  model="din", features=FEATURES, model_spec=DIN, seq_len=20,
                  dataset=job["dataset"])
    t0 = time.perf_counter()
    epochs = run_ray_ingest(wl, batch=1024, world=2, epochs=a.epochs)
    total = time.perf_counter() - t0
    table = [{"epoch": e["epoch"], "rows": e["rows"], "seconds": round(e["seconds"], 1),
              "first_batch_s": round(e["first_batch_seconds"], 2),
              "rows_per_s": round(e["rows"] / e["seconds"]),
              **{t.removeprefix("ray::") + "_rss_mb": e["rss_mb"].get(t, 0.0) for t in TITLES}}
             for e in epochs]
    res = {"events": a.events, "train_rows": rows, "epochs": a.epochs, "blocks": epochs[0]["blocks"],
           "made_s": made, "ingest_s": round(total, 1), "per_epoch": table, "raw": epochs}
    md = (f"### Split coordinator over {a.epochs} epochs: {a.events:,} events "
          f"({rows:,} train rows, {epochs[0]['blocks']} blocks, 2 Ray Train workers)\n\n"
          + report.markdown_table(table, list(table[0]), {}) +
          "\n\nRSS at each epoch's end, MiB (the object store's shared pages count in every "
          "process that maps them).\n")
    os.makedirs(a.out, exist_ok=True)
    report.write(a.out, "split_memory", res, md)
    print(md)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
