"""The per-block work of batch recommendation, pure (no Ray): :class:`Recommender` loads the
runs, the index and the exclusion sets once per process and turns one block of users (a range
of user rows) into its final lists; :func:`block_url` / :func:`write_block` give each block one
Parquet file, written to a temporary name and renamed in when complete, so a rerun can skip the
blocks already done (rectrain/launch/recommend_job.py drives the blocks on Ray Data).

Output rows: ``user_id, rank, item_id, score, source`` (rank 1 = best; ``source``: the
candidate source of the item, ``brute_force`` or ``fallback``), plus ``explain_item_ids`` /
``explain_weights`` with ``explain``. ``score``: the ranking model's predicted probability
(``loss: bce``) or label value (``loss: mse``); for a retrieval model ``<u, v> / temperature``;
for fallback rows the item's train popularity (events).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rectrain.config.sections import RecommendSpec
from rectrain.data import storage
from rectrain.data.schema import ITEM, USER
from rectrain.models.base import label_prediction
from rectrain.serve import candidates as cand
from rectrain.serve.context import EXCLUDE_SPLITS, RunContext, _key_rows
from rectrain.serve.explain import explain_attention, explain_nearest
from rectrain.serve.index import build_index
from rectrain.serve.loading import load_model

#: fault hook for tests: ``block:N[:raise|exit]``: fail (once, marker under OUT/_faults) in block N
FAULT_ENV = "RECTRAIN_RECOMMEND_FAULT"
SOURCE_NAMES = list(cand.SOURCES) + ["brute_force", "fallback"]


def block_url(out: str, block: int) -> str:
    return storage.join(out, "blocks", f"block-{block:06d}.parquet")


def write_block(table: pa.Table, url: str) -> None:
    """``url`` appears only complete: written to a temporary name, then renamed."""
    tmp = f"{url}.tmp-{os.getpid()}"
    storage.write_parquet(table, tmp)
    storage.move(tmp, url)


#: spec fields that do not change the lists (how they are computed, where they go)
_NOT_IN_LISTS = ("actors", "out", "in_process_pairs", "scoring", "actor_memory_gb", "workers")


def claim_out(out: str, spec: RecommendSpec) -> None:
    """Record ``spec`` in ``out/recommend_spec.json``, or check that the blocks already under
    ``out/blocks`` were made with the same settings, so a rerun resumes its own blocks and
    never mixes in (or deletes) those of other settings.

    Raises:
        ValueError: ``out`` is a file, or ``out/blocks`` holds block files of other (or
            unrecorded) settings.
    """
    fs, path = storage.url_to_fs(out)
    if fs.exists(path) and not fs.isdir(path):
        raise ValueError(f"recommend.out: {out} is a file; recommend writes a folder (top_k."
                         f"parquet, blocks/, summary.json): give a folder path")
    url = storage.join(out, "recommend_spec.json")
    want = {k: v for k, v in spec.model_dump(mode="json").items() if k not in _NOT_IN_LISTS}
    want["index_params"].pop("threads", None)
    have = storage.read_json(url) if storage.exists(url) else None
    if have == want:
        return
    fs, path = storage.url_to_fs(storage.join(out, "blocks"))
    if fs.glob(f"{path}/block-*.parquet"):
        fix = (f"give another out (recommend.out / --out), or delete {out}/blocks to start "
               f"over")
        if have is None:
            raise ValueError(f"{out}: holds recommend blocks of unrecorded settings (no "
                             f"recommend_spec.json); {fix}")
        k = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))[0]
        raise ValueError(f"{out}: holds recommend blocks made with other settings (recommend."
                         f"{k}: {have.get(k)!r} there, {want.get(k)!r} now); {fix}")
    storage.write_json(want, url)


def block_done(url: str) -> bool:
    """A block file exists and its Parquet footer reads (a complete file)."""
    if not storage.exists(url):
        return False
    try:
        fs, path = storage.url_to_fs(url)
        with fs.open(path, "rb") as f:
            pq.ParquetFile(f).metadata
        return True
    except Exception:  # noqa: BLE001 - a torn file is redone
        return False


def _fault(out: str, block: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "block" or not parts[1].isdigit() or \
            (len(parts) == 3 and parts[2] not in ("raise", "exit")):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected block:N[:raise|exit]")
    marker = storage.join(out, "_faults", f"block-{int(parts[1])}.json")
    if int(parts[1]) != block or storage.exists(marker):
        return
    storage.write_json({"block": block}, marker)
    if len(parts) == 3 and parts[2] == "raise":
        raise RuntimeError(f"injected fault in recommend block {block} ({FAULT_ENV})")
    print(f"[rectrain] fault injection: recommend actor exits in block {block}", flush=True)
    os._exit(1)


class Recommender:
    """Models, index and exclusion of a :class:`RecommendSpec`, loaded once (one per actor).

    ``spec.ranking_run`` must be set (the driver fills in the job's run_dir). Brute force
    scores every eligible item with that run's model; two-stage scores the merged candidates
    of ``spec.sources``; with a retrieval run as ``ranking_run``, two-stage is that run alone
    through ``spec.index`` (no second stage; brute force: the exact index). Memory per block:
    ``users_per_block x n_items`` pairs at most (brute force), ``users_per_block x
    (candidates + excluded)`` (two-stage); never users x items.
    """

    @torch.no_grad()
    def __init__(self, spec: RecommendSpec, rows_per_chunk: int = 16384, loader=None):
        self.spec, self.rows_per_chunk = spec, rows_per_chunk
        t0 = time.perf_counter()
        # loader: how the ranking run's model is loaded (default unsharded, see RunContext)
        self.rank = RunContext(spec.ranking_run, holdout=spec.evaluate,
                               loader=loader or load_model)
        r = self.rank
        self.excl = None
        if spec.exclude != "none":
            splits = r.history if spec.exclude == "all_seen" else EXCLUDE_SPLITS[spec.exclude]
            self.excl = cand.Exclusion(*r.seen(splits), r.n_items)
        self.popular = np.argsort(-r.popularity, kind="stable")
        names = [s.name for s in spec.sources]
        self.retr = None
        if r.retrieval:  # brute force with a retrieval model: exact search over every item
            self.retr, self.item_map = r, np.arange(r.n_items)
        elif spec.mode == "two_stage" and ("retrieval" in names or spec.explain):
            if spec.retrieval_run:
                self.retr = RunContext(spec.retrieval_run, holdout=spec.evaluate)
                self.item_map = _key_rows(self.retr.item_keys, r.item_keys)
                if not (self.item_map >= 0).any():  # else every list is silently empty
                    raise ValueError(
                        f"recommend.retrieval_run: {spec.retrieval_run} (prepared data "
                        f"{self.retr.prepared}) shares no item id with recommend.ranking_run "
                        f"{spec.ranking_run} ({r.prepared}); train both on the same items")
        t1 = time.perf_counter()
        if self.retr is not None:
            n, c = self.retr.n_items, rows_per_chunk
            self.item_vectors = torch.cat([  # once per process, in chunks of items
                self.retr.model(self.retr.batch(np.zeros(min(c, n - a), np.int64),
                                                np.arange(a, min(a + c, n))), n_queries=0)[1]
                for a in range(0, n, c)])
            # a retrieval run alone: brute force = the exact index, two_stage = ``index``
            kind = "exact" if r.retrieval and spec.mode == "brute_force" else spec.index
            self.vectors = self.item_vectors.float().numpy()
            self.index = build_index(self.vectors, kind, **spec.index_params)
        t2 = time.perf_counter()
        self.recent = r.recent(self._count("recent")) if "recent" in names else None
        #: wall seconds of the loading (``rectrain.serve.timing``): models, the rest of the
        #: serving context (states, exclusion, popularity, recent), the item vectors + index
        ctxs = [r] + ([self.retr] if self.retr is not None and self.retr is not r else [])
        models = sum(c.timings["models_s"] for c in ctxs)
        self.timings = {"models_s": models, "index_s": t2 - t1,
                        "context_s": (t1 - t0) - models + (time.perf_counter() - t2)}
        #: the stage-1 candidates of each two-stage block computed and not yet written:
        #: ``{block: (u, i, src)}`` (per block, as blocks may run on several threads)
        self.last_candidates = {}

    def _count(self, name: str) -> int:
        s = next(s for s in self.spec.sources if s.name == name)
        return s.count or self.spec.candidates

    @torch.no_grad()
    def _user_vectors(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Retrieval user vectors of ranking-run user rows ``u`` -> ``(rows present, [b, d])``."""
        ru = _key_rows(self.rank.user_keys.take(pa.array(u)), self.retr.user_keys)
        has = ru >= 0
        q = self.retr.model(self.retr.batch(ru[has], np.zeros(int(has.sum()), np.int64)))[0]
        return u[has], q.float().numpy()

    @torch.no_grad()
    def _score(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Ranking-model scores float32 of (user row, item row) pairs, in row chunks of
        :meth:`score_chunk`."""
        c = self.rows_per_chunk
        out = [self.score_chunk(u[a:a + c], i[a:a + c]) for a in range(0, len(u), c)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    @torch.no_grad()
    def score_chunk(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """The model callable: scores float32 ``[n]`` of ``n`` (user row, item row) pairs
        (int64 ``[n]`` each) by the ranking model in this process; the sharded path
        (:class:`rectrain.serve.sharded.ShardedRecommender`) replaces it by a collective
        forward of the model's shards."""
        return label_prediction(self.rank.model(self.rank.batch(u, i)),
                                self.rank.layout.regression).numpy()

    @torch.no_grad()
    def candidates(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stage-1 ``(u, i, src)`` of user rows ``[lo, hi)`` with train rows (see
        :mod:`rectrain.serve.candidates`)."""
        r, spec = self.rank, self.spec
        users = np.arange(lo, hi)[r.train_users[lo:hi]]
        parts = []
        for s in spec.sources:
            code, n = cand.SOURCES.index(s.name), self._count(s.name)
            if s.name == "retrieval":
                uu, q = self._user_vectors(users)
                u, i, _ = cand.retrieval(self.index, q, uu, self.item_map, n, self.excl, lo, hi,
                                         self.retr.model.temperature, self.vectors)
            elif s.name == "popular":
                u, i = cand.popular(self.popular, n, self.excl, lo, hi)
            else:
                u, i = cand.recent(*self.recent, n, self.excl, lo, hi)
            keep = r.train_users[u]
            parts.append((code, u[keep], i[keep]))
        return cand.merge(parts, r.n_items)

    @torch.no_grad()  # thread-local: Ray Data calls from its own threads
    def block(self, block: int, lo: int, hi: int, out: str | None = None) -> tuple[pa.Table, dict]:
        """Final lists of user rows ``[lo, hi)`` and the block's counts (users, fallback users,
        candidates). ``out``: where the fault hook keeps its marker."""
        if out is not None:
            _fault(out, block)
        r, spec, k = self.rank, self.spec, self.spec.k
        if r.retrieval:  # the retriever alone: its index's top-k is the list
            u, q = self._user_vectors(np.arange(lo, hi)[r.train_users[lo:hi]])
            u, i, s = cand.retrieval(self.index, q, u, self.item_map, k, self.excl, lo, hi,
                                     r.model.temperature, self.vectors)
            src = np.full(len(u), SOURCE_NAMES.index("brute_force"), np.int8)
            n_cand = len(u)
        else:
            if spec.mode == "brute_force":
                users = np.arange(lo, hi)[r.train_users[lo:hi]]
                u = np.repeat(users, r.n_items)
                i = np.tile(np.arange(r.n_items), len(users))
                if self.excl is not None:
                    ok = ~self.excl.mask(u, i, lo, hi)
                    u, i = u[ok], i[ok]
                src = np.full(len(u), SOURCE_NAMES.index("brute_force"), np.int8)
            else:
                u, i, src = self.candidates(lo, hi)
                self.last_candidates[block] = (u, i, src)  # written beside the lists
            n_cand = len(u)
            s = self._score(u, i)
            top = cand.top_k_per_user(u, i, s, k)
            u, i, s, src = u[top], i[top], s[top], src[top]
        # users with no train rows: the fallback (most popular eligible items)
        cold = np.arange(lo, hi)[~r.train_users[lo:hi]]
        n_cold = len(cold)
        if n_cold:
            fu, fi = cand.popular(self.popular, k, self.excl, lo, hi)
            sel = ~r.train_users[fu]
            fu, fi = fu[sel], fi[sel]
            u, i = np.concatenate([u, fu]), np.concatenate([i, fi])
            s = np.concatenate([s, r.popularity[fi].astype(np.float32)])
            src = np.concatenate([src, np.full(len(fu), SOURCE_NAMES.index("fallback"), np.int8)])
            order = np.argsort(u, kind="stable")
            u, i, s, src = u[order], i[order], s[order], src[order]
        table = pa.table({
            "user_id": r.user_keys.take(pa.array(u)),
            "rank": pa.array((cand.rank_in_runs(u) + 1).astype(np.int32)),
            "item_id": r.item_keys.take(pa.array(i)),
            "score": pa.array(s.astype(np.float32)),
            "source": pa.DictionaryArray.from_arrays(pa.array(src), pa.array(SOURCE_NAMES)),
        })
        if spec.explain:
            if hasattr(r.model, "forward_with_attention"):
                table = explain_attention(table, u, i, r, spec.explain, self.rows_per_chunk)
            elif self.retr is not None:
                table = explain_nearest(table, u, i, r, self.retr, self.item_vectors,
                                        spec.explain)
            else:
                raise ValueError(f"recommend.explain: model {r.cfg.model.name!r} has no "
                                 f"attention and no retrieval_run gives item vectors")
        return table, {"users": hi - lo, "fallback_users": n_cold, "candidates": n_cand,
                       "rows": table.num_rows}
