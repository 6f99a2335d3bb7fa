"""Top-k recommendation for every user of a run, block by block (users x items never in memory).

:func:`recommend` is the single-process brute-force form of ``rectrain recommend --checkpoint``:
every item is scored with the user's *latest* behaviour sequence (the sequence of their last
event with that event's item appended, truncated to ``sequence_length``), the user's train items
(ranking models) or all their events' items (retrieval models, ``<u, v> / temperature`` by the
exact index) are excluded, and the ``k`` best are written as Parquet ``(user_id, rank, item_id,
score)``, rank 1 = best, score = the predicted probability (``model.loss: bce``) or label value
(``model.loss: mse``). :func:`run_blocks` is the same loop for any :class:`RecommendSpec`
(two-stage included) in this process; rectrain/launch/recommend_job.py runs the blocks on a Ray
Data actor pool instead. Both write one file per block (:mod:`rectrain.serve.blocks`) and then
the final lists with :func:`finalize`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rectrain.config.sections import RecommendSpec
from rectrain.data import storage
from rectrain.models import task_of
from rectrain.serve.blocks import (SOURCE_NAMES, Recommender, block_done, block_url,
                                   claim_out, write_block)
from rectrain.serve.context import append_truncate, latest_state, serve_users  # noqa: F401
from rectrain.serve.loading import checkpoint_url, stored_config

#: the lists' columns of the legacy single-file output
LIST_COLUMNS = ["user_id", "rank", "item_id", "score"]


def run_config(run: str):
    """The job config stored with a run's checkpoint (no model loaded); see
    :func:`rectrain.serve.loading.stored_config`."""
    return stored_config(checkpoint_url(run))[1]


def plan_blocks(spec: RecommendSpec) -> list[tuple[int, int, int]]:
    """``(block, lo, hi)`` user-row ranges of ``users_per_block`` users over the ranking run's
    users (:func:`serve_users`)."""
    n = len(serve_users(run_config(spec.ranking_run).prepared_dir))
    b = spec.users_per_block
    return [(j, lo, min(lo + b, n)) for j, lo in enumerate(range(0, n, b))]


def do_block(rec: Recommender, out: str, block: int, lo: int, hi: int) -> dict:
    """Compute and write one block (lists, and the stage-1 candidates in two-stage mode);
    ``ms``: its wall milliseconds (compute and write), ``write_ms``: the writing alone,
    ``done_ms``: epoch milliseconds when it was written."""
    t0 = time.perf_counter()
    table, stats = rec.block(block, lo, hi, out)
    t1 = time.perf_counter()
    kept = rec.last_candidates.pop(block, None)  # stage 1 of this block, as block() made it
    if rec.spec.mode == "two_stage" and not rec.rank.retrieval:
        u, i, src = kept if kept is not None else rec.candidates(lo, hi)
        write_block(pa.table({"user_id": rec.rank.user_keys.take(pa.array(u)),
                              "item_id": rec.rank.item_keys.take(pa.array(i)),
                              "source": pa.DictionaryArray.from_arrays(
                                  pa.array(src), pa.array(SOURCE_NAMES))}),
                    block_url(storage.join(out, "candidates"), block))
    write_block(table, block_url(out, block))
    # ru_maxrss: KiB on Linux; the process's peak so far (models, index, the largest block)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t2 = time.perf_counter()
    return {"block": block, **stats, "peak_rss_mb": int(peak),
            "ms": int(1000 * (t2 - t0)), "write_ms": int(1000 * (t2 - t1)),
            "done_ms": int(1000 * time.time())}


def do_blocks(rec: Recommender, out: str, todo: list[tuple[int, int, int]],
              done=None) -> list[dict]:
    """:func:`do_block` for each ``(block, lo, hi)`` of ``todo`` in this process, on
    :func:`here_threads` threads; returns the blocks' stats in block order. ``done(stats,
    n_done)`` is called after each block (one at a time).

    With T > 1 threads each runs whole blocks with torch and faiss on one intra-op thread, as
    the Ray Data path's one-CPU actors do, instead of splitting each of the ranker's small
    matmuls over T threads (torch's ops release the GIL). Each block is computed the same way
    whatever T, so the lists are the same; only the order the blocks finish in may differ.
    A block's error is raised here."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    stats: list[dict] = []
    lock = threading.Lock()

    def one(b):
        s = do_block(rec, out, *b)
        with lock:
            stats.append(s)
            if done is not None:
                done(s, len(stats))

    threads = here_threads(len(todo))
    if threads == 1:
        for b in todo:
            one(b)
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with _faiss_threads(1), ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, todo))
        finally:
            torch.set_num_threads(before)
    return sorted(stats, key=lambda s: s["block"])


