"""Masking of the shared TransformerEncoder (BST, SASRec, AutoInt build on it)."""

import pytest
import torch

from rectrain.models.layers import TransformerEncoder, attention_mask


@pytest.fixture
def data():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return x, valid


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_padding_and_empty_sequences(data, causal, mode):
    x, valid = data
    enc = TransformerEncoder(8, heads=2, layers=2, causal=causal, max_len=5)
    enc.train(mode == "train")
    enc.blocks[0].dropout.p = 0.0  # deterministic in train mode too
    y = enc(x, valid)
    assert torch.isfinite(y).all()
    assert y[1].abs().sum() == 0 and y[0, 3:].abs().sum() == 0  # empty row / padded steps
    x2 = x.clone()
    x2[0, 3:] = 100.0  # garbage in padded steps changes nothing
    assert torch.equal(enc(x2, valid)[0], y[0])
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_causal_mask_hides_the_future(data):
    x, valid = data
    enc = TransformerEncoder(8, heads=2, layers=2, causal=True).eval()
    y = enc(x, valid)
    x2 = x.clone()
    x2[2, 3] = torch.randn(8)  # changing step 3 leaves steps 0..2 as they were, changes step 3
    y2 = enc(x2, valid)
    torch.testing.assert_close(y2[2, :3], y[2, :3])
    assert (y2[2, 3] - y[2, 3]).abs().max() > 1e-3
    bidir = TransformerEncoder(8, heads=2, layers=1).eval()
    assert (bidir(x2, valid)[2, 0] - bidir(x, valid)[2, 0]).abs().max() > 1e-3


def test_attention_mask_values():
    valid = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    m = attention_mask(valid, causal=True)[0]
    # a padded query may look at valid keys (its output is zeroed later); never at a pad key
    assert m.tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    empty = attention_mask(torch.zeros(1, 2, dtype=torch.bool))[0]
    assert empty.tolist() == [[True, False], [False, True]]  # attends itself only: no NaN
    with pytest.raises(ValueError, match="not divisible"):
        TransformerEncoder(6, heads=4)
