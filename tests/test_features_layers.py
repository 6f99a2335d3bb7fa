"""Arrow -> KeyedJaggedTensor conversion, DIN attention masking, and the DIN forward pass."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from rectrain.data.features import FeatureLayout
from rectrain.data.loader import padding_table, rebatch
from rectrain.models import build_model
from rectrain.models.layers import Dice, TargetAttention
from tests.support.tiny import N_GENRES, N_ITEMS, N_USERS, tiny_cfg

MANIFEST = {"tables": {"user_id": N_USERS + 1, "item": N_ITEMS + 1, "age_bucket": 8,
                       "genres": N_GENRES + 1},
            "dense_stats": {"age": {"mean": 40.0, "std": 10.0}}}


def _table():
    return pa.table({
        "user_id": [3, 4, 5], "item_id": [7, 8, 9],
        "hist_item_id": pa.array([[1, 2], [], [3, 4, 5]], pa.list_(pa.int64())),
        "age_bucket": [1, 2, 3],
        "genres": pa.array([[1], [2, 3], []], pa.list_(pa.int64())),
        "age": [30.0, 50.0, 40.0], "label": pa.array([1, 0, 1], pa.float32()),
    })


def test_layout_groups_tables(tmp_path):
    lay = FeatureLayout(tiny_cfg(str(tmp_path)), MANIFEST)
    assert [t.name for t in lay.ec_tables()] == ["item"]
    assert lay.ec_tables()[0].feature_names == ["item_id", "hist_item_id"]
    assert {t.name for t in lay.ebc_tables()} == {"user_id", "age_bucket", "genres"}
    assert lay.sparse_keys == ["user_id", "age_bucket", "genres", "item_id", "hist_item_id"]


def test_to_batch_builds_kjt_from_offsets(tmp_path):
    lay = FeatureLayout(tiny_cfg(str(tmp_path)), MANIFEST)
    b = lay.to_batch(_table().slice(1, 2))  # a slice: offsets do not start at 0
    kjt = b.sparse
    assert kjt.keys() == lay.sparse_keys
    d = kjt.to_dict()
    assert d["hist_item_id"].lengths().tolist() == [0, 3]
    assert d["hist_item_id"].values().tolist() == [3, 4, 5]
    assert d["genres"].lengths().tolist() == [2, 0]
    assert d["genres"].values().tolist() == [2, 3]
    assert d["user_id"].values().tolist() == [4, 5]
    assert kjt.values().dtype == torch.int64
    assert b.dense.dtype == torch.float32 and b.dense.shape == (2, 1)
    assert b.dense[:, 0].tolist() == pytest.approx([1.0, 0.0])  # (x - 40) / 10
    assert b.labels.tolist() == [0.0, 1.0]


def test_to_batch_names_missing_column(tmp_path):
    lay = FeatureLayout(tiny_cfg(str(tmp_path)), MANIFEST)
    with pytest.raises(KeyError, match="genres"):
        lay.to_batch(_table().drop_columns(["genres"]))


def test_rebatch_exact_sizes_and_no_row_lost():
    tables = [pa.table({"x": np.arange(a, b)}) for a, b in [(0, 103), (103, 200), (200, 255),
                                                              (255, 264), (264, 265)]]
    sizes = [t.num_rows for t in rebatch(tables, 32, drop_last=False)]
    assert sizes[:-1] == [32] * (len(sizes) - 1) and sum(sizes) == 265
    got = np.concatenate([t["x"].to_numpy() for t in rebatch(tables, 32, False)])
    assert got.tolist() == list(range(265))
    assert sum(t.num_rows for t in rebatch(tables, 32, drop_last=True)) == 256


def test_padding_rows_match_schema(tmp_path):
    lay = FeatureLayout(tiny_cfg(str(tmp_path)), MANIFEST)
    pad = padding_table(_table().schema, 4)
    b = lay.to_batch(pa.concat_tables([_table(), pad]))
    assert b.batch_size == 7
    assert b.sparse.to_dict()["hist_item_id"].lengths().tolist()[3:] == [0, 0, 0, 0]


@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_target_attention_ignores_padding_and_handles_empty(activation):
    torch.manual_seed(0)
    att = TargetAttention(4, [8], activation=activation)
    q = torch.randn(3, 4)
    keys = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out, w = att(q, keys, mask)
    keys2 = keys.clone()
    keys2[~mask] = 1e6  # garbage in the padded steps must not leak through
    out2, w2 = att(q, keys2, mask)
    assert torch.allclose(out, out2) and torch.all(w2[~mask] == 0)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()
    # pooled = sum_t w_t k_t over valid steps (the DIN formula, no softmax)
    assert torch.allclose(out[0], (w[0, :2, None] * keys[0, :2]).sum(0), atol=1e-6)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in att.parameters())


def test_dice_matches_the_paper_formula():
    """Zhou et al. 2018 eq. 9: p = sigmoid((s - E[s]) / sqrt(Var[s] + eps)), f = p s + (1-p) a s,
    batch statistics in training, running ones in eval."""
    torch.manual_seed(0)
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.0, 0.5, -1.0]))
    x = torch.randn(64, 5, 3) * 2 + 1  # [B, L, H]: statistics over all B * L positions
    s = x.reshape(-1, 3)
    p = torch.sigmoid((x - s.mean(0)) / torch.sqrt(s.var(0, unbiased=False) + 1e-8))
    assert torch.allclose(dice(x), p * x + (1 - p) * dice.alpha * x, atol=1e-5)
    dice.eval()
    rm, rv = dice.bn.running_mean, dice.bn.running_var
    p = torch.sigmoid((x - rm) / torch.sqrt(rv + 1e-8))
    assert torch.allclose(dice(x), p * x + (1 - p) * dice.alpha * x, atol=1e-5)


def test_din_dice_option_and_prelu_default(tmp_path):
    cfg = tiny_cfg(str(tmp_path))
    lay = FeatureLayout(cfg, MANIFEST)
    assert not any(isinstance(m, Dice) for m in build_model(lay, cfg.model).modules())
    spec = cfg.model.model_copy(update={"attention_activation": "dice", "mlp_activation": "dice"})
    model = build_model(lay, spec)
    assert sum(isinstance(m, Dice) for m in model.modules()) == (
        len(spec.attention_hidden) + len(spec.mlp_hidden))
    logits, weights = model.forward_with_attention(lay.to_batch(_table()))
    assert logits.shape == (3,) and torch.isfinite(logits).all() and torch.all(weights[1] == 0)
    logits.sum().backward()


def test_din_forward_shapes_and_empty_history(tmp_path):
    cfg = tiny_cfg(str(tmp_path))
    lay = FeatureLayout(cfg, MANIFEST)
    model = build_model(lay, cfg.model)
    logits, weights = model.forward_with_attention(lay.to_batch(_table()))
    assert logits.shape == (3,) and weights.shape == (3, cfg.dataset.sequence_length)
    assert torch.isfinite(logits).all()
    assert torch.all(weights[1] == 0)  # row 1 has an empty history
    assert torch.all(weights[0, 2:] == 0) and torch.all(weights[2, 3:] == 0)
