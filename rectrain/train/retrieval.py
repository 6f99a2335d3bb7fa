"""Training and full-ranking evaluation of retrieval / next-item models (``task = "retrieval"``:
two-tower, SASRec). :func:`rectrain.train.loop.run` hands such models to :func:`run_retrieval`.

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

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from rectrain.config import JobConfig
from rectrain.data import storage
from rectrain.data.features import FeatureLayout
from rectrain.data.loader import collective_batches, padded_eval_tables, padding_table, rebatch
from rectrain.data.schema import ITEM, TS, USER, load_manifest
from rectrain.models import build_model
from rectrain.models.sasrec import next_item_targets
from rectrain.models.two_tower import in_batch_softmax_loss
from rectrain.checkpoint import load_checkpoint, save_checkpoint
from rectrain.train.metrics import gather_arrays
from rectrain.train.ranking_metrics import exclusion_mask, metrics_from_ranks, target_ranks
from rectrain.train.sharding import shard_model

KS = (10, 20)


def _read_split(prepared: str, split: str, columns: list[str]) -> pa.Table | None:
    url = storage.join(prepared, split)
    if not storage.exists(url):
        return None
    files, _ = storage.list_parquet_files(url)
    return pa.concat_tables([storage.read_parquet(f, columns) for f in files]) if files else None


def item_counts(prepared: str, item_key: str, n_items: int) -> np.ndarray:
    """int64 ``[n_items]``: how often each encoded item id is the item of a train-split event."""
    t = _read_split(prepared, "train", [item_key])
    ids = t[item_key].to_numpy() if t is not None else np.zeros(0, np.int64)
    return np.bincount(ids, minlength=n_items).astype(np.int64)


class SeenIndex:
    """Items each user interacted with in some splits, as CSR keyed by the raw user id
    (``_user``), for excluding already-seen items from a full ranking.

    ``rows(users)`` maps raw user ids ``[N]`` (Arrow) to CSR rows (-1: no history); ``mask``
    gives the bool ``[N, n_items]`` exclusion mask.
    """

    def __init__(self, prepared: str, splits: tuple[str, ...], item_key: str, n_items: int):
        parts = [t for t in (_read_split(prepared, s, [USER, item_key]) for s in splits) if t]
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


def _say(env, msg: str) -> None:
    if env.rank == 0:
        print(f"[rectrain] {msg}", flush=True)


def _fmt(m: dict) -> str:
    return " ".join(f"{k} {m[k]:.4f}" for k in ("hr@10", "ndcg@10", "recall@20"))


def run_retrieval(cfg: JobConfig, env) -> dict:
    """Train, validate (full ranking), checkpoint and test a retrieval model on this rank
    (collective). Writes ``metrics.json`` (keys ``test.hr@10`` ... as nested dicts, see the
    README) and ``predictions/test.parquet``; returns the metrics (identical on every rank)."""
    from rectrain.train.loop import _global_mean, lr_schedule

    t_start = time.perf_counter()
    tc, ms = cfg.train, cfg.model
    torch.manual_seed(tc.seed)
    np_rng = np.random.default_rng(tc.seed + 1000 * env.rank)
    manifest = load_manifest(cfg.prepared_dir)
    layout = FeatureLayout(cfg, manifest)
    model = build_model(layout, ms, sparse_device=torch.device("meta"), dense_device=env.device)
    item_key = model.item_key
    n_items = layout.num_embeddings[next(f.table_name for f in layout.sequence
                                         if f.name == item_key)]
    temperature = model.temperature
    dmp, optimizer, plan = shard_model(model, cfg.sharding, cfg.optim, env.device)
    _say(env, f"sharding plan ({env.world} ranks):\n{plan}")
    counts = item_counts(cfg.prepared_dir, item_key, n_items)
    log_q = torch.from_numpy(np.log(np.maximum(counts, 1) / max(counts.sum(), 1))).float()
    items = all_items_table(cfg, layout, item_key)
    item_ids = torch.from_numpy(items[item_key].to_numpy().astype(np.int64))
    seen_valid = SeenIndex(cfg.prepared_dir, ("train",), item_key, n_items)
    seen_test = SeenIndex(cfg.prepared_dir, ("train", "valid"), item_key, n_items)
    writer = None
    if env.rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(storage.join(cfg.run_dir, "tensorboard"))
    ckpt_url = storage.join(cfg.run_dir, "checkpoint")
    planned = tc.epochs * max(1, manifest["rows_per_split"]["train"] // (tc.batch_size * env.world))
    set_lr = lr_schedule(optimizer, cfg.optim, planned)
    full = ms.retrieval_loss == "full"
    all_steps = ms.name == "sasrec" and ms.sasrec_all_steps
    if all_steps and not full:
        raise ValueError("model.sasrec_all_steps needs model.retrieval_loss: full")
    target_pos = torch.full((n_items,), -1, dtype=torch.long)
    target_pos[item_ids] = torch.arange(len(item_ids))
    best = {"score": -1.0, "epoch": -1, "metrics": {}}
    history, step, train_seconds, train_samples = [], 0, 0.0, 0
    for epoch in range(tc.epochs):
        t_epoch = time.perf_counter()
        t_log, n_log, loss_sum, loss_n, rows = t_epoch, 0, 0.0, 0, 0
        for t, _ in collective_batches(rebatch(env.shard("train").tables(epoch), tc.batch_size,
                                               True, np_rng), "train"):
            t = t.select(layout.columns)
            B = t.num_rows
            if full:
                t = pa.concat_tables([t, items.select(layout.columns).cast(t.schema)])
            batch = layout.to_batch(t).to(env.device)
            set_lr(step)
            ids = torch.from_numpy(t[item_key].to_numpy()[:B].astype(np.int64))
            if all_steps:  # SASRec's objective: every history step predicts the next item
                h, v = dmp(batch, n_queries=B, all_steps=True)
                nxt = torch.from_numpy(next_item_targets(
                    t[model.hist_key].slice(0, B).combine_chunks(), ids.numpy(), h.shape[1]))
                has = nxt > 0
                logits = h[has.to(env.device)] @ v[B:].t() / temperature
                loss = F.cross_entropy(logits, target_pos[nxt[has]].to(env.device))
            elif full:
                u, v = dmp(batch, n_queries=B)
                logits = u @ v[B:].t() / temperature
                loss = F.cross_entropy(logits, target_pos[ids].to(env.device))
            else:
                u, v = dmp(batch, n_queries=B)
                lq = log_q[ids].to(env.device) if ms.logq_correction else None
                loss = in_batch_softmax_loss(u, v[:B], ids.to(env.device), temperature, lq)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            rows += B
            n_log += B * env.world
            loss_sum += float(loss.detach())
            loss_n += 1
            if tc.max_train_rows and rows >= tc.max_train_rows:
                break
            if step % tc.log_every == 0:
                now = time.perf_counter()
                _say(env, f"epoch {epoch} step {step} loss {loss_sum / loss_n:.4f} "
                          f"{n_log / (now - t_log):,.0f} samples/s")
                if writer:
                    writer.add_scalar("train/loss", loss_sum / loss_n, step)
                t_log, n_log = now, 0
        epoch_s = time.perf_counter() - t_epoch
        train_seconds += epoch_s
        train_samples += rows * env.world
        va = evaluate_ranking(dmp, layout, env.shard("valid"), tc.eval_batch_size, env.device,
                              items, item_key, n_items, seen_valid, counts)
        vm = metrics_from_ranks(va["rank"], KS)
        rec = {"epoch": epoch, "train_loss": _global_mean(loss_sum / max(loss_n, 1)),
               "train_rows": rows * env.world, "train_seconds": epoch_s,
               "train_samples_per_s": rows * env.world / max(epoch_s, 1e-9),
               **{f"valid_{k}": float(x) for k, x in vm.items()}}
        history.append(rec)
        _say(env, f"epoch {epoch}: train loss {rec['train_loss']:.4f} "
                  f"({rec['train_samples_per_s']:,.0f} samples/s) | valid {_fmt(vm)} "
                  f"({vm['users']} users)")
        if writer:
            for k in ("hr@10", "ndcg@10"):
                writer.add_scalar(f"valid/{k}", vm[k], epoch)
        env.report({k: float(x) for k, x in rec.items()})
        if vm["ndcg@10"] > best["score"]:
            best = {"score": vm["ndcg@10"], "epoch": epoch, "metrics": vm,
                    "pop": metrics_from_ranks(va["pop_rank"], KS)}
            save_checkpoint(ckpt_url, dmp, optimizer, meta={
                "epoch": epoch, "step": step, "valid": vm, "world_size": env.world,
                "plan": str(plan), "config": cfg.model_dump(mode="json")})
    load_checkpoint(ckpt_url, dmp)
    te = evaluate_ranking(dmp, layout, env.shard("test"), tc.eval_batch_size, env.device,
                          items, item_key, n_items, seen_test, counts, keep=(ITEM, TS))
    tm = metrics_from_ranks(te["rank"], KS)
    pm = metrics_from_ranks(te["pop_rank"], KS)
    _say(env, f"test (best epoch {best['epoch']}, full ranking over {len(item_ids)} items, "
              f"{tm['users']} users): {_fmt(tm)} | most popular: {_fmt(pm)}")
    metrics = {
        "task": "retrieval", "model": ms.name,
        "test": tm, "valid": best["metrics"],
        "baseline_most_popular": {"test": pm, "valid": best.get("pop", {})},
        "hr@10_vs_most_popular": tm["hr@10"] / pm["hr@10"] if pm["hr@10"] else float("nan"),
        "protocol": {"split": "leave-last-out", "items_ranked": int(len(item_ids)),
                     "exclude": "items of the user's earlier events (train; + valid for test), "
                                "target kept", "ties": "count against the target"},
        "best_epoch": best["epoch"], "rows_per_split": manifest["rows_per_split"],
        "train_samples_per_s": train_samples / max(train_seconds, 1e-9),
        "train_seconds": train_seconds, "worker_seconds": time.perf_counter() - t_start,
        "world_size": env.world, "epochs": history,
    }
    # flat keys too (benchmarks/quality.py reads top-level keys): test_hr@10, test_ndcg@10,
    # test_recall@20, ..., valid_*, most_popular_test_*, most_popular_valid_*
    for prefix, mm in (("test_", tm), ("valid_", best["metrics"]), ("most_popular_test_", pm),
                       ("most_popular_valid_", best.get("pop", {}))):
        metrics.update({prefix + k: x for k, x in mm.items()})
    if env.rank == 0:
        pred = pa.table({"user_id": te[USER], "item_id": te[ITEM], "timestamp": te[TS],
                         "rank": te["rank"].astype(np.int64),
                         "most_popular_rank": te["pop_rank"].astype(np.int64)})
        storage.write_parquet(pred, storage.join(cfg.run_dir, "predictions", "test.parquet"))
        storage.write_json(metrics, storage.join(cfg.run_dir, "metrics.json"))
        for k in ("hr@10", "ndcg@10", "recall@20"):
            writer.add_scalar(f"test/{k}", tm[k], 0)
        writer.close()
    return metrics


def retrieval_top_k(model, candidates, users: pa.Table, items: pa.Table, prepared: str, k: int,
                    users_per_chunk: int = 1024) -> pa.Table:
    """Top-``k`` items per user of a retrieval model (one process, unsharded model).

    ``candidates(user_rows, item_rows)`` builds a :class:`Batch` of (users-catalog row,
    items-catalog row) pairs with each user's latest behaviour sequence (see
    :mod:`rectrain.recommend`). Every item of the catalog is scored by ``<u, v> / temperature``
    (the model's training logit, not a probability); the items of every event the user has in
    the prepared data (train, valid and test) are excluded. Returns
    ``(user_id, rank, item_id, score)``, rank 1 = best, ``k`` rows per user.
    """
    n_users, n_items = users.num_rows, items.num_rows
    with torch.no_grad():
        _, v = model(candidates(np.zeros(n_items, np.int64), np.arange(n_items)), n_queries=0)
        us = [model(candidates(np.arange(lo, min(lo + users_per_chunk, n_users)),
                               np.zeros(min(users_per_chunk, n_users - lo), np.int64)))[0]
              for lo in range(0, n_users, users_per_chunk)]
    scores = torch.cat(us) @ v.t() / model.temperature  # [n_users, n_items]
    parts = [t for t in (_read_split(prepared, s, [USER, ITEM]) for s in
                         ("train", "valid", "test")) if t]
    events = pa.concat_tables(parts)
    u_rows = pc.index_in(events[USER], value_set=users[USER]).to_numpy(zero_copy_only=False)
    i_rows = pc.index_in(events[ITEM], value_set=items[ITEM]).to_numpy(zero_copy_only=False)
    ok = ~(np.isnan(u_rows.astype(np.float64)) | np.isnan(i_rows.astype(np.float64)))
    scores[torch.from_numpy(u_rows[ok].astype(np.int64)),
           torch.from_numpy(i_rows[ok].astype(np.int64))] = float("-inf")
    top = torch.topk(scores, k=min(k, n_items), dim=1)
    kk = top.indices.shape[1]
    u_idx = np.repeat(np.arange(n_users), kk)
    return pa.table({"user_id": users[USER].take(pa.array(u_idx)),
                     "rank": pa.array(np.tile(np.arange(1, kk + 1), n_users).astype(np.int32)),
                     "item_id": items[ITEM].take(pa.array(top.indices.reshape(-1).numpy())),
                     "score": pa.array(top.values.reshape(-1).numpy().astype(np.float32))})
