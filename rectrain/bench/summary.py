"""``rectrain bench all``: one report (``REPORT.md`` + ``summary.json``) from the jobs' results,
with the issue's targets checked on figures of the same run."""

from __future__ import annotations

import json
import os

from rectrain.bench import report

#: (c) >= 0.8 (b), (b) >= 0.6 (a), ingest >= 3 x the rate training consumes
TARGETS = {"c_over_b": 0.8, "b_over_a": 0.6, "ingest_over_train": 3.0}


def targets(results: dict) -> list[dict]:
    """One row per target check: what, measured value, target, met (None when not measured)."""
    rows = []
    ts = {r["workload"]: r for r in results.get("trainstep", {}).get("rows", [])}
    for wl, r in ts.items():
        for key in ("c_over_b", "b_over_a"):
            v = r.get(key)
            rows.append({"check": f"{wl}: {key.replace('_over_', ' / ')}", "measured": v,
                         "target": f">= {TARGETS[key]}",
                         "met": None if v is None else v >= TARGETS[key]})
    for r in results.get("ingest", {}).get("rows", []):
        t = ts.get(r["workload"], {})
        train = t.get("c_ray_samples_per_s") or t.get("b_dmp_samples_per_s")
        v = r["ray_rows_per_s"] / train if train else None
        src = "(c)" if t.get("c_ray_samples_per_s") else "(b)"
        rows.append({"check": f"{r['workload']}: ingest (Ray Data path) / training {src}",
                     "measured": v, "target": f">= {TARGETS['ingest_over_train']}",
                     "met": None if v is None else v >= TARGETS["ingest_over_train"]})
    return rows


def write_summary(out_dir: str, results: dict, size: str, seconds: float) -> str:
    """Write ``REPORT.md`` (every job's table and plots, the targets, the machine) and
    ``summary.json``; returns the report's path."""
    m = report.machine()
    checks = targets(results)
    parts = [f"## Benchmark report (`rectrain bench all --size {size}`)\n",
             f"Machine: {m['cpus']} CPUs, {m.get('mem_total_gib')} GiB, {m['platform']}; "
             f"torch {m['torch']}, torchrec {m['torchrec']}, fbgemm-gpu {m['fbgemm_gpu']}, "
             f"ray {m['ray']}; load average at the end {m.get('load_avg_1_5_15')}; "
             f"{m['time_utc']}. Whole run: {seconds / 60:.1f} min.\n",
             "### Targets (ratios from this run)\n",
             report.markdown_table(checks, ["check", "measured", "target", "met"],
                                   {"measured": ".2f"}), ""]
    for name in ("trainstep", "ingest", "scaling", "peers"):
        p = os.path.join(out_dir, f"{name}.md")
        if name in results and os.path.exists(p):
            with open(p) as f:
                parts.append(f.read())
            for png in sorted(x for x in os.listdir(out_dir)
                              if x.startswith(name) and x.endswith(".png")):
                parts.append(f"![{png}]({png})\n")
    path = os.path.join(out_dir, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"size": size, "seconds": seconds, "machine": m, "targets": checks,
                   "bench_seconds": {k: v.get("bench_seconds") for k, v in results.items()}},
                  f, indent=1, default=float)
    return path
