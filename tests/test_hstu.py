"""HSTU (Zhai et al. 2024): the layer's shapes, causality (the output at step t ignores the inputs
after t, padding ignored) with and without the relative time bias, the bias itself, the
model's causality through the item table (and the event times of the batch), and the event
times ``FeatureLayout.to_batch`` carries for ``model.time_bias``. No Ray."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from rectrain.data.schema import needs_event_times
from rectrain.models.hstu import HSTU, HSTULayer, RelativeBias, log_time_buckets
from tests.support.tiny import N_ITEMS, SEQ_LEN, tiny_cfg
from tests.test_retrieval_models import _layout, _rows

S, D = 7, 8


def _layer(time_buckets=0):
    torch.manual_seed(0)
    return HSTULayer(D, heads=2, qk_dim=3, v_dim=5, steps=S, time_buckets=time_buckets).eval()


@pytest.mark.parametrize("time_buckets", [0, 16])
def test_layer_shapes_and_causality(time_buckets):
    layer = _layer(time_buckets)
    x = torch.randn(3, S, D)
    valid = torch.ones(3, S, dtype=torch.bool)
    valid[1, :3] = False  # row 1: 4 real steps, right-aligned
    valid[2] = False  # row 2: empty
    ts = torch.cumsum(torch.randint(1, 10 ** 5, (3, S)), 1) if time_buckets else None
    with torch.no_grad():
        y = layer(x, valid, ts)
        assert y.shape == (3, S, D) and y.dtype == torch.float32 and torch.isfinite(y).all()
        assert (y[1, :3] == 0).all() and (y[2] == 0).all()  # padded steps and empty rows: 0
        t = 3
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(3, S - t - 1, D)  # change every input after step t
        ts2 = ts.clone() if ts is not None else None
        if ts2 is not None:
            ts2[:, t + 2:] += 10 ** 7  # later times too (step t's target time t+1 kept)
        y2 = layer(x2, valid, ts2)
        torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1])  # steps <= t unchanged
        assert (y2[0, t + 1:] - y[0, t + 1:]).abs().max() > 1e-4
        x3 = x.clone()
        x3[1, :3] = 100.0  # what padded steps hold does not matter
        torch.testing.assert_close(layer(x3, valid, ts), y)


def test_gradient_does_not_flow_from_earlier_outputs_to_later_inputs():
    layer = _layer()
    x = torch.randn(2, S, D, requires_grad=True)
    layer(x, torch.ones(2, S, dtype=torch.bool))[:, 2].sum().backward()
    assert (x.grad[:, 3:] == 0).all() and x.grad[:, :3].abs().sum() > 0


def test_relative_bias_depends_on_offset_and_time_bucket():
    torch.manual_seed(0)
    rab = RelativeBias(steps=4, time_buckets=8)
    b = rab().detach()
    assert b.shape == (1, 4, 4)
    assert torch.allclose(b[0, 1, 0], b[0, 3, 2]) and torch.allclose(b[0, 0, 2], b[0, 1, 3])
    ts = torch.tensor([[0, 10, 1000, 10 ** 6]])
    bt = rab(ts).detach()
    assert bt.shape == (1, 4, 4)
    # query 0 predicts the item at time 10; key 0 at time 0: bucket of |10 - 0|
    want = b[0, 0, 0] + rab.time[log_time_buckets(torch.tensor(10), 8)]
    torch.testing.assert_close(bt[0, 0, 0], want.detach())
    assert log_time_buckets(torch.tensor([0, 1, 10, 10 ** 9]), 8).tolist() == [0, 0, 7, 8]
    # the last query predicts the item at query_time (the reference appends the target's
    # time); without it the last step's own time: only row 3 of the bias changes
    bq = rab(ts, torch.tensor([10 ** 6 + 10])).detach()
    torch.testing.assert_close(bq[0, :3], bt[0, :3])
    torch.testing.assert_close(bq[0, 3, 3], (b[0, 3, 3] + rab.time[7]).detach())  # |dt| = 10
    torch.testing.assert_close(bt[0, 3, 3], (b[0, 3, 3] + rab.time[0]).detach())  # own: 0


def _timed(rows: pa.Table, seed: int = 0) -> pa.Table:
    """``rows`` with the event-time columns prepare writes for a time-bias job: ``_hist_ts``
    (increasing seconds, aligned with ``hist_item_id``) and ``_ts`` (after the history)."""
    rng = np.random.default_rng(seed)
    hist = rows["hist_item_id"].to_pylist()
    times = [list(np.cumsum(rng.integers(1, 10 ** 6, len(h))).tolist()) for h in hist]
    now = [(t[-1] if t else 0) + int(rng.integers(1, 10 ** 6)) for t in times]
    return rows.append_column("_ts", pa.array(now, pa.int64())).append_column(
        "_hist_ts", pa.array(times, pa.list_(pa.int64())))


def test_time_bias_jobs_read_the_event_times_and_to_batch_carries_them():
    assert not needs_event_times(tiny_cfg("/tmp/unused", model={"name": "hstu"}))
    assert needs_event_times(tiny_cfg("/tmp/unused", model={"name": "hstu", "time_bias": True}))
    cfg, layout = _layout("hstu", time_bias=True)
    assert layout.step_times and {"_ts", "_hist_ts"} <= set(layout.columns)
    assert {"_ts", "_hist_ts"} <= set(layout.arrow_schema().names)
    rows = _timed(_rows(4, lengths=[3, 0, SEQ_LEN, 1]))
    b = layout.to_batch(rows)
    assert b.timestamps.shape == (4, SEQ_LEN) and b.timestamps.dtype == torch.int64
    for r, t in enumerate(rows["_hist_ts"].to_pylist()):  # valid steps first, then 0
        assert b.timestamps[r].tolist() == t + [0] * (SEQ_LEN - len(t))
    assert b.event_time.tolist() == rows["_ts"].to_pylist()
    moved = b.to(torch.device("cpu"))
    assert torch.equal(moved.timestamps, b.timestamps) and torch.equal(moved.event_time,
                                                                       b.event_time)
    bad = rows.set_column(rows.schema.get_field_index("_hist_ts"), "_hist_ts",
                          pa.array([[1], [], [1] * SEQ_LEN, [1]], pa.list_(pa.int64())))
    with pytest.raises(ValueError, match=r"column '_hist_ts' and 'hist_item_id' differ in "
                                         r"length at row 0"):
        layout.to_batch(bad)
    _, plain = _layout("hstu")
    b = plain.to_batch(_rows(4))
    assert b.timestamps is None and b.event_time is None and "_hist_ts" not in plain.columns


@pytest.mark.parametrize("time_bias", [False, True])
def test_model_prediction_at_step_t_ignores_later_steps(time_bias):
    torch.manual_seed(0)
    cfg, layout = _layout("hstu", seq_layers=2, seq_heads=2, seq_dropout=0.0,
                          time_bias=time_bias)
    model = HSTU(layout, cfg.model).eval()
    rows = _rows(3, lengths=[6, SEQ_LEN, 2])
    rows = _timed(rows) if time_bias else rows
    changed = [h[:] for h in rows["hist_item_id"].to_pylist()]
    changed[0][4] = (changed[0][4] % N_ITEMS) + 1  # row 0 (6 items): its 5th item = step L-2
    rows2 = rows.set_column(rows.schema.get_field_index("hist_item_id"), "hist_item_id",
                            pa.array(changed, pa.list_(pa.int64())))
    if time_bias:  # and the times after step L-2's: step L-1's and the row's own (the query)
        ts = rows2["_hist_ts"].to_pylist()
        ts[0][5] += 10 ** 7
        now = rows2["_ts"].to_numpy().copy()
        now[0] += 10 ** 8
        rows2 = rows2.set_column(rows2.schema.get_field_index("_hist_ts"), "_hist_ts",
                                 pa.array(ts, pa.list_(pa.int64())))
        rows2 = rows2.set_column(rows2.schema.get_field_index("_ts"), "_ts", pa.array(now))
    with torch.no_grad():
        y = model.sequence_outputs(layout.to_batch(rows))
        y2 = model.sequence_outputs(layout.to_batch(rows2))
        u, v = model(layout.to_batch(rows))
        h, _ = model(layout.to_batch(rows), all_steps=True)
    L = SEQ_LEN
    assert y.shape == (3, L, 8) and u.shape == v.shape == (3, 8)
    torch.testing.assert_close(y2[0, :L - 2], y[0, :L - 2])
    assert (y2[0, L - 2:] - y[0, L - 2:]).abs().max() > 1e-4
    torch.testing.assert_close(y2[1:], y[1:])
    torch.testing.assert_close(u, y[:, -1])
    torch.testing.assert_close(h, y)
    if time_bias:  # the times are used: the row's own time moves its last output only
        now = rows["_ts"].to_numpy().copy()
        now[1] += 10 ** 8
        rows3 = rows.set_column(rows.schema.get_field_index("_ts"), "_ts", pa.array(now))
        with torch.no_grad():
            y3 = model.sequence_outputs(layout.to_batch(rows3))
        torch.testing.assert_close(y3[1, :L - 1], y[1, :L - 1])
        assert (y3[1, L - 1] - y[1, L - 1]).abs().max() > 1e-4


def test_temperature_normalises_both_sides():
    cfg, layout = _layout("hstu", temperature=0.05, seq_dropout=0.0)
    model = HSTU(layout, cfg.model).eval()
    assert model.temperature == 0.05
    with torch.no_grad():
        u, v = model(layout.to_batch(_rows(5, lengths=[0, 1, 2, 3, 4])))
    assert u[0].abs().sum() == 0  # empty history
    torch.testing.assert_close(u[1:].norm(dim=1), torch.ones(4))
    torch.testing.assert_close(v.norm(dim=1), torch.ones(5))


def test_heads_must_divide_the_width():
    cfg, layout = _layout("hstu", seq_heads=3)
    with pytest.raises(ValueError, match="model.seq_heads: 3 does not divide"):
        HSTU(layout, cfg.model)
    cfg, layout = _layout("hstu", seq_heads=3, hstu_qk_dim=4, hstu_v_dim=2)
    assert np.isfinite(HSTU(layout, cfg.model)(layout.to_batch(_rows(2)))[0]
                       .detach().numpy()).all()