def here_threads(n_blocks: int) -> int:
    """Block threads in this process: torch's intra-op thread count (the cores it would use),
    at most one per block."""
    import torch

    return max(1, min(torch.get_num_threads(), n_blocks))


@contextlib.contextmanager
def _faiss_threads(n: int):
    """faiss's OpenMP threads set to ``n`` inside (restored after); nothing without faiss."""
    try:
        import faiss
    except ImportError:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def run_blocks(spec: RecommendSpec, out: str, progress=None,
               wall_from: float | None = None) -> dict:
    """All blocks of ``spec`` in this process, skipping blocks already written; returns the
    summary of :func:`finalize` (with ``wall_s`` counted from ``wall_from``, a
    ``time.perf_counter()``). ``progress(users)`` is called after each block."""
    claim_out(out, spec)
    blocks = plan_blocks(spec)
    todo = [b for b in blocks if not block_done(block_url(out, b[0]))]
    stats = []
    if todo:
        stats = do_blocks(Recommender(spec), out, todo,
                          (lambda s, _: progress(s["users"])) if progress else None)
    return finalize(out, blocks, stats, spec,
                    None if wall_from is None else time.perf_counter() - wall_from)


def finalize(out: str, blocks: list[tuple[int, int, int]], stats: list[dict],
             spec: RecommendSpec, wall_s: float | None = None) -> dict:
    """Concatenate the block files into ``out/top_k.parquet`` (and ``out/candidates.parquet``)
    and write ``out/summary.json``: users, fallback users, rows, blocks skipped (done by an
    earlier run), candidates per user, peak RSS of the processes that ran blocks (MiB).

    Raises:
        RuntimeError: a block file is missing (a block failed without raising).
    """
    missing = [b for b, _, _ in blocks if not block_done(block_url(out, b))]
    if missing:
        raise RuntimeError(f"{out}: recommend blocks {missing[:10]} have no output file")
    rows, c = _concat([block_url(out, b) for b, _, _ in blocks],
                      storage.join(out, "top_k.parquet"),
                      lambda t: _user_counts(t, spec.k))
    fb_users, listed, short = (int(x) for x in c) if np.ndim(c) else (0, 0, 0)
    c = storage.join(out, "candidates")
    if spec.mode == "two_stage" and storage.exists(c):  # not for a retrieval run alone
        _concat([block_url(c, b) for b, _, _ in blocks], storage.join(out, "candidates.parquet"))
    n_users = blocks[-1][2] if blocks else 0
    if short:
        print(f"[rectrain] {short} of {n_users} users get fewer than k={spec.k} items (fewer "
              f"eligible items, or the index found fewer: raise index_params nprobe / "
              f"ef_search)", flush=True)
    if n_users > listed:  # every eligible item excluded for them: no row at all
        print(f"[rectrain] {n_users - listed} of {n_users} users get no list: every item is "
              f"excluded for them (recommend.exclude: {spec.exclude})", flush=True)
    summary = {"mode": spec.mode, "users": n_users, "fallback_users": fb_users,
               "users_without_list": n_users - listed,
               # fewer eligible items than k, or an approximate index (IVF: nprobe lists)
               # that found fewer
               "users_with_short_list": short,
               "rows": rows, "blocks": len(blocks),
               "blocks_skipped": len(blocks) - len(stats),
               "candidates_per_user": (sum(s["candidates"] for s in stats) /
                                       max(1, sum(s["users"] - s["fallback_users"]
                                                  for s in stats))) if stats else None,
               "k": spec.k, "exclude": spec.exclude, "lists": storage.join(out, "top_k.parquet")}
    if stats:
        summary["peak_rss_mb_per_process"] = max(s["peak_rss_mb"] for s in stats)
        # the blocks' own time, summed over processes: users/s without start-up and loading
        summary["block_seconds"] = sum(s.get("ms", 0) for s in stats) / 1000
    if wall_s is not None:
        summary["wall_s"] = wall_s
        summary["users_per_s"] = sum(s["users"] for s in stats) / wall_s if wall_s else None
    storage.write_json(summary, storage.join(out, "summary.json"))
    return summary


