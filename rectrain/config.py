"""Typed job configuration (pydantic v2), loaded from a YAML file in ``jobs/``.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key, a wrong type or an
out-of-range value raises :class:`ConfigError` whose message names the file and the dotted field
path (e.g. ``jobs/x.yaml: features.3.kind: Input should be 'sparse', 'multi_hot', ...``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


#: column names of prepared samples that are not features (plus every name starting with "_")
RESERVED_COLUMNS = ("label", "label_value")


class ConfigError(ValueError):
    """A job configuration is malformed; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class SideTable(_Model):
    """A side table (users or items) joined onto events by ``key``."""

    path: str = Field(description="fsspec URL of a Parquet file or folder")
    key: str = Field(description="column joined with the events' user or item column")


class LabelSpec(_Model):
    """How the binary label is derived from an events column.

    With ``threshold`` set, ``label = 1.0 if column >= threshold else 0.0``; without it, the
    column must already hold 0/1 values (anything else is rejected).
    """

    column: str
    threshold: Optional[float] = None
    aux_thresholds: list[float] = Field(
        [], description="extra targets column >= t for each t, trained as auxiliary BCE heads "
                        "(ordinal multi-task); metrics and predictions use `threshold` only")

    @model_validator(mode="after")
    def _aux_needs_threshold(self) -> "LabelSpec":
        if self.aux_thresholds and self.threshold is None:
            raise ValueError("aux_thresholds need a threshold label")
        return self


class SplitSpec(_Model):
    """Chronological per-user split: the last ``test`` events of each user go to test, the
    ``valid`` events before them to valid, the rest to train."""

    test: int = Field(10, ge=0)
    valid: int = Field(10, ge=0)


class SynthSource(_Model):
    """Sizes of a synthetic log written by ``rectrain synth`` (``dataset.source: synth``); see
    :class:`rectrain.data.sources.synth.SynthSpec` for the meaning and the other parameters."""

    events: int = Field(1_000_000, ge=1)
    users: int = Field(100_000, ge=1)
    items: int = Field(50_000, ge=1)
    files: Optional[int] = Field(None, ge=1)
    categories: int = Field(32, ge=1)
    seed: int = 0


class DatasetSpec(_Model):
    """Where the raw behaviour logs are and which columns mean what."""

    source: Optional[Literal["movielens-100k", "synth"]] = Field(
        None, description="adapter that writes the raw logs below when they are missing"
    )
    synth: Optional[SynthSource] = Field(None, description="sizes for source: synth")
    events: str = Field(description="fsspec URL of the events Parquet file or folder")
    users: Optional[SideTable] = None
    items: Optional[SideTable] = None
    user_column: str = "user_id"
    item_column: str = "item_id"
    timestamp_column: str = "timestamp"
    label: LabelSpec
    sequence_length: int = Field(50, ge=1, description="max behaviour-sequence length")
    split: SplitSpec = SplitSpec()
    on_invalid: Literal["error", "skip", "oov"] = Field(
        "error", description="bad rows: raise (naming file, column, row, value), skip and count, "
                             "or oov: map unknown ids and null list elements to id 0 (counted "
                             "as remapped) and skip and count the other bad rows"
    )
    min_id: Optional[int] = Field(0, description="integer user/item ids below this are invalid "
                                                 "(None: no lower bound)")
    max_id: Optional[int] = Field(None, description="integer user/item ids above this are invalid")
    min_timestamp: int = Field(0, description="timestamps (unix s) below this are invalid")
    max_timestamp: Optional[int] = Field(None, description="timestamps above this are invalid")


class Transform(_Model):
    """A vectorised transform applied to a source column before encoding (exactly one field)."""

    floor_div: Optional[int] = Field(None, ge=1, description="integer division, e.g. age // 10")
    prefix: Optional[int] = Field(None, ge=1, description="first N characters of a string")
    year: bool = Field(False, description="calendar year of a date/timestamp; null -> 0")
    first: bool = Field(False, description="first element of a list column; empty -> null")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Transform":
        n = sum([self.floor_div is not None, self.prefix is not None, bool(self.year),
                 bool(self.first)])
        if n != 1:
            raise ValueError("set exactly one of floor_div, prefix, year, first")
        return self


