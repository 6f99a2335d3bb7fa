"""``rectrain recommend --config JOB.yaml``: the job's ``recommend:`` section as distributed
batch inference on Ray Data (or in this process with ``actors: 0``).

Users are split into blocks of ``users_per_block`` (user-row ranges). The driver loads the
runs and the index once (:class:`rectrain.serve.blocks.Recommender`); small jobs then run
their blocks in this process (:func:`choose_path`), the others through
``Dataset.map_batches`` with an actor pool (at most ``actors``, one block per call): each
actor is a :class:`BlockActor` that fetches the driver's Recommender from the object store
once and writes its block's Parquet file itself (temporary name, then rename), so the driver
holds only per-block counts. A ranking model whose tables exceed ``actor_memory_gb`` is not
loaded by the driver: its blocks run on the model's shards (path ``sharded``,
:mod:`rectrain.launch.sharded_recommend`). A rerun skips the
blocks whose file is complete: a killed job resumes where it stopped, and every user is in
exactly one block. Then :func:`rectrain.serve.recommend.finalize` writes ``top_k.parquet`` and
``summary.json`` and :func:`evaluate` is called with the lists and the candidates.
Ray is started only through :func:`rectrain.launch.cluster.connect`.
"""

from __future__ import annotations

import os
import time

from pydantic import ValidationError
from tqdm import tqdm

from rectrain.config import JobConfig
from rectrain.config.sections import RecommendSpec
from rectrain.data import storage
from rectrain.launch.cluster import cluster_address, connect
from rectrain.serve.blocks import block_done, block_url


class BlockActor:
    """Ray Data callable class, one per actor: the driver's :class:`Recommender` fetched from
    the object store once in ``__init__`` (``shared = [ObjectRef]``; without it the actor loads
    the runs itself). The first block of each actor reports the actor's start-up times."""

    def __init__(self, spec: dict, out: str, shared: list | None = None):
        t0 = time.time()
        from rectrain.serve.blocks import Recommender

        self.spec, self.out = RecommendSpec(**spec), out
        if shared:
            import ray

            self.rec = ray.get(shared[0])
        else:
            self.rec = Recommender(self.spec)
        self.times = {"actor_t0_ms": int(1000 * t0), "actor_ready_ms": int(1000 * time.time())}

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from rectrain.serve.recommend import do_block

        rows = [{**do_block(self.rec, self.out, int(b), int(lo), int(hi)),
                 **dict.fromkeys(_ACTOR_TIMES, 0)}
                for b, lo, hi in zip(batch["block"], batch["lo"], batch["hi"])]
        rows[0].update(self.times)
        self.times = dict.fromkeys(_ACTOR_TIMES, 0)  # reported once per actor
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}


_ACTOR_TIMES = ("actor_t0_ms", "actor_ready_ms")


