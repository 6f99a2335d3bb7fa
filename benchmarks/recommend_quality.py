"""List-quality table of recommend outputs: HR@K, NDCG@K, recall@K, coverage, Gini of item
exposure and popularity bias for each lists file (brute force, two-stage, two-tower alone, ...)
plus the most-popular baseline, all against one prepared folder's held-out test positives.

Independent of how the lists were made: it takes Parquet paths (a file or a partitioned folder
of ``user_id, rank, item_id[, score]``, raw ids as in the prepared catalog). Definitions:
:mod:`rectrain.serve.list_metrics` and docs/models.md ("List quality"). With ``--candidates``
(stage 1's ``user_id, item_id, ...``) it also reports the stage-1 recall of the ``--reference``
lists' top-K. A lists file with its recommend run's ``summary.json`` beside it adds that
run's wall time and users/s (and the ratio to ``--reference``'s). Writes ``OUT.json`` (every
metric and count per method), ``OUT.md`` (the table) and ``OUT_exposure.png`` (Lorenz
curves of item exposure; needs matplotlib, the bench extra). Reads files only: no model, no
Ray.

    python -m benchmarks.recommend_quality --prepared data/movielens-100k/prepared \\
        --lists brute_force=runs/din/recommendations/top_k.parquet \\
        --lists two_stage=runs/din/recommendations_two_stage \\
        [--k 10] [--exclude train] [--positives label] \\
        [--candidates runs/din/candidates --reference brute_force] \\
        [--out benchmarks/results/recommend_quality]
"""

from __future__ import annotations

import argparse
import sys

import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data import storage
from rectrain.serve import list_metrics as lm
from rectrain.serve import list_report


def read_table(url: str, columns: list[str]) -> pa.Table:
    """``columns`` of every Parquet file under ``url`` (a file or a partitioned folder)."""
    files, _ = storage.list_parquet_files(url)
    return pa.concat_tables([storage.read_parquet(f, columns) for f in files])


def named_paths(specs: list[str]) -> dict[str, str]:
    """``["name=path", ...]`` -> ``{name: path}``; raises ValueError on a malformed one."""
    out = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lists {s!r}: expected NAME=PATH")
        if name in out or name == "most_popular":
            raise ValueError(f"--lists {s!r}: the name {name!r} is taken")
        out[name] = path
    return out


def evaluate(prepared: str, lists: dict[str, str], k: int = 10, exclude: str = "train",
             positives: str = "label", candidates: str | None = None,
             reference: str | None = None) -> dict:
    """Metrics per method (``{name: evaluate_lists(...)}``, most-popular last) and, with
    ``candidates``, ``stage_recall`` of ``reference``'s top-``k``. ``exclude: all_seen`` takes
    the train + valid events as the excluded pairs (what a test-time run has seen)."""
    truth = lm.truth_from_prepared(prepared, "test", positives)
    train = lm.events_from_prepared(prepared, ("train",))
    seen = lm.events_from_prepared(prepared, ("train", "valid")) if exclude == "all_seen" \
        else None
    n_items = lm.catalog_size(prepared)
    tables = {name: read_table(path, ["user_id", "rank", "item_id"])
              for name, path in lists.items()}
    users = pc.unique(pa.chunked_array([lm.key_column(t, "user_id", name) for name, t in
                                        (tables.items() or [("truth", truth)])]))
    tables["most_popular"] = lm.most_popular_lists(train, users, k, exclude, seen)
    methods = {name: lm.evaluate_lists(t, truth, train, n_items, k, exclude, seen)
               for name, t in tables.items()}
    out = {"prepared": prepared, "k": k, "exclude": exclude, "positives": positives,
           "n_items": n_items, "lists": dict(lists), "methods": methods,
           "exposure": {name: lm.item_exposure(t, k) for name, t in tables.items()}}
    runs = {name: _summary(path) for name, path in lists.items()}
    out["runs"] = {name: r for name, r in runs.items() if r}
    if candidates:
        if reference not in tables:
            raise ValueError(f"--reference {reference!r}: not one of the --lists names "
                             f"{sorted(lists)}")
        cand = read_table(candidates, ["user_id", "item_id"])
        out["stage_recall"] = {"reference": reference, "candidates": candidates,
                               f"recall_of_top{k}": lm.stage_recall(cand, tables[reference], k)}
    return out


