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

With ``--seeds N`` every job is trained N times (``train.seed`` = 0 … N-1, run dirs
``RUN_DIR/seed-S``) and the table shows mean ± sample standard deviation; an entry with
``baseline: LABEL`` also shows its difference to that entry, called a gain only when it exceeds
twice the larger of the two standard deviations (:func:`compare`). An entry with
``slices: [cold_items]`` adds the metric (AUC; HR@10 for retrieval runs) on the test rows
whose item had < 5 train events and on those whose item had none (:mod:`rectrain.bench.slices`).

    python -m benchmarks.quality [--jobs benchmarks/quality_jobs.yaml] [--only dlrm,bst]
                                 [--seeds 3] [--reuse] [--out benchmarks/results/quality]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import statistics
import time
from pathlib import Path

import yaml

from rectrain.bench.slices import run_cold_item_metrics
from rectrain.config import load_config
from rectrain.data import storage

SECONDARY = ("test_logloss", "test_gauc", "test_rmse", "test_mae", "test_auc")


KEYS = {"job", "metric", "label", "higher_is_better", "baseline", "slices"}
SLICES = ("cold_items",)


def load_entries(path: str) -> list[dict]:
    """Read the job list; each entry gets ``label`` (default: its job's ``model.name``).

    Raises:
        ValueError: naming the file, entry and key: a malformed entry, an unknown key or
            slice, a ``baseline`` that is not the label of an earlier entry with the same metric
            (the comparison would silently be left out, or compare two metrics).
    """
    raw = yaml.safe_load(Path(path).read_text()) or []
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a list of entries, got {type(raw).__name__}")
    out: list[dict] = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or "job" not in e or "metric" not in e:
            raise ValueError(f"{path}: entry {i}: needs `job` and `metric`, got {e!r}")
        at = f"{path}: entry {i} ({e.get('label', e['job'])})"
        unknown = sorted(set(e) - KEYS)
        if unknown:
            raise ValueError(f"{at}: unknown keys {unknown} (known: {sorted(KEYS)})")
        slices = e.get("slices", [])
        if not isinstance(slices, list) or set(slices) - set(SLICES):
            raise ValueError(f"{at}: slices: expected a list of {list(SLICES)}, got {slices!r}")
        e = {"higher_is_better": True, **e}
        if "label" not in e:  # a job that does not load fails as its own row, later
            e["label"] = _model_name(e["job"]) or e["job"]
        b = e.get("baseline")
        if b is not None:
            base = next((o for o in out if o["label"] == b), None)
            later = [j for j, o in enumerate(raw[i:], i) if isinstance(o, dict)
                     and o.get("label") == b]
            if base is None:
                raise ValueError(f"{at}: baseline {b!r} is not the label of an earlier entry"
                                 + (f" (entry {later[0]} comes after; move it above)" if later
                                    else f" (earlier labels: {[o['label'] for o in out]})"))
            if base["metric"] != e["metric"]:
                raise ValueError(f"{at}: baseline {b!r} reports {base['metric']}, this entry "
                                 f"{e['metric']}: a comparison needs the same metric")
        out.append(e)
    return out


def _model_name(job: str) -> str | None:
    try:
        return load_config(job).model.name
    except Exception:  # noqa: BLE001 - the entry's own run reports why
        return None


def select(entries: list[dict], only: str) -> list[dict]:
    """The entries ``--only`` names: the whole text when it is one label, job name (file stem)
    or model name, else its ``;``-separated items (``,``-separated when it has no ``;``), each
    matching an entry's label, job name, job path or model name.

    Raises:
        ValueError: an item that matches no entry (names it; labels may hold commas, e.g.
            "DCNv2 (parallel, full rank)", then separate items with ``;``).
    """
    def keys(e):
        return {e["label"], Path(e["job"]).stem, e["job"], _model_name(e["job"])}

    whole = only.strip()
    if any(whole in keys(e) for e in entries):
        return [e for e in entries if whole in keys(e)]
    items = [x.strip() for x in only.split(";" if ";" in only else ",") if x.strip()]
    missing = [x for x in items if not any(x in keys(e) for e in entries)]
    if missing:
        raise ValueError(f"--only: {missing} match no entry's label, job name or model (labels: "
                         f"{[e['label'] for e in entries]}); separate items with ';' when a "
                         f"label has a comma")
    return [e for e in entries if set(items) & keys(e)]


def _cli(args: list[str], log, retries: int = 1, pause_s: float = 0.0) -> float:
    """Run ``python -m rectrain.cli ARGS``; retried ``retries`` times on failure, after
    ``pause_s`` seconds (an embedded Ray can time out starting on an overloaded machine: 30 s,
    fixed in Ray). Returns the last attempt's seconds.

    Raises:
        RuntimeError: every attempt failed (names the command and the log).
    """
    for attempt in range(retries + 1):
        if attempt and pause_s:
            time.sleep(pause_s)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "rectrain.cli", *args], stdout=log,
                              stderr=subprocess.STDOUT, env=dict(os.environ))
        if proc.returncode == 0:
            return time.perf_counter() - t0
        log.write(f"\n[{Path(sys.argv[0]).stem}] attempt {attempt + 1} failed "
                  f"(exit {proc.returncode})\n")
        log.flush()
    raise RuntimeError(f"rectrain {' '.join(args)} failed (exit {proc.returncode}) "
                       f"{retries + 1} times; see {log.name}")


