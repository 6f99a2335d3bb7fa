"""The closing stages of prepare: row accounting, catalog and vocabulary files, item text
embeddings and the :class:`~rectrain.data.schema.Manifest`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rectrain.config import JobConfig
from rectrain.data import storage
from rectrain.data.prepare.events import EventCounts
from rectrain.data.prepare.vocab import UID, SideTables, Vocabularies
from rectrain.data.schema import ITEM, SPLITS, USER, Manifest, fingerprint, vocab_digest


def check_row_accounting(out: str, events: EventCounts, bucket_stats: list[dict]
                         ) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Every row read is in exactly one split, rejected, or (a window prepare) outside the
    prepared windows (history only), and the Parquet footers of the
    written files add up to the counted rows of their split.
    Returns ``(rows per split, {split: {file url: rows}})``; rows per split are the written
    rows (observed events plus any sampled negatives).

    Raises:
        AssertionError: either identity fails (a bug in prepare, not in the data).
    """
    split_counts = {name: sum(b["rows"][name] for b in bucket_stats) for name in SPLITS}
    negatives = negative_rows(bucket_stats)
    rows_used, n_rejected = sum(split_counts.values()), sum(events.rejected.values())
    n_outside = sum(sum(b.get("outside", {}).values()) for b in bucket_stats)
    if events.rows_read != rows_used + n_rejected + n_outside:
        raise AssertionError(f"row accounting broken: read {events.rows_read} != used "
                             f"{rows_used} + rejected {n_rejected} + outside the window "
                             f"{n_outside}")
    files_per_split: dict[str, dict[str, int]] = {}
    for name in SPLITS:
        url = storage.join(out, name)
        files_per_split[name] = _file_rows(url) if storage.exists(url) else {}
        if sum(files_per_split[name].values()) != split_counts[name] + negatives[name]:
            raise AssertionError(f"{name}: written rows differ from the counted rows")
    return {n: split_counts[n] + negatives[n] for n in SPLITS}, files_per_split


def negative_rows(bucket_stats: list[dict]) -> dict[str, int]:
    """Sampled negative rows per split over the buckets (0 without ``dataset.negatives``)."""
    return {name: sum(b.get("negatives", {}).get("rows", {}).get(name, 0) for b in bucket_stats)
            for name in SPLITS}


def negatives_summary(spec, seed: int, pool_items: int, bucket_stats: list[dict]) -> dict:
    """The manifest's ``negatives``: the ``dataset.negatives`` settings (seed resolved), the
    pool size, negative rows per split and the dropped draws (:mod:`.negatives`)."""
    return {**spec.model_dump(), "seed": spec.seed if spec.seed is not None else seed,
            "labels": "observed events 1, sampled negatives 0", "pool_items": pool_items,
            "rows_per_split": negative_rows(bucket_stats),
            "dropped": sum(b.get("negatives", {}).get("dropped", 0) for b in bucket_stats)}


def _file_rows(url: str) -> dict[str, int]:
    """{file url: rows} of the Parquet files under ``url``, from their footers."""
    fs, path = storage.url_to_fs(url)
    rows = {}
    for p in sorted(fs.find(path)):
        if p.endswith(".parquet"):
            with fs.open(p, "rb") as f:
                rows[p if storage.is_local(fs) else fs.unstrip_protocol(p)] = \
                    pq.ParquetFile(f).metadata.num_rows
    return rows


def write_catalog_and_vocabularies(out: str, side: SideTables, vocab: Vocabularies) -> None:
    """``catalog/{users,items}.parquet`` (encoded side features per raw id, for recommendation)
    and ``vocab/<feature>.parquet`` (raw ``value`` -> ``id``, to map ids back)."""
    for role in side.raw:
        cat = {**side.encoded[role], (USER if role == "users" else ITEM): side.keys[role]}
        storage.write_parquet(pa.table(cat), storage.join(out, "catalog", f"{role}.parquet"))
    for name, v in vocab.vocabs.items():
        storage.write_parquet(pa.table({"value": v, "id": pa.array(np.arange(1, len(v) + 1))}),
                              storage.join(out, "vocab", f"{name}.parquet"))


