"""Feature layer: feature specs -> TorchRec table configs, Arrow record batches -> :class:`Batch`.

Conversion is vectorised: a list column's lengths come from its Arrow offsets and its values
from the flattened child array; scalar ids are a single ``int64`` column with length 1 each. No
per-row Python runs between Parquet and the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.modules.embedding_configs import (DataType, EmbeddingBagConfig, EmbeddingConfig,
                                                PoolingType)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from rectrain.config import FeatureSpec, JobConfig
from rectrain.data.door import check_table
from rectrain.data.match import MATCH_DIM
from rectrain.data.schema import HIST_TS, LABEL, LABEL_VALUE, TS, needs_event_times


@dataclass
class Batch(Pipelineable):
    """One training/eval batch (stop 5 of the sample's path in docs/architecture.md).

    Attributes:
        dense: float32 ``[B, D]`` z-normalised dense features (``D`` may be 0), then the
            ``text_embedding`` inputs, then 3 per ``match`` feature, bounded and not normalised
            (:meth:`FeatureLayout.dense_dim`).
        sparse: :class:`KeyedJaggedTensor` with int64 values and int32 lengths, keys in
            :attr:`FeatureLayout.sparse_keys` order (pooled features first, then the
            sequence-table features).
        labels: float32 ``[B]``: the binary label, or with ``model.loss: mse`` the raw label
            value (e.g. the rating) that the model regresses.
        aux_labels: float32 ``[B, K]`` auxiliary targets (``label_value >= t`` for each of
            ``dataset.label.aux_thresholds``); ``K`` may be 0.
        timestamps: int64 ``[B, L]`` unix seconds of the behaviour sequence's steps
            (``_hist_ts``; ``L = dataset.sequence_length``), aligned with and padded like the
            sequence feature (valid steps first, then 0), or None: only for
            :attr:`FeatureLayout.step_times` (HSTU's ``model.time_bias``).
        event_time: int64 ``[B]`` unix seconds of the row's own event (``_ts``: the time of
            the item the sequence is asked to predict), or None like ``timestamps``.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    aux_labels: torch.Tensor
    timestamps: torch.Tensor | None = None
    event_time: torch.Tensor | None = None

    def _map(self, fn) -> "Batch":
        """A copy (same class, so subclasses' fields too) with ``fn`` applied to every tensor
        and KJT field; None fields stay None."""
        return dataclasses.replace(self, **{
            f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None})

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream) -> None:  # for TorchRec train pipelines
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_rows(self) -> int:  # as pa.Table: lets collective_batches count a Batch
        return self.batch_size


