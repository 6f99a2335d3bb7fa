"""Match features (kind: match, rectrain/data/match.py) against a hand-computed example, through
FeatureLayout.to_batch into every ranking model, the "candidate in history" rule, and the
repeat-consumption option of the synthetic logs (no Ray)."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from rectrain.config import ConfigError
from rectrain.data.features import FeatureLayout
from rectrain.data.match import history_rule_scores, item_keys, match_dense
from rectrain.data.sources.synth import SynthSpec, generate_events, make_world
from rectrain.models import build_model
from tests.support.prepared import batch_table, tiny_manifest
from tests.support.tiny import tiny_cfg

H = 3600
# rows: candidate, history (most recent last), history times, sample time
CAND = np.array([5, 3, 0, 7, 2])
HIST = [[5, 3, 5, 7], [], [0, 0], [7], [1, 4]]
HIST_TS = [[0, H, 2 * H, 9 * H], [], [0, H], [10 * H], [0, H]]
NOW = np.array([10 * H, 10 * H, 10 * H, 10 * H, 10 * H])


def _flat(lists):
    return (np.array([x for row in lists for x in row], dtype=np.int64),
            np.array([len(r) for r in lists]))


def test_item_match_by_hand():
    hist, lengths = _flat(HIST)
    ts, _ = _flat(HIST_TS)
    out = match_dense(CAND, hist, lengths, NOW, ts)
    want = np.zeros((5, 3), dtype=np.float32)
    # row 0: item 5 twice, last at position 2 of 4 (1 event ago), 8 hours before the sample
    want[0] = [math.log1p(2), 1 / 2, 1 / (1 + math.log1p(8))]
    # row 1: empty history; row 2: unknown id 0 never matches; row 4: no match
    want[3] = [math.log1p(1), 1.0, 1.0]  # the most recent event, 0 hours before
    np.testing.assert_allclose(out, want, rtol=1e-6)
    # without timestamps the time column is 0
    np.testing.assert_allclose(match_dense(CAND, hist, lengths)[:, 2], 0.0)
    with pytest.raises(ValueError, match="history elements"):
        match_dense(CAND, hist[:-1], lengths)


def test_category_match_sparse_and_multi_hot():
    hist, lengths = _flat(HIST)
    key_of = np.array([0, 1, 1, 2, 2, 0, 3, 3])  # category id of items 0..7
    out = match_dense(CAND, hist, lengths, key_of=key_of)
    # row 4: candidate 2 (category 1) meets item 1 (category 1) one event ago
    np.testing.assert_allclose(out[4], [math.log1p(1), 1 / 2, 0.0])
    # row 0: candidate 5 has no category (0): no match; row 3: 7 and 7 share category 3
    np.testing.assert_allclose(out[0], 0.0)
    np.testing.assert_allclose(out[3, :2], [math.log1p(1), 1.0])
    # multi_hot: items 1..3 with genre sets {1, 2}, {3}, {2}; from the encoded catalog
    cat = pa.table({"item_id": [1, 2, 3], "genres": pa.array([[1, 2], [3], [2]],
                                                             pa.list_(pa.int64()))})
    key_of, bitmask = item_keys(cat, "item_id", "genres", num_items=4, num_categories=4)
    assert bitmask and key_of.tolist() == [0, 0b110, 0b1000, 0b100]
    out = match_dense(np.array([1, 2]), np.array([2, 3, 1, 3]), np.array([2, 2]),
                      key_of=key_of, bitmask=True)
    np.testing.assert_allclose(out, [[math.log1p(1), 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_rule_counts_the_candidate_in_history():
    t = pa.table({"item_id": CAND, "hist_item_id": pa.array(HIST, pa.list_(pa.int64()))})
    assert history_rule_scores(t).tolist() == [2, 0, 0, 1, 0]


MATCH = {"name": "match_item", "kind": "match", "source": "hist_item_id"}


def _match_table(n=12):
    t = batch_table(0, n)
    lengths = [len(x) for x in t["hist_item_id"].to_pylist()]
    # every other candidate is the most recent history item, so the feature is not all 0
    item = t["item_id"].to_numpy().copy()
    last = [h[-1] if h else item[i] for i, h in enumerate(t["hist_item_id"].to_pylist())]
    item[::2] = np.array(last)[::2]
    t = t.set_column(t.column_names.index("item_id"), "item_id", pa.array(item))
    return t.append_column("_ts", pa.array(np.full(n, 100 * H))).append_column(
        "_hist_ts", pa.array([list(range(k)) for k in lengths], pa.list_(pa.int64())))


@pytest.mark.parametrize("name", ["din", "dlrm", "dcnv2", "bst", "autoint"])
def test_every_ranking_model_takes_match_features(name, tmp_path):
    cfg = tiny_cfg(str(tmp_path), model={"name": name})
    cfg = cfg.model_copy(update={"features": cfg.features + [
        type(cfg.features[0])(**MATCH)]})
    layout = FeatureLayout(cfg, tiny_manifest())
    assert layout.dense_dim == 1 + 3 and {"_ts", "_hist_ts"} <= set(layout.columns)
    batch = layout.to_batch(_match_table())
    assert batch.dense.shape == (12, 4)
    has_hist = np.array([len(h) > 0 for h in _match_table()["hist_item_id"].to_pylist()])
    recent = np.flatnonzero(has_hist & (np.arange(12) % 2 == 0))  # candidate = latest event
    assert len(recent) and (batch.dense[recent, 2] == 1.0).all()  # 1 / (1 + 0 events ago)
    model = build_model(layout, cfg.model)
    logits = model(batch)
    assert logits.shape[0] == 12 and torch.isfinite(logits).all()
    logits.sum().backward()


def test_match_config_is_checked(tmp_path):
    bad = {"name": "m", "kind": "match", "source": "item_id"}
    with pytest.raises(ConfigError, match="sequence"):
        tiny_cfg(str(tmp_path), features=tiny_cfg(str(tmp_path)).model_dump()["features"]
                 + [bad])


def test_repeat_synth_makes_reconsumption_part_of_the_label():
    base = SynthSpec(events=20_000, users=500, items=2_000)
    rep = SynthSpec(events=20_000, users=500, items=2_000, repeat=0.5)
    t0 = generate_events(base, 0, 0, base.users, make_world(base))
    t1 = generate_events(rep, 0, 0, rep.users, make_world(rep))

    def seen_before(t):
        key = t["user_id"].to_numpy() * 10**6 + t["item_id"].to_numpy()
        order = np.lexsort((np.arange(len(key)), key))
        seen = np.zeros(len(key), bool)
        seen[order[1:]] = key[order][1:] == key[order][:-1]
        return seen

    s0, s1 = seen_before(t0), seen_before(t1)
    assert s1.mean() > s0.mean() + 0.15  # re-consumption rows are there
    c0, c1 = t0["click"].to_numpy(), t1["click"].to_numpy()
    # the label depends on it: re-consumed items are clicked far more often, but not without
    assert c1[s1].mean() > c1[~s1].mean() + 0.15
    assert abs(c0[s0].mean() - c0[~s0].mean()) < 0.05
    # the option is checked
    with pytest.raises(ValueError, match="repeat"):
        SynthSpec(events=10, repeat=1.5)
