"""DIN with and without match features (rectrain/data/match.py), beside the "candidate in
history" rule on the same test rows, over several seeds.

For each dataset (a repeat-consumption synthetic log, ``jobs/synth_repeat_din*.yaml``, and
MovieLens-100K P-ML100K, ``jobs/movielens_din*.yaml``) the two jobs are prepared (raw logs
written first by the job's dataset adapter), then trained ``--seeds`` times each through the
normal CLI (``python -m rectrain.cli train --seed S --run-dir RUNS/JOB/seedS``, its own embedded
Ray and 2 Ray Train workers). The rule's AUC (``sklearn.metrics.roc_auc_score`` of the
candidate's count in its behaviour sequence) is computed on the baseline job's prepared test
split, the rows both models are tested on (checked: same row count).

Writes ``OUT.md`` (mean ± sample std of test AUC per variant, the rule's AUC, the gain of
match features and by how much each variant beats the rule) and ``OUT.json`` (every run); the
CLI logs go to ``RUNS/logs/``.

    nice -n 10 python -m benchmarks.match_features [--seeds 3] [--only synth,movielens]
        [--out benchmarks/results/match_features] [--runs runs/match_features] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.quality import _cli as quality_cli
from rectrain.config import load_config
from rectrain.data import storage
from rectrain.data.match import history_rule_auc

DATASETS = {  # name -> (label, baseline job, match-feature job)
    "synth": ("synthetic repeat log (300k events, repeat 0.4)", "jobs/synth_repeat_din.yaml",
              "jobs/synth_repeat_din_match.yaml"),
    "movielens": ("MovieLens-100K (P-ML100K)", "jobs/movielens_din.yaml",
                  "jobs/movielens_din_match.yaml"),
}


def _cli(args: list[str], log) -> float:
    """``python -m rectrain.cli ARGS`` with up to 3 attempts 20 s apart (:func:`benchmarks.
    quality._cli`); returns its seconds."""
    return quality_cli(args, log, retries=2, pause_s=20)


def _prepare(job: str, log) -> None:
    cfg = load_config(job)
    if not storage.exists(storage.join(cfg.prepared_dir, "manifest.json")):
        _cli(["prepare", *([cfg.dataset.source] if cfg.dataset.source else []),
              "--config", job], log)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def run_dataset(name: str, seeds: int, runs: Path, log_dir: Path,
                reuse: bool = False) -> dict:
    """Prepare, train both jobs ``seeds`` times (``reuse``: not a seed whose ``metrics.json``
    is there), score the rule; returns the dataset's row."""
    label, base, match = DATASETS[name]
    out = {"dataset": label, "jobs": {"din": base, "din_match": match}, "runs": []}
    with open(log_dir / f"{name}_prepare.log", "w") as log:
        for job in (base, match):
            _prepare(job, log)
    prepared = load_config(base).prepared_dir
    rule = history_rule_auc(prepared, "test")
    out["rule"] = rule
    for variant, job in (("din", base), ("din_match", match)):
        name_ = load_config(job).name
        for s in range(seeds):
            run_dir = runs / name_ / f"seed{s}"
            wall = None
            if not (reuse and (run_dir / "metrics.json").exists()):
                with open(log_dir / f"{name_}_seed{s}.log", "w") as log:
                    wall = round(_cli(["train", "--config", job, "--seed", str(s),
                                       "--run-dir", str(run_dir)], log), 1)
            m = json.loads((run_dir / "metrics.json").read_text())
            if m["test_rows"] != rule["rows"]:
                raise AssertionError(f"{job}: {m['test_rows']} test rows, the rule scored "
                                     f"{rule['rows']} ({prepared})")
            out["runs"].append({"variant": variant, "seed": s, "test_auc": m["test_auc"],
                                "best_valid_auc": m.get("best_valid_auc"),
                                "cli_seconds": wall})  # None: reused
            print(f"[match_features] {name_} seed {s}: test AUC {m['test_auc']:.4f} "
                  f"({wall} s)", flush=True)
    for variant in ("din", "din_match"):
        out[variant] = mean_std([r["test_auc"] for r in out["runs"] if r["variant"] == variant])
    return out


def markdown(rows: list[dict], seeds: int) -> str:
    lines = [f"| data | DIN test AUC | DIN + match features | \"candidate in history\" rule | "
             f"match − DIN | DIN − rule | DIN + match − rule | test rows |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (d, ds), (m, ms), rule = r["din"], r["din_match"], r["rule"]["auc"]
        lines.append(f"| {r['dataset']} | {d:.4f} ± {ds:.4f} | {m:.4f} ± {ms:.4f} | "
                     f"{rule:.4f} (candidate in history on {r['rule']['in_history']:.1%} of "
                     f"rows) | {m - d:+.4f} | {d - rule:+.4f} | {m - rule:+.4f} | "
                     f"{r['rule']['rows']:,} |")
    lines.append(f"\nMean ± sample std over {seeds} seed(s) (train.seed 0..{seeds - 1}); the "
                 f"rule is scored on the same prepared test rows.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", default=",".join(DATASETS), help="comma list of " +
                   ", ".join(DATASETS))
    p.add_argument("--out", default="benchmarks/results/match_features")
    p.add_argument("--runs", default="runs/match_features")
    p.add_argument("--reuse", action="store_true", help="keep runs that have metrics.json")
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or a.seeds < 1:
        p.error(f"--only: unknown {unknown}; known {list(DATASETS)}" if unknown
                else "--seeds must be >= 1")
    out = Path(a.out)
    log_dir = Path(a.runs) / "logs"  # beside the runs, out of git
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = [run_dataset(n, a.seeds, Path(a.runs), log_dir, a.reuse) for n in names]
    md = markdown(rows, a.seeds)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"seeds": a.seeds, "rows": rows}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