class FeatureSpec(_Model):
    """One model input.

    kinds: ``sparse`` (one categorical id per sample), ``multi_hot`` (a list column, pooled),
    ``sequence`` (the user's behaviour sequence of another feature's ids, most recent last;
    ``source`` names that feature), ``dense`` (a numeric column, z-normalised with train stats),
    ``text_embedding`` (an items-table text column embedded by a sentence-embedding model in
    prepare; a float32 ``[B, 384]`` dense input for the candidate item, see
    :mod:`rectrain.data.text_embed`).
    Features with the same ``table`` share one embedding table (default: their own name).
    """

    name: str
    kind: Literal["sparse", "multi_hot", "sequence", "dense", "text_embedding"]
    source: str
    table: Optional[str] = None
    transform: Optional[Transform] = None
    pooling: Literal["sum", "mean"] = "sum"
    extra_sources: list[str] = Field(
        [], description="text_embedding: more item text columns, joined to source with '. '")
    history: bool = Field(
        False, description="text_embedding: also the mean vector of the behaviour-sequence "
                           "items and its cosine with the candidate's (see rectrain.data."
                           "text_embed.text_dense)")
    encoding: Literal["vocab", "hash"] = Field(
        "vocab", description="vocab: ids from the vocabulary built during prepare (exact, table "
                             "size = distinct values + 1); hash: 1 + stable hash mod hash_buckets "
                             "(unbounded id spaces, fixed table size, collisions counted)")
    hash_buckets: Optional[int] = Field(None, ge=1, description="table size - 1 for hash")

    @model_validator(mode="after")
    def _hash_needs_buckets(self) -> "FeatureSpec":
        if self.encoding == "hash" and self.hash_buckets is None:
            raise ValueError(f"feature {self.name!r}: encoding hash needs hash_buckets")
        if self.encoding == "hash" and self.kind in ("dense", "sequence"):
            raise ValueError(f"feature {self.name!r}: encoding hash is for sparse/multi_hot "
                             f"features (a sequence uses its source feature's encoding)")
        return self

    @property
    def table_name(self) -> str:
        return self.table or self.name


class ModelSpec(_Model):
    """Model choice and sizes. ``din``: Deep Interest Network (Zhou et al., KDD 2018)."""

    name: Literal["din", "dlrm", "dcnv2", "bst", "autoint", "two_tower", "sasrec"] = "din"
    embedding_dim: int = Field(16, ge=1)
    sequence_features: list[str] = Field(
        ["hist_item_id"],
        description="behaviour sequences attended over; each one's source feature is the "
                    "matching part of the query (e.g. [hist_item_id, hist_genre] attends with "
                    "[item_id, genre], as DIN's goods + category ids). May be empty only for "
                    "dlrm (a Criteo-style job with no behaviour sequence)")
    # ---- retrieval / next-item models (two_tower, sasrec: rectrain/models/{two_tower,sasrec}.py,
    # trained by rectrain/train/retrieval.py)
    item_feature: str = Field(
        "item_id", description="two_tower/sasrec: the target item's sparse feature; its table "
                               "is the corpus ranked in full at evaluation")
    user_features: Optional[list[str]] = Field(
        None, description="two_tower: pooled features of the user tower (None: every pooled "
                          "feature not in item_features)")
    item_features: list[str] = Field(
        [], description="two_tower: pooled item side features of the item tower (next to "
                        "item_feature)")
    tower_hidden: list[int] = Field([128, 64], min_length=1,
                                    description="two_tower: tower MLP sizes; last = output dim")
    temperature: float = Field(0.05, gt=0, description="two_tower: softmax temperature on the "
                                                       "cosine similarity of the two towers")
    retrieval_loss: Literal["in_batch", "full"] = Field(
        "in_batch", description="in_batch: sampled softmax over the batch's items with log-Q "
                                "correction (Yi et al. 2019); full: softmax over every item")
    logq_correction: bool = Field(True, description="in_batch: subtract log(item frequency)")
    seq_layers: int = Field(2, ge=1, description="sasrec: transformer blocks")
    seq_heads: int = Field(1, ge=1, description="sasrec: attention heads")
    seq_dropout: float = Field(0.2, ge=0.0, lt=1.0, description="sasrec: dropout")
    sasrec_all_steps: bool = Field(
        False, description="sasrec: train every history step to predict the next item (the "
                           "paper's objective; needs retrieval_loss: full), not only the last")
    seq_max_len: Optional[int] = Field(
        None, ge=1, description="sasrec: attend over the last N history items only (None: "
                                "dataset.sequence_length)")
    attention_hidden: list[int] = [64, 32]
    mlp_hidden: list[int] = [200, 80]
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    aux_weight: float = Field(1.0, ge=0.0, description="weight of the auxiliary heads' loss")
    # ---- ranking model zoo (rectrain/models/zoo.py)
    loss: Literal["bce", "mse"] = Field(
        "bce", description="bce: binary label (AUC/logloss); mse: regression on the raw label "
                           "column `label_value`, e.g. the rating (RMSE/MAE)")
    sequence_encoder: Optional[Literal["mean", "cnn", "gru", "lstm", "transformer"]] = Field(
        None, description="history encoder: din adds its output next to target attention "
                          "(None: none); bst runs it over history + target (None: transformer); "
                          "dlrm/dcnv2/autoint pool the history with it (None: mean)")
    encoder_kernel: int = Field(3, ge=1, description="cnn sequence encoder kernel (steps)")
    attention_heads: int = Field(2, ge=1, description="heads of bst/autoint/transformer blocks")
    attention_layers: int = Field(1, ge=1, description="transformer blocks (bst/autoint)")
    bottom_mlp: list[int] = Field([64], description="dlrm: bottom MLP on dense features "
                                                     "(a last layer of embedding_dim is added)")
    cross_layers: int = Field(3, ge=1, description="dcnv2: cross layers")
    cross_rank: Optional[int] = Field(None, ge=1, description="dcnv2: low-rank W = U V^T")
    cross_structure: Literal["stacked", "parallel"] = Field(
        "parallel", description="dcnv2: cross then deep (stacked) or side by side (parallel)")


