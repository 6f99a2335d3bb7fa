"""Vocabularies and side tables of the prepare stage.

Side tables (users, items) are small: they are read, checked and encoded once in the driver
and broadcast to the per-file tasks. Event-level columns get their vocabularies from one pass
over the events files (a Ray task per file returns its distinct values, merged here). A
feature encoded by hashing (``encoding: hash``) needs no vocabulary; its distinct values give
the collision report (:func:`rectrain.data.encode.hash_collisions`).
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rectrain.config import DatasetSpec, FeatureSpec, JobConfig
from rectrain.data import storage
from rectrain.data.encode import (apply_transform, build_vocab, encode, grow_vocab,
                                  hash_collisions, hash_encode, oov_count)
from rectrain.data.prepare.rawids import raw_id_encode, raw_id_report
from rectrain.data.prepare.validate import (DataValidationError, locate, null_list_elements,
                                            read_side_table)

log = logging.getLogger(__name__)

UID = "_uid"  # the dense user id (1-based) that orders and buckets users


@dataclass
class SideTables:
    """The users / items tables of a job (either may be absent), keyed by role."""

    raw: dict[str, pa.Table] = field(default_factory=dict)  # as read
    files: dict[str, list[str]] = field(default_factory=dict)
    keys: dict[str, pa.Array] = field(default_factory=dict)  # key column, row order
    encoded: dict[str, dict[str, pa.Array]] = field(default_factory=dict)  # role -> feature -> ids
    null_list_elements: dict[str, int] = field(default_factory=dict)  # "role.column" -> rows
    #: "role.feature" -> side-table rows whose value was null (encoded as id 0 / empty list)
    null_values: dict[str, int] = field(default_factory=dict)


@dataclass
class Vocabularies:
    """``vocabs``: feature -> sorted distinct raw values (id = index + 1), written to
    ``vocab/``; ``event``: the event-level ones the per-file tasks encode with (plus
    :data:`UID` when there is no users table); ``hashing``: feature -> collision report."""

    vocabs: dict[str, pa.Array] = field(default_factory=dict)
    event: dict[str, pa.Array] = field(default_factory=dict)
    hashing: dict[str, dict] = field(default_factory=dict)
    #: feature -> the vocabulary this prepare extends (``dataset.vocab_from``), id order
    previous: dict[str, pa.Array] = field(default_factory=dict)
    #: feature -> its growth report (:func:`rectrain.data.encode.grow_vocab`), plus
    #: ``oov_rows`` (values sent to id 0 for want of room), for features with a capacity or
    #: a previous vocabulary
    growth: dict[str, dict] = field(default_factory=dict)

    def build(self, f: FeatureSpec, col) -> pa.Array:
        """The vocabulary of feature ``f`` over ``col``: sorted distinct values, or, with a
        previous vocabulary or ``f.capacity``, the grown one (:func:`grow_vocab`)."""
        prev = self.previous.get(f.name)
        if prev is None and f.capacity is None:
            return build_vocab(col)
        v, report = grow_vocab(col, prev, f.capacity, f"feature {f.name!r}")
        self.growth[f.name] = {**report, "oov_rows": 0}
        if report["oov_values"]:  # counted in the manifest, but easy to miss there
            log.warning("feature %r: capacity %s is full (%d values); %d more distinct values "
                        "go to the OOV row 0 (raise the feature's capacity to keep them apart)",
                        f.name, f.capacity, report["size"], report["oov_values"])
        return v


def previous_vocabularies(source: str | None, names: list[str]) -> dict[str, pa.Array]:
    """The vocabularies (raw values in id order) of ``names`` saved under ``source``'s
    ``vocab/<feature>.parquet``: ``source`` is a prepared folder (holds ``manifest.json``) or
    a run directory / checkpoint whose ``meta.json`` config names one (``dataset.vocab_from``).
    A feature without a saved vocabulary starts empty. ``{}`` for ``source=None``.

    Raises:
        FileNotFoundError: ``source`` is neither, or the prepared folder a run names is gone
            (the message names it and the field).
    """
    if source is None:
        return {}
    prepared = resolve_prepared(source)
    if not storage.exists(storage.join(prepared, "manifest.json")):  # else every id renumbered
        raise FileNotFoundError(f"dataset.vocab_from: {source} was prepared into {prepared}, "
                                f"which is gone (no manifest.json); point vocab_from at that "
                                f"prepared folder where it is now")
    out = {}
    for name in names:
        url = storage.join(prepared, "vocab", f"{name}.parquet")
        if storage.exists(url):
            t = storage.read_parquet(url).sort_by("id")
            out[name] = t["value"].combine_chunks()
    return out


def resolve_prepared(source: str) -> str:
    """The prepared folder ``source`` names: itself when it holds ``manifest.json``, else the
    ``prepared_dir`` in the job config of the checkpoint at ``source``, ``source/checkpoint``
    (a run's best) or its newest ``source/checkpoints/step-*``.

    Raises:
        FileNotFoundError: none of these exists (names ``source``).
    """
    if storage.exists(storage.join(source, "manifest.json")):
        return source
    fs, root = storage.url_to_fs(storage.join(source, "checkpoints"))
    steps = sorted(fs.glob(root.rstrip("/") + "/step-*/meta.json")) if fs.exists(root) else []
    newest_first = [storage.join(source, "checkpoints", posixpath.basename(posixpath.dirname(m)))
                    for m in reversed(steps)]  # step-NNNNNNNN: the name sorts by step
    for ck in [source, storage.join(source, "checkpoint")] + newest_first:
        meta = storage.join(ck, "meta.json")
        if storage.exists(meta):
            return storage.read_json(meta)["config"]["prepared_dir"]
    raise FileNotFoundError(f"dataset.vocab_from: {source} is neither a prepared folder "
                            f"(manifest.json) nor a run directory or checkpoint (meta.json)")


def transform(f: FeatureSpec, col, where: str):
    """``apply_transform`` with errors that name the feature, source column, type and file.
    Dense features come back as float64 with NaN/inf as null."""
    try:
        out = apply_transform(col, f.transform)
        is_list = pa.types.is_list(out.type) or pa.types.is_large_list(out.type)
        if is_list != (f.kind == "multi_hot"):
            raise TypeError(f"a {f.kind} feature needs a {'list' if not is_list else 'scalar'} "
                            f"column, got {out.type}")
        if f.kind == "dense":
            out = pc.cast(out, pa.float64())
            # NaN/inf count as missing: imputed with the train mean (0 after normalisation)
            out = pc.if_else(pc.is_finite(out), out, pa.scalar(None, pa.float64()))
        return out
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError) as e:
        what = f"transform {f.transform.model_dump(exclude_defaults=True)}" if f.transform \
            else f"a {f.kind} feature"
        raise DataValidationError(
            f"{where}: column {f.source!r} ({col.type}) cannot be used for feature {f.name!r} "
            f"as {what}: {e}") from None


def read_side_tables(spec: DatasetSpec) -> SideTables:
    """Read and key-check the users / items tables the job names."""
    side = SideTables()
    for role, s in (("users", spec.users), ("items", spec.items)):
        if s is not None:
            side.raw[role], side.files[role] = read_side_table(s.path, role, s.key)
            side.keys[role] = side.raw[role][s.key].combine_chunks()
            side.encoded[role] = {}
    return side


def feature_roles(cfg: JobConfig, side: SideTables) -> dict[str, str]:
    """Which table (``users``, ``items`` or ``events``) each pooled or dense feature's source
    column lives in (the first side table holding it, else the events)."""
    return {f.name: next((r for r in ("users", "items") if r in side.raw
                          and f.source in side.raw[r].column_names), "events")
            for f in cfg.features if f.kind not in ("sequence", "text_embedding", "match")}


def encode_side_features(cfg: JobConfig, side: SideTables, roles: dict[str, str],
                         vocab: Vocabularies) -> None:
    """Encode every side-table feature once (fills ``side.encoded`` and ``vocab``).

    Raises:
        DataValidationError: a list feature's element is null under ``on_invalid: error``
            (names file, column, row and value); a transform does not fit the column.
    """
    spec = cfg.dataset
    for f in cfg.features:
        role = roles.get(f.name, "events")
        if role == "events":
            continue
        raw = side.raw[role]
        col = transform(f, raw[f.source], spec.users.path if role == "users" else spec.items.path)
        if f.kind == "multi_hot":
            bad = null_list_elements(col)
            n_bad = pc.sum(bad).as_py() or 0
            if n_bad and spec.on_invalid == "error":
                row = pc.index(bad, True).as_py()
                file, frow = locate(raw, side.files[role], row)
                raise DataValidationError(
                    f"{file}: column {f.source!r} row {frow}: null element in a list (value "
                    f"{raw[f.source][row].as_py()!r}); {n_bad} such row(s) in the "
                    f"{role} table. Set dataset.on_invalid: oov to map them to id 0 and count them.")
            if n_bad:  # skip / oov: a side-table row cannot be dropped; its nulls encode to 0
                side.null_list_elements[f"{role}.{f.source}"] = n_bad
        if f.kind != "dense" and col.null_count:  # dense nulls: dense_stats' imputed count
            side.null_values[f"{role}.{f.name}"] = col.null_count
        if f.kind == "dense":
            side.encoded[role][f.name] = col
        elif f.encoding == "hash":
            side.encoded[role][f.name] = hash_encode(col, f.hash_buckets)
            vocab.hashing[f.name] = hash_collisions(col, f.hash_buckets)
        elif f.encoding == "zch":
            side.encoded[role][f.name] = raw_id_encode(col)
            vocab.hashing[f.name] = raw_id_report(col, f.capacity)
        else:
            vocab.vocabs[f.name] = vocab.build(f, col)
            side.encoded[role][f.name] = encode(col, vocab.vocabs[f.name])
            if f.name in vocab.growth:  # side rows whose value found no room
                vocab.growth[f.name]["oov_rows"] = oov_count(col, side.encoded[role][f.name])


def event_vocabularies(files: list[str], spec: DatasetSpec, event_feats: list[FeatureSpec],
                       col_types: dict[str, pa.DataType], need_uid: bool,
                       vocab: Vocabularies, groups: list[list[int]] | None = None) -> None:
    """Vocabularies (or hash reports) of the event-level features, and of the raw user id
    when there is no users table (``need_uid``), from one distinct-values pass."""
    unique_cols = sorted({f.source for f in event_feats if f.kind != "dense"}
                         | ({spec.user_column} if need_uid else set()))
    if not unique_cols:
        return
    distinct = event_distincts(files, unique_cols, col_types, groups)
    for c in unique_cols:
        uniq = distinct[c]
        for f in event_feats:
            if f.source == c and f.kind != "dense" and f.encoding == "hash":
                vocab.hashing[f.name] = hash_collisions(transform(f, uniq, spec.events),
                                                        f.hash_buckets)
            elif f.source == c and f.kind != "dense" and f.encoding == "zch":
                vocab.hashing[f.name] = raw_id_report(transform(f, uniq, spec.events),
                                                      f.capacity)
            elif f.source == c and f.kind != "dense":
                vocab.event[f.name] = vocab.build(f, transform(f, uniq, spec.events))
        if need_uid and c == spec.user_column:
            vocab.event[UID] = build_vocab(uniq)
    vocab.vocabs.update({k: v for k, v in vocab.event.items() if k != UID})


def _file_distincts(path: str, columns: list[str]) -> dict[str, pa.Array]:
    """Distinct values of each column of one events file (runs as a Ray task).

    List columns give their distinct elements; dictionary-encoded columns their decoded values;
    a null is kept as one value (a transform such as ``year`` maps it to a value of its own).
    An empty file gives ``{}`` (its columns may be missing: the footer check allows that).
    Returns ``{column: pa.Array}``.
    """
    fs, p = storage.url_to_fs(path)
    with fs.open(p, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if pf.metadata.num_rows == 0:
            return {}
        t = pf.read(columns=columns)
    out = {}
    for c in columns:
        col = t[c].combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            col = pc.list_flatten(col)
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        out[c] = pc.unique(col)
    return out


def _unfit_value_error(path: str, column: str, target: pa.DataType) -> DataValidationError:
    """The error for an events file whose ``column`` holds a value that ``target`` (the type
    the other files' values merge into, e.g. int64 when one file has uint64 above 2**63)
    cannot hold, naming the file, column, first such row and its value."""
    col = storage.read_parquet(path, columns=[column])[column].combine_chunks()
    is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    flat = pc.list_flatten(col) if is_list else col
    if pa.types.is_dictionary(flat.type):
        flat = flat.dictionary_decode()
    i = -1
    if pa.types.is_integer(flat.type) and pa.types.is_integer(target):
        info = np.iinfo(target.to_pandas_dtype())
        v = pc.fill_null(flat, 0).to_numpy()
        bad = np.flatnonzero((v > info.max) | (v < info.min))
        i = int(bad[0]) if bad.size else -1
    row = (pc.list_parent_indices(col)[i].as_py() if is_list else i) if i >= 0 else None
    where = f"row {row}: value {col[row].as_py()!r}" if row is not None else "a value"
    return DataValidationError(f"{path}: column {column!r} {where} does not fit {target}, the "
                               f"type the events files' values are merged into")


def _group_distincts(paths: list[str], columns: list[str]) -> list[dict[str, pa.Array]]:
    """:func:`_file_distincts` of each file of a read group (one Ray task)."""
    return [_file_distincts(p, columns) for p in paths]


def event_distincts(files: list[str], columns: list[str], col_types: dict[str, pa.DataType],
                    groups: list[list[int]] | None = None) -> dict[str, pa.Array]:
    """Distinct values of event-level columns over all ``files``: a Ray task per group of
    files (``groups``, indices into ``files``; default one file per task; distincts are kept
    per file, :func:`_file_distincts`), merged here, nulls included. Integer values come back
    as int64 (uint64 stays uint64) and floats as float64, since files may differ in width; a
    list column comes back as ONE list row holding its distinct elements.

    Raises:
        DataValidationError: a value the merged type cannot hold (names file, column, row, value).
    """
    import ray

    task = ray.remote(_group_distincts)
    groups = groups if groups is not None else [[i] for i in range(len(files))]
    parts = [d for ds in ray.get([task.remote([files[i] for i in g], columns) for g in groups])
             for d in ds]
    out = {}
    for c in columns:
        ty = col_types.get(c, pa.null())
        is_list = pa.types.is_list(ty) or pa.types.is_large_list(ty)
        elem = ty.value_type if is_list else ty
        if pa.types.is_dictionary(elem):
            elem = elem.value_type
        target = (elem if pa.types.is_uint64(elem) else
                  pa.int64() if pa.types.is_integer(elem) else
                  pa.float64() if pa.types.is_floating(elem) else elem)
        arrays = []
        for path, p in zip(files, parts):
            if c in p and len(p[c]):
                try:
                    arrays.append(pc.cast(p[c], target))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise _unfit_value_error(path, c, target) from None
        values = pc.unique(pa.concat_arrays(arrays)) if arrays else pa.array([], target)
        if is_list:
            values = pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
            values = values.cast(pa.list_(target) if pa.types.is_list(ty)
                                 else pa.large_list(target))
        out[c] = values
    return out
