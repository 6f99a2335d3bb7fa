"""The job sections other than ``model`` (dataset, features, optim, train, sharding, ray,
checkpoint, recommend), pydantic v2 models with ``extra="forbid"``: a misspelt key, a wrong
type or an out-of-range value is a validation error naming the dotted field."""

from __future__ import annotations

import re

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rectrain.config.zch import ZchSpec


#: column names of prepared samples that are not features (plus every name starting with "_")
RESERVED_COLUMNS = ("label", "label_value")


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


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str | int) -> int:
    """Seconds of ``"7d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` or a plain integer.

    Raises:
        ValueError: anything else, or a duration below one second (names
            ``dataset.windows.size``).
    """
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", str(text))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"dataset.windows.size: {text!r} is not a duration such as 7d, 12h, "
                         f"30m, 45s, 2w or a positive number of seconds")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


class WindowSpec(_Model):
    """Time windows of the event log (``dataset.windows``, docs/protocol.md): ``size`` (a
    duration such as ``7d``, ``12h``, or seconds) from ``start`` (unix s; default the first
    event's timestamp), or explicit ``boundaries`` (unix s, ascending: window i is
    ``[b_i, b_{i+1})``)."""

    size: Optional[str] = Field(None, description="window length: <n>s|m|h|d|w or seconds")
    start: Optional[int] = Field(None, description="start of window 0 (unix s); default the "
                                                   "first event's timestamp")
    boundaries: Optional[list[int]] = Field(None, min_length=2,
                                            description="explicit window edges (unix s)")
    valid_fraction: float = Field(0.5, ge=0.0, le=1.0, description="the first part of window "
                                  "N+1 (by time) that is valid; the rest is test")
    cumulative: bool = Field(False, description="train on windows 0..N, not window N alone")

    @model_validator(mode="after")
    def _size_or_boundaries(self) -> "WindowSpec":
        if (self.size is None) == (self.boundaries is None):
            raise ValueError("set exactly one of size, boundaries")
        if self.boundaries is not None and any(
                b >= c for b, c in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError("boundaries must be strictly ascending")
        if self.size is not None:
            parse_duration(self.size)
        return self


class SynthSource(_Model):
    """Sizes of a synthetic log written by ``rectrain synth`` (``dataset.source: synth``); see
    :class:`rectrain.data.sources.synth.SynthSpec` for the meaning and the other parameters."""

    events: int = Field(1_000_000, ge=1)
    users: int = Field(100_000, ge=1)
    items: int = Field(50_000, ge=1)
    files: Optional[int] = Field(None, ge=1)
    categories: int = Field(32, ge=1)
    seed: int = 0
    repeat: float = Field(0.0, ge=0, le=1, description="probability that an event re-buys an "
                          "earlier item of the user (rectrain.data.sources.synth_repeat)")
    item_churn: float = Field(0.0, ge=0, le=1, description="share of items born during the "
                              "log's window, with fading popularity (rectrain.data.sources."
                              "synth_churn)")
    item_half_life_days: float = Field(45.0, gt=0, description="item churn: popularity "
                                       "half-life after an item's birth, days")


#: default dataset.max_timestamp: 2100-01-01T00:00:00Z in unix seconds. Far enough ahead for any
#: real log, and below "unknown" sentinels (9999-12-31 = 253402214400) and unix milliseconds
#: (1.7e12 for 2024) read as seconds
MAX_TIMESTAMP = 4_102_444_800


class NegativesSpec(_Model):
    """Sampled negatives (``dataset.negatives``, docs/data.md#sampled-negatives): ``count``
    items the user has no event of are added as label-0 rows beside each event of ``splits``,
    sharing its behaviour sequence and context; every observed event becomes label 1."""

    count: int = Field(4, ge=1, description="negatives per observed event")
    sampling: Literal["uniform", "popularity"] = Field(
        "uniform", description="uniform over the items with events, or popularity^alpha")
    alpha: float = Field(0.75, ge=0.0, description="exponent of popularity sampling")
    splits: list[Literal["train", "valid", "test"]] = Field(
        ["train", "valid", "test"], min_length=1, description="splits that get negatives")
    seed: Optional[int] = Field(None, description="sampling seed; default train.seed")


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
    windows: Optional[WindowSpec] = Field(
        None, description="cut the log into time windows; with `window: N` prepare writes "
                          "train = window N, valid/test = window N+1 (docs/protocol.md)")
    window: Optional[int] = Field(None, ge=0, description="the window a prepare writes")
    negatives: Optional[NegativesSpec] = Field(
        None, description="add sampled negatives (implicit feedback: observed events label 1)")
    vocab_from: Optional[str] = Field(
        None, description="prepared folder, run directory or checkpoint whose vocabularies "
                          "this prepare extends (known values keep their ids; see docs/data.md)")
    on_invalid: Literal["error", "skip", "oov"] = Field(
        "error", description="bad rows: raise (naming file, column, row, value), skip and count, "
                             "or oov: map unknown ids and null list elements to id 0 (counted "
                             "as remapped) and skip and count the other bad rows"
    )
    min_id: Optional[int] = Field(0, description="integer user/item ids below this are invalid "
                                                 "(None: no lower bound)")
    max_id: Optional[int] = Field(None, description="integer user/item ids above this are invalid")
    min_timestamp: int = Field(0, description="timestamps (unix s) below this are invalid")
    max_timestamp: Optional[int] = Field(
        MAX_TIMESTAMP, description="timestamps (unix s) above this are invalid; default "
                                   "2100-01-01T00:00:00Z, which rejects sentinels such as "
                                   "9999-12-31 and milliseconds read as seconds (None: no "
                                   "upper bound)")

    @model_validator(mode="after")
    def _window_needs_windows(self) -> "DatasetSpec":
        if self.window is not None and self.windows is None:  # else silently the whole log
            raise ValueError(f"dataset.window: {self.window} is set but dataset.windows is not; "
                             f"add windows (e.g. windows: {{size: 7d}}) or remove window")
        return self

    @model_validator(mode="after")
    def _negatives_no_aux(self) -> "DatasetSpec":
        if self.negatives is not None and self.label.aux_thresholds:  # no rating to threshold
            raise ValueError("dataset.negatives: sampled negatives have no label value; set "
                             "dataset.label.aux_thresholds: []")
        return self


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
    :mod:`rectrain.data.text_embed`), ``match`` (whether, how often, how many events and how
    long ago the behaviour sequence ``source`` met the candidate item, or with ``category`` an
    item of its category: float32 dense ``[B, 3]``, see :mod:`rectrain.data.match`).
    Features with the same ``table`` share one embedding table (default: their own name).
    """

    name: str
    kind: Literal["sparse", "multi_hot", "sequence", "dense", "text_embedding", "match"]
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
    category: Optional[str] = Field(
        None, description="match: an item-side sparse or multi_hot feature; match the "
                          "candidate's category (any shared id) instead of the item itself")
    encoding: Literal["vocab", "hash", "zch"] = Field(
        "vocab", description="vocab: ids from the vocabulary built during prepare (exact, table "
                             "size = distinct values + 1); hash: 1 + stable hash mod hash_buckets "
                             "(unbounded id spaces, fixed table size, collisions counted); zch: "
                             "raw 63-bit hashed ids, remapped in the model by TorchRec's managed "
                             "collisions to `capacity` rows with eviction (docs/data.md)")
    hash_buckets: Optional[int] = Field(None, ge=1, description="table size - 1 for hash")
    capacity: Optional[int] = Field(
        None, ge=1, description="vocab: reserved rows (table size = capacity + 1, fixed "
                                "across prepares); values beyond it map to the OOV row 0, "
                                "counted in the manifest's vocab_growth (docs/data.md); "
                                "zch: the table's rows")
    zch: Optional[ZchSpec] = Field(None, description="encoding zch: eviction settings")

    @model_validator(mode="after")
    def _hash_needs_buckets(self) -> "FeatureSpec":
        if self.encoding == "hash" and self.hash_buckets is None:
            raise ValueError(f"feature {self.name!r}: encoding hash needs hash_buckets")
        if self.hash_buckets is not None and self.encoding != "hash":  # else silently unused
            raise ValueError(f"feature {self.name!r}: hash_buckets is for encoding hash, not "
                             f"{self.encoding}")
        if self.zch is not None and self.encoding != "zch":
            raise ValueError(f"feature {self.name!r}: zch settings are for encoding zch, not "
                             f"{self.encoding}")
        if self.encoding == "hash" and self.kind in ("dense", "sequence"):
            raise ValueError(f"feature {self.name!r}: encoding hash is for sparse/multi_hot "
                             f"features (a sequence uses its source feature's encoding)")
        if self.encoding == "zch" and (self.capacity is None or self.kind != "sparse"):
            raise ValueError(f"feature {self.name!r}: encoding zch is for sparse features and "
                             f"needs capacity (the table's rows)")
        if self.capacity is not None and (self.encoding not in ("vocab", "zch")
                                          or self.kind not in ("sparse", "multi_hot")):
            raise ValueError(f"feature {self.name!r}: capacity is for sparse/multi_hot features "
                             f"with encoding vocab or zch (a sequence uses its source's table)")
        return self

    @property
    def table_name(self) -> str:
        return self.table or self.name


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
    min_workers: Optional[int] = Field(
        None, ge=1, description="elastic training when < num_workers: after a node is lost, Ray "
                                "Train restarts the run on as many workers as still fit (at "
                                "least this many), from the latest checkpoint (needs "
                                "checkpoint.max_failures >= 1; docs/checkpoints.md)")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: Optional[bool] = Field(None, description="None: use GPUs when the cluster has them")
    seed: int = 0
    log_every: int = Field(20, ge=1, description="log a line every N steps")
    max_train_rows: Optional[int] = Field(
        None, ge=1, description="cap rows per worker and epoch (smoke runs, benchmarks): every "
                                "rank stops at the same step, ceil(cap / batch_size)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement group strategy for the workers (STRICT_SPREAD: one "
                            "worker per node)")
    gpus_per_worker: Optional[float] = Field(
        None, gt=0, description="GPUs per worker when GPUs are used (default 1)")
    memory_per_worker_gb: Optional[float] = Field(
        None, gt=0, description="memory per worker in GiB: reserved as a Ray logical resource "
                                "and the host-memory capacity per rank in TorchRec's sharding "
                                "planner (CPU tables must fit it, less a 15 % margin and the "
                                "dense/batch reservation; None: TorchRec's 128 GiB)")
    gpu_memory_gb: Optional[float] = Field(
        None, gt=0, description="HBM per GPU in GiB for the sharding planner (GPU tables must "
                                "fit it, less TorchRec's 15 % reservation; None: TorchRec's "
                                "32 GiB)")
    resources_per_worker: dict[str, float] = Field(
        {}, description="extra custom Ray resources per worker, e.g. {trainer_node: 1}")
    pipeline: Literal["plain", "sparse_dist"] = Field(
        "plain", description="sparse_dist: TorchRec's TrainPipelineSparseDist overlaps the next "
                             "batch's input distribution with this batch's compute")
    batch_timeout_s: Optional[float] = Field(
        600.0, gt=0, description="stop with an error when no input block arrives for this many "
                                 "seconds (e.g. Ray Data's read starved of CPUs on a cluster); "
                                 "None: wait forever")
    prefetch_batches: int = Field(
        0, ge=0, description="Arrow -> Batch conversions done ahead in a background thread "
                             "(0: inline). Off by default: on 2 cores with 2 workers the thread "
                             "competes with the step (DLRM -8 to -13 %, DIN -1 to +2 % in "
                             "paired benchmark runs); worth trying where cores idle, e.g. GPUs")
    input: Literal["ray_data", "files"] = Field(
        "ray_data", description="how the train split reaches the workers. ray_data: Ray Data's "
                                "read tasks and exact streaming split (reads can run on other "
                                "CPUs and nodes); files: each worker reads its own share of "
                                "the Parquet files, a new share each epoch "
                                "(rectrain.data.file_stream), which skips Ray Data's object "
                                "store and split coordinator but reads on the worker's cores "
                                "(checkpoint.every_n_steps' deterministic order, when set, "
                                "takes precedence over both)")


class ShardingSpec(_Model):
    """Sharding types offered to TorchRec's planner (table_wise, row_wise, column_wise) and the
    tables' weight precision."""

    types: list[Literal["table_wise", "row_wise", "column_wise"]] = Field(["table_wise"],
                                                                         min_length=1)
    embedding_dtype: Literal["fp32", "fp16"] = Field(
        "fp32", description="embedding weights' type in training (TorchRec table data_type; "
                            "FBGEMM's TBE stores fp16 rows and returns fp32 embeddings): fp16 "
                            "halves table memory; unsharded serving models load them as fp32")


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
    warm_start: Optional[str] = Field(
        None, description="a run directory (its best checkpoint, else its latest) or "
                          "checkpoint URL whose weights and optimiser state start this run; "
                          "epoch, step and best start afresh; the prepared data must equal or "
                          "extend the checkpoint's (docs/checkpoints.md)")
    max_failures: int = Field(0, ge=-1, description="Ray Train FailureConfig.max_failures: "
                                                    "worker-group restarts from the latest "
                                                    "checkpoint (-1: unlimited)")


