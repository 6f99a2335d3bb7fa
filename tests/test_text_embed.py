"""text_embedding features: the Ray Data embedding stage equals the model's direct output, and
the vectors reach Batch.dense (candidate, history mean, cosine) with the right shape."""

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from rectrain.config import ConfigError, config_from_dict
from rectrain.data.features import FeatureLayout
from rectrain.data.prepare import prepare
from rectrain.data.text_embed import DIM, embed_texts, encode_texts, item_text, load_encoder
from rectrain.models.din import DIN
from tests.support.tiny import N_ITEMS, tiny_job, tiny_tables

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "", "Four Rooms (1995)", "Get Shorty (1995)"]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


def test_embedding_stage_matches_direct_model_output(ray_local, encoder):
    got = embed_texts(pa.array(TITLES), batch_size=2)  # 3 Ray Data batches, actor pool
    assert got.shape == (len(TITLES), DIM) and got.dtype == np.float32
    nonempty = [i for i, t in enumerate(TITLES) if t]
    np.testing.assert_allclose(np.linalg.norm(got[nonempty], axis=1), 1.0, atol=1e-5)
    direct = encoder.encode([TITLES[i] for i in nonempty], normalize_embeddings=True)
    np.testing.assert_allclose(got[nonempty], direct, atol=1e-5)
    assert not got[2].any()  # empty text -> zero vector
    # different films get different vectors
    assert float(got[0] @ got[1]) < 0.95


def test_item_text_joins_columns_and_nulls():
    t = pa.table({"title": ["A", None, "C"], "description": ["x y", "only desc", None]})
    assert item_text(t, ["title", "description"]).to_pylist() == ["A. x y", "only desc", "C"]
    with pytest.raises(KeyError, match="plot"):
        item_text(t, ["plot"])


def test_config_needs_an_item_id_feature(tmp_path):
    job = tiny_job(str(tmp_path))
    job["features"] = [f for f in job["features"] if f["source"] != "item_id"] + [
        {"name": "title_emb", "kind": "text_embedding", "source": "title"}]
    job["model"] = {**job["model"], "sequence_features": ["x"]}
    with pytest.raises(ConfigError, match="text_embedding needs a sparse feature"):
        config_from_dict(job)


def test_prepare_to_batch_dense_shape_and_values(tmp_path, ray_local, encoder):
    tables = tiny_tables(n_events=200)
    titles = [f"film number {i} about {'space' if i % 2 else 'love'}" for i in range(N_ITEMS)]
    titles[3] = None  # a missing title: zero vector, counted
    tables["items"] = tables["items"].append_column("title", pa.array(titles, pa.string()))
    for name, t in tables.items():
        (tmp_path / "raw" / name).mkdir(parents=True)
        pq.write_table(t, tmp_path / "raw" / name / "part-0.parquet")
    job = tiny_job(str(tmp_path))
    job["features"].append({"name": "title_emb", "kind": "text_embedding", "source": "title",
                            "history": True})
    cfg = config_from_dict(job)
    m = prepare(cfg)
    info = m["text_embeddings"]["title_emb"]
    assert info["items"] == N_ITEMS and info["empty_text"] == 1 and info["dim"] == DIM
    layout = FeatureLayout(cfg, m)
    rows = pads.dataset(str(tmp_path / "prepared" / "train")).to_table().slice(0, 40)
    batch = layout.to_batch(rows.select(layout.columns))
    # 1 z-normalised dense feature (age), then candidate [384], history mean [384], cosine [1]
    assert batch.dense.shape == (40, 1 + 2 * DIM + 1) == (40, layout.dense_dim)
    assert batch.dense.dtype == torch.float32
    # the candidate block is the model's vector of that row's item title (scaled by sqrt(D))
    item_raw = rows["_item"].to_numpy()
    idx = item_raw - 100  # tiny item ids are 100..149, in items-table order
    want = np.zeros((40, DIM), dtype=np.float32)
    has = np.array([titles[i] is not None for i in idx])
    want[has] = encode_texts(encoder, [titles[i] for i in idx[has]])
    cand = batch.dense[:, 1:1 + DIM].numpy() / np.sqrt(DIM)
    np.testing.assert_allclose(cand, want, atol=1e-5)
    # the history block is the mean of the history items' vectors
    hist = rows["hist_item_id"].to_pylist()
    mat = layout.text_matrix["title_emb"]
    for r in (0, 7, 39):
        exp = mat[hist[r]].mean(0) if hist[r] else np.zeros(DIM, np.float32)
        np.testing.assert_allclose(batch.dense[r, 1 + DIM:1 + 2 * DIM].numpy() / np.sqrt(DIM),
                                   exp, atol=1e-5)
    cos = batch.dense[:, -1].numpy()
    assert ((cos >= -1.0 - 1e-5) & (cos <= 1.0 + 1e-5)).all()
    # DIN takes it as dense input
    out = DIN(layout, cfg.model)(batch)
    assert out.shape == (40,) and torch.isfinite(out).all()