def run_entry(entry: dict, reuse: bool, log_dir: Path, collect: bool = False,
              seed: int | None = None) -> dict:
    """Train one job (unless reused, or ``collect``: never train) and return its table row.

    With ``seed`` the run uses ``train.seed = seed`` and the run dir ``RUN_DIR/seed-S``.

    Raises:
        FileNotFoundError: ``collect`` and the job has no ``metrics.json``.
    """
    cfg = load_config(entry["job"])
    run_dir = cfg.run_dir if seed is None else storage.join(cfg.run_dir, f"seed-{seed}")
    extra = [] if seed is None else ["--seed", str(seed), "--run-dir", run_dir]
    metrics_url = storage.join(run_dir, "metrics.json")
    log_path = log_dir / f"{cfg.name}{'' if seed is None else f'-seed{seed}'}.log"
    wall = None
    if collect and not storage.exists(metrics_url):
        raise FileNotFoundError(f"not run: {metrics_url} missing")
    if not (reuse or collect) or not storage.exists(metrics_url):
        with open(log_path, "w") as log:
            if not storage.exists(storage.join(cfg.prepared_dir, "manifest.json")):
                _cli(["prepare", *([cfg.dataset.source] if cfg.dataset.source else []),
                      "--config", entry["job"]], log)
            wall = _cli(["train", "--config", entry["job"], *extra], log)
    m = storage.read_json(metrics_url)
    if entry["metric"] not in m:
        raise KeyError(f"{metrics_url}: no metric {entry['metric']!r} (has {sorted(m)})")
    row = {"label": entry.get("label", cfg.model.name), "job": entry["job"],
           "model": cfg.model.name, "metric": entry["metric"], "value": m[entry["metric"]],
           "higher_is_better": entry["higher_is_better"], "seed": m.get("seed", seed),
           "run_dir": run_dir,
           "train_samples_per_s": m.get("train_samples_per_s"),
           # the run's own record (Ray Train start-up + epochs + test), same for reused runs
           "wall_seconds": m.get("train_wall_seconds"),
           "cli_seconds": wall,  # the whole `rectrain train` subprocess when run here
           "best_epoch": m.get("best_epoch"), "world_size": m.get("world_size")}
    row.update({k: m[k] for k in SECONDARY if k in m and k != entry["metric"]})
    if "cold_items" in entry.get("slices", ()):
        sl = run_cold_item_metrics(run_dir, cfg.prepared_dir)
        key = "test_auc" if "test_auc_cold" in sl else "test_hr@10"
        row.update(sl, value_cold=sl[f"{key}_cold"], value_unseen=sl[f"{key}_unseen"])
    return row


AGGREGATED = ("value", "train_samples_per_s", "wall_seconds", *SECONDARY, "value_cold",
              "value_unseen", "cold_rows", "unseen_rows")