def _summary(lists_path: str) -> dict:
    """``wall_s``, ``block_seconds``, ``users_per_s``, ``peak_rss_mb_per_process`` and ``mode``
    of the recommend
    run that wrote ``lists_path`` (its ``summary.json`` beside ``top_k.parquet``); {} if none."""
    url = storage.join(lists_path.rstrip("/").rsplit("/", 1)[0], "summary.json")
    if not lists_path.endswith(".parquet") or not storage.exists(url):
        return {}
    s = storage.read_json(url)
    return {k: s[k] for k in ("mode", "wall_s", "block_seconds", "users_per_s",
                              "peak_rss_mb_per_process") if k in s}


def timing_note(runs: dict[str, dict], reference: str) -> str:
    """One line per run with a summary: recommend's wall time (``summary.json``'s ``wall_s``:
    from planning the blocks to the final files, Ray connection and actor start-up included,
    list metrics and process start-up not) and its ratio to ``reference``'s, then the blocks'
    own seconds (scoring and writing, summed over actors: no start-up or loading) and theirs."""
    ref = runs.get(reference, {})
    lines = []
    for name, r in runs.items():
        if "wall_s" not in r:
            continue
        line = f"{name}: wall {r['wall_s']:.1f} s, {r.get('users_per_s', 0):.0f} users/s"
        if ref.get("wall_s") and name != reference:
            line += f", {ref['wall_s'] / r['wall_s']:.2f}x faster than {reference}"
        if r.get("block_seconds"):
            line += f"; blocks {r['block_seconds']:.1f} s"
            if ref.get("block_seconds") and name != reference:
                line += f", {ref['block_seconds'] / r['block_seconds']:.2f}x"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepared", required=True, help="prepared folder (test/train splits)")
    p.add_argument("--lists", action="append", default=[], metavar="NAME=PATH",
                   help="a recommend output (file or folder); repeat for each method")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--exclude", default="train", choices=lm.EXCLUDE,
                   help="the exclusion policy the lists were made with")
    p.add_argument("--positives", default="label", choices=("label", "all"),
                   help="truth = test rows with label 1 (ranking data) or every test row")
    p.add_argument("--candidates", help="stage-1 candidates (file or folder)")
    p.add_argument("--reference", default="brute_force",
                   help="the --lists name whose top-K stage-1 recall is measured against")
    p.add_argument("--out", default="benchmarks/results/recommend_quality")
    a = p.parse_args(argv)
    res = evaluate(a.prepared, named_paths(a.lists), a.k, a.exclude, a.positives,
                   a.candidates, a.reference)
    exposure = res.pop("exposure")
    table = list_report.format_metrics(res["methods"], markdown=True)
    note = (f"{res['methods']['most_popular']['users_evaluated']:,} users with test positives "
            f"({a.positives}), K = {a.k}, exclude = {a.exclude}, {res['n_items']:,} items")
    if "stage_recall" in res:
        note += (f"; stage-1 recall of the {a.reference} top-{a.k}: "
                 f"{res['stage_recall'][f'recall_of_top{a.k}']:.4f}")
    if res["runs"]:
        note += "\n\n" + timing_note(res["runs"], a.reference)
    storage.write_json(res, f"{a.out}.json")
    fs, md = storage.url_to_fs(f"{a.out}.md")
    with fs.open(md, "w") as f:
        f.write(f"{table}\n\n{note}\n")
    png = list_report.plot_exposure(f"{a.out}_exposure.png", exposure, res["n_items"])
    print(table, note, f"wrote {a.out}.json, {a.out}.md" + (f", {png}" if png else ""),
          sep="\n")
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
