"""Train-step benchmark: the same model and batches through three paths in ONE run.

- (a) ``plain``: one process, plain PyTorch (``nn.EmbeddingBag``/``nn.Embedding`` with sparse
  gradients, Adagrad on the tables, Adam on the dense layers), global batch ``B × W`` per step,
  inputs converted to per-feature tensors before timing; all cores.
- (b) ``dmp``: ``W`` processes (``torch.multiprocessing``, gloo, no Ray), rectrain's
  :func:`~rectrain.train.sharding.shard_model` (TorchRec planner + DMP + fused row-wise Adagrad +
  Adam), per-rank batch ``B`` (the same global batch), batches built in memory before timing;
  ``cpus / W`` threads per rank. Optionally through ``TrainPipelineSparseDist``.
- (c) ``ray``: rectrain's full job, :func:`rectrain.launch.ray_launch.train` (Ray Train
  workers fed by Ray Data from the Parquet files, the loop of :mod:`rectrain.train.loop`),
  samples/s as the loop measures it (train time of each epoch, input included). The best epoch
  and the steady state (excluding each epoch's time to its first batch) are reported too.

Ratios ``(c)/(b)`` and ``(b)/(a)`` are computed from figures of the same run.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time

import pyarrow.parquet as pq
import torch

from rectrain.bench import report
from rectrain.bench.devices import autocast as _autocast
from rectrain.bench.devices import embedding_bytes
from rectrain.bench.devices import free_port as _free_port
from rectrain.bench.devices import rss_mb as _rss_mb
from rectrain.bench.devices import sync as _sync
from rectrain.bench.devices import to_device as _to
from rectrain.bench.workloads import Workload


def bench_config(job: dict):
    """The validated :class:`~rectrain.config.JobConfig` of a workload's job dict."""
    from rectrain.config import config_from_dict

    return config_from_dict(job)


def _layout(cfg):
    from rectrain.data.features import FeatureLayout
    from rectrain.data.schema import load_manifest

    return FeatureLayout(cfg, load_manifest(cfg.prepared_dir))


def load_batches(cfg, layout, batch: int, steps: int, rank: int = 0, world: int = 1,
                 global_batch: bool = False) -> list:
    """Batches of the train split in memory: step ``s`` covers rows ``[s*B*W, (s+1)*B*W)``
    (cycling over the split); rank ``r`` gets its ``B`` rows of it, or all ``B*W`` rows when
    ``global_batch``. Returns a list of :class:`~rectrain.data.features.Batch`."""
    t = pq.read_table(os.path.join(cfg.prepared_dir, "train"), columns=layout.columns)
    g = batch * world
    n_avail = t.num_rows // g
    if n_avail == 0:
        raise ValueError(f"{cfg.prepared_dir}/train: {t.num_rows} rows < one global batch of {g}")
    out = []
    for s in range(min(steps, n_avail)):
        lo = s * g if global_batch else s * g + rank * batch
        out.append(layout.to_batch(t.slice(lo, g if global_batch else batch)))
    return [out[s % len(out)] for s in range(steps)]