def resolve_spec(cfg: JobConfig, **over) -> tuple[RecommendSpec, str]:
    """The job's recommend section with ``over`` (None values ignored) and the defaults filled
    in: ``ranking_run`` = ``run_dir``; returns ``(spec, out folder)``."""
    data = cfg.recommend.model_dump()
    data.update({k: v for k, v in over.items() if v is not None})
    data["ranking_run"] = data.get("ranking_run") or cfg.run_dir
    try:
        spec = RecommendSpec(**data)
    except ValidationError as e:  # an override (flag) the job's own validation never saw
        err = e.errors()[0]
        field = ".".join(str(x) for x in ("recommend", *err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        raise ValueError(msg if msg.startswith("recommend.") else
                         f"{field}: {msg}, got {err.get('input')!r}") from None
    return spec, spec.out or storage.join(cfg.run_dir, "recommendations")


def recommend_job(cfg: JobConfig, address: str | None = None, actor_max_restarts: int = -1,
                  **over) -> dict:
    """Run ``cfg.recommend`` (with ``over``); returns the summary (``out/summary.json``).

    The driver loads the runs, the serving context and the index once
    (:class:`~rectrain.serve.blocks.Recommender`); then the blocks run in this process when
    ``actors`` is 0 or the job is small (:func:`choose_path`), else on a Ray Data actor pool
    of at most one actor per block, each fetching that Recommender from the object store
    (``ray.put``) instead of rebuilding it. When the ranking model's tables exceed
    ``actor_memory_gb`` (or ``scoring: sharded``; :func:`rectrain.serve.sharded.
    choose_scoring`) the driver loads no model and the blocks run on the model's shards in a
    Ray Train worker group instead (:func:`rectrain.launch.sharded_recommend.run_sharded`).
    ``summary["path"]`` (``in_process`` / ``ray_data`` / ``sharded``) and ``["path_reason"]``
    say which path ran and why (pairs vs ``in_process_pairs``, table bytes vs the budget),
    ``summary["timings"]`` the wall seconds per phase (:mod:`rectrain.serve.timing`).

    ``actor_max_restarts``: Ray restarts of a dead actor (-1: Ray Data's default, unlimited,
    its block retried; 0: the job fails and a rerun resumes from the written blocks).

    Raises:
        FileNotFoundError: a run has no complete checkpoint.
        ValueError: see :func:`check_spec`; ``out`` holds blocks of other settings
            (:func:`rectrain.serve.blocks.claim_out`).
        ray.exceptions.RayError: a block failed (the blocks already written stay).
    """
    from rectrain.launch.sharded_recommend import rank_summary, run_sharded
    from rectrain.serve.blocks import Recommender, claim_out
    from rectrain.serve.recommend import finalize, plan_blocks
    from rectrain.serve.sharded import choose_scoring
    from rectrain.serve.timing import Phases, process_age_s

    ph = Phases()
    ph.add("driver_start_s", process_age_s())
    t_start = time.perf_counter()
    with ph("plan_s"):
        spec, out = resolve_spec(cfg, **over)
        check_spec(spec)
        claim_out(out, spec)
        t0 = time.perf_counter()
        blocks = plan_blocks(spec)
        todo = [b for b in blocks if not block_done(block_url(out, b[0]))]
        # from the stored config and manifest: the driver loads no model when sharded
        scoring, why = choose_scoring(spec) if todo else ("unsharded", "")
    n_users = sum(hi - lo for _, lo, hi in todo)
    rec = None
    if todo and scoring == "unsharded":
        rec = Recommender(spec)
        ph.update(rec.timings)
    if scoring == "sharded":
        path, reason = "sharded", why
    else:
        path, reason = choose_path(spec, rec, n_users)
        reason += f"; {why}" if why else ""
    print(f"[rectrain] recommend path: {path} ({reason})", flush=True)
    bar = tqdm(total=n_users, unit="users", desc="[rectrain] recommend", mininterval=1.0,
               disable=n_users == 0)
    try:
        if path == "in_process":
            stats = _run_here(rec, out, todo, bar, ph)
        elif path == "sharded":
            stats = run_sharded(spec, out, todo, cluster_address(address, cfg), bar, ph)
        else:
            stats = _run_ray(spec, out, todo, cluster_address(address, cfg), bar,
                             actor_max_restarts, rec, ph)
        with ph("finalize_s"):
            summary = finalize(out, blocks, stats, spec, time.perf_counter() - t0)
    finally:
        bar.close()
    del rec  # the driver's copy: the list metrics need none of it
    with ph("metrics_s"):
        metrics = evaluate(cfg, spec, out, summary)
    ph.add("total_s", ph.s["driver_start_s"] + time.perf_counter() - t_start)
    summary.update({"path": path, "path_reason": reason, "timings": ph.rounded()})
    if path == "sharded":
        summary["ranks"] = rank_summary(stats)
    storage.write_json(summary, storage.join(out, "summary.json"))
    print(f"[rectrain] recommend timings: {ph.line()}", flush=True)
    if metrics is not None:
        summary["list_metrics"] = metrics
    return summary


def choose_path(spec: RecommendSpec, rec, n_users: int) -> tuple[str, str]:
    """``("in_process" | "ray_data", why)``: in this process when ``actors`` is 0, when no
    block is left, or when the job's pairs (``n_users`` x items scored per user: the catalogue
    in brute force, the candidates in two-stage, k for a retrieval run alone through its
    index) are at most ``in_process_pairs`` (Ray's start-up and the actors' loading, ~20 s on
    2 cores, would cost more than a second core saves)."""
    if spec.actors == 0:
        return "in_process", "actors: 0"
    if rec is None:
        return "in_process", "every block already written"
    if spec.mode == "brute_force":
        per_user = rec.rank.n_items
    elif rec.rank.retrieval:
        per_user = spec.k
    else:
        per_user = sum(s.count or spec.candidates for s in spec.sources)
    pairs = n_users * per_user
    if pairs <= spec.in_process_pairs:
        return "in_process", (f"{n_users:,} users x {per_user:,} = {pairs:,} pairs <= "
                              f"in_process_pairs {spec.in_process_pairs:,}")
    return "ray_data", (f"{pairs:,} pairs > in_process_pairs {spec.in_process_pairs:,}; "
                        f"{spec.actors} actors")


def check_spec(spec: RecommendSpec) -> None:
    """Checks of the runs that need only their stored configs, before any model is loaded.

    Raises:
        FileNotFoundError: a run has no complete checkpoint, or its prepared data is gone.
        ValueError: ``retrieval_run`` is not a retrieval model (two-tower, SASRec), or
            ``evaluate`` is on and the ranking run's prepared data has no test split, or the
            two-stage sources give fewer than ``k`` candidates per user.
    """
    from rectrain.models import task_of
    from rectrain.serve.recommend import run_config

    ranker = run_config(spec.ranking_run)
    _check_prepared("ranking_run", spec.ranking_run, ranker.prepared_dir)
    names = [s.name for s in spec.sources]
    if spec.retrieval_run and spec.mode == "two_stage" and ("retrieval" in names
                                                          or spec.explain):
        retr = run_config(spec.retrieval_run)
        _check_prepared("retrieval_run", spec.retrieval_run, retr.prepared_dir)
        name = retr.model.name
        if task_of(name) != "retrieval":
            raise ValueError(f"recommend.retrieval_run: {spec.retrieval_run} is a {name} run "
                             f"(a ranking model); stage 1 needs a retrieval run (two_tower, "
                             f"sasrec): give one, or use it as recommend.ranking_run")
    total = {s.name: s.count or spec.candidates for s in spec.sources}
    if spec.mode == "two_stage" and task_of(ranker.model.name) != "retrieval" and \
            sum(total.values()) < spec.k:
        raise ValueError(f"recommend.candidates: the sources give at most {sum(total.values())} "
                         f"candidates per user ({total}), fewer than k: {spec.k}, so every "
                         f"list would be short; raise recommend.candidates (or the sources' "
                         f"count) to at least k")
    if spec.evaluate and not _has_files(storage.join(ranker.prepared_dir, "test")):
        raise ValueError(f"recommend.evaluate: {ranker.prepared_dir} (the prepared data of "
                         f"recommend.ranking_run {spec.ranking_run}) has no test/ split to "
                         f"score the lists against; set recommend.evaluate: false")


def _check_prepared(field: str, run: str, prepared: str) -> None:
    if not storage.exists(storage.join(prepared, "manifest.json")):
        raise FileNotFoundError(f"recommend.{field}: {run} was trained on the prepared data "
                                f"{prepared}, which is gone (no manifest.json); prepare the "
                                f"job into that prepared_dir again, or give another run")


def _has_files(url: str) -> bool:
    try:
        return bool(storage.list_parquet_files(url)[0])
    except FileNotFoundError:
        return False


def _run_here(rec, out: str, todo, bar, ph) -> list[dict]:
    """The blocks ``todo`` in this process (no Ray; :func:`rectrain.serve.recommend.do_blocks`,
    one block per core at a time)."""
    from rectrain.serve.recommend import do_blocks

    t = time.perf_counter()

    def done(s: dict, n_done: int) -> None:
        if n_done == 1:
            ph.add("first_block_s", time.perf_counter() - t)
        bar.update(s["users"])

    stats = do_blocks(rec, out, todo, done)
    ph.add("blocks_s", time.perf_counter() - t)
    ph.add("write_s", sum(s["write_ms"] for s in stats) / 1000)
    return stats


def _run_ray(spec: RecommendSpec, out: str, todo, address, bar, max_restarts: int, rec,
             ph) -> list[dict]:
    if not todo:
        return []
    from rectrain.serve.timing import actor_phases

    with ph("ray_init_s"):
        connect(address)
    import ray

    with ph("share_s"):  # once, instead of every actor rebuilding the context and the index
        shared = [ray.put(rec)]
    started_ms, t = int(1000 * time.time()), time.perf_counter()
    ds = ray.data.from_items([{"block": b, "lo": lo, "hi": hi} for b, lo, hi in todo],
                             override_num_blocks=len(todo))
    # one block per call; each actor thread-limits torch to its own CPU; no idle actors
    ds = ds.map_batches(BlockActor, batch_size=1, num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=min(spec.actors, len(todo))),
                        fn_constructor_kwargs={"spec": spec.model_dump(), "out": out,
                                               "shared": shared},
                        max_restarts=max_restarts,
                        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                                  **_fault_env()}})
    stats = []
    for row in ds.iter_rows():
        stats.append({k: int(v) for k, v in row.items()})
        bar.update(int(row["users"]))
    ph.add("blocks_s", time.perf_counter() - t)
    ph.update(actor_phases(stats, started_ms))
    ph.add("write_s", sum(s.get("write_ms", 0) for s in stats) / 1000)
    return stats


