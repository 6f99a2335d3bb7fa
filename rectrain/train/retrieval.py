"""Training and full-ranking evaluation of retrieval / next-item models (``task = "retrieval"``:
two-tower, SASRec, HSTU): :class:`RetrievalTask`, run by the one loop (:func:`rectrain.train.loop.run`).

**Samples.** Every prepared event is a training positive (implicit feedback: all interactions,
whatever their rating): the row's user features and behaviour sequence (its strictly earlier
events) form the query, the row's item the positive. The label column is not used.

**Loss** (``model.retrieval_loss``): ``in_batch`` = sampled softmax over the items of the
(per-rank) batch with log-Q correction, ``q`` = the item's frequency among training positives
(exact counts from the prepared train split; Yi et al. 2019 estimate it by streaming); ``full``
= softmax over every item of the corpus (the all-items rows are appended to each batch so that
one TorchRec lookup serves both).

**Evaluation** (leave-last-out, ``dataset.split: {test: 1, valid: 1}``): for every validation
(test) row, i.e. each user's second-to-last (last) event, the query is built from that row (its
history = up to ``sequence_length`` events strictly before it); every item of the corpus is
scored; the items of the user's earlier events (train split for valid; train + valid for test)
are excluded, except the target itself; the target's rank gives HR@K, NDCG@K, recall@K and MRR
(:mod:`rectrain.train.ranking_metrics`). Ranks are gathered over all ranks, each user counted
exactly once (checked). A **most-popular** baseline (items ranked by train-split frequency,
same exclusions, same rows) is computed in the same pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from rectrain.config import JobConfig
from rectrain.data import storage
from rectrain.data.features import Batch, FeatureLayout
from rectrain.data.loader import padded_eval_tables, padding_table
from rectrain.data.schema import ITEM, TS, USER, read_split
from rectrain.models.sasrec import next_item_targets
from rectrain.models.two_tower import in_batch_softmax_loss
from rectrain.train.metrics import gather_arrays
from rectrain.train.ranking_metrics import exclusion_mask, metrics_from_ranks, target_ranks

KS = (10, 20)


def item_counts(prepared: str, item_key: str, n_items: int) -> np.ndarray:
    """int64 ``[n_items]``: how often each encoded item id is the item of a train-split event."""
    t = read_split(prepared, "train", [item_key])
    ids = t[item_key].to_numpy() if t is not None else np.zeros(0, np.int64)
    return np.bincount(ids, minlength=n_items).astype(np.int64)


class SeenIndex:
    """Items each user interacted with in some splits, as CSR keyed by the raw user id
    (``_user``), for excluding already-seen items from a full ranking.

    ``rows(users)`` maps raw user ids ``[N]`` (Arrow) to CSR rows (-1: no history); ``mask``
    gives the bool ``[N, n_items]`` exclusion mask.
    """

    def __init__(self, prepared: str, splits: tuple[str, ...], item_key: str, n_items: int):
        parts = [t for t in (read_split(prepared, s, [USER, item_key]) for s in splits) if t]
        t = pa.concat_tables(parts)
        self.users = pc.unique(t[USER].combine_chunks())
        row = pc.index_in(t[USER], value_set=self.users).to_numpy(zero_copy_only=False)
        items = t[item_key].to_numpy()
        order = np.argsort(row, kind="stable")
        self.items = items[order].astype(np.int64)
        self.indptr = np.zeros(len(self.users) + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=len(self.users)), out=self.indptr[1:])
        self.n_items = n_items

    def mask(self, users: pa.Array) -> torch.Tensor:
        rows = pc.fill_null(pc.index_in(users, value_set=self.users), -1)
        return exclusion_mask(rows.to_numpy(zero_copy_only=False), self.indptr, self.items,
                              self.n_items)


def all_items_table(cfg: JobConfig, layout: FeatureLayout, item_key: str) -> pa.Table:
    """One row per item of the corpus with the columns of ``layout`` (item side features from
    ``catalog/items.parquet`` when present, the rest padding: id 0, empty lists, zeros)."""
    url = storage.join(cfg.prepared_dir, "catalog", "items.parquet")
    if storage.exists(url):
        cat = storage.read_parquet(url)
    else:
        n = layout.num_embeddings[next(f.table_name for f in layout.sequence
                                       if f.name == item_key)]
        cat = pa.table({item_key: pa.array(np.arange(1, n, dtype=np.int64))})
    schema = layout.arrow_schema()
    t = padding_table(schema, cat.num_rows)
    for name in cat.column_names:
        if name in schema.names:
            t = t.set_column(schema.get_field_index(name), name,
                             pc.cast(cat[name], schema.field(name).type))
    return t


def corpus_vectors(model, layout: FeatureLayout, items: pa.Table, item_key: str, n_items: int,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V [n_items, d], absent bool [n_items])``: item vectors indexed by encoded item id
    (collective under DMP: every rank calls it). Ids not in the corpus (0 = unknown) are
    ``absent`` and never ranked."""
    with torch.no_grad():
        _, v = model(layout.to_batch(items).to(device), n_queries=0)
    ids = torch.from_numpy(items[item_key].to_numpy().astype(np.int64))
    V = torch.zeros(n_items, v.shape[1])
    V[ids] = v.float().cpu()
    absent = torch.ones(n_items, dtype=torch.bool)
    absent[ids] = False
    return V, absent


