"""``rectrain continual --config JOB.yaml``: the loop over time windows (issue 14).

For a job with ``dataset.windows``, for each window T = 0, 1, ... (up to the last one that has a
successor): prepare window T (train = T, valid/test = T+1, docs/protocol.md "P-WINDOW",
``vocab_from`` the previous window's prepared folder, so ids keep their rows), train on it and
report the model of T on T+1 (the run's test split: the second part of window T+1, never
trained on or selected by). Policies, each in its own folders:

- ``warm``: warm-start from the model of T-1 (docs/checkpoints.md, "Warm start");
- ``scratch``: train from scratch on windows 0..T (``windows.cumulative``);
- ``never``: the model of window 0 (``warm``'s), only evaluated on each later window.

Layout: ``<prepared_dir>/window-NNN`` (warm, never) and ``cumulative-NNN`` (scratch);
``<run_dir>/<policy>/window-NNN``; ``<run_dir>/continual.json`` (one row per window and policy).
A window whose run already holds ``metrics.json`` is not run again, so a failed loop restarts
at the window where it stopped (within a window, ``--resume`` of that run is the finer tool).
"""

from __future__ import annotations

import time
from typing import Optional

from rectrain.config import JobConfig
from rectrain.data import storage

POLICIES = ("warm", "scratch", "never")


def _window_cfg(cfg: JobConfig, w: int, policy: str, warm_from: Optional[str]) -> JobConfig:
    """The job of window ``w`` under ``policy``: its prepared folder, run directory, window,
    vocabulary source and warm start."""
    c = cfg.model_copy(deep=True)
    kind = "cumulative" if policy == "scratch" else "window"
    c.prepared_dir = storage.join(cfg.prepared_dir, f"{kind}-{w:03d}")
    c.run_dir = storage.join(cfg.run_dir, policy, f"window-{w:03d}")
    c.dataset.window = w
    c.dataset.windows.cumulative = policy == "scratch"
    c.dataset.vocab_from = (storage.join(cfg.prepared_dir, f"{kind}-{w - 1:03d}") if w
                            else cfg.dataset.vocab_from)
    c.checkpoint.warm_start = warm_from
    c.checkpoint.resume = None
    return c


def _short_tail(manifest: dict) -> bool:
    """Whether ``manifest`` is the prepare of the log's second-to-last window whose successor
    (the last, often partial, window) has an empty valid or test split: the loop ends there
    instead of failing (a window earlier in the log with no events stays an error)."""
    win, split = manifest.get("window") or {}, manifest.get("rows_per_split") or {}
    return (win.get("index") == win.get("num_windows", 0) - 2
            and not (split.get("valid") and split.get("test")))


def _prepared(c: JobConfig, address: Optional[str]) -> dict:
    """The manifest of window job ``c``, preparing it first unless its folder has one. A
    prepare that fails only because its successor is the log's partial last window has
    still written its manifest (prepare saves it before raising), which is returned so the
    loop can end there (:func:`_short_tail`)."""
    from rectrain.data.schema import load_manifest
    from rectrain.launch.jobs import prepare_job

    url = storage.join(c.prepared_dir, "manifest.json")
    if not storage.exists(url):
        try:
            prepare_job(c, address=address)
        except ValueError:
            if not (storage.exists(url) and _short_tail(load_manifest(c.prepared_dir))):
                raise
    return load_manifest(c.prepared_dir)


def evaluate_on(run_dir: str, prepared_dir: str) -> dict:
    """The test metrics (``test_auc``, ``test_logloss``, ``test_rows``) of ``run_dir``'s best
    checkpoint on another window's prepared test split, in this process (no Ray).

    Raises:
        ValueError: the prepared data neither equals nor extends the checkpoint's, or the
            model is a retrieval model (not supported here).
    """
    from rectrain.config import RETRIEVAL_MODELS
    from rectrain.data.schema import LABEL, check_same_data, load_manifest, read_split
    from rectrain.serve.loading import load_model
    from rectrain.train.objectives import eval_metrics
    from rectrain.train.ranking import evaluate

    lm = load_model(run_dir)
    if lm.cfg.model.name in RETRIEVAL_MODELS:
        raise ValueError(f"continual policy never: {lm.cfg.model.name} is a retrieval model; "
                         f"only ranking models are evaluated outside a run")
    check_same_data(lm.meta.get("data"), load_manifest(prepared_dir), lm.meta["url"],
                    prepared_dir)
    table = read_split(prepared_dir, "test", list(dict.fromkeys(lm.layout.columns + [LABEL])),
                       negatives=True)

    class _One:
        def tables(self):
            return iter([table])

    import torch
    m = eval_metrics(lm.cfg, evaluate(lm.model, lm.layout, _One(), lm.cfg.train.eval_batch_size,
                                      torch.device("cpu")))
    return {"test_auc": m["auc"], "test_logloss": m["logloss"], "test_rows": m["rows"]}