def _write(table: pa.Table, url: str) -> None:
    write_block(table, url)


def _user_counts(t: pa.Table, k: int) -> np.ndarray:
    """``[fallback users, users with rows, users with 1..k-1 rows]`` of one block (each user
    is in one block)."""
    if not t.num_rows:
        return np.zeros(3, dtype=np.int64)
    is_fb = pc.equal(pc.cast(t["source"], pa.string()), "fallback")
    per_user = pc.value_counts(t["user_id"]).field("counts").to_numpy()
    return np.array([len(pc.unique(t.filter(is_fb)["user_id"])), len(per_user),
                     int((per_user < k).sum())])


def _concat(urls: list[str], dest: str, count=None) -> tuple[int, int]:
    """Stream the block files ``urls`` into one Parquet file ``dest`` (one block in memory at a
    time, so the driver never holds every user's rows; temporary name, then renamed); returns
    ``(rows, sum of count(block table))`` (``count`` may return an array: summed per element)."""
    tmp = f"{dest}.tmp-{os.getpid()}"
    fs, path = storage.url_to_fs(tmp)
    rows = counted = 0
    writer = None
    with fs.open(path, "wb") as f:
        try:
            for url in urls:
                t = storage.read_parquet(url)
                if writer is None:
                    writer = pq.ParquetWriter(f, t.schema)
                writer.write_table(t.cast(writer.schema))
                rows += t.num_rows
                counted += count(t) if count else 0
        finally:
            if writer is not None:
                writer.close()
    storage.move(tmp, dest)
    return rows, counted


def recommend(run_dir: str, k: int = 10, out: str | None = None, users_per_chunk: int = 256,
              explain: int = 0) -> tuple[str, int]:
    """Write top-``k`` recommendations for every user of a run; returns ``(path, n_users)``.

    Brute force in this process, ``users_per_chunk`` users per block. With ``explain = m > 0``
    (attention models), each recommendation also lists the ``m`` items of the user's behaviour
    sequence with the largest attention weights for that candidate (``explain_item_ids``,
    ``explain_weights``; see :mod:`rectrain.serve.explain`). Users without train events get the
    most popular items. Every event is the users' history (production lists, no list metrics:
    ``recommend --config`` with ``recommend.evaluate`` scores lists). ``run_dir`` is a run directory (its best ``checkpoint/``) or a
    checkpoint folder.

    Raises:
        FileNotFoundError: ``run_dir`` has no complete checkpoint, or its prepared data is gone.
    """
    retrieval = task_of(run_config(run_dir).model.name) == "retrieval"
    spec = RecommendSpec(mode="brute_force", ranking_run=run_dir, k=k, explain=explain,
                         exclude="all_seen" if retrieval else "train",
                         users_per_block=users_per_chunk, actors=0, evaluate=False)
    path = out or storage.join(run_dir, "recommendations", "top_k.parquet")
    work = f"{path}.blocks-{time.time_ns()}"
    try:
        summary = run_blocks(spec, work)
        lists = storage.read_parquet(summary["lists"])
        cols = LIST_COLUMNS + [c for c in ("explain_item_ids", "explain_weights")
                               if c in lists.column_names]
        _write(lists.select(cols), path)  # renamed in when complete: a failure keeps the old file
    finally:
        storage.remove(work)
    return path, summary["users"]