def evaluate_ranking(model, layout: FeatureLayout, source, batch_size: int, device,
                     items: pa.Table, item_key: str, n_items: int, seen: SeenIndex,
                     popularity: np.ndarray, keep: tuple[str, ...] = ()) -> dict:
    """Full-ranking evaluation of every row of this rank's shard (collective; rows gathered
    over ranks). Returns arrays over ALL rows: ``rank`` (the model's), ``pop_rank`` (most
    popular), ``_user``, ``target`` and each column in ``keep``.

    Raises:
        ValueError: a user appears in more than one row (the split is not leave-last-out).
    """
    model.eval()
    V, absent = corpus_vectors(model, layout, items, item_key, n_items, device)
    pop = torch.from_numpy(popularity.astype(np.float64)).unsqueeze(0)
    out: dict[str, list] = {"rank": [], "pop_rank": [], "target": [], USER: [],
                            **{k: [] for k in keep}}
    with torch.no_grad():
        for t, n_real, raw in padded_eval_tables(source, layout, batch_size, keep, out):
            if raw is not None:
                users = raw[USER].combine_chunks()
            u, _ = model(layout.to_batch(t).to(device))
            if not n_real:
                continue
            u = u[:n_real].float().cpu()
            target = torch.from_numpy(t[item_key].to_numpy()[:n_real].astype(np.int64))
            exclude = seen.mask(users) | absent.unsqueeze(0)
            out["rank"].append(target_ranks(u @ V.t(), target, exclude).numpy())
            out["pop_rank"].append(
                target_ranks(pop.expand(n_real, -1), target, exclude).numpy())
            out["target"].append(target.numpy())
            out[USER].append(users.to_numpy(zero_copy_only=False))
    model.train()
    arrays = gather_arrays({k: (np.concatenate(v) if v else np.zeros(0, np.int64))
                            for k, v in out.items()})
    users, counts = np.unique(arrays[USER], return_counts=True)
    if len(counts) and counts.max() > 1:
        raise ValueError(f"full-ranking evaluation: user {users[counts.argmax()]!r} has "
                         f"{counts.max()} rows; use dataset.split test: 1, valid: 1 "
                         f"(leave-last-out)")
    return arrays