# ----------------------------------------------------------------------------- (a) plain
def _plain_proc(args: dict, out_path: str) -> None:
    from rectrain.bench.models import PlainDIN, PlainDLRM, to_plain

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    dev = torch.device(args.get("device", "cpu"))
    cfg = bench_config(args["job"])
    layout = _layout(cfg)
    model = (PlainDIN if args["model"] == "din" else PlainDLRM)(layout, cfg.model)
    model.to(dev)
    batches = [_to(to_plain(b, layout), dev) for b in load_batches(
        cfg, layout, args["batch"], args["warmup"] + args["steps"], world=args["world"],
        global_batch=True)]
    sparse = [p for n, p in model.named_parameters() if n.startswith(("bags.", "embs."))]
    dense = [p for n, p in model.named_parameters() if not n.startswith(("bags.", "embs."))]
    opts = [torch.optim.Adagrad(sparse, lr=cfg.optim.sparse_lr),
            torch.optim.Adam(dense, lr=cfg.optim.dense_lr)]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t0 = None
    for i, x in enumerate(batches):
        if i == args["warmup"]:
            _sync(dev)
            t0 = time.perf_counter()
        with _autocast(dev, args.get("bf16", False)):
            out = model(x).float()
        lg = out if out.dim() == 1 else out[:, 0]
        loss = loss_fn(lg, x["labels"])
        if out.dim() == 2:
            loss = loss + cfg.model.aux_weight * loss_fn(out[:, 1:], x["aux"])
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    _sync(dev)
    dt = time.perf_counter() - t0
    n = args["steps"] * args["batch"] * args["world"]
    with open(out_path, "w") as f:
        json.dump({"seconds": dt, "samples": n, "samples_per_s": n / dt,
                   "final_loss": float(loss.detach()), "threads": args["threads"],
                   "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


def run_plain(args: dict) -> dict:
    """Path (a) in a fresh spawned process; returns its result dict."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "plain.json")
        p = mp.get_context("spawn").Process(target=_plain_proc, args=(args, path))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"plain PyTorch path failed (exit {p.exitcode}); see above")
        with open(path) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- (b) DMP
def _dmp_case(case: dict, rank: int, world: int) -> dict:
    import gc

    import torch.distributed as dist

    from rectrain.data.features import FeatureLayout
    from rectrain.data.schema import load_manifest
    from rectrain.models import build_model
    from rectrain.train.pipeline import Stepper
    from rectrain.train.sharding import shard_model

    torch.manual_seed(0)
    cfg = bench_config(case["job"])
    manifest = load_manifest(cfg.prepared_dir)
    manifest["tables"].update(case.get("table_rows") or {})
    layout = FeatureLayout(cfg, manifest)
    model = build_model(layout, cfg.model, sparse_device=torch.device("meta"))
    dev = torch.device(f"cuda:{rank}") if case.get("device") == "cuda" else torch.device("cpu")
    dmp, opt, plan = shard_model(model, cfg.sharding, cfg.optim, dev)
    mem = embedding_bytes(dmp)
    rss = _rss_mb()
    steps, warmup = case.get("steps", 0), case.get("warmup", 0)
    batches = load_batches(cfg, layout, case["batch"], warmup + steps, rank, world) \
        if steps else []
    stepper = Stepper(dmp, opt, dev, cfg.model.aux_weight, case.get("pipeline", "plain"))
    dist.barrier()
    t0 = time.perf_counter()
    loss = torch.zeros(())
    with _autocast(dev, case.get("bf16", False)):
        for i, (loss, _) in enumerate(stepper.steps(iter(batches))):
            if i == warmup - 1:
                _sync(dev)
                dist.barrier()
                t0 = time.perf_counter()
    _sync(dev)
    dist.barrier()
    dt = time.perf_counter() - t0
    res = {"rank": rank, "seconds": dt, "final_loss": float(loss), "embedding_bytes": mem,
           "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_mb": rss, "plan": str(plan) if rank == 0 else None}
    del dmp, opt, model, batches, stepper
    gc.collect()
    return res


def _dmp_proc(rank: int, world: int, port: int, cases: list, threads: int, out_dir: str) -> None:
    import logging
    import warnings

    import torch.distributed as dist

    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    cuda = any(c.get("device") == "cuda" for c in cases)
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        out = [_dmp_case(c, rank, world) for c in cases]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def run_dmp_cases(cases: list[dict], world: int, threads: int) -> list[dict]:
    """Path (b) for each case (dict: job, batch, steps, warmup, pipeline, table_rows) in ONE
    group of ``world`` spawned gloo processes (``threads`` torch threads each); per case:
    global samples/s (slowest rank's time), per-rank embedding bytes and peak RSS."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_dmp_proc, args=(world, _free_port(), cases, threads, d),
                           nprocs=world, join=True, start_method="spawn")
        per_rank = []
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    out = []
    for i, c in enumerate(cases):
        ranks = [pr[i] for pr in per_rank]
        dt = max(r["seconds"] for r in ranks)
        n = c.get("steps", 0) * c["batch"] * world
        out.append({"seconds": dt, "samples": n, "samples_per_s": n / dt if n else None,
                    "final_loss": ranks[0]["final_loss"], "threads_per_rank": threads,
                    "embedding_bytes_per_rank": [r["embedding_bytes"] for r in ranks],
                    "max_rss_mb_per_rank": [r["max_rss_mb"] for r in ranks],
                    "rss_mb_per_rank": [r["rss_mb"] for r in ranks],
                    "plan": ranks[0]["plan"]})
    return out


def run_dmp(args: dict) -> dict:
    """Path (b) for one case (see :func:`run_dmp_cases`)."""
    return run_dmp_cases([args], args["world"], args["threads"])[0]


# ----------------------------------------------------------------------------- (c) Ray
def run_ray(job: dict) -> dict:
    """Path (c): rectrain's Ray Train job on the workload; returns the loop's figures."""
    from rectrain.launch.ray_launch import train

    cfg = bench_config(job)
    t0 = time.perf_counter()
    m = train(cfg)
    wall = time.perf_counter() - t0
    eps = m["epochs"]
    best = max(eps, key=lambda e: e["train_samples_per_s"])
    steady = [e["train_rows"] / max(e["train_seconds"] - e.get("train_first_batch_seconds", 0),
                                    1e-9) for e in eps]
    return {"samples_per_s": m["train_samples_per_s"],
            "best_epoch_samples_per_s": best["train_samples_per_s"],
            "steady_samples_per_s": max(steady),
            "first_batch_seconds": [e.get("train_first_batch_seconds") for e in eps],
            "epochs": len(eps), "train_rows": sum(e["train_rows"] for e in eps),
            "train_seconds": m["train_seconds"], "wall_seconds": wall,
            "test_auc": m["test_auc"]}


# ----------------------------------------------------------------------------- the job
def ratio(x, y):
    return (x / y) if (x and y) else None


def run_trainstep(workloads: list[Workload], out_dir: str, batch: int = 1024, world: int = 2,
                  steps: int = 30, warmup: int = 3, ray_epochs: int = 2,
                  pipeline: str = "plain", paths=("a", "b", "c"), device: str = "cpu",
                  bf16: bool = False, ablations: bool = False, progress=None) -> dict:
    """Run (a), (b) and (c) for each workload; write ``trainstep.json``/``.md``/``.png``."""
    cpus = os.cpu_count() or 1
    rows = []
    for wl in workloads:
        job = wl.job(os.path.join(out_dir, "runs", wl.name), batch_size=batch,
                     num_workers=world, epochs=ray_epochs)
        if pipeline != "plain":
            job["train"]["pipeline"] = pipeline
        if device == "cuda":
            job["train"]["use_gpu"] = True
        common = {"job": job, "batch": batch, "world": world, "steps": steps, "warmup": warmup,
                  "model": wl.model, "device": device, "bf16": bf16}
        r = {"workload": wl.name, "model": wl.model, "batch_per_worker": batch,
             "workers": world}
        if progress:
            progress.set_description(f"trainstep {wl.name}: (a) plain PyTorch")
        skip = {"skipped": "not requested (--paths)"}
        a = skip
        if "a" in paths:
            # best of all cores and one thread: on a loaded machine OpenMP's spinning threads
            # make the multi-threaded process several times slower than a single thread
            tries = [run_plain({**common, "threads": t}) for t in sorted({cpus, 1}, reverse=True)]
            a = dict(max(tries, key=lambda x: x["samples_per_s"]),
                     samples_per_s_by_threads={x["threads"]: x["samples_per_s"] for x in tries})
        if progress:
            progress.update(1)
            progress.set_description(f"trainstep {wl.name}: (b) TorchRec DMP")
        b = (run_dmp({**common, "threads": max(1, cpus // world), "pipeline": pipeline})
             if "b" in paths else skip)
        if progress:
            progress.update(1)
            progress.set_description(f"trainstep {wl.name}: (c) Ray Train + Ray Data")
        c = run_ray(job) if "c" in paths else skip
        if progress:
            progress.update(1)
        abl = {}
        if ablations:
            # each optimisation off (or on) against the run above, same workload, same run
            if progress:
                progress.set_description(f"trainstep {wl.name}: optimisations off/on")
            if "b" in paths and pipeline == "plain":
                abl["b_sparse_dist"] = run_dmp({**common, "threads": max(1, cpus // world),
                                                "pipeline": "sparse_dist"})["samples_per_s"]
            if "c" in paths and "samples_per_s" in c:
                # the prefetch thread, 2 batches ahead (default off: train.prefetch_batches 0)
                j2 = {**job, "train": {**job["train"], "prefetch_batches": 2}}
                abl["c_prefetch_2"] = run_ray(j2)
            if progress:
                progress.update(2)
        r["ablations"] = abl
        r.update({"a_plain_samples_per_s": a.get("samples_per_s"),
                  "b_dmp_samples_per_s": b.get("samples_per_s"),
                  "c_ray_samples_per_s": c.get("samples_per_s"),
                  "c_ray_steady_samples_per_s": c.get("steady_samples_per_s"),
                  "b_over_a": ratio(b.get("samples_per_s"), a.get("samples_per_s")),
                  "c_over_b": ratio(c.get("samples_per_s"), b.get("samples_per_s")),
                  "c_steady_over_b": ratio(c.get("steady_samples_per_s"),
                                           b.get("samples_per_s")),
                  "pipeline": pipeline,
                  "a": a, "b": b, "c": c})
        rows.append(r)
    cols = ["workload", "a_plain_samples_per_s", "b_dmp_samples_per_s", "c_ray_samples_per_s",
            "c_ray_steady_samples_per_s", "b_over_a", "c_over_b", "c_steady_over_b"]
    md = ("### Train step: samples/s of the same model and batches, one run\n\n"
          f"Device {device}{' (bf16 autocast of dense layers)' if bf16 else ''}; "
          f"{world} workers × batch {batch} (global {world * batch}); (a) plain PyTorch, 1 "
          f"process, best of {cpus} threads and 1 thread; (b) TorchRec DMP, {world} gloo processes, no Ray "
          f"(pipeline: {pipeline}); (c) rectrain's Ray Train + Ray Data job "
          f"({ray_epochs} epochs; 'steady' excludes each epoch's wait for its first batch).\n\n"
          + report.markdown_table(rows, cols, {"b_over_a": ".2f", "c_over_b": ".2f",
                                               "c_steady_over_b": ".2f"})
          + "\n\n" + report.LOADED_NOTE + "\n")
    for r in rows:
        for p in ("a", "b", "c"):
            if "skipped" in r[p]:
                md += f"\n- {r['workload']}: ({p}) skipped: {r[p]['skipped']}.\n"
    abl_rows = []
    for r in rows:
        ab = r["ablations"]
        if "b_sparse_dist" in ab:
            abl_rows.append({"workload": r["workload"], "optimisation":
                             "(b) TrainPipelineSparseDist (input dist overlapped)",
                             "before": r["b_dmp_samples_per_s"], "after": ab["b_sparse_dist"]})
        if "c_prefetch_2" in ab:
            abl_rows.append({"workload": r["workload"], "optimisation":
                             "(c) Arrow→Batch prefetch thread, 2 ahead (default off)",
                             "before": r["c_ray_samples_per_s"],
                             "after": ab["c_prefetch_2"]["samples_per_s"]})
    for x in abl_rows:
        x["after_over_before"] = ratio(x["after"], x["before"])
    if abl_rows:
        md += ("\n#### Optimisations, before / after (samples/s, same run)\n\n"
               + report.markdown_table(abl_rows, ["workload", "optimisation", "before", "after",
                                                  "after_over_before"],
                                       {"after_over_before": ".2f"}) + "\n")
    labels, vals = [], []
    for r in rows:
        for k, lab in (("a_plain_samples_per_s", "a plain"), ("b_dmp_samples_per_s", "b DMP"),
                       ("c_ray_samples_per_s", "c Ray")):
            if r[k]:
                labels.append(f"{r['workload']}\n{lab}")
                vals.append(r[k])
    report.plot_bars(os.path.join(out_dir, "trainstep.png"), labels, vals, "samples/s",
                     "train step: (a) plain PyTorch, (b) TorchRec DMP, (c) Ray Train + Ray Data")
    result = {"settings": {"batch_per_worker": batch, "workers": world, "steps": steps,
                           "warmup": warmup, "ray_epochs": ray_epochs, "pipeline": pipeline,
                           "device": device, "bf16": bf16},
              "rows": rows, "optimisations": abl_rows}
    report.write(out_dir, "trainstep", result, md)
    return result
