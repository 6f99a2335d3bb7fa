"""Training's samples/s beside the CPU of every process of its embedded Ray, over time.

Trains the DIN of ``rectrain bench scale`` (``rectrain.bench.synth_jobs``) on an existing
prepared folder of that job for ``--steps`` steps, with a sampler that every 2 s adds up the
CPU seconds of the process tree by role (Ray Train workers; the read tasks' pooled workers;
the split coordinator; the rest: Ray's servers, Train's actors, the driver) and prints the
cores each used; the loop's per-20-step rate lines are time-stamped as they arrive. Prints the
harmonic-mean samples/s of the steps 40-120 and 220-``steps`` windows and the mean cores per
role while the workers train.

    PYTHONPATH=. python benchmarks/train_timeline.py --prepared WORK/prepared --users 200000
    RECTRAIN_DATA_IDLE_PAUSE_S=0 PYTHONPATH=. python benchmarks/train_timeline.py ...  # no pause
    PYTHONPATH=. python benchmarks/train_timeline.py ... --cap-mb 256   # Ray Data budget 256 MiB

``WORK/prepared``: e.g. ``rectrain bench scale --size quick --events 10000000 --keep``'s
``runs/scale/e10000000/prepared``. ``--cap-mb`` caps Ray Data's object-store budget
(``DataContext.execution_options.resource_limits``, which Ray Train's ingest carries over).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

ROLES = ("train", "read", "coordinator", "other")


def role(title: str) -> str:
    if "RayTrainWorker" in title:
        return "train"
    if title == "ray::IDLE" or "Read" in title:
        return "read"
    return "coordinator" if "SplitCoordinator" in title else "other"


def child(a) -> None:
    from rectrain.bench.proctree import cpu_seconds_by_title, cpu_snapshot
    from rectrain.bench.synth_jobs import job_dict
    from rectrain.config import config_from_dict
    from rectrain.launch.ray_launch import train

    if a.cap_mb:
        from ray.data import DataContext, ExecutionResources
        DataContext.get_current().execution_options.resource_limits = ExecutionResources(
            object_store_memory=a.cap_mb * 2**20)
    stop = threading.Event()

    def sample():
        prev, t0 = cpu_snapshot(os.getpid()), time.time()
        while not stop.wait(2.0):
            cur, t = cpu_snapshot(os.getpid()), time.time()
            use = dict.fromkeys(ROLES, 0.0)
            for name, s in cpu_seconds_by_title(prev, cur).items():
                use[role(name)] += s / (t - t0)
            print("CPU " + json.dumps({k: round(v, 3) for k, v in use.items()}), flush=True)
            prev, t0 = cur, t

    threading.Thread(target=sample, daemon=True).start()
    job = job_dict(os.path.dirname(a.prepared), a.users, 100_000, a.users * 50,
                   name="train_timeline")
    job["prepared_dir"], job["run_dir"] = a.prepared, a.run_dir
    job["train"].update(max_train_rows=(a.steps + 1) * 1024, log_every=20, batch_size=1024)
    train(config_from_dict(job))
    stop.set()


def summary(lines: list[str], steps: int) -> dict:
    rates, cpu = [], []
    for line in lines:
        m = re.search(r"step (\d+) loss \S+ ([\d,]+) samples/s", line)
        if m:
            rates.append((int(m.group(1)), float(m.group(2).replace(",", ""))))
        elif line.startswith("CPU "):
            cpu.append(json.loads(line[4:]))

    def hm(lo, hi):
        xs = [r for s, r in rates if lo <= s <= hi and r > 0]
        return len(xs) / sum(1 / x for x in xs) if xs else None

    busy = [c for c in cpu if c["train"] > 0.3]
    return {"samples_per_s_steps_40_120": hm(40, 120),
            f"samples_per_s_steps_220_{steps}": hm(220, steps),
            "cores_while_training": {k: statistics.mean(c[k] for c in busy) if busy else None
                                     for k in ROLES},
            "rates": rates}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", required=True, help="prepared folder of the scale job")
    ap.add_argument("--users", type=int, required=True, help="users of that log (events / 50)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--cap-mb", type=int, default=0, help="Ray Data object-store budget, MiB")
    ap.add_argument("--run-dir", default="/tmp/rectrain-train-timeline")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.steps < 240:
        ap.error("--steps must be at least 240 (the late window starts at step 220)")
    if a.child:
        return child(a)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *(argv or sys.argv[1:])]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("CPU ") or "samples/s" in line:
            print(time.strftime("%H:%M:%S ") + line, end="", flush=True)
    if p.wait():
        sys.exit("".join(lines[-30:]))
    s = summary(lines, a.steps)
    print(json.dumps({k: v for k, v in s.items() if k != "rates"}, indent=1))


if __name__ == "__main__":
    main()