def text_embeddings(cfg: JobConfig, side: SideTables, vocab: Vocabularies) -> dict:
    """Item text -> sentence embeddings (Ray Data batch inference), see rectrain.data.text_embed;
    ``{}`` for a job without a ``text_embedding`` feature."""
    if not any(f.kind == "text_embedding" for f in cfg.features):
        return {}
    from rectrain.data.text_embed import prepare_text_embeddings, text_feature_item_key

    key = text_feature_item_key(cfg)
    return prepare_text_embeddings(cfg, side.raw.get("items"), side.encoded["items"].get(key),
                                   len(vocab.vocabs[key]), cfg.prepared_dir)


def table_sizes(cfg: JobConfig, vocab: Vocabularies) -> dict[str, int]:
    """Rows of each embedding table: the largest vocabulary (or hash range, or ``capacity``)
    + 1 (id 0) over the features that share it; a sequence feature uses its source
    feature's ids."""
    tables: dict[str, int] = {}
    for f in cfg.features:
        if f.kind in ("dense", "text_embedding", "match"):
            continue
        src = f.source if f.kind == "sequence" else f.name
        cap = next((g.capacity for g in cfg.features if g.name == src), None)
        zch = vocab.hashing.get(src, {}).get("encoding") == "zch"
        size = (cap if zch  # zch: raw ids, remapped to the table's rows in the model
                else vocab.hashing[src]["buckets"] + 1 if src in vocab.hashing
                else (cap if cap is not None else len(vocab.vocabs[src])) + 1)
        tables[f.table_name] = max(tables.get(f.table_name, 0), size)
    return tables


def build_manifest(cfg: JobConfig, markers: list[str], side: SideTables, vocab: Vocabularies,
                   events: EventCounts, bucket_stats: list[dict], split_counts: dict[str, int],
                   files_per_split: dict, dense_stats: dict, text: dict,
                   seconds: dict[str, float], window: dict | None = None) -> Manifest:
    """Assemble the manifest from the stages' results (nothing is read or checked here)."""
    tables = table_sizes(cfg, vocab)
    fs = events.file_stats
    schema = next(b["schema"] for b in bucket_stats if b["schema"] is not None)
    raw = {f.table_name for f in cfg.features if f.encoding == "zch"}  # ids not yet rows
    features = [{"name": f.name, "kind": f.kind, "table": f.table_name,
                 "num_embeddings": tables.get(f.table_name), "pooling": f.pooling,
                 **({"raw_ids": True} if f.table_name in raw else {})}
                for f in cfg.features]
    digests = {name: vocab_digest(v) for name, v in vocab.vocabs.items()}
    vocabularies = {name: {"size": len(v), "digest": digests[name]}
                    for name, v in vocab.vocabs.items()}
    return Manifest(
        name=cfg.name,
        schema=schema,
        features=features,
        tables=tables,
        num_users=len(side.keys["users"]) if "users" in side.keys else len(vocab.event[UID]),
        num_items=len(side.keys["items"]) if "items" in side.keys else None,
        rows_read=events.rows_read,
        rows_used=sum(split_counts.values()) - sum(negative_rows(bucket_stats).values()),
        rows_rejected=sum(events.rejected.values()),
        rejected_by_reason=dict(events.rejected),
        rows_remapped=sum(events.remapped.values()),
        remapped_by_reason=dict(events.remapped),
        side_table_null_list_elements=side.null_list_elements,
        null_values={**side.null_values, **dict(events.null_values)},
        hashing=vocab.hashing,
        empty_files=[s["file"] for s in fs if s["rows_read"] == 0],
        rows_per_split=split_counts,
        files_per_split=files_per_split,
        input_files={s["file"]: {"rows_read": s["rows_read"], "rows_used": s["rows_used"],
                                 "rejected": s["rejected"], "remapped": s["remapped"]}
                     for s in fs},
        skipped_markers=markers,
        side_tables={r: {"files": side.files[r], "rows": side.raw[r].num_rows} for r in side.raw},
        dense_stats=dense_stats,
        text_embeddings=text,
        seconds=seconds,
        config=cfg.model_dump(mode="json"),
        fingerprint=fingerprint(schema, tables, features, vocab.hashing, digests),
        vocabularies=vocabularies,
        window={**window, **{f"rows_{k}": sum(b.get("outside", {}).get(k, 0)
                                               for b in bucket_stats)
                             for k in ("before", "after")}} if window else {},
        vocab_growth={"vocab_from": cfg.dataset.vocab_from, "features": vocab.growth}
        if vocab.growth else {},
    )
