"""The prepared-sample contract shared by prepare (which writes it), the trainer and serving
(which read it): meta column names, split names and the manifest file.

A prepared folder holds ``train/``, ``valid/``, ``test/`` Parquet samples (one row per event:
the feature columns of the job plus the meta columns below), ``catalog/{users,items}.parquet``
and ``manifest.json`` (schema, table sizes, rows per split, rejected rows by reason).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields

import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data import storage

SPLITS = ("train", "valid", "test")
# meta columns carried in every sample next to the features
USER, ITEM, TS, POS, LABEL, SPLIT = "_user", "_item", "_ts", "_pos", "label", "_split"
LABEL_VALUE = "label_value"  # the raw label column as float32 (e.g. the rating)
#: list<int64> unix seconds of the behaviour-sequence events, aligned with its steps (written
#: only for the jobs of :func:`needs_event_times`)
HIST_TS = "_hist_ts"


def needs_event_times(cfg) -> bool:
    """Whether a job (a :class:`~rectrain.config.JobConfig`) reads the per-step event times
    ``_hist_ts`` (and the row's ``_ts``): its ``match`` features (time since the last match)
    or HSTU's relative time bias (``model.time_bias``). Prepare writes ``_hist_ts`` and the
    trainer reads it exactly for these jobs."""
    return (any(f.kind == "match" for f in cfg.features)
            or bool(getattr(cfg.model, "time_bias", False)))


def load_manifest(prepared_dir: str) -> dict:
    """Read ``manifest.json`` from a prepared folder as a plain dict (the trainer and serving
    index it by key; :meth:`Manifest.load` gives the typed form).

    Raises:
        FileNotFoundError: the folder has no ``manifest.json`` (the message names the folder).
    """
    url = storage.join(prepared_dir, "manifest.json")
    if not storage.exists(url):
        raise FileNotFoundError(f"{prepared_dir}: no manifest.json; run `rectrain prepare --config JOB.yaml` first")
    return storage.read_json(url)


def empty_split_reason(rows_per_split: dict[str, int], split_cfg: dict, rows_used: int,
                       source: str, splits: tuple[str, ...] = SPLITS) -> str | None:
    """Why a prepared folder cannot be trained on, or None when every split has rows.

    ``rows_per_split`` (split -> rows) and ``split_cfg`` (``dataset.split`` as a dict:
    ``test``, ``valid`` events per user) come from the manifest; ``source`` names the prepared
    folder in the message; only ``splits`` are checked. Training needs train rows to fit,
    valid rows to select the best epoch and test rows to score it.
    """
    empty = [s for s in splits if not rows_per_split.get(s)]
    if not empty:
        return None
    n_test, n_valid = int(split_cfg.get("test", 0)), int(split_cfg.get("valid", 0))
    if rows_used == 0:
        why = "no event passed validation (see rejected_by_reason in manifest.json)"
    elif "test" in empty and n_test == 0:
        why = "dataset.split.test is 0: set it to at least 1"
    elif "valid" in empty and n_valid == 0:
        why = "dataset.split.valid is 0: set it to at least 1"
    else:
        why = (f"every user has at most {n_test + n_valid if 'train' in empty else n_test} "
               f"events, so dataset.split (test: {n_test}, valid: {n_valid} per user) leaves "
               f"the {' and '.join(empty)} split empty: lower dataset.split.test / "
               f"dataset.split.valid or add events")
    return (f"{source}: the {', '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} "
            f"empty; training needs rows in train, valid and test: {why}")


def vocab_digest(values: pa.Array) -> str:
    """sha256 (hex) of one vocabulary (raw values in id order), over its Arrow IPC bytes."""
    sink = pa.BufferOutputStream()
    table = pa.table({"value": values}).combine_chunks()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def fingerprint(schema: dict, tables: dict, features: list, hashing: dict,
                vocab_digests: dict[str, str]) -> str:
    """sha256 (hex) of what fixes the meaning of every id: the sample schema, the table sizes,
    the features, the hashing settings and each vocabulary's digest (:func:`vocab_digest`)."""
    spec = {"schema": schema, "tables": tables, "features": features,
            "hashing": {k: v.get("buckets") for k, v in hashing.items()},
            "vocab": vocab_digests}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _structure(manifest: dict) -> str:
    """The fingerprint of a manifest without its vocabularies: schema, table sizes, features
    and hashing settings."""
    return fingerprint(manifest.get("schema", {}), manifest.get("tables", {}),
                       manifest.get("features", []), manifest.get("hashing", {}), {})


def _layout(manifest: dict) -> str:
    """:func:`_structure` without the table sizes (``tables``, each feature's
    ``num_embeddings``): what must stay equal when ``vocab`` tables grow."""
    feats = [{k: v for k, v in f.items() if k != "num_embeddings"}
             for f in manifest.get("features", [])]
    return fingerprint(manifest.get("schema", {}), {}, feats, manifest.get("hashing", {}), {})


def data_identity(manifest: dict) -> dict:
    """``{"fingerprint", "tables", "structure", "layout", "vocabularies"}`` of a manifest
    dict, stored in every checkpoint's meta.

    ``fingerprint`` is the one prepare wrote (vocabularies included); a manifest without one
    (written by hand or by an older rectrain) gets a fingerprint of its schema, tables and
    features only. ``structure`` is that vocabulary-free fingerprint, ``layout`` the same
    without table sizes (:func:`_layout`), and ``vocabularies`` the manifest's
    ``{feature: {size, digest}}``: what :func:`extension_problems` needs to prove that later
    data extends these vocabularies (and may have grown their tables)."""
    fp = manifest.get("fingerprint") or _structure(manifest)
    return {"fingerprint": fp, "tables": dict(manifest.get("tables", {})),
            "structure": _structure(manifest), "layout": _layout(manifest),
            "vocabularies": dict(manifest.get("vocabularies", {}))}


def _id_sources(manifest: dict) -> dict[str, set[str]]:
    """table -> the features whose vocabularies give its ids (a sequence feature's ids are
    its ``source``'s, from the manifest's job config)."""
    source = {f["name"]: f.get("source") or f["name"]
              for f in manifest.get("config", {}).get("features", [])
              if f.get("kind") == "sequence"}
    out: dict[str, set[str]] = {}
    for f in manifest.get("features", []):
        if f.get("table"):
            out.setdefault(f["table"], set()).add(source.get(f["name"], f["name"]))
    return out


def _table_problems(saved: dict, manifest: dict, grow: bool) -> list[str]:
    """Why the table sizes of ``manifest`` do not continue ``saved``'s: any change without
    ``grow``; with it, a table that shrank, or grew without every feature on it having a
    vocabulary at the checkpoint (only a vocabulary prefix proves the old ids kept their
    rows; :func:`extension_problems` checks the prefixes)."""
    old_t, new_t = saved.get("tables", {}), dict(manifest.get("tables", {}))
    changed = [t for t in sorted(set(old_t) | set(new_t)) if old_t.get(t) != new_t.get(t)]
    sizes = {t: f"table {t}: {old_t.get(t)} rows at the checkpoint, {new_t.get(t)} now"
             for t in changed}
    if not grow or saved.get("layout") != _layout(manifest):
        return [sizes[t] for t in changed] or ["same table sizes, other schema, features or "
                                               "hashing"]
    out, sources = [], _id_sources(manifest)
    for t in changed:
        if old_t.get(t) is None or new_t.get(t) is None or new_t[t] < old_t[t]:
            out.append(sizes[t] + " (only growth continues the ids)")
        elif missing := sorted(sources.get(t, {t}) - set(saved["vocabularies"])):
            out.append(sizes[t] + f" (grown, but {', '.join(missing)} had no vocabulary at "
                       f"the checkpoint to prove its ids kept their rows)")
    return out


def grown_tables(saved: dict | None, manifest: dict) -> dict[str, list[int]]:
    """``{table: [rows at the checkpoint, rows now]}`` for the tables of ``manifest`` larger
    than in ``saved`` (a checkpoint's :func:`data_identity`); ``{}`` without ``saved``. Only
    meaningful once :func:`check_same_data` with ``grow=True`` accepted the data."""
    old_t = (saved or {}).get("tables", {})
    return {t: [int(old_t[t]), int(n)] for t, n in sorted(manifest.get("tables", {}).items())
            if t in old_t and n > old_t[t]}


def extension_problems(saved: dict, manifest: dict, prepared_dir: str,
                       grow: bool = False) -> list[str]:
    """Why the prepared data (``manifest`` of ``prepared_dir``) does not continue the id
    mapping of ``saved`` (a checkpoint's :func:`data_identity`); empty when it does.

    Prefix-compatible: equal schema, table sizes, features and hashing, and every saved
    vocabulary of n values equal to the first n values of the same feature's vocabulary now
    (``prepared_dir/vocab/<feature>.parquet``, by :func:`vocab_digest`), so every id the
    checkpoint was trained on means the same raw value and new values only took free rows.
    ``grow``: tables may also be larger now (:func:`_table_problems`), as when a vocabulary
    outgrew the table (no ``capacity``, or a raised one); ids ``1..n`` still keep their rows.
    """
    if not saved.get("vocabularies") or "structure" not in saved:
        return ["the checkpoint records no vocabularies (written before vocab growth)"]
    out = [] if saved["structure"] == _structure(manifest) else \
        _table_problems(saved, manifest, grow)
    tables, old_t = {f["name"]: f.get("table") for f in manifest.get("features", [])}, \
        saved.get("tables", {})

    def on(name: str) -> str:  # the table a renumbered vocabulary's ids index
        t = tables.get(name)
        return (f"; table {t}: {old_t.get(t)} rows at the checkpoint, "
                f"{manifest.get('tables', {}).get(t)} now") if t else ""

    for name, v in sorted(saved["vocabularies"].items()):
        n, url = v["size"], storage.join(prepared_dir, "vocab", f"{name}.parquet")
        if not storage.exists(url):
            out.append(f"feature {name}: no vocabulary now")
            continue
        values = storage.read_parquet(url).sort_by("id")["value"].combine_chunks()
        if len(values) < n:
            out.append(f"feature {name}: {n} values at the checkpoint, {len(values)} now")
        elif vocab_digest(values.slice(0, n).take(pa.array(range(n)))) != v["digest"]:
            out.append(f"feature {name}: its first {n} values differ (renumbered){on(name)}")
    return out


def check_same_data(saved: dict | None, manifest: dict, checkpoint: str,
                    prepared_dir: str, grow: bool = False) -> str:
    """Stop when the prepared data changed since the checkpoint was written, unless it only
    extends the checkpoint's vocabularies (:func:`extension_problems`: ``dataset.vocab_from``
    with a ``capacity``, docs/data.md), or, with ``grow`` (warm start and resume, which load
    into larger tables: :func:`grown_tables`), extends them and grew their tables.

    ``saved``: the checkpoint meta's ``data`` (:func:`data_identity` at save time; None for a
    checkpoint written before fingerprints, which is not checked); ``manifest``: the prepared
    folder's manifest now. Returns ``"same"`` (or ``"unchecked"`` for ``saved=None``) or
    ``"extends"``.

    Raises:
        ValueError: the fingerprints differ and the data does not extend the checkpoint's;
            names the checkpoint, the prepared folder and each table or vocabulary that
            changed.
    """
    if not saved:
        return "unchecked"
    now = data_identity(manifest)
    if saved["fingerprint"] == now["fingerprint"]:
        return "same"
    problems = extension_problems(saved, manifest, prepared_dir, grow)
    if not problems:
        return "extends"
    old_t, new_t = saved.get("tables", {}), now["tables"]
    diff = [f"table {t}: {old_t.get(t)} rows at the checkpoint, {new_t.get(t)} now"
            for t in sorted(set(old_t) | set(new_t)) if old_t.get(t) != new_t.get(t)]
    raise ValueError(
        f"{checkpoint}: the prepared data in {prepared_dir} changed since this checkpoint was "
        f"written (manifest fingerprint {saved['fingerprint'][:12]} then, "
        f"{now['fingerprint'][:12]} now: " + ("; ".join(diff) if diff else
                                              "same table sizes, other vocabularies or schema")
        + "), so its ids would mean other things; prepare into another prepared_dir for the "
          "new data, or train afresh (without --resume / --warm-start); to continue on new "
          "data, prepare it with dataset.vocab_from (with a capacity per feature the tables "
          "keep their size; without, --warm-start and --resume grow them) (not a prefix: "
        + "; ".join(problems) + ")")


@dataclass
class Manifest:
    """What prepare wrote into a prepared folder (``manifest.json``), field for field.

    Counts are rows (int); ``seconds`` are wall-clock seconds per prepare stage. The JSON
    file's keys are these field names, in this order (:meth:`to_dict`).
    """

    name: str
    schema: dict[str, str]  # sample column -> Arrow type string
    features: list[dict]  # {name, kind, table, num_embeddings, pooling} per job feature
    tables: dict[str, int]  # embedding table -> rows (ids 0..n-1; 0 is padding/unknown)
    num_users: int
    num_items: int | None  # None without an items side table
    rows_read: int
    rows_used: int
    rows_rejected: int
    rejected_by_reason: dict[str, int]
    rows_remapped: int  # used with an unknown id / null list element mapped to 0 (oov)
    remapped_by_reason: dict[str, int]
    side_table_null_list_elements: dict[str, int]  # "<role>.<column>" -> rows
    hashing: dict[str, dict]  # feature -> collision report (encode.hash_collisions)
    empty_files: list[str]
    rows_per_split: dict[str, int]  # train / valid / test
    files_per_split: dict[str, dict[str, int]]  # split -> {file url: rows}
    input_files: dict[str, dict]  # events file -> {rows_read, rows_used, rejected, remapped}
    skipped_markers: list[str]
    side_tables: dict[str, dict]  # role -> {files, rows}
    dense_stats: dict[str, dict]  # feature -> {mean, std, missing_imputed} (train split)
    text_embeddings: dict
    seconds: dict[str, float]  # read_validate_join, sequences_split, shuffle_write_train, total
    config: dict  # the job config, JSON mode
    fingerprint: str = ""  # schema + tables + features + vocabularies (see fingerprint())
    #: "<users|items|events>.<feature>" -> rows whose value was null and is encoded as id 0
    #: (a scalar) or an empty list (a list); dense nulls are in dense_stats (missing_imputed)
    null_values: dict[str, int] = field(default_factory=dict)
    #: how the events files were read: {tasks, files, files_per_task: {min, max, mean},
    #: task_bytes, task_files, small_files, mean_file_bytes} (prepare/readtasks.py)
    read_tasks: dict = field(default_factory=dict)
    #: feature -> {size, digest} of each saved vocabulary (vocab/<feature>.parquet)
    vocabularies: dict[str, dict] = field(default_factory=dict)
    #: {vocab_from, features: {feature: {known, seen, new, oov_values, capacity, size,
    #: oov_rows}}} for features with a capacity or a previous vocabulary; {} otherwise
    vocab_growth: dict = field(default_factory=dict)
    #: a window prepare's edges and counts (prepare/windows.py): {index, num_windows,
    #: boundaries, cumulative, train, valid, test ([start, end) unix s), rows_before,
    #: rows_after (read, history only)}; {} without dataset.windows
    window: dict = field(default_factory=dict)
    #: dataset.negatives' settings and counts (prepare/negatives.py): {count, sampling, alpha,
    #: splits, seed, labels, pool_items, rows_per_split, dropped}; {} without negatives.
    #: rows_per_split above includes these rows; rows_used counts observed events only
    negatives: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The manifest as the JSON object stored on disk (a shallow dict of the fields)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def save(self, prepared_dir: str) -> None:
        """Write ``prepared_dir/manifest.json``."""
        storage.write_json(self.to_dict(), storage.join(prepared_dir, "manifest.json"))

    @classmethod
    def load(cls, prepared_dir: str) -> Manifest:
        """Read ``prepared_dir/manifest.json``.

        Raises:
            FileNotFoundError: the folder has no ``manifest.json`` (the message names it).
            TypeError: the file lacks a field or has one this class does not know (a manifest
                from another rectrain version: run ``rectrain prepare`` again).
        """
        return cls(**load_manifest(prepared_dir))


def read_split(prepared_dir: str, split: str, columns: list[str],
               negatives: bool = False) -> pa.Table | None:
    """``columns`` of a prepared split as one Arrow table (None when the split is absent or has
    no files), each file checked at the door (:func:`rectrain.data.door.read_checked`).
    Sampled negatives (``dataset.negatives``: rows with label 0 in a split that has them) are
    left out unless ``negatives``: histories, exclusions, popularity and truth are the
    observed events; evaluating a ranker on a split wants them.

    Raises:
        rectrain.data.door.PreparedDataError: a bad id or schema, naming file, column, row.
    """
    url = storage.join(prepared_dir, split)
    if not storage.exists(url):
        return None
    from rectrain.data.door import prepared_bounds, read_checked

    files, _ = storage.list_parquet_files(url)
    if not files:
        return None
    if negatives or split not in negative_splits(prepared_dir):
        return read_checked(files, columns, prepared_bounds(prepared_dir))
    t = read_checked(files, list(dict.fromkeys([*columns, LABEL])), prepared_bounds(prepared_dir))
    return t.filter(pc.greater_equal(t[LABEL], 0.5)).select(columns)


def negative_splits(prepared_dir: str) -> tuple[str, ...]:
    """Splits of a prepared folder that hold sampled negatives (``manifest.json``'s
    ``negatives.splits``; empty without a manifest or negatives)."""
    url = storage.join(prepared_dir, "manifest.json")
    if not storage.exists(url):
        return ()
    return tuple(storage.read_json(url).get("negatives", {}).get("splits", ()))
