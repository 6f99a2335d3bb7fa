"""Per-row prepare rate: 5,000 x 10-row events files vs 2 x 10,000-row files (the tiny test job).

Usage: PYTHONPATH=. python benchmarks/small_files.py SCRATCH_DIR   (issue 12, kind 8)
A warm-up prepare, then one timed, per layout; prints rows/s and the manifest's read_tasks.
"""
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from rectrain.config import config_from_dict
from rectrain.data.prepare import prepare
from rectrain.launch.ray_launch import init_ray
from tests.support.tiny import tiny_cfg, tiny_job, tiny_tables

root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
init_ray(tiny_cfg(str(root / "ray")))
res = {}
for name, n_files, rows in (("2x10000", 2, 10_000), ("5000x10", 5000, 10)):
    tmp = root / name
    t = tiny_tables(seed=1, n_events=n_files * rows)
    for s in ("users", "items"):
        (tmp / "raw" / s).mkdir(parents=True, exist_ok=True)
        pq.write_table(t[s], tmp / "raw" / s / "part-0.parquet")
    ev = tmp / "raw" / "events"; ev.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        pq.write_table(t["events"].slice(i * rows, rows), ev / f"part-{i:05d}.parquet")
    cfg = config_from_dict(tiny_job(str(tmp)))
    prepare(cfg)  # warm-up (workers, imports)
    t0 = time.perf_counter(); m = prepare(cfg); dt = time.perf_counter() - t0
    res[name] = {"rows": m["rows_read"], "seconds": round(dt, 2),
                 "rows_per_s": round(m["rows_read"] / dt), "read": m.get("read_tasks")}
    print(name, res[name], m["seconds"], flush=True)
print(json.dumps(res), "ratio per-row (big/small):",
      round(res["2x10000"]["rows_per_s"] / res["5000x10"]["rows_per_s"], 1))