class RecommendSource(_Model):
    """One candidate source of the two-stage mode (see rectrain/serve/candidates.py)."""

    name: Literal["retrieval", "popular", "recent"]
    count: Optional[int] = Field(None, ge=1, description="candidates per user from this source "
                                                          "(default: recommend.candidates)")


#: ``recommend.index_params`` names (rectrain/serve/index.py build_index)
INDEX_PARAMS = ("nlist", "nprobe", "m", "ef_search", "ef_construction", "threads",
                "items_per_block")


class RecommendSpec(_Model):
    """``rectrain recommend --config JOB.yaml``: top-k lists for every user (docs/recommend.md).

    ``brute_force`` scores every item with ``ranking_run``'s model (a ranking or a retrieval
    run); ``two_stage`` takes each user's candidates from ``sources`` (retrieval: an index over
    ``retrieval_run``'s item vectors) and scores only those with ``ranking_run``. Users go in
    blocks of ``users_per_block`` through a Ray Data actor pool (``actors``; 0: in this process,
    no Ray); one Parquet file per block under ``out``, a rerun skips finished blocks. A ranking
    model whose tables exceed ``actor_memory_gb`` is scored on its shards (``scoring``)."""

    mode: Literal["brute_force", "two_stage"] = "brute_force"
    retrieval_run: Optional[str] = Field(None, description="two-tower or SASRec run directory "
                                                           "or checkpoint folder")
    ranking_run: Optional[str] = Field(None, description="ranking run (DIN, DLRM, DCN-V2, BST, "
                                                         "AutoInt); default: run_dir")
    candidates: int = Field(200, ge=1, description="stage-1 candidates per user (N)")
    k: int = Field(10, ge=1, description="items per user in the final lists")
    exclude: Literal["none", "train", "all_seen"] = Field(
        "train", description="items never recommended: none; train: the user's train-split "
                             "events; all_seen: every event of the user's history (train, "
                             "valid, and test unless evaluate)")
    evaluate: bool = Field(
        True, description="hold the test split out: each user's history, exclusions and "
                          "popularity from train + valid only, and the lists scored against "
                          "the test events (recommend_metrics.json: HR/NDCG/recall@k, "
                          "coverage, Gini, popularity bias, beside most-popular); false: "
                          "lists from every event (production), no list metrics")
    reference: Optional[str] = Field(
        None, description="evaluate, two_stage: top_k.parquet of a brute-force run with the "
                          "same ranker; stage 1's recall of its top-k is reported")
    positives: Literal["label", "all"] = Field(
        "label", description="evaluate: the test events that count as relevant: label (label "
                             "1, e.g. rating >= 4) or all (every event: next-item protocols)")
    sources: list[RecommendSource] = Field(
        [RecommendSource(name="retrieval")], min_length=1,
        description="two_stage candidate sources in priority order (duplicates keep the first)")
    fallback: Literal["popular"] = Field(
        "popular", description="list for users with no train events (counted in the summary)")
    index: Literal["exact", "ivf", "hnsw"] = Field(
        "exact", description="retrieval index: exact blockwise matmul or faiss IVF / HNSW")
    index_params: dict[str, int] = Field(
        {}, description="nlist, nprobe (ivf); m, ef_search, ef_construction (hnsw); threads; "
                        "items_per_block (exact)")
    users_per_block: int = Field(1024, ge=1, description="users per block (and output file)")
    actors: int = Field(1, ge=0, description="Ray Data actors (each loads models and index "
                                             "once); 0: run in this process without Ray")
    in_process_pairs: int = Field(
        500_000, ge=0, description="run in this process without Ray, whatever actors says, "
                                   "when users x items scored per user (brute force: the "
                                   "catalogue; two_stage: the candidates; a retrieval run "
                                   "alone: k) is at most this: Ray's start-up and the actors' "
                                   "loading would cost more than they save; 0: never")
    explain: int = Field(0, ge=0, description="past items per recommendation that explain it")
    scoring: Literal["auto", "unsharded", "sharded"] = Field(
        "auto", description="how the ranking model is held: unsharded (one copy per process), "
                            "sharded (a Ray Train worker group with the training's sharding "
                            "plan, blocks divided among the ranks); auto: sharded when the "
                            "ranking tables' bytes exceed actor_memory_gb")
    actor_memory_gb: float = Field(
        8.0, gt=0, allow_inf_nan=False,
        description="auto: memory budget (GiB) of one scoring process for the ranking "
                    "model's embedding tables (finite; scoring: unsharded never shards)")
    workers: Optional[int] = Field(
        None, ge=1, description="sharded: ranks of the worker group (default: the ranking "
                                "run's train.num_workers)")
    out: Optional[str] = Field(None, description="output folder (default RUN_DIR/"
                                                 "recommendations)")

    @field_validator("workers", "actor_memory_gb", mode="before")
    @classmethod
    def _no_bool(cls, v):
        # pydantic's lax mode reads true / false as 1 / 0: a typo for a count or a budget
        if isinstance(v, bool):
            raise ValueError("expected a number, not a boolean")
        return v

    @model_validator(mode="after")
    def _check(self) -> "RecommendSpec":
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"recommend.sources: duplicate source in {names}")
        if self.mode == "two_stage" and "retrieval" in names and not self.retrieval_run:
            raise ValueError("recommend.retrieval_run: the retrieval source needs a run")
        for key, value in self.index_params.items():  # faiss aborts the process on some
            if key not in INDEX_PARAMS:
                raise ValueError(f"recommend.index_params.{key}: unknown parameter; known: "
                                 f"{', '.join(INDEX_PARAMS)}")
            low = 2 if key == "m" else 1
            if value < low:
                raise ValueError(f"recommend.index_params.{key}: {value} must be >= {low}")
        if self.workers is not None and self.scoring == "unsharded":
            raise ValueError(f"recommend.workers: {self.workers} sizes the sharded worker "
                             f"group, which scoring: unsharded never starts; drop it or set "
                             f"scoring: sharded / auto")
        if self.explain and self.scoring == "sharded":
            raise ValueError("recommend.explain: explanations read the unsharded model's "
                             "attention or item vectors; set explain: 0 or scoring: unsharded")
        return self