class OptimSpec(_Model):
    """Dense parameters: Adam/AdamW. Sparse (embedding) parameters: a fused optimiser applied in
    backward (TorchRec ``apply_optimizer_in_backward``)."""

    dense: Literal["adam", "adamw", "sgd"] = "adam"
    dense_lr: float = Field(1e-3, gt=0)
    dense_weight_decay: float = Field(0.0, ge=0)
    sparse: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: float = Field(0.05, gt=0)
    sparse_weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="decay of both learning rates over the planned steps")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")


class TrainSpec(_Model):
    """Training loop settings; sizes in samples (global batch = batch_size * num_workers)."""

    batch_size: int = Field(1024, ge=1, description="per-worker batch size (samples)")
    eval_batch_size: int = Field(4096, ge=1)
    epochs: int = Field(5, ge=1)
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: Optional[bool] = Field(None, description="None: use GPUs when the cluster has them")
    seed: int = 0
    log_every: int = Field(20, ge=1, description="log a line every N steps")
    max_train_rows: Optional[int] = Field(None, ge=1, description="cap rows per epoch (smoke runs)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement group strategy for the workers (STRICT_SPREAD: one "
                            "worker per node)")
    gpus_per_worker: Optional[float] = Field(
        None, gt=0, description="GPUs per worker when GPUs are used (default 1)")
    memory_per_worker_gb: Optional[float] = Field(
        None, gt=0, description="memory reserved per worker in GiB (Ray logical resource)")
    resources_per_worker: dict[str, float] = Field(
        {}, description="extra custom Ray resources per worker, e.g. {trainer_node: 1}")
    pipeline: Literal["plain", "sparse_dist"] = Field(
        "plain", description="sparse_dist: TorchRec's TrainPipelineSparseDist overlaps the next "
                             "batch's input distribution with this batch's compute")
    prefetch_batches: int = Field(
        0, ge=0, description="Arrow -> Batch conversions done ahead in a background thread "
                             "(0: inline). Off by default: on 2 cores with 2 workers the thread "
                             "competes with the step (DLRM -8 to -13 %, DIN -1 to +2 % in "
                             "paired benchmark runs); worth trying where cores idle, e.g. GPUs")


class ShardingSpec(_Model):
    """Sharding types offered to TorchRec's planner (table_wise, row_wise, column_wise)."""

    types: list[Literal["table_wise", "row_wise", "column_wise"]] = ["table_wise"]


class RaySpec(_Model):
    """Where to run. ``address`` None starts an embedded local Ray with ``num_cpus`` logical CPUs
    = workers * cpus_per_worker + data_cpus, so Ray Data always has CPUs left to read with."""

    address: Optional[str] = None
    data_cpus: float = Field(2.0, gt=0)


class CheckpointSpec(_Model):
    """Periodic, atomic checkpoints under ``run_dir/checkpoints/step-<N>`` (the best-validation
    checkpoint stays in ``run_dir/checkpoint``), resume and Ray Train failure handling."""

    every_n_steps: Optional[int] = Field(
        None, ge=1, description="also checkpoint every N global steps; turns on the "
                                "deterministic train order so a resume continues mid-epoch "
                                "at the exact row (see rectrain/data/order.py)")
    at_epoch_end: bool = Field(True, description="checkpoint after each epoch's validation")
    keep_last: int = Field(2, ge=1, description="periodic checkpoints kept (older deleted)")
    resume: Optional[str] = Field(
        None, description="'latest' (newest complete checkpoint of run_dir), a checkpoint "
                          "URL, or 'auto' (latest if any, else a fresh start); None: fresh")
    max_failures: int = Field(0, ge=-1, description="Ray Train FailureConfig.max_failures: "
                                                    "worker-group restarts from the latest "
                                                    "checkpoint (-1: unlimited)")


