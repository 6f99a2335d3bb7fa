"""The ``model`` section: one pydantic class per model, a discriminated union on ``model.name``.

Each class holds only the fields its model reads (shared ones in :class:`ModelBase`,
:class:`RankingBase`, :class:`RetrievalBase`), so a field of another model (``sasrec_all_steps``
on din) is an error naming ``model.<field>``. A ``model`` section without ``name`` is a din.
Rules that involve other sections (feature names, the split) are in :func:`check_model`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, PositiveInt, Tag

from rectrain.config.sections import _Model

RANKING_MODELS = ("din", "dlrm", "dcnv2", "bst", "autoint")
RETRIEVAL_MODELS = ("two_tower", "sasrec", "hstu")


class ModelBase(_Model):
    """Fields every model has (read by the shared front end and the training loop)."""

    name: str
    embedding_dim: int = Field(16, ge=1)
    sequence_features: list[str] = Field(
        ["hist_item_id"],
        description="behaviour sequences attended over; each one's source feature is the "
                    "matching part of the query (e.g. [hist_item_id, hist_genre] attends with "
                    "[item_id, genre], as DIN's goods + category ids). May be empty only for "
                    "dlrm (a Criteo-style job with no behaviour sequence)")
    loss: Literal["bce", "mse"] = Field(
        "bce", description="bce: binary label (AUC/logloss); mse: regression on the raw label "
                           "column `label_value`, e.g. the rating (RMSE/MAE). Retrieval models: "
                           "bce only (they train a softmax over items)")
    aux_weight: float = Field(1.0, ge=0.0, description="weight of the auxiliary heads' loss "
                                                       "(dataset.label.aux_thresholds)")


class RankingBase(ModelBase):
    """Ranking models: logits ``[B]`` (``[B, 1+K]`` with K auxiliary heads) from an MLP over the
    embeddings and a pooled or encoded behaviour history."""

    mlp_hidden: list[PositiveInt] = [200, 80]
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    sequence_encoder: Optional[Literal["mean", "cnn", "gru", "lstm", "transformer"]] = Field(
        None, description="history encoder: din adds its output next to target attention "
                          "(None: none); bst runs it over history + target (None: transformer); "
                          "dlrm/dcnv2/autoint pool the history with it (None: mean)")
    encoder_kernel: int = Field(3, ge=1, description="cnn sequence encoder kernel (steps)")
    attention_heads: int = Field(2, ge=1, description="heads of bst/autoint/transformer blocks")
    attention_layers: int = Field(1, ge=1, description="transformer blocks (bst/autoint)")


class DinSpec(RankingBase):
    """Deep Interest Network (Zhou et al., KDD 2018): target attention over the history."""

    name: Literal["din"] = "din"
    attention_hidden: list[PositiveInt] = Field([64, 32], description="target-attention MLP sizes")
    attention_activation: Literal["prelu", "dice"] = Field(
        "prelu", description="activation of the target-attention MLP (dice: the paper's Dice)")
    mlp_activation: Literal["prelu", "dice"] = Field(
        "prelu", description="activation of the top MLP (dice: the paper's Dice)")


class DlrmSpec(RankingBase):
    """DLRM (Naumov et al. 2019): bottom MLP on dense inputs, dot interaction, top MLP."""

    name: Literal["dlrm"] = "dlrm"
    bottom_mlp: list[PositiveInt] = Field([64], description="bottom MLP on dense features "
                                                     "(a last layer of embedding_dim is added)")


class Dcnv2Spec(RankingBase):
    """DCN-V2 (Wang et al., WWW 2021): cross network and deep MLP."""

    name: Literal["dcnv2"] = "dcnv2"
    cross_layers: int = Field(3, ge=1, description="cross layers")
    cross_rank: Optional[int] = Field(None, ge=1, description="low-rank W = U V^T")
    cross_structure: Literal["stacked", "parallel"] = Field(
        "parallel", description="cross then deep (stacked) or side by side (parallel)")


class BstSpec(RankingBase):
    """Behaviour Sequence Transformer (Chen et al., DLP-KDD 2019): history + target encoded."""

    name: Literal["bst"] = "bst"


class AutoIntSpec(RankingBase):
    """AutoInt (Song et al., CIKM 2019): self-attention over the feature fields."""

    name: Literal["autoint"] = "autoint"


class RetrievalBase(ModelBase):
    """Retrieval / next-item models: user and item vectors, evaluated by ranking the whole item
    corpus (leave-last-out split)."""

    loss: Literal["bce"] = Field("bce", description="unused: retrieval models train a softmax "
                                                    "over items (bce only)")
    item_feature: str = Field(
        "item_id", description="the target item's sparse feature; its table is the corpus "
                               "ranked in full at evaluation")
    retrieval_loss: Literal["in_batch", "full"] = Field(
        "in_batch", description="in_batch: sampled softmax over the batch's items with log-Q "
                                "correction (Yi et al. 2019); full: softmax over every item")
    logq_correction: bool = Field(True, description="in_batch: subtract log(item frequency)")


class TwoTowerSpec(RetrievalBase):
    """Two-tower retrieval (Yi et al., RecSys 2019)."""

    name: Literal["two_tower"] = "two_tower"
    user_features: Optional[list[str]] = Field(
        None, description="pooled features of the user tower (None: every pooled feature not "
                          "in item_features)")
    item_features: list[str] = Field(
        [], description="pooled item side features of the item tower (next to item_feature)")
    tower_hidden: list[PositiveInt] = Field([128, 64], min_length=1,
                                    description="tower MLP sizes; last = output dim")
    temperature: float = Field(0.05, gt=0, description="softmax temperature on the cosine "
                                                       "similarity of the two towers")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="tower MLP dropout")


class SasrecSpec(RetrievalBase):
    """SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item history."""

    name: Literal["sasrec"] = "sasrec"
    seq_layers: int = Field(2, ge=1, description="transformer blocks")
    seq_heads: int = Field(1, ge=1, description="attention heads")
    seq_dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout")
    sasrec_all_steps: bool = Field(
        False, description="train every history step to predict the next item (the paper's "
                           "objective; needs retrieval_loss: full), not only the last")
    seq_max_len: Optional[int] = Field(
        None, ge=1, description="attend over the last N history items only (None: "
                                "dataset.sequence_length)")


class HstuSpec(RetrievalBase):
    """HSTU (Zhai et al., ICML 2024, arXiv 2402.17152): pointwise aggregated (SiLU, no softmax)
    causal attention with a relative position (and, with time_bias, time) bias over the item
    history."""

    name: Literal["hstu"] = "hstu"
    seq_layers: int = Field(2, ge=1, description="HSTU layers")
    seq_heads: int = Field(1, ge=1, description="attention heads")
    seq_dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout (input and each "
                                                                "layer's output)")
    seq_max_len: Optional[int] = Field(
        None, ge=1, description="attend over the last N history items only (None: "
                                "dataset.sequence_length)")
    hstu_all_steps: bool = Field(
        False, description="train every history step to predict the next item (the paper's "
                           "autoregressive objective; needs retrieval_loss: full), not only "
                           "the last")
    hstu_qk_dim: Optional[int] = Field(None, ge=1, description="per-head width of Q and K "
                                                               "(None: embedding_dim / heads)")
    hstu_v_dim: Optional[int] = Field(None, ge=1, description="per-head width of U and V "
                                                              "(None: embedding_dim / heads)")
    temperature: Optional[float] = Field(
        None, gt=0, description="set: L2-normalise user and item vectors, logit = cosine / "
                                "temperature (the reference's setting, 0.05); None: dot product")
    time_bias: bool = Field(
        False, description="add the relative time bias: a learned scalar per bucket of "
                           "log|t_next - t_key| (needs _hist_ts in the prepared folder: prepare "
                           "with this setting on)")
    time_buckets: int = Field(128, ge=1, description="time_bias: log-time buckets "
                                                     "(the reference's 128)")


#: model name -> its config class
MODEL_SPECS: dict[str, type[ModelBase]] = {
    c.model_fields["name"].default: c
    for c in (DinSpec, DlrmSpec, Dcnv2Spec, BstSpec, AutoIntSpec, TwoTowerSpec, SasrecSpec,
              HstuSpec)}


def _model_tag(v: Any) -> Optional[str]:
    """The union's tag: ``name`` of a dict (missing: din) or of a spec object."""
    if isinstance(v, dict):
        return v.get("name", "din")
    return getattr(v, "name", None)