def aggregate(runs: list[dict]) -> dict:
    """One row from the per-seed rows of one entry: every numeric field in :data:`AGGREGATED`
    becomes its mean over the seeds, with ``FIELD_std`` (sample standard deviation, ddof 1; 0
    for one seed) and ``FIELD_runs`` (the per-seed values); NaN values (an undefined AUC) are
    left out of the mean."""
    out = {k: v for k, v in runs[0].items() if k not in AGGREGATED}
    out["seeds"] = [r.get("seed") for r in runs]
    for k in AGGREGATED:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
        if not vals:
            continue
        out[k] = statistics.fmean(vals)
        out[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out[f"{k}_runs"] = vals
    return out


def compare(row: dict, base: dict) -> dict:
    """``row`` against ``base`` (aggregated rows of the same metric): the difference of the
    means in the metric's better direction, ``gain`` true only when it exceeds twice the
    larger standard deviation (below that, seed-to-seed noise explains it) and ``loss`` true
    when it falls below minus that."""
    sign = 1 if row["higher_is_better"] else -1
    delta = sign * (row["value"] - base["value"])
    noise = 2 * max(row.get("value_std", 0.0), base.get("value_std", 0.0))
    return {"baseline": base["label"], "delta": delta, "noise": noise,
            "gain": bool(delta > noise and noise > 0),
            "loss": bool(delta < -noise and noise > 0)}


def _fmt(v, nd=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{nd}f}"
    return str(v)


def _pm(r: dict, key: str, nd: int = 4) -> str:
    """``mean ± std`` of an aggregated field (the mean alone for one seed)."""
    v = r.get(key)
    if v is None:
        return "–"
    return _fmt(v, nd) + (f" ± {_fmt(r[key + '_std'], nd)}" if len(r.get("seeds", ())) > 1
                          else "")


def markdown(rows: list[dict]) -> str:
    """The Markdown table of ``rows`` (aggregated rows: :func:`aggregate`)."""
    cold = any("value_cold" in r for r in rows)
    vs = any("compare" in r for r in rows)
    extra_h = (" items < 5 train events (rows) | unseen items (rows) |" if cold else "") \
        + (" vs baseline |" if vs else "")
    head = ("| model | job | metric | value | test logloss | test GAUC | test RMSE / MAE |"
            f"{extra_h} train samples/s | wall (s) |\n|---|---|---|---|---|---|---|"
            + "---|" * (2 * cold + vs) + "---|---|")
    lines = [head]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        if r.get("error"):
            why = "not run" if r["error"].startswith("not run") else "failed"
            lines.append(f"| {r['label']} | `{r['job']}` | {r['metric']} {arrow} | {why} |"
                         + " – |" * (5 + 2 * cold + vs))
            continue
        rm = (f"{_pm(r, 'test_rmse') if r['metric'] != 'test_rmse' else _pm(r, 'value')} / "
              f"{_pm(r, 'test_mae')}") if ("test_mae" in r) else "–"
        extra = ""
        if cold:
            extra += (f" {_pm(r, 'value_cold')} ({_fmt(r.get('cold_rows'), 0)}) |"
                      f" {_pm(r, 'value_unseen')} ({_fmt(r.get('unseen_rows'), 0)}) |")
        if vs:
            c = r.get("compare")
            extra += (f" {c['delta']:+.4f} vs {c['baseline']}: "
                      f"{'gain' if c['gain'] else 'loss' if c.get('loss') else 'within noise'} (2σ = {c['noise']:.4f}) |"
                      if c else " – |")
        lines.append(
            f"| {r['label']} | `{r['job']}` | {r['metric']} {arrow} | **{_pm(r, 'value')}** | "
            f"{_pm(r, 'test_logloss')} | {_pm(r, 'test_gauc')} | {rm} |{extra} "
            f"{_fmt(r.get('train_samples_per_s'), 0)} | {_fmt(r.get('wall_seconds'), 0)} |")
    seeds = max((len(r.get("seeds", ())) for r in rows), default=1)
    if seeds > 1:
        lines.append(f"\nMean ± sample standard deviation over {seeds} seeds (0…{seeds - 1}); "
                     "a difference is a gain only above twice the larger standard deviation.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="benchmarks/quality_jobs.yaml")
    p.add_argument("--only", default=None,
                   help="labels, job names or models, separated by ';' (or ',' when none has "
                        "a comma), or one whole label")
    p.add_argument("--seeds", type=int, default=1,
                   help="train each job with seeds 0..N-1 (run dirs RUN_DIR/seed-S); "
                        "1 = the job's own seed and run dir")
    p.add_argument("--reuse", action="store_true", help="reuse runs that have metrics.json")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: tabulate the runs that have metrics.json")
    p.add_argument("--out", default="benchmarks/results/quality")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error(f"--seeds: must be at least 1, got {a.seeds}")
    try:
        entries = load_entries(a.jobs)
        if a.only:
            entries = select(entries, a.only)
    except ValueError as err:
        p.error(str(err))
    chosen = {e["label"] for e in entries}
    for e in entries:
        if e.get("baseline") and e["baseline"] not in chosen:
            print(f"[quality] {e['label']}: its baseline {e['baseline']!r} is not selected by "
                  f"--only, so no comparison", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent / "logs"
    log_dir.mkdir(exist_ok=True)
    seeds = [None] if a.seeds == 1 else list(range(a.seeds))
    rows, by_label = [], {}
    for e in entries:
        runs = []
        for seed in seeds:
            print(f"[quality] {e['job']}{'' if seed is None else f' seed {seed}'} ...",
                  flush=True)
            try:
                runs.append(run_entry(e, a.reuse, log_dir, a.collect, seed))
                r = runs[-1]
                print(f"[quality] {r['label']}: {r['metric']} {_fmt(r['value'])} "
                      f"({_fmt(r['wall_seconds'], 0)} s)", flush=True)
            except Exception as err:  # report and continue: one failed job hides no other
                print(f"[quality] {e['job']} FAILED: {err}", flush=True)
                runs = [{"label": e.get("label", e["job"]), "job": e["job"], "model": "?",
                         "metric": e["metric"], "value": None, "error": str(err),
                         "higher_is_better": e["higher_is_better"]}]
                break
        row = runs[0] if runs[0].get("error") else aggregate(runs)
        base = by_label.get(e.get("baseline"))
        if base is not None and not row.get("error") and not base.get("error"):
            row["compare"] = compare(row, base)
        by_label[row["label"]] = row
        rows.append(row)
        # write after every job so partial results survive
        Path(f"{out}.json").write_text(json.dumps(rows, indent=2))
        Path(f"{out}.md").write_text(markdown(rows))
    print(markdown(rows))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