class JobConfig(_Model):
    """A whole job: data → prepared samples → training run → recommendations."""

    name: str
    prepared_dir: str = Field(description="fsspec URL where prepare writes samples + manifest")
    run_dir: str = Field(description="where train writes metrics, checkpoints, predictions")
    dataset: DatasetSpec
    features: list[FeatureSpec]
    model: ModelSpec = ModelSpec()
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()
    sharding: ShardingSpec = ShardingSpec()
    ray: RaySpec = RaySpec()
    checkpoint: CheckpointSpec = CheckpointSpec()

    @model_validator(mode="after")
    def _check_features(self) -> "JobConfig":
        names = [f.name for f in self.features]
        for i, n in enumerate(names):
            if n in RESERVED_COLUMNS or n.startswith("_"):
                raise ValueError(f"features.{i}.name: {n!r} is reserved for the samples' own "
                                 f"columns ({', '.join(RESERVED_COLUMNS)}, names starting with _)")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate feature names {sorted(dup)}")
        by_name = {f.name: f for f in self.features}
        for f in self.features:
            if f.kind == "sequence":
                src = by_name.get(f.source)
                if src is None or src.kind != "sparse":
                    raise ValueError(
                        f"feature {f.name!r}: a sequence's source must name a sparse feature, "
                        f"got {f.source!r}"
                    )
                if src.table_name != f.table_name:
                    raise ValueError(
                        f"feature {f.name!r}: must share table {src.table_name!r} with its "
                        f"source feature (set table: {src.table_name})"
                    )
            if f.kind == "text_embedding":
                items = self.dataset.items
                if items is None:
                    raise ValueError(f"feature {f.name!r}: text_embedding needs dataset.items")
                if not any(g.kind == "sparse" and g.source == items.key and g.transform is None
                           for g in self.features):
                    raise ValueError(f"feature {f.name!r}: text_embedding needs a sparse "
                                     f"feature with source {items.key!r} (the item id)")
            if f.kind == "dense" and f.transform is not None and f.transform.prefix:
                raise ValueError(f"feature {f.name!r}: prefix transform on a dense feature")
        if not self.model.sequence_features and self.model.name != "dlrm":
            raise ValueError(f"model.sequence_features: {self.model.name} needs at least one "
                             "behaviour sequence (only dlrm runs without one)")
        for i, fname in enumerate(self.model.sequence_features):
            if fname not in by_name:
                raise ValueError(f"model.sequence_features.{i}: no feature named {fname!r}")
            if by_name[fname].kind != "sequence":
                raise ValueError(f"model.sequence_features.{i}: {fname!r} is not a sequence")
        return self


def _resolve(value: str, base: Path) -> str:
    if "://" in value or os.path.isabs(value):
        return value
    return str((base / value).resolve())


def load_config(path: str | os.PathLike, overrides: Optional[dict] = None) -> JobConfig:
    """Load and validate a job YAML.

    Relative paths in the file (dataset, prepared_dir, run_dir) are resolved against the current
    directory (or ``$RECTRAIN_BASE_DIR`` when set, as in the cluster image). ``overrides`` is a
    nested dict merged over the YAML (used by the CLI and tests).

    Raises:
        ConfigError: the file is missing, is not YAML, or a field is invalid (message names the
            file and the dotted field path).
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    if overrides:
        raw = _deep_merge(raw, overrides)
    return config_from_dict(raw, source=str(p))


def config_from_dict(raw: dict, source: str = "<dict>") -> JobConfig:
    """Validate a config dict; raises :class:`ConfigError` naming ``source`` and the field."""
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<root>"
            lines.append(f"{source}: {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    # RECTRAIN_BASE_DIR: where relative paths resolve on cluster nodes whose shared storage is
    # mounted at a fixed place (cluster/Dockerfile); default the current directory
    base = Path(os.environ.get("RECTRAIN_BASE_DIR") or Path.cwd())
    cfg.prepared_dir = _resolve(cfg.prepared_dir, base)
    cfg.run_dir = _resolve(cfg.run_dir, base)
    ds = cfg.dataset
    ds.events = _resolve(ds.events, base)
    for side in (ds.users, ds.items):
        if side is not None:
            side.path = _resolve(side.path, base)
    return cfg


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