#: the ``model`` section: one of the classes in :data:`MODEL_SPECS`, chosen by ``name``
ModelSpec = Annotated[
    Union[tuple(Annotated[c, Tag(n)] for n, c in MODEL_SPECS.items())],
    Discriminator(_model_tag, custom_error_type="model_name",
                  custom_error_message=f"model.name: use one of {', '.join(MODEL_SPECS)}")]


def model_fields(name: str) -> set[str]:
    """Field names of model ``name``'s config class (KeyError for an unknown name)."""
    return set(MODEL_SPECS[name].model_fields)


def check_model(job) -> None:
    """The model's rules that involve other sections of ``job`` (a JobConfig).

    Raises:
        ValueError: ``"<dotted field>: <reason>"``, e.g. ``model.item_features.0: ...``.
    """
    m, feats = job.model, job.features
    by_name = {f.name: f for f in feats}
    if not m.sequence_features and m.name != "dlrm":
        raise ValueError(f"model.sequence_features: {m.name} needs at least one behaviour "
                         "sequence (only dlrm runs without one)")
    for i, fname in enumerate(m.sequence_features):
        if fname not in by_name:
            raise ValueError(f"model.sequence_features.{i}: no feature named {fname!r}")
        if by_name[fname].kind != "sequence":
            raise ValueError(f"model.sequence_features.{i}: {fname!r} is not a sequence")
    if not isinstance(m, RetrievalBase):
        return
    split = job.dataset.split
    if (split.test, split.valid) != (1, 1):
        raise ValueError(f"dataset.split: {m.name} is evaluated by full ranking with one "
                         f"held-out item per user; use {{test: 1, valid: 1}} (leave-last-out), "
                         f"got {{test: {split.test}, valid: {split.valid}}}")
    if job.dataset.negatives is not None:  # its loader would read sampled negatives as positives
        raise ValueError(f"dataset.negatives: {m.name} trains on observed events only (its "
                         "negatives are the other items of the softmax); remove "
                         "dataset.negatives (it is for ranking models)")
    # the same partition as rectrain.data.features.FeatureLayout (pooled vs sequence tables)
    seq_tables = {f.table_name for f in feats if f.kind == "sequence"}
    ids = [f for f in feats if f.kind not in ("dense", "text_embedding", "match")]
    pooled = [f.name for f in ids if f.table_name not in seq_tables]
    item = by_name.get(m.item_feature)
    if item is None or item.kind != "sparse" or item.table_name not in seq_tables:
        on_seq = sorted(f.name for f in ids if f.table_name in seq_tables)
        raise ValueError(f"model.item_feature: {m.item_feature!r} must be a sparse feature on "
                         f"the table of a behaviour sequence; sequence-table features: {on_seq}")
    hist = by_name[m.sequence_features[0]]
    if hist.table_name != item.table_name:
        raise ValueError(f"model.sequence_features.0: {hist.name!r} must share table "
                         f"{item.table_name!r} with model.item_feature {item.name!r}")
    if isinstance(m, TwoTowerSpec):
        for field in ("item_features", "user_features"):
            for i, n in enumerate(getattr(m, field) or []):
                if n not in pooled:
                    raise ValueError(f"model.{field}.{i}: {n!r} is not a pooled feature "
                                     f"(pooled: {pooled})")
                if n in (getattr(m, field) or [])[:i]:
                    raise ValueError(f"model.{field}.{i}: {n!r} is listed twice")
        both = set(m.item_features) & set(m.user_features or [])
        if both:
            raise ValueError(f"model.user_features: {sorted(both)} also in model.item_features "
                             f"(a feature belongs to one tower)")
    if isinstance(m, SasrecSpec) and m.sasrec_all_steps and m.retrieval_loss != "full":
        raise ValueError(f"model.sasrec_all_steps: true needs model.retrieval_loss: full "
                         f"(got {m.retrieval_loss})")
    if isinstance(m, HstuSpec) and m.hstu_all_steps and m.retrieval_loss != "full":
        raise ValueError(f"model.hstu_all_steps: true needs model.retrieval_loss: full "
                         f"(got {m.retrieval_loss})")
