"""HSTU (Zhai et al. 2024): the layer's shapes, causality (the output at step t ignores the inputs
after t, padding ignored) with and without the relative time bias, the bias itself, and the
model's causality through the item table. No Ray."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from rectrain.models.hstu import HSTU, HSTULayer, RelativeBias, log_time_buckets
from tests.support.tiny import N_ITEMS, SEQ_LEN
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


def test_model_prediction_at_step_t_ignores_later_steps():
    torch.manual_seed(0)
    cfg, layout = _layout("hstu", seq_layers=2, seq_heads=2, seq_dropout=0.0)
    model = HSTU(layout, cfg.model).eval()
    rows = _rows(3, lengths=[6, SEQ_LEN, 2])
    changed = [h[:] for h in rows["hist_item_id"].to_pylist()]
    changed[0][4] = (changed[0][4] % N_ITEMS) + 1  # row 0 (6 items): its 5th item = step L-2
    rows2 = rows.set_column(rows.schema.get_field_index("hist_item_id"), "hist_item_id",
                            pa.array(changed, pa.list_(pa.int64())))
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
