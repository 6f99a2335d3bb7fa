"""The GPU node's benchmark: train-step samples/s of DLRM (at MLPerf DLRM-DCNv2's sizes) and DIN
on one GPU, the input path and CPU worker scaling beside it, each part in its own process under
its own time budget.

``python -m benchmarks.gpu.bench --out DIR [--smoke]`` (from the repository root, no install:
``PYTHONPATH`` holds the repo and the kit's ``--target`` folder). Writes ``DIR/bench.json``
(every figure, settings, versions, machine, per-part status and seconds) and ``DIR/bench.md``
(the tables) after every part, so a run cut short still reports what finished.

Parts, in order (name: what, budget in seconds for the full run):

- ``env``: ``nvidia-smi``, versions, ``python -m rectrain.compat`` (all torchrec/fbgemm names).
- ``data``: the Criteo-shaped and synthetic DIN workloads (:mod:`rectrain.bench.workloads`).
- ``dlrm_b`` / ``dlrm_a``: DLRM (Naumov et al. 2019) at MLPerf DLRM-DCNv2's sizes (128-dim
  tables, bottom 512-256-128, top 1024-1024-512-256-1; dot interaction, as rectrain's DCNv2
  needs a behaviour sequence) on the Criteo-shaped set, (b) TorchRec
  DMP on nccl (world size 1; CUDA TBE kernels, fused row-wise Adagrad, Adam on dense, bf16
  autocast of the dense layers) and (a) plain PyTorch ``nn.EmbeddingBag`` on CUDA (sparse
  Adagrad, Adam, bf16 autocast): :func:`rectrain.bench.trainstep.run_dmp` / ``run_plain``.
- ``din_b`` / ``din_a``: DIN the same way on the synthetic behaviour logs.
- ``ingest``: Parquet -> :class:`~rectrain.data.features.Batch` (pyarrow read + ``to_batch``) of
  the Criteo-shaped train split in 1, 4 and 16 processes (files split across them), rows/s.
- ``scaling``: TorchRec DMP on CPU, 1, 2, 4, 8 gloo workers (16 cores / W threads each), DIN
  at a fixed per-worker batch: global samples/s.

``--smoke``: tiny sizes, CPU, seconds per part (the dry run of the same code).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

#: sizes per mode; ``batch`` is the GPU global batch (one GPU, world size 1)
PLANS = {
    "full": dict(device="cuda", bf16=True, batch=65536, din_batch=32768, steps=20, warmup=5,
                 criteo_max_rows=4_000_000, emb_dim=128, din_users=1_000_000,
                 din_items=2_000_000, seq_len=50, ingest_procs=[1, 4, 16],
                 scaling_workers=[1, 2, 4, 8], scaling_batch=1024, scaling_steps=8),
    "smoke": dict(device="cpu", bf16=False, batch=256, din_batch=256, steps=2, warmup=1,
                  criteo_max_rows=2_000, emb_dim=8, din_users=500, din_items=1_000, seq_len=10,
                  ingest_procs=[1, 2], scaling_workers=[1, 2], scaling_batch=128,
                  scaling_steps=2),
}
#: part -> seconds it may take (full run; smoke: the same, mostly unused)
BUDGETS = {"env": 40, "data": 60, "dlrm_b": 80, "dlrm_a": 60, "din_b": 60, "din_a": 45,
           "ingest": 50, "scaling": 110}
#: MLPerf Training DLRM-DCNv2 (Criteo 1TB multi-hot), per-GPU rate of H100/H200-class closed-
#: division submissions with HugeCTR: about 2M samples/s per GPU (about 2.9M on B200)
MLPERF_PER_GPU = 2.0e6


def _criteo(root: str, p: dict, rows: int):
    from rectrain.bench.workloads import dlrm_criteo

    wl = dlrm_criteo(os.path.join(root, "criteo"), rows, max_rows=p["criteo_max_rows"])
    # MLPerf DLRM-DCNv2's sizes: 128-dim tables, bottom MLP 512-256-128, top MLP
    # 1024-1024-512-256-1; the interaction is rectrain's DLRM dot product (its DCNv2 needs a
    # behaviour sequence: the config rejects dcnv2 without one)
    wl.model_spec = {"name": "dlrm", "embedding_dim": p["emb_dim"], "sequence_features": [],
                     "bottom_mlp": [512, 256], "mlp_hidden": [1024, 1024, 512, 256]}
    return wl


def _din(root: str, p: dict, rows: int):
    from rectrain.bench.workloads import din_synth

    return din_synth(os.path.join(root, "din"), rows, seq_len=p["seq_len"],
                     n_users=p["din_users"], n_items=p["din_items"])


def _rows(p: dict, batch: int) -> int:
    return batch * (p["steps"] + p["warmup"])


def _case(wl, root: str, p: dict, batch: int) -> dict:
    job = wl.job(os.path.join(root, "runs", wl.name), batch_size=batch, num_workers=1)
    if p["device"] == "cuda":
        job["train"]["use_gpu"] = True
    return {"job": job, "batch": batch, "world": 1, "steps": p["steps"], "warmup": p["warmup"],
            "model": wl.model, "device": p["device"], "bf16": p["bf16"], "threads": 16,
            "pipeline": "plain"}


def _run_dmp(case: dict) -> dict:
    from rectrain.bench.trainstep import run_dmp

    return run_dmp(case)


def _slim(r: dict) -> dict:
    r = dict(r)
    if r.get("plan"):
        r["plan"] = r["plan"][:2000]
    return r


def part_env(p: dict, root: str, save) -> None:
    from rectrain import compat

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True) \
        if p["device"] == "cuda" else None
    bad = compat.check_names()
    import torch

    save({"versions": compat.stack_versions(), "compat_missing": bad,
          "nvidia_smi": smi.stdout.strip() if smi else None,
          "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
          "cpus": os.cpu_count()})
    if bad:
        raise RuntimeError(f"rectrain.compat: missing {bad}")


def part_data(p: dict, root: str, save) -> None:
    t = time.perf_counter()
    _criteo(root, p, _rows(p, p["batch"]))
    t1 = time.perf_counter()
    _din(root, p, max(_rows(p, p["din_batch"]), p["scaling_batch"] * 8 * (p["scaling_steps"] + 2)))
    save({"criteo_seconds": t1 - t, "din_seconds": time.perf_counter() - t1})


def _train_part(kind: str, path: str):
    def run(p: dict, root: str, save) -> None:
        from rectrain.bench.trainstep import run_plain

        batch = p["batch"] if kind == "dlrm" else p["din_batch"]
        wl = (_criteo if kind == "dlrm" else _din)(root, p, _rows(p, batch))
        case = _case(wl, root, p, batch)
        r = _run_dmp(case) if path == "b" else run_plain(case)
        save({"workload": wl.name, "model": wl.model, "path": path, "batch": batch,
              "device": p["device"], "bf16": p["bf16"], **_slim(r)})
    return run


def _ingest_proc(args: tuple) -> dict:
    files, job, batch = args
    from rectrain.bench.trainstep import _layout, bench_config
    from rectrain.data.loader import rebatch
    import pyarrow.parquet as pq

    layout = _layout(bench_config(job))
    t0, rows = time.perf_counter(), 0
    tables = (pq.read_table(f, columns=layout.columns) for f in files)
    for t in rebatch(tables, batch, drop_last=False):
        rows += layout.to_batch(t).batch_size
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def part_ingest(p: dict, root: str, save) -> None:
    import multiprocessing as mp

    from rectrain.data.storage import list_parquet_files

    wl = _criteo(root, p, _rows(p, p["batch"]))
    job = _case(wl, root, p, p["batch"])["job"]
    files, _ = list_parquet_files(os.path.join(wl.prepared_dir, "train"))
    res = {}
    for n in p["ingest_procs"]:
        with mp.get_context("spawn").Pool(n) as pool:
            # per-process time after its imports; rows/s over the slowest process
            out = pool.map(_ingest_proc, [(files[i::n], job, 8192) for i in range(n)])
        rows = sum(o["rows"] for o in out)
        res[str(n)] = {"rows": rows, "seconds": max(o["seconds"] for o in out),
                       "rows_per_s": rows / max(o["seconds"] for o in out)}
        save({"workload": wl.name, "batch": 8192, "by_procs": res})


def part_scaling(p: dict, root: str, save) -> None:
    wl = _din(root, p, _rows(p, p["din_batch"]))
    res = {}
    for w in p["scaling_workers"]:
        case = dict(_case(wl, root, p, p["scaling_batch"]), device="cpu", bf16=False, world=w,
                    steps=p["scaling_steps"], warmup=2, threads=max(1, (os.cpu_count() or 1) // w))
        case["job"]["train"]["use_gpu"] = False
        r = _run_dmp(case)
        res[str(w)] = {"samples_per_s": r["samples_per_s"], "threads_per_rank":
                       r["threads_per_rank"], "seconds": r["seconds"]}
        save({"workload": wl.name, "batch_per_worker": p["scaling_batch"], "by_workers": res})


PARTS = {"env": part_env, "data": part_data,
         "dlrm_b": _train_part("dlrm", "b"), "dlrm_a": _train_part("dlrm", "a"),
         "din_b": _train_part("din", "b"), "din_a": _train_part("din", "a"),
         "ingest": part_ingest, "scaling": part_scaling}


def _child(name: str, mode: str, root: str, out_json: str) -> int:
    def save(obj):
        with open(out_json + ".tmp", "w") as f:
            json.dump(obj, f, default=str)
        os.replace(out_json + ".tmp", out_json)

    PARTS[name](PLANS[mode], root, save)
    return 0


def run_all(out: str, mode: str, parts: list[str], data_root: str, scale: float = 1.0) -> dict:
    """Run ``parts`` one by one in child processes (own session, killed at their budget x
    ``scale``); write ``out/bench.json`` and ``out/bench.md`` after each. Returns the result."""
    os.makedirs(out, exist_ok=True)
    res = {"mode": mode, "plan": PLANS[mode], "mlperf_per_gpu_samples_per_s": MLPERF_PER_GPU,
           "parts": {}}
    t_all = time.perf_counter()
    for name in parts:
        budget = BUDGETS[name] * scale
        tmp = os.path.join(data_root, f"part_{name}.json")
        if os.path.exists(tmp):
            os.remove(tmp)
        print(f"[gpu-bench] {name}: start (budget {budget:.0f} s)", flush=True)
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu.bench", "--child", name,
                                 "--mode", mode, "--data", data_root, "--child-out", tmp],
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and every process it spawned
            proc.wait()
            status = f"timeout after {budget:.0f} s"
        dt = time.perf_counter() - t
        body = json.load(open(tmp)) if os.path.exists(tmp) else {}
        res["parts"][name] = {"status": status, "part_seconds": round(dt, 1), **body}
        res["seconds"] = round(time.perf_counter() - t_all, 1)
        print(f"[gpu-bench] {name}: {status} in {dt:.0f} s", flush=True)
        write(out, res)
    return res


def write(out: str, res: dict) -> None:
    from benchmarks.gpu.report import markdown

    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(markdown(res))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_node")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (the dry run)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {list(PARTS)}")
    ap.add_argument("--data", default="/tmp/rectrain-gpu-bench", help="workload folder")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="x every part's budget")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a.child, a.mode, a.data, a.child_out)
    parts = a.parts.split(",")
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {unknown}; known {list(PARTS)}")
    mode = "smoke" if a.smoke else "full"
    os.makedirs(a.data, exist_ok=True)
    res = run_all(a.out, mode, parts, os.path.abspath(a.data), a.budget_scale)
    bad = [n for n, r in res["parts"].items() if r["status"] != "ok"]
    print(f"[gpu-bench] done in {res['seconds']:.0f} s; "
          + (f"not ok: {bad}" if bad else "all parts ok") + f"; {a.out}/bench.md", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
