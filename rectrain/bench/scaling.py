"""Scaling benchmark, on path (b) (TorchRec DMP in gloo processes, batches in memory):

- workers 1, 2, 4 (one node; this benchmark does not span Ray nodes): global samples/s at a
  fixed per-worker batch, ``cpus / W`` threads per worker (so 4 workers on 2 cores share cores);
- embedding table size (rows × dim) against embedding memory per worker (shard weights + fused
  optimiser state, bytes counted from the local shards) for each sharding type, on 2 workers;
  the item table of DIN is an ``EmbeddingCollection`` table, which TorchRec can shard table-,
  row- and column-wise on CPU;
- behaviour-sequence length 10 → 200 through DIN's target attention (samples/s);
- per-worker batch size (samples/s).
"""

from __future__ import annotations

import os

from rectrain.bench import report
from rectrain.bench.trainstep import run_dmp_cases
from rectrain.bench.workloads import din_synth

#: knob → (workers, table rows, dims, sequence lengths, batch sizes, timed steps)
PLANS = {
    "tiny": dict(workers=[1, 2], rows=[10_000, 100_000], dims=[16], seq=[10, 50],
                 batches=[256, 1024], steps=3),
    "quick": dict(workers=[1, 2, 4], rows=[100_000, 1_000_000], dims=[16, 64, 256],
                  seq=[10, 50, 100, 200], batches=[256, 1024, 4096], steps=10),
    "full": dict(workers=[1, 2, 4], rows=[100_000, 1_000_000, 4_000_000], dims=[16, 64, 256],
                 seq=[10, 25, 50, 100, 200], batches=[256, 512, 1024, 2048, 4096], steps=20),
}


