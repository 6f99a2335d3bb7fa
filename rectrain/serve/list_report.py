"""Reporting the quality of recommendation lists (:mod:`rectrain.serve.list_metrics`):
``recommend_metrics.json``, a printed table (model lists beside most-popular), and a Lorenz
curve of item exposure (PNG; matplotlib, the ``bench`` extra, imported only when plotting)."""

from __future__ import annotations

import logging
import os

import numpy as np

from rectrain.data import storage
from rectrain.serve.list_metrics import gini_index, lorenz_curve

log = logging.getLogger(__name__)


def write_metrics(path: str, metrics: dict) -> str:
    """Write ``metrics`` as JSON at ``path`` (any fsspec URL, e.g. ``RUN/recommend_metrics
    .json``); returns ``path``."""
    storage.write_json(metrics, path)
    return path


COLUMNS = ("hr@{k}", "ndcg@{k}", "recall@{k}", "coverage", "gini", "popularity_ratio")


def format_metrics(results: dict[str, dict], markdown: bool = False) -> str:
    """A small table, one row per method (``{name: evaluate_lists(...)}``, e.g. the model's
    lists and ``most_popular``): HR@K, NDCG@K, recall@K, coverage, Gini, popularity ratio and
    users evaluated; GitHub Markdown with ``markdown=True``, aligned text otherwise."""
    k = next(iter(results.values()))["k"] if results else 10
    cols = [c.format(k=k) for c in COLUMNS]
    head = ["method", *cols, "users"]
    rows = [[name, *(f"{m.get(c, float('nan')):.4f}" for c in cols), f"{m['users_evaluated']:,}"]
            for name, m in results.items()]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    width = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(x).rjust(w) if j else str(x).ljust(w)
                               for j, (x, w) in enumerate(zip(r, width))) for r in [head, *rows])


def plot_exposure(path: str, exposures: dict[str, np.ndarray], n_items: int) -> str | None:
    """Lorenz curves of item exposure (one per method, :func:`item_exposure`) as a PNG at
    ``path`` (a local path); returns it, or None (logged) when matplotlib, the ``bench`` extra,
    is not installed."""
    try:
        import matplotlib
    except ImportError:
        log.info("exposure plot skipped: matplotlib (pip install -e '.[bench]') is missing")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="equal exposure")
    for name, x in exposures.items():
        gx, gy = lorenz_curve(x, n_items)
        ax.plot(gx, gy, lw=1.4, label=f"{name} (Gini {gini_index(x, n_items):.3f})")
    ax.set_xlabel("share of the catalogue (least exposed first)")
    ax.set_ylabel("share of recommendations")
    ax.set_title(f"Item exposure over {n_items:,} items", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate_recommend(out: str, prepared: str, k: int, exclude: str, positives: str,
                       n_items: int, reference: str | None = None) -> dict:
    """List quality of a finished ``rectrain recommend --config`` run in ``out`` (its
    ``top_k.parquet`` and, two-stage, ``candidates.parquet``) against the test split of the
    ranking run's ``prepared`` data; written to ``out/recommend_metrics.json`` and returned.

    ``model`` and ``most_popular`` (the baseline for the same users and exclusion) are
    :func:`rectrain.serve.list_metrics.evaluate_lists` results; two-stage runs add ``stage1``:
    candidates per user, the share of the truth items among the candidates (stage 1's recall
    at N, the ceiling of the final lists), and, given ``reference`` (the ``top_k.parquet`` of a
    brute-force run with the same ranker), the share of its top-``k`` that the candidates
    contain (:func:`~rectrain.serve.list_metrics.stage_recall`). With matplotlib installed,
    ``out/exposure.png`` (Lorenz curves of item exposure) is written beside it (local ``out``).

    Raises:
        FileNotFoundError: a split or output file is missing.
    """
    import pyarrow.compute as pc

    from rectrain.serve.list_metrics import (evaluate_lists, events_from_prepared,
                                             item_exposure, most_popular_lists, stage_recall,
                                             truth_from_prepared)

    lists = storage.read_parquet(storage.join(out, "top_k.parquet"))
    truth = truth_from_prepared(prepared, "test", positives)
    train = events_from_prepared(prepared, ("train",))
    seen = events_from_prepared(prepared, ("train", "valid")) if exclude == "all_seen" else None
    popular = most_popular_lists(train, pc.unique(lists["user_id"].combine_chunks()), k,
                                 exclude, seen)
    result = {"model": evaluate_lists(lists, truth, train, n_items, k, exclude, seen),
              "most_popular": evaluate_lists(popular, truth, train, n_items, k, exclude, seen),
              "positives": positives}
    c = storage.join(out, "candidates.parquet")
    if storage.exists(c):
        cand = storage.read_parquet(c, columns=["user_id", "item_id"])
        n_users = len(pc.unique(cand["user_id"].combine_chunks()))
        # per user with truth: the share of its truth items among its candidates
        result["stage1"] = {"candidates_per_user": cand.num_rows / max(1, n_users),
                            "truth_recall": stage_recall(cand, truth)}
        if reference:
            result["stage1"]["recall_of_reference_top_k"] = stage_recall(
                cand, storage.read_parquet(reference), k)
    write_metrics(storage.join(out, "recommend_metrics.json"), result)
    if "://" not in out:
        plot_exposure(os.path.join(out, "exposure.png"),
                      {"model": item_exposure(lists, k), "most popular":
                       item_exposure(popular, k)}, n_items)
    return result