def _fault_env() -> dict:
    from rectrain.serve.blocks import FAULT_ENV

    return {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}


def evaluate(cfg: JobConfig, spec: RecommendSpec, out: str, summary: dict) -> dict | None:
    """List quality of a finished recommend run (``recommend.evaluate``): the lists (and
    two-stage candidates) in ``out`` against the test split of the ranking run's prepared data,
    beside most-popular (:func:`rectrain.serve.list_report.evaluate_recommend`); printed, and
    written to ``out/recommend_metrics.json``. None when ``evaluate`` is off."""
    if not spec.evaluate:
        return None
    from rectrain.serve.recommend import run_config
    from rectrain.serve.list_metrics import catalog_size
    from rectrain.serve.list_report import evaluate_recommend, format_metrics

    prepared = run_config(spec.ranking_run).prepared_dir
    m = evaluate_recommend(out, prepared, spec.k, spec.exclude, spec.positives,
                           catalog_size(prepared), spec.reference)
    print(f"[rectrain] list quality against the test split (exclude: {spec.exclude}, "
          f"positives: {spec.positives}):\n" + format_metrics(
              {"model lists": m["model"], "most popular": m["most_popular"]}), flush=True)
    if "stage1" in m:
        s1 = m["stage1"]
        ref = s1.get("recall_of_reference_top_k")
        print(f"[rectrain] stage 1: {s1['candidates_per_user']:.0f} candidates per user hold "
              f"{s1['truth_recall']:.3f} of the test items"
              + (f", {ref:.3f} of the brute-force top-{spec.k}" if ref is not None else ""),
              flush=True)
    return m