def run_scaling(data_root: str, out_dir: str, size: str = "quick", progress=None) -> dict:
    """The scaling job; writes ``scaling.json``/``.md`` and ``scaling_*.png``."""
    plan = PLANS[size]
    cpus = os.cpu_count() or 1
    n_rows = {"tiny": 8_192, "quick": 40_960, "full": 81_920}[size]
    steps, warmup = plan["steps"], 2
    base = din_synth(os.path.join(data_root, "din_synth_L50"), n_rows, seq_len=50)
    run_dir = os.path.join(out_dir, "runs", "scaling")
    res: dict = {"settings": {"size": size, **plan, "rows": n_rows}}

    def tick(msg):
        if progress:
            progress.set_description(f"scaling: {msg}")

    # workers
    tick("workers")
    res["workers"] = []
    for w in plan["workers"]:
        case = {"job": base.job(run_dir, batch_size=1024, num_workers=w), "batch": 1024,
                "steps": steps, "warmup": warmup}
        r = run_dmp_cases([case], w, max(1, cpus // w))[0]
        res["workers"].append({"workers": w, "samples_per_s": r["samples_per_s"],
                               "threads_per_worker": max(1, cpus // w)})
        if progress:
            progress.update(1)
    # table size vs memory per sharding type (no training steps: memory after sharding)
    tick("table size × sharding type")
    res["memory"] = []
    for st in ("table_wise", "row_wise", "column_wise"):
        cases = []
        for rows in plan["rows"]:
            for dim in plan["dims"]:
                job = base.job(run_dir, batch_size=1024, num_workers=2)
                job["model"]["embedding_dim"] = dim
                job["sharding"] = {"types": [st]}
                cases.append({"job": job, "batch": 1024, "table_rows": {"item": rows},
                              "_rows": rows, "_dim": dim})
        out = run_dmp_cases(cases, 2, max(1, cpus // 2))
        for c, r in zip(cases, out):
            res["memory"].append({
                "sharding": st, "item_rows": c["_rows"], "dim": c["_dim"],
                "item_table_mb": c["_rows"] * c["_dim"] * 4 / 2**20,
                "max_embedding_mb_per_worker": max(r["embedding_bytes_per_rank"]) / 2**20,
                "embedding_mb_per_worker": [b / 2**20 for b in r["embedding_bytes_per_rank"]],
                "rss_mb_per_worker": max(r["rss_mb_per_rank"])})
        if progress:
            progress.update(1)
    # sequence length
    tick("sequence length")
    cases = []
    for L in plan["seq"]:
        wl = din_synth(os.path.join(data_root, f"din_synth_L{L}"), n_rows, seq_len=L)
        cases.append({"job": wl.job(run_dir, batch_size=1024), "batch": 1024, "steps": steps,
                      "warmup": warmup})
    out = run_dmp_cases(cases, 2, max(1, cpus // 2))
    res["sequence_length"] = [{"seq_len": L, "samples_per_s": r["samples_per_s"]}
                              for L, r in zip(plan["seq"], out)]
    if progress:
        progress.update(1)
    # batch size
    tick("batch size")
    cases = [{"job": base.job(run_dir, batch_size=b), "batch": b,
              "steps": max(3, steps * 1024 // b), "warmup": warmup} for b in plan["batches"]]
    out = run_dmp_cases(cases, 2, max(1, cpus // 2))
    res["batch_size"] = [{"batch_per_worker": b, "samples_per_s": r["samples_per_s"]}
                         for b, r in zip(plan["batches"], out)]
    if progress:
        progress.update(1)

    md = ["### Scaling (TorchRec DMP, gloo, batches in memory; DIN on synthetic logs)\n"]
    md.append(f"Workers (batch 1024 per worker, {cpus} cores, cpus/W threads per worker; one "
              "node):\n")
    md.append(report.markdown_table(res["workers"], ["workers", "threads_per_worker",
                                                     "samples_per_s"]))
    md.append("\nEmbedding memory per worker after sharding (2 workers; the item table's rows × "
              "dim; other tables small; weights + fused row-wise Adagrad state, counted from "
              "each worker's local shards):\n")
    md.append(report.markdown_table(res["memory"], [
        "sharding", "item_rows", "dim", "item_table_mb", "max_embedding_mb_per_worker",
        "rss_mb_per_worker"], {"item_table_mb": ".1f", "max_embedding_mb_per_worker": ".1f",
                               "rss_mb_per_worker": ".0f"}))
    md.append("\nrss_mb_per_worker: the worker process's resident memory right after sharding "
              "(cases run one after another in the same processes, so it includes what the "
              "allocator kept from earlier cases). TorchRec's planner cuts column-wise shards of "
              "at least 128 columns (`MIN_CW_DIM`), so column-wise sharding splits a table "
              "across workers only from dim 256; below that it places the table like "
              "table-wise.\n")
    md.append("\nBehaviour-sequence length (2 workers, batch 1024):\n")
    md.append(report.markdown_table(res["sequence_length"], ["seq_len", "samples_per_s"]))
    md.append("\nBatch size per worker (2 workers):\n")
    md.append(report.markdown_table(res["batch_size"], ["batch_per_worker", "samples_per_s"]))
    md.append("\n" + report.LOADED_NOTE)
    report.plot_lines(os.path.join(out_dir, "scaling_workers.png"),
                      {"DIN": ([r["workers"] for r in res["workers"]],
                               [r["samples_per_s"] for r in res["workers"]])},
                      "workers", "samples/s", "samples/s vs workers (DMP, gloo)")
    series = {}
    for r in res["memory"]:
        key = f"{r['sharding']} dim {r['dim']}"
        xs, ys = series.setdefault(key, ([], []))
        xs.append(r["item_rows"])
        ys.append(r["max_embedding_mb_per_worker"])
    report.plot_lines(os.path.join(out_dir, "scaling_memory.png"), series, "item table rows",
                      "max embedding MB per worker", "memory per worker vs table size (2 workers)",
                      logx=True)
    report.plot_lines(os.path.join(out_dir, "scaling_seq_len.png"),
                      {"DIN": ([r["seq_len"] for r in res["sequence_length"]],
                               [r["samples_per_s"] for r in res["sequence_length"]])},
                      "behaviour-sequence length", "samples/s",
                      "samples/s vs sequence length (target attention)")
    report.plot_lines(os.path.join(out_dir, "scaling_batch.png"),
                      {"DIN": ([r["batch_per_worker"] for r in res["batch_size"]],
                               [r["samples_per_s"] for r in res["batch_size"]])},
                      "batch per worker", "samples/s", "samples/s vs batch size", logx=True)
    report.write(out_dir, "scaling", res, "\n".join(md))
    return res