def _column(table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _list_parts(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values int64, lengths int32) of a (possibly sliced) list column, from its offsets."""
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.int64, copy=False), lengths.astype(np.int32, copy=False)


class FeatureLayout:
    """How a job's features map onto embedding tables and KJT keys.

    A table is a *sequence table* when a ``sequence`` feature uses it; all features on sequence
    tables are looked up unpooled through an ``EmbeddingCollection`` (the DIN query and the
    behaviour sequence share the item table). All other sparse / multi-hot features are pooled
    through an ``EmbeddingBagCollection``.

    Args:
        cfg: the job config (features, embedding dim).
        manifest: the prepared data's manifest (table cardinalities, dense stats).
    """

    def __init__(self, cfg: JobConfig, manifest: dict):
        self.cfg = cfg
        self.embedding_dim = cfg.model.embedding_dim
        feats = cfg.features
        seq_tables = {f.table_name for f in feats if f.kind == "sequence"}
        sparse = [f for f in feats if f.kind not in ("dense", "text_embedding", "match")]
        self.pooled: list[FeatureSpec] = [f for f in sparse if f.table_name not in seq_tables]
        self.sequence: list[FeatureSpec] = [f for f in sparse if f.table_name in seq_tables]
        self.dense: list[FeatureSpec] = [f for f in feats if f.kind == "dense"]
        self.sparse_keys = [f.name for f in self.pooled] + [f.name for f in self.sequence]
        self.num_embeddings: dict[str, int] = dict(manifest["tables"])
        self.dense_stats = manifest.get("dense_stats", {})
        # text_embedding features: [num_item_ids + 1, D] matrices gathered by item id
        self.text: list[FeatureSpec] = [f for f in feats if f.kind == "text_embedding"]
        self.text_info = {f.name: manifest.get("text_embeddings", {}).get(f.name)
                          for f in self.text}
        missing = [n for n, i in self.text_info.items() if i is None]
        if missing:
            raise KeyError(f"manifest has no text embeddings for {missing}; run prepare again")
        if self.text:
            from rectrain.data import storage
            from rectrain.data.text_embed import load_text_matrix

            # relative to prepared_dir, so a moved/copied prepared folder still works
            self.text_matrix = {n: load_text_matrix(storage.join(
                cfg.prepared_dir, "catalog", f"text_{n}.parquet")) for n in self.text_info}
        self._init_match(cfg, feats)
        #: to_batch fills Batch.timestamps / event_time (HSTU's relative time bias)
        self.step_times = bool(getattr(cfg.model, "time_bias", False))
        self.time_sequence = (cfg.model.sequence_features[0]
                              if self.step_times and cfg.model.sequence_features else None)
        self.max_sequence_length = cfg.dataset.sequence_length
        self.aux_thresholds = list(cfg.dataset.label.aux_thresholds)
        #: mse regression trains on the raw label column (batch.labels = label_value)
        self.regression = getattr(cfg.model, "loss", "bce") == "mse"
        self.columns = self.sparse_keys + [f.name for f in self.dense] + [LABEL] + (
            [LABEL_VALUE] if self.aux_thresholds or self.regression else []) + self.time_columns
        #: id column -> (kind, table, rows): what every batch is checked against (data/door.py)
        #: zch tables (table -> its zch feature's spec): their columns hold raw 63-bit ids
        self.zch_tables = {f.table_name: f for f in feats if f.encoding == "zch"}
        self.bounds = {f.name: (f.kind, f.table_name, self.num_embeddings[f.table_name])
                       for f in self.pooled + self.sequence
                       if f.table_name not in self.zch_tables}
        self.check_at_door = True  # False only to measure the check's cost (bench)
        #: tables' weight type, ``sharding.embedding_dtype`` ("fp32" / "fp16")
        self.table_dtype = cfg.sharding.embedding_dtype

    def _tables(self, feats: list[FeatureSpec], make) -> list:
        """One config per table name (first feature's settings), features appended in order."""
        out: dict = {}
        for f in feats:
            if f.table_name in out:
                out[f.table_name].feature_names.append(f.name)
            else:
                out[f.table_name] = make(f, name=f.table_name, embedding_dim=self.embedding_dim,
                                         num_embeddings=self.num_embeddings[f.table_name],
                                         feature_names=[f.name],
                                         data_type=DataType[self.table_dtype.upper()])
        return list(out.values())

    def ebc_tables(self) -> list[EmbeddingBagConfig]:
        """Pooled tables, for an ``EmbeddingBagCollection`` (mean or sum pooling)."""
        return self._tables(self.pooled, lambda f, **kw: EmbeddingBagConfig(
            pooling=PoolingType.MEAN if f.pooling == "mean" else PoolingType.SUM, **kw))

    def ec_tables(self) -> list[EmbeddingConfig]:
        """Sequence tables (unpooled), for an ``EmbeddingCollection``."""
        return self._tables(self.sequence, lambda f, **kw: EmbeddingConfig(**kw))

    def arrow_schema(self) -> pa.Schema:
        """Arrow schema of :attr:`columns` as prepare writes them."""
        fields = []
        for f in self.pooled + self.sequence:
            ty = pa.int64() if f.kind == "sparse" else pa.list_(pa.int64())
            fields.append(pa.field(f.name, ty))
        fields += [pa.field(f.name, pa.float64()) for f in self.dense]
        fields.append(pa.field(LABEL, pa.float32()))
        if self.aux_thresholds or self.regression:
            fields.append(pa.field(LABEL_VALUE, pa.float32()))
        if self.time_columns:
            fields += [pa.field(TS, pa.int64()), pa.field(HIST_TS, pa.list_(pa.int64()))]
        return pa.schema(fields)

    @property
    def dense_dim(self) -> int:
        """Width of ``Batch.dense``: one column per dense feature, then per text feature D
        (candidate) or 2D + 1 (candidate, history mean, cosine; ``history: true``), then 3 per
        ``match`` feature (:mod:`rectrain.data.match`)."""
        text = sum(i["dim"] * (2 if f.history else 1) + (1 if f.history else 0)
                   for f, i in zip(self.text, self.text_info.values()))
        return len(self.dense) + text + MATCH_DIM * len(self.match)

    def dense_sides(self) -> tuple[list[int], list[int]]:
        """Columns of ``Batch.dense`` by side, for models with a user and an item tower.

        Returns ``(query, item)``: ``query`` = the plain dense features and each text
        feature's history mean (user context), ``item`` = each text feature's candidate vector
        (a property of the item, so a never-seen item still gets a meaningful vector). The
        candidate-history cosine of ``history: true`` mixes both sides and is in neither.
        """
        query, item = list(range(len(self.dense))), []
        at = len(self.dense)
        for f, info in zip(self.text, self.text_info.values()):
            d = info["dim"]
            item += range(at, at + d)
            if f.history:
                query += range(at + d, at + 2 * d)
            at += 2 * d + 1 if f.history else d
        return query, item

    def to_batch(self, table: pa.Table | pa.RecordBatch) -> Batch:
        """Convert Arrow rows (prepared-sample schema) to a :class:`Batch`.

        Raises:
            KeyError: a feature column is missing (message names the column).
            rectrain.data.door.PreparedDataError: an id outside its table, a negative or null
                id, a null list element, a non-integer id column or a null/NaN label (names
                column, row within the batch and value).
        """
        missing = [c for c in self.columns if c not in table.column_names]
        if missing:
            raise KeyError(f"batch lacks feature column(s) {missing}; has {table.column_names}")
        if self.check_at_door:
            check_table(table, self.bounds, "batch",
                        label=LABEL_VALUE if self.regression else LABEL)
        n = table.num_rows
        values, lengths = [], []
        for name in self.sparse_keys:
            col = table.column(name)
            if isinstance(col, pa.ChunkedArray):
                col = col.combine_chunks()
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                v, ln = _list_parts(col)
            else:
                v = col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                ln = np.ones(n, dtype=np.int32)
            values.append(v)
            lengths.append(ln)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.sparse_keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        if self.dense:
            cols = []
            for f in self.dense:
                x = table.column(f.name).to_numpy(zero_copy_only=False).astype(np.float32)
                st = self.dense_stats.get(f.name, {"mean": 0.0, "std": 1.0})
                x = (x - st["mean"]) / (st["std"] or 1.0)
                cols.append(np.nan_to_num(x, nan=0.0))
            dense = torch.from_numpy(np.stack(cols, axis=1))
        else:
            dense = torch.zeros(n, 0)
        if self.text:
            dense = torch.cat([dense] + [torch.from_numpy(self._text_dense(f, table))
                                         for f in self.text], dim=1)
        if self.match:
            dense = torch.cat([dense, torch.from_numpy(self._match_dense(table))], dim=1)
        labels = torch.from_numpy(
            table.column(LABEL_VALUE if self.regression else LABEL)
            .to_numpy(zero_copy_only=False).astype(np.float32, copy=True))
        if self.aux_thresholds:
            v = torch.from_numpy(table.column(LABEL_VALUE).to_numpy(zero_copy_only=False)
                                 .astype(np.float32))
            aux = (v.unsqueeze(1) >= torch.tensor(self.aux_thresholds)).float()
        else:
            aux = torch.zeros(n, 0)
        ts, now = self._step_times(table) if self.step_times else (None, None)
        return Batch(dense=dense, sparse=kjt, labels=labels, aux_labels=aux, timestamps=ts,
                     event_time=now)

    def _step_times(self, table) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timestamps int64 [B, L], event_time int64 [B])`` of :class:`Batch` from the
        ``_hist_ts`` and ``_ts`` columns, padded as the EC pads the sequence
        (``JaggedTensor.to_padded_dense``: valid steps first, cut at ``L``, then 0).

        Raises:
            ValueError: ``_hist_ts`` and the sequence differ in length (names the row).
        """
        ts, ts_len = _list_parts(_column(table, HIST_TS))
        _, lengths = _list_parts(_column(table, self.time_sequence))
        if not np.array_equal(lengths, ts_len):
            raise ValueError(f"batch: column {HIST_TS!r} and {self.time_sequence!r} differ in "
                             f"length at row {int(np.flatnonzero(lengths != ts_len)[0])}; "
                             f"prepare again")
        # copies: Arrow's buffers are read-only
        padded = JaggedTensor(values=torch.tensor(ts), lengths=torch.tensor(ts_len)
                              ).to_padded_dense(desired_length=self.max_sequence_length)
        now = _column(table, TS).to_numpy(zero_copy_only=False).astype(np.int64)
        return padded, torch.from_numpy(now)

    def _text_dense(self, f: FeatureSpec, table) -> np.ndarray:
        """float32 ``[B, D]`` (or ``[B, 2D + 1]``) text inputs of ``f`` for the rows of
        ``table`` (see :func:`rectrain.data.text_embed.text_dense`)."""
        from rectrain.data.text_embed import text_dense

        info = self.text_info[f.name]
        cand = _column(table, info["item_feature"]).to_numpy(zero_copy_only=False)
        if not f.history:
            return text_dense(self.text_matrix[f.name], cand.astype(np.int64, copy=False))
        if not info.get("history_feature"):
            raise KeyError(f"feature {f.name!r}: history: true needs a sequence feature over "
                           f"{info['item_feature']!r}")
        values, lengths = _list_parts(_column(table, info["history_feature"]))
        return text_dense(self.text_matrix[f.name], cand.astype(np.int64, copy=False),
                          values, lengths)

    def _init_match(self, cfg: JobConfig, feats: list[FeatureSpec]) -> None:
        """``match`` features: their sequence, candidate and (with ``category``) the per-item
        category keys from ``catalog/items.parquet``; the meta columns they read."""
        by_name = {f.name: f for f in feats}
        self.match: list[FeatureSpec] = [f for f in feats if f.kind == "match"]
        #: the event-time meta columns the job reads (match features, HSTU's time bias)
        self.time_columns = [TS, HIST_TS] if needs_event_times(cfg) else []
        #: (name, source) of the meta sequences serving rebuilds like a behaviour sequence
        self.meta_sequences = [(HIST_TS, TS)] if self.time_columns else []
        self.match_keys: dict[str, tuple] = {}
        for f in self.match:
            if f.category is None:
                continue
            import pyarrow.parquet as pq

            from rectrain.data import storage
            from rectrain.data.match import item_keys

            cand = by_name[f.source].source
            url = storage.join(cfg.prepared_dir, "catalog", "items.parquet")
            if not storage.exists(url):
                raise FileNotFoundError(f"{url}: match feature {f.name!r} with category "
                                        f"{f.category!r} needs the items catalog; run prepare")
            fs, path = storage.url_to_fs(url)
            with fs.open(path, "rb") as fh:
                names = pq.read_schema(fh).names
            if f.category not in names:  # a user-side or events feature: no per-item value
                raise ValueError(f"features.{feats.index(f)}.category: {f.category!r} is not "
                                 f"an item-side feature ({url} has {names}); name a sparse or "
                                 f"multi_hot feature read from dataset.items")
            cat = storage.read_parquet(url, columns=[cand, f.category])
            self.match_keys[f.name] = item_keys(
                cat, cand, f.category, self.num_embeddings[by_name[cand].table_name],
                self.num_embeddings[by_name[f.category].table_name])

    def _match_dense(self, table) -> np.ndarray:
        """float32 ``[B, 3 * len(match)]`` of the ``match`` features (rectrain.data.match)."""
        from rectrain.data.match import match_dense

        by_name = {f.name: f for f in self.cfg.features}
        now = _column(table, TS).to_numpy(zero_copy_only=False).astype(np.int64)
        ts, ts_len = _list_parts(_column(table, HIST_TS))
        out = []
        for f in self.match:
            seq = by_name[f.source]
            cand = _column(table, seq.source).to_numpy(zero_copy_only=False).astype(np.int64)
            hist, lengths = _list_parts(_column(table, seq.name))
            if not np.array_equal(lengths, ts_len):
                raise ValueError(f"batch: column {HIST_TS!r} and {seq.name!r} differ in length "
                                 f"at row {int(np.flatnonzero(lengths != ts_len)[0])}; prepare "
                                 f"again")
            key_of, bitmask = self.match_keys.get(f.name, (None, False))
            out.append(match_dense(cand, hist, lengths, now, ts, key_of, bitmask))
        return np.concatenate(out, axis=1)