@dataclass
class RetrievalBatch(Batch):
    """A training batch of a retrieval model: the ``B`` query rows (their item column is the
    positive), followed with ``retrieval_loss: full`` by one row per corpus item (so one TorchRec
    lookup embeds both).

    Attributes (besides :class:`~rectrain.data.features.Batch`'s):
        targets: int64 ``[B]``: the positive's encoded item id.
        next_items: int64 ``[B, S]``: SASRec's / HSTU's every-step next-item targets (0 = none;
            ``[B, 0]`` unless ``model.sasrec_all_steps`` / ``hstu_all_steps``).
    """

    targets: torch.Tensor = None
    next_items: torch.Tensor = None

    @property
    def n_queries(self) -> int:
        return int(self.targets.shape[0])

    # to / record_stream / pin_memory: Batch's, over every field (these two too)

    @property
    def batch_size(self) -> int:  # rows trained on (the corpus rows are not samples)
        return self.n_queries

    def to_proxy_tuple(self, model) -> dict:
        """Concrete arguments for TorchRec's fx trace of ``model.forward`` (the sparse-dist
        pipeline, ``torchrec.distributed.train_pipeline.utils._rewrite_model``): the call's
        ``n_queries`` / ``all_steps``, so the trace follows this call's control flow."""
        params = inspect.signature(model.forward).parameters
        args = {"n_queries": self.n_queries, "all_steps": self.next_items.shape[1] > 0}
        return {k: v for k, v in args.items() if k in params}


def _fmt(m: dict) -> str:
    return " ".join(f"{k} {m[k]:.4f}" for k in ("hr@10", "ndcg@10", "recall@20"))


