"""Two-tower, SASRec and HSTU: the log-Q corrected in-batch softmax against its formula, forward
and backward on a tiny batch, SASRec's causal masking, and full-ranking evaluation on one rank."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from rectrain.config import config_from_dict, model_fields
from rectrain.data.features import FeatureLayout
from rectrain.models import build_model
from rectrain.models.sasrec import SASRec, right_align
from rectrain.models.two_tower import TwoTower, in_batch_softmax_loss
from tests.support.tiny import N_ITEMS, N_USERS, SEQ_LEN, tiny_job

TABLES = {"user_id": N_USERS + 1, "item": N_ITEMS + 1, "age_bucket": 8, "genres": 7}


def _layout(name: str, **model):
    """``model`` settings of the other retrieval model are dropped (each has its own fields)."""
    model = {k: v for k, v in model.items() if k in model_fields(name)}
    job = tiny_job("/tmp/unused", model={"name": name, "embedding_dim": 8, **model})
    cfg = config_from_dict(job)
    return cfg, FeatureLayout(cfg, {"tables": TABLES, "dense_stats": {}})


def _rows(n: int, seed: int = 0, lengths=None) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, SEQ_LEN + 1, n) if lengths is None else np.asarray(lengths)
    hist = [list(rng.integers(1, N_ITEMS + 1, k)) for k in lengths]
    genres = [list(rng.integers(1, 7, rng.integers(0, 3))) for _ in range(n)]
    return pa.table({
        "user_id": pa.array(rng.integers(1, N_USERS + 1, n), pa.int64()),
        "item_id": pa.array(rng.permutation(N_ITEMS)[:n] + 1, pa.int64()),
        "age_bucket": pa.array(rng.integers(1, 8, n), pa.int64()),
        "genres": pa.array(genres, pa.list_(pa.int64())),
        "hist_item_id": pa.array(hist, pa.list_(pa.int64())),
        "age": pa.array(rng.normal(size=n)),
        "label": pa.array(np.zeros(n, np.float32)),
    })


def test_in_batch_logq_softmax_matches_direct_formula():
    torch.manual_seed(0)
    u, v = torch.randn(4, 3), torch.randn(4, 3)
    ids = torch.tensor([7, 2, 7, 5])  # rows 0 and 2 hold the same item: accidental hit
    q = torch.tensor([0.5, 0.1, 0.5, 0.4])
    tau = 0.3
    loss = in_batch_softmax_loss(u, v, ids, tau, torch.log(q))
    direct = 0.0
    for i in range(4):
        terms = [math.exp(float(u[i] @ v[j]) / tau - math.log(float(q[j])))
                 for j in range(4) if j == i or ids[j] != ids[i]]
        pos = float(u[i] @ v[i]) / tau - math.log(float(q[i]))
        direct += -(pos - math.log(sum(terms)))
    assert float(loss) == pytest.approx(direct / 4, rel=1e-5)
    # without the correction it is the plain in-batch softmax (cross-entropy on the diagonal)
    plain = in_batch_softmax_loss(u, v, torch.arange(4), tau)
    ref = torch.nn.functional.cross_entropy(u @ v.t() / tau, torch.arange(4))
    assert float(plain) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("name", ["two_tower", "sasrec", "hstu"])
def test_forward_backward_tiny_batch(name):
    torch.manual_seed(0)
    cfg, layout = _layout(name, item_features=["genres"], tower_hidden=[16, 8], seq_layers=2,
                          seq_heads=2)
    model = build_model(layout, cfg.model)
    assert model.task == "retrieval"
    batch = layout.to_batch(_rows(12, lengths=[0] + [3] * 5 + [SEQ_LEN] * 6))
    u, v = model(batch)
    d = 8
    assert u.shape == v.shape == (12, d) and torch.isfinite(u).all() and torch.isfinite(v).all()
    if name == "two_tower":  # L2-normalised towers
        torch.testing.assert_close(u.norm(dim=1), torch.ones(12))
        torch.testing.assert_close(v.norm(dim=1), torch.ones(12))
    else:
        assert u[0].abs().sum() == 0  # empty history -> zero query
    ids = torch.from_numpy(batch.sparse["item_id"].values().numpy())
    loss = in_batch_softmax_loss(u, v, ids, model.temperature, torch.full((12,), -3.0))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert torch.isfinite(loss)
    table = next(p for n, p in model.named_parameters() if "embedding_weights.item" in n
                 or "embeddings.item" in n)
    g = table.grad
    assert g is not None and g[ids].abs().sum() > 0  # the batch's items got gradient
    dense = [n for n in grads if "embedding" not in n]
    assert dense and all(grads[n] is not None and torch.isfinite(grads[n]).all() for n in dense)


def test_sasrec_prediction_at_step_t_ignores_later_steps():
    torch.manual_seed(0)
    cfg, layout = _layout("sasrec", seq_layers=2, seq_heads=2, seq_dropout=0.0)
    model = SASRec(layout, cfg.model).eval()
    rows = _rows(3, lengths=[6, SEQ_LEN, 2])
    hist = rows["hist_item_id"].to_pylist()
    changed = [h[:] for h in hist]
    changed[0][4] = (changed[0][4] % N_ITEMS) + 1  # row 0 (6 items): change its 5th item
    rows2 = rows.set_column(rows.schema.get_field_index("hist_item_id"), "hist_item_id",
                            pa.array(changed, pa.list_(pa.int64())))
    with torch.no_grad():
        y = model.sequence_outputs(layout.to_batch(rows))
        y2 = model.sequence_outputs(layout.to_batch(rows2))
        u, _ = model(layout.to_batch(rows))
        u2, _ = model(layout.to_batch(rows2))
    L = SEQ_LEN
    # right-aligned: row 0's items sit at steps L-6 .. L-1; its 5th item is step L-2
    torch.testing.assert_close(y2[0, :L - 2], y[0, :L - 2])  # earlier steps unchanged
    assert (y2[0, L - 2:] - y[0, L - 2:]).abs().max() > 1e-4  # that step and later change
    torch.testing.assert_close(y2[1:], y[1:])  # other users untouched
    torch.testing.assert_close(u, y[:, -1])  # the query is the last step's output
    assert (u2[0] - u[0]).abs().max() > 1e-4


def test_right_align():
    x = torch.arange(1, 13, dtype=torch.float32).view(3, 4, 1)
    y, valid = right_align(x, torch.tensor([2, 0, 4]))
    assert y.squeeze(-1).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [9, 10, 11, 12]]
    assert valid.tolist() == [[False, False, True, True], [False] * 4, [True] * 4]


def test_item_features_are_checked():
    # checked when the config is validated (ConfigError is a ValueError), before any model
    with pytest.raises(ValueError, match="model.item_features.0: 'nope'"):
        cfg, layout = _layout("two_tower", item_features=["nope"])
        TwoTower(layout, cfg.model)
    with pytest.raises(ValueError, match="model.item_feature"):
        cfg, layout = _layout("sasrec", item_feature="user_id")
        SASRec(layout, cfg.model)


@pytest.mark.parametrize("name", ["two_tower", "sasrec", "hstu"])
def test_n_queries_limits_the_user_side(name):
    torch.manual_seed(0)
    cfg, layout = _layout(name, item_features=["genres"], tower_hidden=[16, 8], seq_dropout=0.0,
                          seq_max_len=4)
    model = build_model(layout, cfg.model).eval()
    batch = layout.to_batch(_rows(6, seed=3))
    with torch.no_grad():
        u, v = model(batch)
        u2, v2 = model(batch, n_queries=2)
        u0, v0 = model(batch, n_queries=0)
    assert u2.shape[0] == 2 and u0.shape[0] == 0
    torch.testing.assert_close(u2, u[:2])
    torch.testing.assert_close(v2, v)
    torch.testing.assert_close(v0, v)


def test_next_item_targets():
    from rectrain.models.sasrec import next_item_targets

    hist = pa.array([[5, 6, 7], [], [1, 2, 3, 4, 9]], pa.list_(pa.int64())).slice(0, 3)
    out = next_item_targets(hist, np.array([8, 3, 10]), steps=4)
    # right-aligned last 4 items; step s -> item at s + 1, last step -> the row's item
    assert out.tolist() == [[0, 6, 7, 8], [0, 0, 0, 0], [3, 4, 9, 10]]  # empty: no step
    # sliced arrays (non-zero offsets) work too
    assert next_item_targets(hist.slice(2, 1), np.array([10]), 2).tolist() == [[9, 10]]


def test_two_tower_puts_the_item_text_vector_in_the_item_tower(tmp_path):
    """A ``text_embedding`` feature is an item property: the candidate's vector feeds the item
    tower (a never-seen item still gets a content vector), never the user tower (which would see
    the very item it must retrieve); the history mean feeds the user tower."""
    import pyarrow.parquet as pq

    from tests.support.tiny import tiny_job as _job

    D = 4
    job = _job(str(tmp_path), model={"name": "two_tower", "embedding_dim": 8,
                                     "item_features": ["genres"], "tower_hidden": [16, 8]})
    job["features"].append({"name": "title_emb", "kind": "text_embedding", "source": "title",
                            "history": True})
    cfg = config_from_dict(job)
    (tmp_path / "prepared" / "catalog").mkdir(parents=True)
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(N_ITEMS, D)).astype(np.float32)
    pq.write_table(pa.table({"id": np.arange(1, N_ITEMS + 1), "vector": pa.FixedSizeListArray
                             .from_arrays(pa.array(vec.ravel()), D)}),
                   tmp_path / "prepared" / "catalog" / "text_title_emb.parquet")
    info = {"title_emb": {"dim": D, "item_feature": "item_id", "history_feature": "hist_item_id"}}
    layout = FeatureLayout(cfg, {"tables": TABLES, "dense_stats": {}, "text_embeddings": info})
    assert layout.dense_sides() == ([0, 1 + D, 2 + D, 3 + D, 4 + D], [1, 2, 3, 4])
    torch.manual_seed(0)
    model = build_model(layout, cfg.model).eval()
    rows = _rows(6, seed=1)
    rows = rows.append_column("title", pa.array(["t"] * 6))
    batch = layout.to_batch(rows)
    other = batch.dense.clone()
    other[:, 1:1 + D] = torch.randn(6, D)     # other candidate texts, same ids and history
    with torch.no_grad():
        u, v = model(batch)
        u2, v2 = model(type(batch)(dense=other, sparse=batch.sparse, labels=batch.labels,
                                   aux_labels=batch.aux_labels))
    torch.testing.assert_close(u2, u)          # the user tower does not see the candidate text
    assert not torch.allclose(v2, v)           # the item tower does
