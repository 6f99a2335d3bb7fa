"""Cost of the whole recommend stage at scale, on synthetic logs (issue 13, "What it must show").

    PYTHONPATH=. python -m benchmarks.recommend_scale --out runs/bench/recommend_scale \
        --sizes 250000 500000 1000000 [--items 200000] [--events-per-user 20] [--small]

Per size (users; items fixed, ``--events-per-user`` events each):

1. ``rectrain synth`` writes the raw logs (:func:`rectrain.launch.jobs.synth_job`);
2. prepare with a leave-last-out split (``{test: 1, valid: 1}``), ``sequence_length`` 20 and
   two side features (item ``category``, user ``device``);
3. checkpoints of a two-tower retriever and a DIN ranker (``embedding_dim`` 16) with seeded
   *initial* weights, no training: the cost of recommend (loading, index, scoring, writing)
   does not depend on what the weights learnt, only on the shapes;
4. :func:`rectrain.launch.recommend_job.recommend_job` on Ray Data (2 actors, 1 CPU each,
   ``evaluate: false``): (a) ``two_tower``: the retriever alone through a faiss HNSW index, top
   10; (b) ``two_stage``: HNSW top-``--candidates`` then the DIN ranker, top 10. (b) is skipped
   at a size where its time, extrapolated linearly in users from the largest smaller size
   measured, would exceed ``--max-two-stage-s``.

Every step runs in its own process (its own embedded Ray), so the driver's peak RSS
(``ru_maxrss``) is that of the recommend driver alone; the actors' peak is
``summary.json``'s ``peak_rss_mb_per_process``. ``steady users/s`` = users / (sum of the block
seconds / actors): the scoring rate without Ray start-up and the actors' loading.

``--small`` adds the case of a 100k-event catalogue: ``--small-users`` users, 10k items,
two-stage N = 200 with DIN, 2 actors.

Writes ``OUT/recommend_scale.json``, ``OUT/recommend_scale.md`` and ``OUT/recommend_scale.png``
(seconds per 1k users and peak RSS vs users). Data and runs go under ``OUT/work`` (reused when
present: delete it to regenerate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from rectrain.bench.synth_jobs import DIN, HNSW, TWO_TOWER, job_dict, rec_over, save_untrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def child_data(a: dict) -> dict:
    """Synth + prepare + untrained checkpoints (skipped when the work folder has them)."""
    from rectrain.config import config_from_dict
    from rectrain.data import storage
    from rectrain.data.prepare import prepare
    from rectrain.data.sources.synth import SynthSpec
    from rectrain.launch.cluster import connect
    from rectrain.launch.jobs import synth_job

    job, out = a["job"], {}
    cfg = config_from_dict(job)
    connect(None, num_cpus=2, dashboard=False)
    if not storage.exists(f"{a['work']}/raw/synth.json"):
        t = time.perf_counter()
        synth_job(SynthSpec(**job["dataset"]["synth"]), f"{a['work']}/raw")
        out["synth_s"] = time.perf_counter() - t
    if not storage.exists(f"{cfg.prepared_dir}/manifest.json"):
        t = time.perf_counter()
        m = prepare(cfg)
        out["prepare_s"] = time.perf_counter() - t
        out["rows_per_split"] = m["rows_per_split"]
    for name, model in (("din", DIN), ("two_tower", TWO_TOWER)):
        run = f"{a['work']}/{name}"
        if not storage.exists(f"{run}/checkpoint/meta.json"):
            save_untrained(job, run, model)
    return out


def child_rec(a: dict) -> dict:
    """One recommend run through rectrain's own API; the summary plus the driver's peak RSS."""
    from rectrain.config import config_from_dict
    from rectrain.data import storage
    from rectrain.launch.recommend_job import recommend_job

    cfg = config_from_dict(a["job"])
    storage.remove(a["over"]["out"])  # a fresh run, no blocks to resume
    t = time.perf_counter()
    s = recommend_job(cfg, **a["over"])
    s["command_s"] = time.perf_counter() - t
    s["driver_peak_rss_mb"] = _rss_mb()
    return s


def _child(kind: str, arg: dict, log: str) -> dict:
    res = f"{log}.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "benchmarks.recommend_scale", "--child", kind,
                            json.dumps(arg), res], cwd=ROOT, env=env, stdout=f,
                           stderr=subprocess.STDOUT)
    if p.returncode:
        raise RuntimeError(f"{kind} step failed (exit {p.returncode}); see {log}")
    with open(res) as f:
        return json.load(f)


def row(size: str, users: int, items: int, events: int, method: str, s: dict,
        actors: int) -> dict:
    block_s = s.get("block_seconds")
    return {"size": size, "users": users, "items": items, "events": events, "method": method,
            "wall_s": round(s["command_s"], 1),
            "users_per_s": round(users / s["command_s"], 1),
            "s_per_1k_users": round(1000 * s["command_s"] / users, 3),
            "steady_users_per_s": round(users / (block_s / actors), 1) if block_s else None,
            "steady_s_per_1k_users": round(1000 * block_s / actors / users, 3)
            if block_s else None,
            "actor_peak_rss_mb": s.get("peak_rss_mb_per_process"),
            "driver_peak_rss_mb": s["driver_peak_rss_mb"],
            "candidates_per_user": s.get("candidates_per_user"), "blocks": s["blocks"]}


def run_size(out: str, users: int, items: int, events: int, methods: list[tuple[str, int]],
             actors: int, block: int, size: str) -> tuple[dict, list[dict]]:
    work = f"{out}/work/{size}"
    job = job_dict(work, users, items, events)
    print(f"[bench] {size}: data ({users:,} users, {items:,} items, {events:,} events)",
          flush=True)
    data = _child("data", {"job": job, "work": work}, f"{out}/logs/{size}_data.log")
    rows = []
    for mode, n in methods:
        name = "two-tower alone (HNSW)" if mode == "two_tower" else \
            f"two-stage: HNSW {n} -> DIN"
        print(f"[bench] {size}: {name}", flush=True)
        s = _child("rec", {"job": job, "over": rec_over(work, mode, n, actors, block)},
                   f"{out}/logs/{size}_{mode}{n}.log")
        rows.append(row(size, users, items, events, name, s, actors))
        print(f"[bench]   {json.dumps(rows[-1])}", flush=True)
    return data, rows


def write_report(out: str, result: dict) -> None:
    cols = ["size", "users", "items", "events", "method", "wall_s", "users_per_s",
            "s_per_1k_users", "steady_users_per_s", "steady_s_per_1k_users",
            "actor_peak_rss_mb", "driver_peak_rss_mb"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c])
                                       for c in cols) + " |")
    md = ["### recommend at scale (synthetic logs, untrained weights, 2 Ray Data actors)", "",
          *lines, "", "Skipped: " + ("; ".join(result["skipped"]) or "nothing"), ""]
    with open(f"{out}/recommend_scale.md", "w") as f:
        f.write("\n".join(md))
    with open(f"{out}/recommend_scale.json", "w") as f:
        json.dump(result, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    scale = [r for r in result["rows"] if r["size"] != "small"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for m in dict.fromkeys(r["method"] for r in scale):
        rs = [r for r in scale if r["method"] == m]
        x = [r["users"] for r in rs]
        ax[0].plot(x, [r["s_per_1k_users"] for r in rs], "o-", label=f"{m}: whole command")
        if all(r["steady_s_per_1k_users"] for r in rs):
            ax[0].plot(x, [r["steady_s_per_1k_users"] for r in rs], "o--",
                       label=f"{m}: blocks only")
        ax[1].plot(x, [r["actor_peak_rss_mb"] for r in rs], "o-", label=f"{m}: actor")
        ax[1].plot(x, [r["driver_peak_rss_mb"] for r in rs], "s--", label=f"{m}: driver")
    ax[0].set(xlabel="users", ylabel="seconds per 1k users", xscale="log", ylim=(0, None),
              title="cost per user")
    ax[1].set(xlabel="users", ylabel="peak RSS per process (MiB)", xscale="log",
              ylim=(0, None), title="peak memory")
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{out}/recommend_scale.png", dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/recommend_scale")
    p.add_argument("--sizes", type=int, nargs="*", default=[250_000, 500_000, 1_000_000],
                   help="users per size (ascending)")
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--events-per-user", type=int, default=20)
    p.add_argument("--candidates", type=int, default=50, help="two-stage N at scale")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--users-per-block", type=int, default=4096)
    p.add_argument("--max-two-stage-s", type=float, default=600.0)
    p.add_argument("--no-two-stage", action="store_true")
    p.add_argument("--only-two-stage", action="store_true",
                   help="with --append: add the two-stage runs of sizes measured before")
    p.add_argument("--two-stage-max-users", type=int, default=None,
                   help="skip two-stage at sizes above this many users (time budget)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of an earlier OUT/recommend_scale.json (other sizes)")
    p.add_argument("--small", action="store_true", help="also the 100k-event / 10k-item case")
    p.add_argument("--small-users", type=int, default=5000)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        kind, arg, res = a.child
        r = (child_data if kind == "data" else child_rec)(json.loads(arg))
        with open(res, "w") as f:
            json.dump(r, f)
        return r
    out = os.path.abspath(a.out)
    os.makedirs(f"{out}/logs", exist_ok=True)
    result = {"bench": "recommend_scale", "machine": {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"items": a.items, "events_per_user": a.events_per_user,
                     "candidates": a.candidates, "actors": a.actors,
                     "users_per_block": a.users_per_block, "k": 10, "exclude": "train",
                     "index": "hnsw", "index_params": HNSW, "din": DIN, "two_tower": TWO_TOWER,
                     "weights": "seeded initial weights, no training"},
        "data": {}, "rows": [], "skipped": []}
    if a.append and os.path.exists(f"{out}/recommend_scale.json"):
        with open(f"{out}/recommend_scale.json") as f:
            old = json.load(f)
        result.update({k: old[k] for k in ("data", "rows", "skipped")})
    if a.small:
        data, rows = run_size(out, a.small_users, 10_000, 100_000, [("two_stage", 200)],
                              a.actors, 1024, "small")
        result["data"]["small"] = data
        result["rows"] += rows
        write_report(out, result)
    for users in a.sizes:
        size = f"u{users}"
        methods = [] if a.only_two_stage else [("two_tower", 0)]
        prev = [r for r in result["rows"] if r["method"].startswith("two-stage")
                and r["size"] != "small" and r["users"] < users]
        if a.no_two_stage:
            result["skipped"].append(f"{size} two-stage: --no-two-stage")
        elif a.two_stage_max_users is not None and users > a.two_stage_max_users:
            result["skipped"].append(f"{size} two-stage: above --two-stage-max-users "
                                     f"{a.two_stage_max_users:,} (time budget)")
        elif prev and prev[-1]["wall_s"] * users / prev[-1]["users"] > a.max_two_stage_s:
            est = prev[-1]["wall_s"] * users / prev[-1]["users"]
            result["skipped"].append(f"{size} two-stage: extrapolated {est:.0f} s > "
                                     f"{a.max_two_stage_s:.0f} s")
        else:
            methods.append(("two_stage", a.candidates))
        data, rows = run_size(out, users, a.items, users * a.events_per_user, methods,
                              a.actors, a.users_per_block, size)
        result["data"][size] = data
        result["rows"] += rows
        result["rows"].sort(key=lambda r: (r["size"] != "small", r["users"], r["method"]))
        write_report(out, result)
    write_report(out, result)
    print(open(f"{out}/recommend_scale.md").read(), flush=True)
    return result


if __name__ == "__main__":
    main()
