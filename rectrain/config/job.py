"""The whole job (:class:`JobConfig`) and its cross-section rules, checked at validation."""

from __future__ import annotations

from pydantic import Field, model_validator

from rectrain.config.models import RETRIEVAL_MODELS, DinSpec, ModelSpec, check_model
from rectrain.config.zch import check_zch
from rectrain.config.sections import (RESERVED_COLUMNS, CheckpointSpec, DatasetSpec, FeatureSpec,
                                      OptimSpec, RaySpec, RecommendSpec, ShardingSpec,
                                      TrainSpec, _Model)


class JobConfig(_Model):
    """A whole job: data → prepared samples → training run → recommendations."""

    name: str
    prepared_dir: str = Field(description="fsspec URL where prepare writes samples + manifest")
    run_dir: str = Field(description="where train writes metrics, checkpoints, predictions")
    dataset: DatasetSpec
    features: list[FeatureSpec]
    model: ModelSpec = Field(default_factory=DinSpec,
                             description="one of the model sections below, chosen by name")
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()
    sharding: ShardingSpec = ShardingSpec()
    ray: RaySpec = RaySpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    recommend: RecommendSpec = RecommendSpec()

    @model_validator(mode="after")
    def _check_features(self) -> "JobConfig":
        names = [f.name for f in self.features]
        for i, n in enumerate(names):
            if n in RESERVED_COLUMNS or n.startswith("_"):
                raise ValueError(f"features.{i}.name: {n!r} is reserved for the samples' own "
                                 f"columns ({', '.join(RESERVED_COLUMNS)}, names starting with _)")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"features: duplicate feature names {sorted(dup)}")
        by_name = {f.name: f for f in self.features}
        for i, f in enumerate(self.features):
            at = f"features.{i}: feature {f.name!r}"
            if f.kind == "sequence":
                src = by_name.get(f.source)
                if src is None or src.kind != "sparse":
                    raise ValueError(f"{at}: a sequence's source must name a sparse feature, "
                                     f"got {f.source!r}")
                if src.table_name != f.table_name:
                    raise ValueError(f"{at}: must share table {src.table_name!r} with its "
                                     f"source feature (set table: {src.table_name})")
            if f.kind == "text_embedding":
                items = self.dataset.items
                if items is None:
                    raise ValueError(f"{at}: text_embedding needs dataset.items")
                if not any(g.kind == "sparse" and g.source == items.key and g.transform is None
                           for g in self.features):
                    raise ValueError(f"{at}: text_embedding needs a sparse feature with source "
                                     f"{items.key!r} (the item id)")
            if f.kind == "match":
                seq = by_name.get(f.source)
                if seq is None or seq.kind != "sequence":
                    raise ValueError(f"{at}: a match feature's source must name a sequence "
                                     f"feature (its candidate is that sequence's source), got "
                                     f"{f.source!r}")
                cat = by_name.get(f.category) if f.category else None
                if f.category and (cat is None or cat.kind not in ("sparse", "multi_hot")
                                   or self.dataset.items is None):
                    raise ValueError(f"{at}: category must name a sparse or multi_hot feature "
                                     f"of dataset.items, got {f.category!r}")
                if self.model.name in RETRIEVAL_MODELS:
                    raise ValueError(f"{at}: match features are for ranking models, not "
                                     f"{self.model.name}")
            if f.kind == "dense" and f.transform is not None and f.transform.prefix:
                raise ValueError(f"{at}: prefix transform on a dense feature")
        check_model(self)
        check_zch(self, RETRIEVAL_MODELS)
        tc = self.train
        if tc.min_workers is not None and tc.min_workers > tc.num_workers:
            raise ValueError(f"train.min_workers: {tc.min_workers} is more than train.num_workers "
                             f"({tc.num_workers})")
        if tc.min_workers is not None and tc.min_workers < tc.num_workers \
                and self.checkpoint.max_failures == 0:
            raise ValueError("train.min_workers: elastic training restarts the run after a lost "
                             "worker, which needs checkpoint.max_failures >= 1 (or -1)")
        return self
