"""Model-quality table: train a list of jobs through the normal CLI path and tabulate one metric
per job, with train samples/s and wall time.

The list is data (``benchmarks/quality_jobs.yaml`` by default): each entry names a job YAML, the
``metrics.json`` key to report (``test_auc``, ``test_rmse``, ``test_hr@10``, ...) and optionally
a label and ``higher_is_better``. Each job runs as ``python -m rectrain.cli train --config JOB``
in a subprocess (its own embedded Ray, 2 Ray Train workers and sharded tables as the job says);
the job's prepared samples are made first with ``rectrain prepare`` when the manifest is missing.
With ``--reuse`` a job whose ``run_dir/metrics.json`` exists is not rerun (its wall time is then
the ``train_wall_seconds`` recorded by that run).

Writes ``OUT.md`` (a Markdown table: model, metric, value, train samples/s, wall time, plus the
secondary metrics logloss / RMSE / MAE / GAUC where the run has them) and ``OUT.json``. Wall time
is the run's ``train_wall_seconds`` (Ray Train start-up + epochs + test); ``OUT.json`` also has
``cli_seconds``, the whole ``rectrain train`` subprocess, for jobs trained by this invocation.

    python -m benchmarks.quality [--jobs benchmarks/quality_jobs.yaml] [--only dlrm,bst]
                                 [--reuse] [--out benchmarks/results/quality]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rectrain.config import load_config
from rectrain.data import storage

SECONDARY = ("test_logloss", "test_gauc", "test_rmse", "test_mae", "test_auc")


def load_entries(path: str) -> list[dict]:
    """Read the job list; raises ValueError naming the file and entry on a malformed one."""
    raw = yaml.safe_load(Path(path).read_text()) or []
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a list of entries, got {type(raw).__name__}")
    out = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or "job" not in e or "metric" not in e:
            raise ValueError(f"{path}: entry {i}: needs `job` and `metric`, got {e!r}")
        out.append({"higher_is_better": True, **e})
    return out


def _cli(args: list[str], log, retries: int = 1) -> float:
    """Run ``python -m rectrain.cli ARGS``; retried ``retries`` times on failure (an embedded
    Ray can time out starting on an overloaded machine). Returns the last attempt's seconds."""
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "rectrain.cli", *args], stdout=log,
                              stderr=subprocess.STDOUT, env=dict(os.environ))
        if proc.returncode == 0:
            return time.perf_counter() - t0
        log.write(f"\n[quality] attempt {attempt + 1} failed (exit {proc.returncode})\n")
        log.flush()
    raise RuntimeError(f"rectrain {' '.join(args)} failed (exit {proc.returncode}) "
                       f"{retries + 1} times; see {log.name}")


def run_entry(entry: dict, reuse: bool, log_dir: Path, collect: bool = False) -> dict:
    """Train one job (unless reused, or ``collect``: never train) and return its table row.

    Raises:
        FileNotFoundError: ``collect`` and the job has no ``metrics.json``.
    """
    cfg = load_config(entry["job"])
    metrics_url = storage.join(cfg.run_dir, "metrics.json")
    log_path = log_dir / f"{cfg.name}.log"
    wall = None
    if collect and not storage.exists(metrics_url):
        raise FileNotFoundError(f"not run: {metrics_url} missing")
    if not (reuse or collect) or not storage.exists(metrics_url):
        with open(log_path, "w") as log:
            if not storage.exists(storage.join(cfg.prepared_dir, "manifest.json")):
                _cli(["prepare", *([cfg.dataset.source] if cfg.dataset.source else []),
                      "--config", entry["job"]], log)
            wall = _cli(["train", "--config", entry["job"]], log)
    m = storage.read_json(metrics_url)
    if entry["metric"] not in m:
        raise KeyError(f"{metrics_url}: no metric {entry['metric']!r} (has {sorted(m)})")
    row = {"label": entry.get("label", cfg.model.name), "job": entry["job"],
           "model": cfg.model.name, "metric": entry["metric"], "value": m[entry["metric"]],
           "higher_is_better": entry["higher_is_better"],
           "train_samples_per_s": m.get("train_samples_per_s"),
           # the run's own record (Ray Train start-up + epochs + test), same for reused runs
           "wall_seconds": m.get("train_wall_seconds"),
           "cli_seconds": wall,  # the whole `rectrain train` subprocess when run here
           "best_epoch": m.get("best_epoch"), "world_size": m.get("world_size")}
    row.update({k: m[k] for k in SECONDARY if k in m and k != entry["metric"]})
    return row


def _fmt(v, nd=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{nd}f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    """The Markdown table of ``rows`` (as returned by :func:`run_entry`)."""
    head = ("| model | job | metric | value | test logloss | test GAUC | test RMSE / MAE | "
            "train samples/s | wall (s) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        if r.get("error"):
            why = "not run" if r["error"].startswith("not run") else "failed"
            lines.append(f"| {r['label']} | `{r['job']}` | {r['metric']} {arrow} | {why} | "
                         "– | – | – | – | – |")
            continue
        rm = (f"{_fmt(r.get('test_rmse') if r['metric'] != 'test_rmse' else r['value'])} / "
              f"{_fmt(r.get('test_mae'))}") if ("test_mae" in r) else "–"
        lines.append(
            f"| {r['label']} | `{r['job']}` | {r['metric']} {arrow} | **{_fmt(r['value'])}** | "
            f"{_fmt(r.get('test_logloss'))} | {_fmt(r.get('test_gauc'))} | {rm} | "
            f"{_fmt(r['train_samples_per_s'], 0)} | {_fmt(r['wall_seconds'], 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="benchmarks/quality_jobs.yaml")
    p.add_argument("--only", default=None, help="comma-separated labels, models or job names")
    p.add_argument("--reuse", action="store_true", help="reuse runs that have metrics.json")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: tabulate the runs that have metrics.json")
    p.add_argument("--out", default="benchmarks/results/quality")
    a = p.parse_args(argv)
    entries = load_entries(a.jobs)
    if a.only:
        keep = set(a.only.split(","))
        entries = [e for e in entries if keep & {e.get("label"), Path(e["job"]).stem,
                                                 load_config(e["job"]).model.name}]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent / "logs"
    log_dir.mkdir(exist_ok=True)
    rows = []
    for e in entries:
        print(f"[quality] {e['job']} ...", flush=True)
        try:
            rows.append(run_entry(e, a.reuse, log_dir, a.collect))
            r = rows[-1]
            print(f"[quality] {r['label']}: {r['metric']} {_fmt(r['value'])} "
                  f"({_fmt(r['wall_seconds'], 0)} s)", flush=True)
        except Exception as err:  # report and continue: one failed job does not hide the others
            print(f"[quality] {e['job']} FAILED: {err}", flush=True)
            rows.append({"label": e.get("label", e["job"]), "job": e["job"], "model": "?",
                         "metric": e["metric"], "value": None, "error": str(err),
                         "higher_is_better": e["higher_is_better"], "train_samples_per_s": None,
                         "wall_seconds": None})
        # write after every job so partial results survive
        Path(f"{out}.json").write_text(json.dumps(rows, indent=2))
        Path(f"{out}.md").write_text(markdown(rows))
    print(markdown(rows))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
