"""Cost curves (``rectrain bench scale``): synth → prepare → train → recommend on synthetic logs
of growing size, each stage in its own subprocess (its own embedded Ray), measured.

Per size (events; users = events / :data:`EVENTS_PER_USER`, Zipf-distributed activity; a fixed
item catalogue, ``items`` of the preset) the job of :mod:`rectrain.bench.synth_jobs`
(leave-last-out split, behaviour sequences of up to 20 items, DIN with ``embedding_dim`` 16 on
2 Ray Train workers of 1 CPU, batch 1024 per worker):

1. **synth**: :func:`rectrain.launch.jobs.synth_job` (``rectrain synth``), one Ray task per
   file of 1M events; rate = events/s.
2. **prepare**: :func:`rectrain.launch.jobs.prepare_job` (``rectrain prepare``); events/s.
3. **train**: :func:`rectrain.launch.ray_launch.train` (``rectrain train``), 1 epoch capped at
   ``warmup + steps + 1`` steps (``train.max_train_rows`` = steps × batch per worker: every
   rank stops at the same step), then validation and test on all rows (one row per user each, so
   they grow with the events); rate = samples/s over the steps after ``warmup``, from the
   loop's per-``log_every`` lines (Ray Data input included). The warm-up (200 steps at
   ``quick``) outlasts Ray Data's read-ahead: until its object-store budget is full (or the
   split is read) the read tasks take ~0.7 of a core from the 2 workers (10M events: 15k
   samples/s over steps 40-120, 21-22k over steps 220-400), a cost of the epoch's first
   minute, not of its rows.
4. **recommend**: :func:`rectrain.launch.recommend_job.recommend_job` on Ray Data actors:
   ``two_tower`` (default; a two-tower retriever with seeded untrained weights of the real
   shapes, saved in this stage, alone through a faiss HNSW index) or ``two_stage`` (HNSW top
   50, then the DIN trained in stage 3); top 10 per user, ``evaluate: false``; users/s.

Measured per stage (:mod:`rectrain.bench.proctree`): wall seconds of the subprocess (Python and
Ray start-up included), the rate, seconds per million events, the peak RSS of the driver and
the largest of each class of the other processes of its tree (Ray Train workers, other
``ray::`` workers and actors, Ray's system processes), and bytes on disk of its output (raw
logs, prepared samples, the run dir, the recommendations). A stage whose wall time,
extrapolated linearly in events from the largest smaller size measured, would exceed
``budget_s`` is skipped with the reason (and so are the stages that need its output); a stage
that fails is run up to twice more (``attempts``; Ray's 30 s start-up limit), then recorded
as failed.

Writes ``OUT/scale.json``, ``OUT/scale.md``, ``OUT/scale_seconds.png`` and
``OUT/scale_memory.png`` (with matplotlib, the ``bench`` extra), after every size; data under
``OUT/runs/scale/e<events>`` (removed after each size unless ``keep``), each stage's output in
``OUT/logs/scale/e<events>_<stage>.log``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time

from rectrain.bench import report
from rectrain.bench.proctree import CLASSES, dir_bytes, wait_sampled
from rectrain.bench.synth_jobs import DIN, TWO_TOWER, job_dict, rec_over, save_untrained

STAGES = ("synth", "prepare", "train", "recommend")
#: average events per user (users grow with the events)
EVENTS_PER_USER = 50
#: size presets: events per run, item catalogue, train steps (after ``warmup``), recommend's
#: users per block and Ray Data actors (one at tiny: a single block)
SIZES = {
    "tiny": dict(events=[20_000, 50_000], items=2_000, steps=4, warmup=2, block=1024,
                 actors=1, budget_s=600.0),
    "quick": dict(events=[1_000_000, 10_000_000, 50_000_000], items=100_000, steps=100,
                  warmup=200, block=4096, actors=2, budget_s=900.0),
    "full": dict(events=[1_000_000, 10_000_000, 50_000_000, 100_000_000], items=100_000,
                 steps=200, warmup=200, block=4096, actors=2, budget_s=1800.0),
}
#: what each stage needs, and where its output lies (under the size's work folder)
NEEDS = {"synth": None, "prepare": "synth", "train": "prepare", "recommend": "prepare"}
OUTPUT = {"synth": "raw", "prepare": "prepared", "train": "din", "recommend": "rec"}
_STEP_LINE = re.compile(r"epoch \d+ step (\d+) loss \S+ ([\d,]+) samples/s")


# ---------------------------------------------------------------- stage children (subprocess)

def _child(stage: str, a: dict) -> dict:
    from rectrain.config import config_from_dict

    job, work = a["job"], a["work"]
    cfg = config_from_dict(job)
    t = time.perf_counter()
    out: dict = {}
    if stage == "synth":
        from rectrain.data.sources.synth import SynthSpec
        from rectrain.launch.jobs import synth_job
        s = synth_job(SynthSpec(**job["dataset"]["synth"]), f"{work}/raw", num_cpus=2)
        out = {"files": s["files"], "users": s["users"]}
    elif stage == "prepare":
        from rectrain.launch.jobs import prepare_job
        m = prepare_job(cfg)
        out = {"rows_per_split": m["rows_per_split"], "rows_rejected": m["rows_rejected"]}
    elif stage == "train":
        from rectrain.launch.ray_launch import train
        m = train(cfg)
        e = m["epochs"][0]
        out = {"train_rows": e["train_rows"], "train_seconds": e["train_seconds"],
               "train_first_batch_seconds": e["train_first_batch_seconds"],
               "epoch_samples_per_s": e["train_samples_per_s"],
               "test_auc": m.get("test_auc")}
    elif stage == "recommend":
        from rectrain.data import storage
        from rectrain.launch.recommend_job import recommend_job
        save_untrained(job, f"{work}/two_tower", TWO_TOWER)
        out["checkpoint_s"] = time.perf_counter() - t
        over = rec_over(work, a["mode"], 50, a["actors"], a["block"])
        over["out"] = f"{work}/rec"
        storage.remove(over["out"])
        s = recommend_job(cfg, **over)
        out.update({k: s.get(k) for k in ("blocks", "block_seconds", "users",
                                          "peak_rss_mb_per_process", "candidates_per_user")})
    out["inner_s"] = time.perf_counter() - t
    out["driver_ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _child_main(argv: list[str]) -> None:
    stage, arg, res = argv
    r = _child(stage, json.loads(arg))
    with open(res, "w") as f:
        json.dump(r, f, default=float)


# ---------------------------------------------------------------- the driver of the benchmark

def steady_samples_per_s(log_text: str, warmup: int) -> float | None:
    """Global samples/s over the training steps after ``warmup``, from the loop's
    ``epoch E step S loss L R samples/s`` lines (each the rate of the ``log_every`` steps up
    to step S): the harmonic mean of the windows that start at or after ``warmup`` (equal
    samples per window, so this is total samples / total seconds). None without such lines."""
    rates, prev = [], 0
    for m in _STEP_LINE.finditer(log_text):
        step, rate = int(m.group(1)), float(m.group(2).replace(",", ""))
        if prev >= warmup and rate > 0:
            rates.append(rate)
        prev = step
    return len(rates) / sum(1 / r for r in rates) if rates else None


def _run_stage(stage: str, arg: dict, log: str) -> dict:
    res = f"{log}.json"
    if os.path.exists(res):
        os.remove(res)
    # the child imports this rectrain, not another one an editable install points at
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)}
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "rectrain.bench.scale", "--child", stage,
                              json.dumps(arg), res], stdout=f, stderr=subprocess.STDOUT,
                             env=env)
        rc, wall, mem = wait_sampled(p)
    out = {"exit_code": rc, "wall_s": wall, "memory": mem}
    if rc == 0 and os.path.exists(res):
        with open(res) as f:
            out["child"] = json.load(f)
    return out


def _skip_reason(stage: str, events: int, rows: list[dict], status: dict, budget_s: float,
                 recommend: str = "two_tower") -> str | None:
    # two-stage ranks with the DIN that stage 3 trained
    dep = "train" if stage == "recommend" and recommend == "two_stage" else NEEDS[stage]
    if dep and status.get(dep) != "ok":
        return f"needs {dep}, which {status.get(dep, 'did not run')}"
    prev = [r for r in rows if r["stage"] == stage and r["status"] == "ok"
            and r["events"] < events]
    if prev:
        p = max(prev, key=lambda r: r["events"])
        est = p["wall_s"] * events / p["events"]
        fixed = (p.get("detail") or {}).get("train_seconds") if stage == "train" else None
        if fixed is not None:  # a fixed number of steps: only the rest grows with the events
            est = fixed + (p["wall_s"] - fixed) * events / p["events"]
        if est > budget_s:
            return (f"extrapolated {est:,.0f} s from {p['events']:,} events "
                    f"({p['wall_s']:,.0f} s) > budget {budget_s:,.0f} s")
    return None


def _row(stage: str, events: int, users: int, items: int, r: dict, work: str, log: str,
         warmup: int) -> dict:
    row = {"stage": stage, "events": events, "users": users, "items": items, "status": "ok",
           "wall_s": round(r["wall_s"], 2), "s_per_m_events": round(r["wall_s"] * 1e6 / events,
                                                                     3)}
    mem = r["memory"]
    for c in CLASSES:
        row[f"{c}_peak_rss_mb"] = mem["peak_rss_mb"][c]
        row[f"{c}_peak_private_mb"] = mem.get("peak_private_mb", {}).get(c, 0.0)
    row["driver_peak_rss_mb"] = max(row["driver_peak_rss_mb"],
                                    r["child"].get("driver_ru_maxrss_mb", 0))
    row["worker_peak_rss_mb"] = max(mem["peak_rss_mb"]["train_worker"],
                                    mem["peak_rss_mb"]["ray_worker"])
    row["worker_peak_private_mb"] = max(row["train_worker_peak_private_mb"],
                                        row["ray_worker_peak_private_mb"])
    row["tree_peak_rss_mb"] = mem["tree_peak_rss_mb"]
    row["top_private_mb"] = mem.get("top_private_mb", {})
    row["processes"] = mem["processes"]
    row["top_processes_mb"] = mem["top_processes_mb"]
    row["disk_bytes"] = dir_bytes(os.path.join(work, OUTPUT[stage]))
    c = r["child"]
    row["detail"] = c
    if stage in ("synth", "prepare"):
        row["rate"], row["rate_unit"] = events / r["wall_s"], "events/s"
    elif stage == "train":
        with open(log) as f:
            steady = steady_samples_per_s(f.read(), warmup)
        row["rate"] = steady or c["epoch_samples_per_s"]
        row["rate_unit"] = ("samples/s after warm-up" if steady else
                            "samples/s (epoch, first batch included)")
    else:
        row["rate"], row["rate_unit"] = users / r["wall_s"], "users/s"
    row["rate"] = round(row["rate"], 1)
    return row


def run_scale(out_dir: str, size: str = "quick", events: list[int] | None = None,
              budget_s: float | None = None, recommend: str = "two_tower", keep: bool = False,
              progress=None) -> dict:
    """The scale job; writes ``scale.json``/``.md``/``_*.png`` under ``out_dir`` after each size
    and returns the result (``rows``: one per stage and size, ``status`` ok, skipped or
    failed)."""
    preset = SIZES[size]
    sizes = sorted(events or preset["events"])
    budget = preset["budget_s"] if budget_s is None else budget_s
    items, steps, warmup, block, actors = (preset[k] for k in ("items", "steps", "warmup",
                                                               "block", "actors"))
    batch = 1024
    logs = os.path.join(out_dir, "logs", "scale")
    os.makedirs(logs, exist_ok=True)
    res = {"settings": {"size": size, "events": sizes, "events_per_user": EVENTS_PER_USER,
                        "items": items, "train_steps": steps, "train_warmup_steps": warmup,
                        "batch_per_worker": batch, "workers": 2, "budget_s": budget,
                        "recommend": recommend, "users_per_block": block,
                        "recommend_actors": actors, "din": DIN,
                        "two_tower": TWO_TOWER},
           "rows": []}
    for n in sizes:
        users = max(1, n // EVENTS_PER_USER)
        work = os.path.join(out_dir, "runs", "scale", f"e{n}")
        shutil.rmtree(work, ignore_errors=True)
        job = job_dict(work, users, items, n, name=f"scale_e{n}")
        # rate lines every gcd(warmup, steps, 20) steps fall on the warm-up boundary; one
        # step more than warmup + steps, as the loop stops at the cap before that step's line
        job["train"].update(max_train_rows=(warmup + steps + 1) * batch,
                            log_every=math.gcd(warmup, steps, 20), batch_size=batch)
        status: dict = {}
        for stage in STAGES:
            if progress:
                progress.set_description(f"scale: {n:,} events, {stage}")
            why = _skip_reason(stage, n, res["rows"], status, budget, recommend)
            log = os.path.join(logs, f"e{n}_{stage}.log")
            if why is None:
                arg = {"job": job, "work": work, "mode": recommend, "block": block,
                       "actors": actors}
                # two retries: on a loaded machine an embedded Ray can time out starting
                # ("The current node timed out during startup"), which is not the stage's cost
                for attempt in (1, 2, 3):
                    shutil.rmtree(os.path.join(work, OUTPUT[stage]), ignore_errors=True)
                    r = _run_stage(stage, arg, log if attempt == 1 else f"{log}.{attempt}")
                    if r["exit_code"] == 0 and "child" in r:
                        break
                if r["exit_code"] == 0 and "child" in r:
                    row = _row(stage, n, users, items, r, work, log if attempt == 1
                               else f"{log}.{attempt}", warmup)
                    row["attempts"] = attempt
                else:
                    why = f"failed 3 times (last exit {r['exit_code']}; see {log}, .2, .3)"
            if why is not None:
                row = {"stage": stage, "events": n, "users": users, "items": items,
                       "status": "failed" if why.startswith("failed") else "skipped",
                       "reason": why}
            status[stage] = row["status"] if row["status"] == "ok" else f"was {row['status']}"
            res["rows"].append(row)
            print(f"[bench] scale {n:,} events {stage}: " + (
                f"{row['wall_s']:.1f} s, {row['rate']:,.0f} {row['rate_unit']}, driver "
                f"{row['driver_peak_rss_mb']:.0f} MiB, worker {row['worker_peak_rss_mb']:.0f} "
                f"(private {row['worker_peak_private_mb']:.0f}) "
                f"MiB" if row["status"] == "ok" else row["reason"]),
                flush=True)
            if progress:
                progress.update(1)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        write_report(out_dir, res)
    return res


EXPECTED = """Expected shape: **per-event cost flat** for synth, prepare and recommend (each
does work per event or per user, users ∝ events), falling at small sizes where the fixed
start-up (Python, Ray, the actors' loading) dominates; train runs a fixed number of steps, so
its seconds per million events fall with size and its samples/s stay flat (its validation and
test score one row per user each, which grows with the events). **Training memory flat**: the
workers stream blocks of the prepared samples (Ray Data `streaming_split`), so neither a
worker nor the driver holds the log; only the tables grow (users ∝ events). **Prepare memory
bounded by the bucket size, not by the log**: each sequence task holds one user bucket, and
prepare uses 16 buckets up to 8M events and one per 500,000 events above
(`rectrain.data.prepare.bucket_count`), so a bucket holds at most ~500k events on average."""


def write_report(out_dir: str, res: dict) -> None:
    """``scale.json``, ``scale.md`` and the two plots (skipped with a note without
    matplotlib)."""
    s = res["settings"]
    cols = ["events", "users", "status", "wall_s", "s_per_m_events", "rate",
            "driver_peak_rss_mb", "train_worker_peak_private_mb", "ray_worker_peak_private_mb",
            "train_worker_peak_rss_mb", "ray_worker_peak_rss_mb", "disk_mb"]
    md = [f"### Cost curves: synth → prepare → train → recommend ({s['size']})\n",
          f"Synthetic logs (`rectrain synth`): {s['events_per_user']} events per user on "
          f"average, {s['items']:,} items; DIN (dim 16) on {s['workers']} Ray Train workers, "
          f"batch {s['batch_per_worker']} per worker, {s['train_warmup_steps']} warm-up + "
          f"{s['train_steps']} steps; recommend: {s['recommend']} (HNSW, top 10, "
          f"{s['recommend_actors']} Ray Data actors). "
          "Each stage in its own subprocess and embedded Ray; wall includes the start-up. "
          "Peak memory in MiB per process, sampled every 0.5 s: the driver's RSS; for the "
          "largest Ray Train worker and other `ray::` worker or actor, *private* memory (RSS "
          "minus shared pages: what the process itself holds) and RSS (which also counts every "
          "object-store page the process has read, so a long-lived Ray worker's RSS grows "
          "with the data that passed through it).\n"]
    for stage in STAGES:
        rows = [dict(r, disk_mb=r.get("disk_bytes", 0) / 2**20, status=r["status"] if
                     r["status"] == "ok" else f"{r['status']}: {r['reason']}")
                for r in res["rows"] if r["stage"] == stage]
        unit = next((r["rate_unit"] for r in rows if r.get("rate_unit")), "")
        md.append(f"\n**{stage}** (rate: {unit or '–'}; disk: "
                  f"{OUTPUT[stage]} folder)\n")
        md.append(report.markdown_table(rows, cols, {"disk_mb": ",.1f", "wall_s": ",.1f",
                                                     "s_per_m_events": ",.2f"}))
    md += ["", EXPECTED, "", report.LOADED_NOTE]
    report.write(out_dir, "scale", res, "\n".join(md))
    try:
        _plots(out_dir, res)
    except ImportError as e:
        print(f"[bench] scale: no plots ({e})", flush=True)


def _plots(out_dir: str, res: dict) -> None:
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    secs, mem = {}, {}
    for stage in STAGES:
        rs = [r for r in ok if r["stage"] == stage]
        if rs:
            x = [r["events"] for r in rs]
            secs[stage] = (x, [r["s_per_m_events"] for r in rs])
            mem[f"{stage}: driver"] = (x, [r["driver_peak_rss_mb"] for r in rs])
            mem[f"{stage}: largest worker (private)"] = (
                x, [r.get("worker_peak_private_mb", r["worker_peak_rss_mb"]) for r in rs])
    if not secs:
        return
    report.plot_lines(os.path.join(out_dir, "scale_seconds.png"), secs, "events",
                      "seconds per million events", "cost per event, per stage", logx=True)
    report.plot_lines(os.path.join(out_dir, "scale_memory.png"), mem, "events",
                      "peak MiB per process (driver RSS; worker private)",
                      "peak memory, per stage", logx=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="a stage of rectrain bench scale (internal)")
    p.add_argument("--child", nargs=3, required=True)
    _child_main(p.parse_args().child)
