"""Ingest benchmark: Parquet → ``Batch`` (KJT) throughput, rows/s, over the same files.

- ``pyarrow read``: ``pyarrow.parquet.read_table`` of the train split (the feature columns), one
  process: the floor cost of reading the bytes.
- ``pyarrow read + to_batch``: the same read, sliced into batches of ``B`` rows and converted by
  :meth:`FeatureLayout.to_batch` (Arrow offsets → KeyedJaggedTensor), one process.
- ``pyarrow read + shuffle + to_batch``: the same, each block of the Ray path's size permuted
  first as the training loader does (:func:`~rectrain.data.loader.rebatch` with a generator),
  one process: the work the Ray path does, without Ray.
- ``rectrain Ray Data``: the path training uses, inside ``W`` Ray Train workers (blocks as
  training asks for them, :func:`rectrain.launch.ray_launch.read_blocks`):
  ``ray.data.read_parquet`` (files in a seeded per-epoch order) → exact ``streaming_split`` → whole
  Arrow blocks (:class:`~rectrain.data.loader.RayShard`) → local shuffle and slicing
  (:func:`~rectrain.data.loader.rebatch`) → ``to_batch`` in a prefetch thread, with no model:
  global rows/s per epoch (all rows / slowest worker's time), with and without each epoch's
  wait for its first batch (the streaming executor's start-up).
- ``Ray Data delivery``: the same read and split with workers that only receive the blocks
  (no shuffle, no ``to_batch``): what Ray Data itself costs to hand the rows over.
- ``train.input: files``: the same workers, shuffle and ``to_batch``, each worker reading its
  own share of the files (:class:`~rectrain.data.file_stream.FileStream`), no Ray Dataset.

Per core used: each path's CPU seconds (user + system, all threads) over the same work, and
``rows / CPU seconds`` = rows/s per core used (cores used = CPU seconds / wall seconds). One
process: its own ``time.process_time``. Ray: every process under the driver (Ray's servers,
the 2 workers, the read tasks' pooled workers, the split coordinator, Ray Train's controller),
summed by :func:`rectrain.bench.proctree.cpu_snapshot` between rank 0's epoch barriers; so
Ray Data's scheduling loops and idle polling are counted, which on a loaded machine grow with
the wall time. Each figure per core is the least CPU of its repeats (one process) or epochs
after the first (Ray, whose first epoch starts the workers): on the 2-core development machine
the same one-process work took 0.56-0.84 CPU-s from run to run, so one repeat a side could
move the ratio by a third.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

from rectrain.bench import report
from rectrain.bench.proctree import CLASSES
from rectrain.bench.workloads import Workload


def _ingest_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    from rectrain.bench.trainstep import _layout, bench_config
    from rectrain.bench.proctree import (cpu_seconds, cpu_seconds_by_title, cpu_snapshot,
                                         rss_by_title)
    from rectrain.data.loader import RayShard, prefetch, rebatch

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    cfg = bench_config(config["job"])
    layout = _layout(cfg)
    ctx = ray.train.get_context()
    rng = np.random.default_rng(ctx.get_world_rank())
    if config.get("source") == "files":  # train.input: files
        from rectrain.data.file_stream import FileStream
        shard = FileStream(config["train_url"], ctx.get_world_rank(), ctx.get_world_size(),
                           layout.columns, cfg.train.seed)
    else:
        shard = RayShard(ray.train.get_dataset_shard("train"))
    history = []
    rank0 = ctx.get_world_rank() == 0
    for epoch in range(config["epochs"]):
        dist.barrier()
        snap = cpu_snapshot(config["tree_pid"]) if rank0 else None
        t0 = time.perf_counter()
        first = None
        rows = 0
        if config.get("convert", True):
            feed = prefetch((layout.to_batch(t.select(layout.columns)) for t in
                             rebatch(shard.tables(epoch), config["batch"], True, rng)),
                            config["prefetch"])
            sizes = (b.batch_size for b in feed)
        else:  # delivery only: the blocks as the loader receives them, nothing done with them
            sizes = (t.num_rows for t in shard.tables(epoch))
        for n in sizes:
            if first is None:
                first = time.perf_counter() - t0
            rows += n
        dt = time.perf_counter() - t0
        t = torch.tensor([dt, dt - (first or 0.0), first or 0.0, rows], dtype=torch.float64)
        mx = t.clone()
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        sm = t.clone()
        dist.all_reduce(sm)
        tree = {"cpu_seconds": {}, "cpu_by_title": {}, "rss_mb": {}, "private_mb": {}}
        if rank0:  # the process tree's CPU and memory, sampled by one rank
            after = cpu_snapshot(config["tree_pid"])
            tree = {"cpu_seconds": cpu_seconds(snap, after),
                    "cpu_by_title": cpu_seconds_by_title(snap, after),
                    "rss_mb": rss_by_title(config["tree_pid"]),
                    "private_mb": rss_by_title(config["tree_pid"], private=True)}
        history.append({"epoch": epoch, "seconds": float(mx[0]),
                        "steady_seconds": float(mx[1]), "first_batch_seconds": float(mx[2]),
                        "rows": int(sm[3]), **tree})
        ray.train.report(history[-1])
    if ctx.get_world_rank() == 0:  # Ray Train 2.60 keeps no metrics without a checkpoint
        from rectrain.data import storage
        storage.write_json({"epochs": history}, config["result_path"])


def run_ray_ingest(wl: Workload, batch: int, world: int, epochs: int, prefetch: int = 2,
                   convert: bool = True, blocks: int | None = None, source: str = "ray_data"
                   ) -> list[dict]:
    """rectrain's Ray Data path in ``world`` Ray Train workers; per-epoch figures. With
    ``convert=False`` the workers only receive the blocks (Ray Data's delivery cost);
    ``blocks`` overrides the read's block count (default: training's,
    :func:`~rectrain.launch.ray_launch.read_blocks`). ``source="files"``: the workers read
    their own shares of the files instead (``train.input: files``,
    :class:`~rectrain.data.file_stream.FileStream`; no Ray Dataset, ``blocks`` is 0)."""
    import ray.data
    from ray.data import FileShuffleConfig

    from rectrain.bench.trainstep import _layout, bench_config
    from rectrain.data import storage
    from rectrain.launch.ray_launch import fit, init_ray, read_blocks

    job = wl.job("/tmp/rectrain-bench-ingest", batch_size=batch, num_workers=world)
    # rank 0 writes its per-epoch figures here (local mode: the driver's file system)
    result_path = os.path.join(tempfile.mkdtemp(prefix="rectrain-bench-ingest-"), "ingest.json")
    cfg = bench_config(job)
    init_ray(cfg)
    layout = _layout(cfg)
    train = os.path.join(wl.prepared_dir, "train")
    datasets = {}
    if source == "files":
        blocks = 0
    else:
        # the block count train() uses (read_blocks)
        files = storage.list_parquet_files(train)[0]
        blocks = blocks or read_blocks(sum(pq.read_metadata(f).num_rows for f in files),
                                       batch, world, "train")
        datasets["train"] = ray.data.read_parquet(
            train, columns=layout.columns, shuffle=FileShuffleConfig(seed=cfg.train.seed),
            override_num_blocks=blocks)
    fit(_ingest_worker,
        {"job": job, "batch": batch, "epochs": epochs, "prefetch": prefetch, "convert": convert,
         "source": source, "train_url": train,
         "tree_pid": os.getpid(),
         "threads": max(1, (os.cpu_count() or 1) // world), "result_path": result_path},
        num_workers=world, datasets=datasets, name="bench_ingest",
        storage_path="/tmp/rectrain-bench-ingest/ray",
        resources_per_worker={"CPU": cfg.train.cpus_per_worker})
    with open(result_path) as f:
        history = json.load(f)["epochs"]
    return [{k: h[k] for k in ("epoch", "seconds", "steady_seconds", "first_batch_seconds",
                               "rows", "cpu_seconds", "cpu_by_title", "rss_mb", "private_mb")}
            | {"blocks": blocks}
            for h in history]


def run_pyarrow(wl: Workload, batch: int, repeats: int = 3, block_rows: int | None = None
                ) -> dict:
    """The single-process pyarrow read, read + ``to_batch`` and read + shuffle + ``to_batch``
    (blocks of ``block_rows`` rows permuted first, as :func:`~rectrain.data.loader.rebatch`
    does in training); rows/s of the fastest of ``repeats``, CPU seconds the least."""
    from rectrain.bench.trainstep import _layout, bench_config
    from rectrain.data.loader import rebatch

    cfg = bench_config(wl.job("/tmp/rectrain-bench-ingest"))
    layout = _layout(cfg)
    path = os.path.join(wl.prepared_dir, "train")
    rng = np.random.default_rng(0)
    best_read, best_conv, rows, conv_rows = float("inf"), float("inf"), 0, 0
    conv_cpu, shuf_cpu, shuf_rows = float("inf"), float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        t = pq.read_table(path, columns=layout.columns)
        best_read = min(best_read, time.perf_counter() - t0)
        rows = t.num_rows
        t0, c0 = time.perf_counter(), time.process_time()
        t = pq.read_table(path, columns=layout.columns)
        conv_rows = 0
        for lo in range(0, t.num_rows - batch + 1, batch):
            conv_rows += layout.to_batch(t.slice(lo, batch)).batch_size
        best_conv = min(best_conv, time.perf_counter() - t0)
        conv_cpu = min(conv_cpu, time.process_time() - c0)
        step = block_rows or t.num_rows
        c0 = time.process_time()
        t = pq.read_table(path, columns=layout.columns)
        shuf_rows = sum(layout.to_batch(b).batch_size for b in rebatch(
            (t.slice(lo, step) for lo in range(0, t.num_rows, step)), batch, True, rng))
        shuf_cpu = min(shuf_cpu, time.process_time() - c0)
    return {"rows": rows, "read_rows_per_s": rows / best_read,
            "read_to_batch_rows": conv_rows, "read_to_batch_rows_per_s": conv_rows / best_conv,
            "read_to_batch_cpu_s": conv_cpu,
            "read_to_batch_rows_per_cpu_s": conv_rows / max(conv_cpu, 1e-9),
            "read_shuffle_to_batch_cpu_s": shuf_cpu,
            "read_shuffle_to_batch_rows_per_cpu_s": shuf_rows / max(shuf_cpu, 1e-9)}


def _least_cpu(epochs: list[dict]) -> dict:
    """The epoch with the least Ray CPU seconds among those after the first (all if one)."""
    steady = epochs[1:] or epochs
    return min(steady, key=lambda e: e["cpu_seconds"].get("total") or float("inf"))


def run_ingest(workloads: list[Workload], out_dir: str, batch: int = 1024, world: int = 2,
               epochs: int = 3, progress=None) -> dict:
    """The ingest job; writes ``ingest.json``/``.md``/``.png``."""
    rows = []
    for wl in workloads:
        if progress:
            progress.set_description(f"ingest {wl.name}: pyarrow")
        ray_res = run_ray_ingest(wl, batch, world, epochs)
        if progress:
            progress.update(1)
            progress.set_description(f"ingest {wl.name}: Ray Data delivery only")
        bare = run_ray_ingest(wl, batch, world, epochs, convert=False)
        if progress:
            progress.update(1)
            progress.set_description(f"ingest {wl.name}: workers reading their files")
        own = run_ray_ingest(wl, batch, world, epochs, source="files")
        if progress:
            progress.update(1)
            progress.set_description(f"ingest {wl.name}: pyarrow")
        pa_res = run_pyarrow(wl, batch, block_rows=-(-ray_res[0]["rows"] // ray_res[0]["blocks"]))
        if progress:
            progress.update(1)
        best = max(ray_res, key=lambda e: e["rows"] / e["seconds"])
        ray_rps = best["rows"] / best["seconds"]
        least = _least_cpu(ray_res)
        ray_cpu = least["cpu_seconds"].get("total") or float("nan")
        ray_per_core = least["rows"] / ray_cpu
        bare_least = _least_cpu(bare)
        bare_cpu = bare_least["cpu_seconds"].get("total") or float("nan")
        own_least = _least_cpu(own)
        own_cpu = own_least["cpu_seconds"].get("total") or float("nan")
        own_per_core = own_least["rows"] / own_cpu
        ray_steady = max(e["rows"] / max(e["steady_seconds"], 1e-9) for e in ray_res)
        rows.append({
            "workload": wl.name, "rows": pa_res["rows"],
            "pyarrow_read_rows_per_s": pa_res["read_rows_per_s"],
            "pyarrow_to_batch_rows_per_s": pa_res["read_to_batch_rows_per_s"],
            "ray_rows_per_s": ray_rps, "ray_steady_rows_per_s": ray_steady,
            "ray_first_batch_s": best["first_batch_seconds"],
            "ray_rows_per_epoch": best["rows"],
            "ray_over_pyarrow_to_batch": ray_rps / pa_res["read_to_batch_rows_per_s"],
            "pyarrow_to_batch_cpu_s": pa_res["read_to_batch_cpu_s"],
            "pyarrow_to_batch_rows_per_core": pa_res["read_to_batch_rows_per_cpu_s"],
            "ray_cpu_s": ray_cpu, "ray_cores_used": ray_cpu / best["seconds"],
            "ray_rows_per_core": ray_per_core,
            "ray_over_pyarrow_per_core": ray_per_core / pa_res["read_to_batch_rows_per_cpu_s"],
            "pyarrow_shuffle_to_batch_rows_per_core":
                pa_res["read_shuffle_to_batch_rows_per_cpu_s"],
            "ray_over_pyarrow_shuffle_per_core":
                ray_per_core / pa_res["read_shuffle_to_batch_rows_per_cpu_s"],
            "ray_delivery_cpu_s": bare_cpu, "ray_delivery_share": bare_cpu / ray_cpu,
            "files_rows_per_s": max(e["rows"] / e["seconds"] for e in own),
            "files_cpu_s": own_cpu, "files_rows_per_core": own_per_core,
            "files_over_pyarrow_per_core":
                own_per_core / pa_res["read_to_batch_rows_per_cpu_s"],
            "files_cpu_s_by_class": own_least["cpu_seconds"], "files_epochs": own,
            "ray_cpu_s_by_class": least["cpu_seconds"], "ray_blocks": best["blocks"],
            "ray_delivery_cpu_s_by_class": bare_least["cpu_seconds"],
            "epochs": ray_res, "delivery_epochs": bare, "pyarrow": pa_res})
    cols = ["workload", "rows", "pyarrow_read_rows_per_s", "pyarrow_to_batch_rows_per_s",
            "ray_rows_per_s", "ray_steady_rows_per_s", "ray_first_batch_s",
            "ray_over_pyarrow_to_batch"]
    core_cols = ["workload", "pyarrow_to_batch_cpu_s", "pyarrow_to_batch_rows_per_core",
                 "ray_cpu_s", "ray_cores_used", "ray_rows_per_core",
                 "ray_over_pyarrow_per_core"]
    split_cols = ["workload", "pyarrow_shuffle_to_batch_rows_per_core",
                  "ray_over_pyarrow_shuffle_per_core", "ray_delivery_cpu_s",
                  "ray_delivery_share"]
    files_cols = ["workload", "files_rows_per_s", "files_cpu_s", "files_rows_per_core",
                  "files_over_pyarrow_per_core"]
    by_class = [{"workload": r["workload"], "run": run,
                 "blocks": r["ray_blocks"] if run != "files" else "-",
                 **{k: r[key].get(k, 0.0) for k in CLASSES}}
                for r in rows for run, key in (("convert", "ray_cpu_s_by_class"),
                                               ("delivery", "ray_delivery_cpu_s_by_class"),
                                               ("files", "files_cpu_s_by_class"))]
    md = ("### Ingest: Parquet → Batch(KJT), rows/s over the same files\n\n"
          f"pyarrow: one process; Ray: rectrain's Ray Data path in {world} Ray Train workers, "
          f"batch {batch}, best of {epochs} epochs ('steady' excludes the wait for the first "
          "batch); pyarrow best of 3.\n\n"
          + report.markdown_table(rows, cols, {"ray_over_pyarrow_to_batch": ".2f",
                                               "ray_first_batch_s": ".2f"})
          + "\n\nPer core used (rows/s per core = rows / CPU seconds; cores used = CPU seconds "
          "/ wall seconds), the least CPU of the pyarrow repeats and of the Ray epochs after "
          "the first. pyarrow: the read + to_batch process; Ray: every process of the "
          "embedded Ray over the same epoch (workers, read tasks, split coordinator, Ray's "
          "servers; `rectrain.bench.proctree.cpu_snapshot`):\n\n"
          + report.markdown_table(rows, core_cols, {
              "pyarrow_to_batch_cpu_s": ".2f", "ray_cpu_s": ".2f", "ray_cores_used": ".2f",
              "ray_over_pyarrow_per_core": ".2f"})
          + "\n\nWhere the Ray path's CPU goes: against one process doing the same shuffle "
          "(each block of the Ray path's size permuted, as the training loader does), and "
          "Ray Data's delivery alone (the same read and split into workers that only receive "
          "the blocks; its CPU seconds and their share of the Ray path's):\n\n"
          + report.markdown_table(rows, split_cols, {
              "ray_over_pyarrow_shuffle_per_core": ".2f", "ray_delivery_cpu_s": ".2f",
              "ray_delivery_share": ".2f"})
          + "\n\n`train.input: files`: the same workers reading their own shares of the "
          "files (rectrain.data.file_stream; no Ray Dataset for train), the same shuffle and "
          "to_batch, every process of the embedded Ray counted:\n\n"
          + report.markdown_table(rows, files_cols, {"files_cpu_s": ".2f",
                                                     "files_over_pyarrow_per_core": ".2f"})
          + "\n\nRay's CPU seconds of those epochs by process class (rectrain.bench.proctree), "
          "and the read's block count:\n\n"
          + report.markdown_table(by_class, ["workload", "run", "blocks", *CLASSES], {
              k: ".2f" for k in CLASSES})
          + "\n\n" + report.LOADED_NOTE + "\n")
    labels, vals = [], []
    for r in rows:
        for k, lab in (("pyarrow_read_rows_per_s", "pyarrow read"),
                       ("pyarrow_to_batch_rows_per_s", "pyarrow+to_batch"),
                       ("ray_rows_per_s", "Ray Data path"),
                       ("ray_steady_rows_per_s", "Ray Data steady"),
                       ("files_rows_per_s", "workers read files")):
            labels.append(f"{r['workload']}\n{lab}")
            vals.append(r[k])
    report.plot_bars(os.path.join(out_dir, "ingest.png"), labels, vals, "rows/s",
                     "ingest: Parquet → Batch(KJT)")
    result = {"settings": {"batch": batch, "workers": world, "epochs": epochs}, "rows": rows}
    report.write(out_dir, "ingest", result, md)
    return result