def _row(w: int, policy: str, m: dict, manifest: dict, seconds: float) -> dict:
    growth = manifest.get("vocab_growth", {}).get("features", {})
    return {"window": w, "policy": policy,
            **{k: m.get(k) for k in ("test_auc", "test_logloss", "test_hr@10", "test_ndcg@10")
               if k in m},
            "train_rows": manifest["rows_per_split"]["train"] if policy != "never" else 0,
            "new_ids": {f: g["new"] for f, g in growth.items()},
            "oov_rows": {f: g["oov_rows"] for f, g in growth.items()},
            "train_seconds": m.get("train_seconds", 0.0), "seconds": round(seconds, 3),
            **_zch_counts(m.get("epochs") or [])}


def _zch_counts(epochs: list[dict]) -> dict:
    """A window's zch counts from its run's epoch records (each epoch's own counts): admitted,
    evicted and colliding summed over the epochs, held at the last."""
    out = {}
    for e in epochs:
        for k, v in e.items():
            if k.startswith("zch_"):
                out[k] = v if k.endswith("_held") or k not in out else out[k] + v
    return out


def continual(cfg: JobConfig, policies=("warm",), address: Optional[str] = None,
              max_windows: Optional[int] = None) -> list[dict]:
    """Run the window loop for ``policies`` (see the module doc); returns the rows written to
    ``<run_dir>/continual.json``. ``max_windows`` caps the number of windows trained.

    Raises:
        ValueError: the job has no ``dataset.windows``, or an unknown policy.
    """
    from rectrain.launch.ray_launch import train

    if cfg.dataset.windows is None:
        raise ValueError("dataset.windows: rectrain continual needs time windows "
                         "(e.g. windows: {size: 7d}); see docs/protocol.md")
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"continual: unknown policy {bad[0]!r} (choose from {POLICIES})")
    todo = list(dict.fromkeys(["warm"] + list(policies))) if "never" in policies \
        else list(policies)
    rows, w, n_windows = [], 0, None
    while n_windows is None or w < n_windows - 1:
        if max_windows is not None and w >= max_windows:
            break
        for policy in todo:
            t0 = time.perf_counter()
            prev = storage.join(cfg.run_dir, "warm", f"window-{w - 1:03d}")
            c = _window_cfg(cfg, w, policy, prev if policy == "warm" and w else None)
            manifest = _prepared(c, address)
            n_windows = manifest["window"]["num_windows"]
            if _short_tail(manifest):
                print(f"[rectrain] continual: window {w} stops the loop: its successor, the "
                      f"log's last window, has no valid or test events "
                      f"({manifest['rows_per_split']})", flush=True)
                n_windows = w + 1  # the while ends after this window
                break
            if policy == "never":
                m = storage.read_json(storage.join(cfg.run_dir, "warm", "window-000",
                                                   "metrics.json")) if w == 0 else \
                    evaluate_on(storage.join(cfg.run_dir, "warm", "window-000"), c.prepared_dir)
                m = {**m, "train_seconds": 0.0}
            elif storage.exists(storage.join(c.run_dir, "metrics.json")):
                m = storage.read_json(storage.join(c.run_dir, "metrics.json"))
            else:
                m = train(c, address)
            rows.append(_row(w, policy, m, manifest, time.perf_counter() - t0))
        w += 1
    rows = [r for r in rows if r["policy"] in policies]
    storage.write_json({"policies": list(policies), "rows": rows},
                       storage.join(cfg.run_dir, "continual.json"))
    plot_curves(rows, storage.join(cfg.run_dir, "continual.png"))
    return rows


def plot_curves(rows: list[dict], url: str) -> Optional[str]:
    """Test metric of the model of T on window T+1 against the window, one line per policy,
    written to ``url`` (PNG). Returns ``url``, or None without matplotlib (the ``[bench]``
    extra) or without a metric to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    key = next((k for k in ("test_auc", "test_hr@10") if any(k in r for r in rows)), None)
    if key is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = [(r["window"], r[key]) for r in rows if r["policy"] == policy and key in r
               and r["window"] > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=policy)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("window T (its model evaluated on window T+1)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return url


def table_text(rows: list[dict]) -> str:
    """The rows as a plain-text table: window, policy, test AUC, logloss, train rows, train s."""
    lines = [f"{'window':>6} {'policy':>8} {'test_auc':>9} {'logloss':>8} {'train_rows':>10} "
             f"{'train_s':>8}"]
    for r in rows:
        lines.append(f"{r['window']:>6} {r['policy']:>8} {r.get('test_auc', float('nan')):>9.4f} "
                     f"{r.get('test_logloss', float('nan')):>8.4f} {r['train_rows']:>10} "
                     f"{r['train_seconds']:>8.1f}")
    return "\n".join(lines)