class RetrievalTask:
    """:class:`~rectrain.train.task.Task` for models returning ``(user, item)`` vectors.

    ``model.sasrec_all_steps`` / ``model.hstu_all_steps`` need ``retrieval_loss: full``
    (checked when the config loads).
    """

    def __init__(self, cfg, layout: FeatureLayout, manifest: dict, model, env):
        ms = cfg.model
        self.cfg, self.layout, self.env = cfg, layout, env
        self.item_key = model.item_key
        # full ranking enumerates the item table's rows as the item ids
        if getattr(layout, "zch_tables", None):
            raise ValueError(f"model.name: {ms.name} ranks every item row, which encoding "
                             f"zch ({sorted(layout.zch_tables)}) does not map to items; use a "
                             f"ranking model or encoding vocab")
        self.hist_key = getattr(model, "hist_key", None)
        self.temperature = model.temperature
        self.n_items = layout.num_embeddings[next(f.table_name for f in layout.sequence
                                                  if f.name == self.item_key)]
        self.full = ms.retrieval_loss == "full"
        self.all_steps = (getattr(ms, "sasrec_all_steps", False)
                          or getattr(ms, "hstu_all_steps", False))
        self.steps = model.steps if self.all_steps else 0  # SASRec / HSTU: output steps
        self.logq = ms.logq_correction and not self.full
        prepared = cfg.prepared_dir
        self.counts = item_counts(prepared, self.item_key, self.n_items)
        self.log_q = torch.from_numpy(np.log(np.maximum(self.counts, 1)
                                             / max(self.counts.sum(), 1))).float()
        self.items = all_items_table(cfg, layout, self.item_key)
        self.corpus = self.items.select(layout.columns)
        item_ids = torch.from_numpy(self.items[self.item_key].to_numpy().astype(np.int64))
        self.n_corpus = len(item_ids)
        self.target_pos = torch.full((self.n_items,), -1, dtype=torch.long)
        self.target_pos[item_ids] = torch.arange(self.n_corpus)
        self.seen = {"valid": SeenIndex(prepared, ("train",), self.item_key, self.n_items),
                     "test": SeenIndex(prepared, ("train", "valid"), self.item_key, self.n_items)}

    def to_batch(self, table: pa.Table) -> RetrievalBatch:
        t = table.select(self.layout.columns)
        B = t.num_rows
        ids = t[self.item_key].to_numpy().astype(np.int64)
        nxt = np.zeros((B, 0), np.int64)
        if self.all_steps:
            nxt = next_item_targets(t[self.hist_key].combine_chunks(), ids, self.steps)
        if self.full:
            t = pa.concat_tables([t, self.corpus.cast(t.schema)])
        b = self.layout.to_batch(t)
        return RetrievalBatch(**vars(b), targets=torch.from_numpy(ids),
                              next_items=torch.from_numpy(nxt))

    def start(self, step: int) -> None:
        pass

    def loss(self, model, batch: RetrievalBatch) -> torch.Tensor:
        B, dev = batch.n_queries, batch.targets.device
        if self.all_steps:  # SASRec's / HSTU's objective: every step predicts the next item
            h, v = model(batch, n_queries=B, all_steps=True)
            has = batch.next_items > 0
            logits = h[has] @ v[B:].t() / self.temperature
            return F.cross_entropy(logits, self.target_pos.to(dev)[batch.next_items[has]])
        u, v = model(batch, n_queries=B)
        if self.full:
            logits = u @ v[B:].t() / self.temperature
            return F.cross_entropy(logits, self.target_pos.to(dev)[batch.targets])
        lq = self.log_q.to(dev)[batch.targets] if self.logq else None
        return in_batch_softmax_loss(u, v[:B], batch.targets, self.temperature, lq)

    def _evaluate(self, model, source, split: str, keep=()) -> dict:
        tc = self.cfg.train
        return evaluate_ranking(model, self.layout, source, tc.eval_batch_size, self.env.device,
                                self.items, self.item_key, self.n_items, self.seen[split],
                                self.counts, keep=keep)

    def validate(self, model, source) -> dict:
        va = self._evaluate(model, source, "valid")
        return {**metrics_from_ranks(va["rank"], KS),
                "most_popular": metrics_from_ranks(va["pop_rank"], KS)}

    def selection_score(self, vm: dict) -> float:
        v = vm["ndcg@10"]
        return v if v == v else -1e30

    def epoch_record(self, vm: dict) -> dict:
        return {f"valid_{k}": float(x) for k, x in vm.items() if k != "most_popular"}

    def describe(self, vm: dict) -> str:
        return f"valid {_fmt(vm)} ({vm['users']} users)"

    def scalars(self, vm: dict) -> dict[str, float]:
        return {f"valid/{k}": vm[k] for k in ("hr@10", "ndcg@10")}

    def test(self, model, source, best_valid: dict) -> tuple[dict, pa.Table, str]:
        te = self._evaluate(model, source, "test", keep=(ITEM, TS))
        tm = metrics_from_ranks(te["rank"], KS)
        pm = metrics_from_ranks(te["pop_rank"], KS)
        valid = {k: x for k, x in best_valid.items() if k != "most_popular"}
        pop_valid = best_valid.get("most_popular", {})
        metrics = {
            "task": "retrieval", "test": tm, "valid": valid,
            "baseline_most_popular": {"test": pm, "valid": pop_valid},
            "hr@10_vs_most_popular": tm["hr@10"] / pm["hr@10"] if pm["hr@10"] else float("nan"),
            "protocol": {"split": "leave-last-out", "items_ranked": self.n_corpus,
                         "exclude": "items of the user's earlier events (train; + valid for "
                                    "test), target kept", "ties": "count against the target"},
        }
        # flat keys too (benchmarks/quality.py reads top-level keys): test_hr@10, ...,
        # valid_*, most_popular_test_*, most_popular_valid_*
        for prefix, mm in (("test_", tm), ("valid_", valid), ("most_popular_test_", pm),
                           ("most_popular_valid_", pop_valid)):
            metrics.update({prefix + k: x for k, x in mm.items()})
        pred = pa.table({"user_id": te[USER], "item_id": te[ITEM], "timestamp": te[TS],
                         "rank": te["rank"].astype(np.int64),
                         "most_popular_rank": te["pop_rank"].astype(np.int64)})
        text = (f"full ranking over {self.n_corpus} items, {tm['users']} users: {_fmt(tm)} | "
                f"most popular: {_fmt(pm)}")
        return metrics, pred, text
