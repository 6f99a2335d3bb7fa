"""Zoo layers: dot interaction, DCN-V2 cross network, sequence encoders (masking, empty
sequences, no leak from padded steps)."""

import pytest
import torch

from rectrain.models.zoo_layers import (SEQUENCE_ENCODERS, CrossNetV2, DotInteraction,
                                        SequenceEncoder, masked_max, masked_mean)


@pytest.fixture
def seq():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8)
    valid = torch.tensor([[1, 1, 1, 0, 0, 0], [0] * 6, [1] * 6, [1, 0, 0, 0, 0, 0]],
                         dtype=torch.bool)
    return x, valid


def test_dot_interaction_is_the_upper_triangle():
    x = torch.randn(3, 4, 5)
    out = DotInteraction(4)(x)
    assert out.shape == (3, 6)
    expected = torch.stack([(x[:, i] * x[:, j]).sum(-1) for i in range(4)
                            for j in range(i + 1, 4)], dim=1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("rank", [None, 3])
def test_cross_network_formula(rank):
    torch.manual_seed(0)
    net = CrossNetV2(6, layers=2, rank=rank)
    x0 = torch.randn(5, 6)
    x = x0
    for i in range(2):  # x_{l+1} = x0 * (W x_l + b) + x_l, W = U V^T when low-rank
        if rank:
            W = net.u[i].weight @ net.v[i].weight
            b = net.u[i].bias
        else:
            W, b = net.w[i].weight, net.w[i].bias
        x = x0 * (x @ W.T + b) + x
    torch.testing.assert_close(net(x0), x)
    if rank:
        assert sum(p.numel() for p in net.parameters()) == 2 * (6 * 3 + 3 * 6 + 6)


def test_masked_pooling(seq):
    x, valid = seq
    torch.testing.assert_close(masked_mean(x, valid)[0], x[0, :3].mean(0))
    torch.testing.assert_close(masked_max(x, valid)[0], x[0, :3].max(0).values)
    assert masked_mean(x, valid)[1].abs().sum() == 0 and masked_max(x, valid)[1].abs().sum() == 0


@pytest.mark.parametrize("kind", SEQUENCE_ENCODERS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_encoder_masking_and_empty(seq, kind, mode):
    x, valid = seq
    torch.manual_seed(1)
    enc = SequenceEncoder(kind, 8, max_len=6, kernel=3)
    enc.train(mode == "train")
    y = enc(x.clone().requires_grad_(), valid)
    assert y.shape == (4, 8) and torch.isfinite(y).all()
    assert y[1].abs().sum() == 0  # an empty sequence encodes to zeros, not NaN
    x2 = x.clone()
    x2[~valid] = 1e3  # garbage in padded steps changes nothing
    torch.testing.assert_close(enc(x2, valid), y, rtol=1e-5, atol=1e-5)
    # the same rows with less padding (a shorter batch) give the same codes
    torch.testing.assert_close(enc(x[[0, 3], :3], valid[[0, 3], :3]), y[[0, 3]],
                               rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    enc(xg, valid).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad[~valid].abs().sum() == 0
    if kind != "mean":
        assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_recurrent_encoder_is_the_last_valid_state(seq):
    x, valid = seq
    enc = SequenceEncoder("gru", 8, max_len=6)
    out, _ = enc.rnn(x[0:1, :3])
    torch.testing.assert_close(enc(x, valid)[0], out[0, -1])


def test_order_matters_for_cnn_and_gru_not_mean(seq):
    x, valid = seq
    rev = x[2].flip(0).unsqueeze(0)
    for kind, sensitive in [("mean", False), ("cnn", True), ("gru", True)]:
        enc = SequenceEncoder(kind, 8, max_len=6)
        diff = (enc(rev, valid[2:3]) - enc(x[2:3], valid[2:3])).abs().max()
        assert (diff > 1e-4) == sensitive, kind


def test_unknown_encoder():
    with pytest.raises(ValueError, match="rnn"):
        SequenceEncoder("rnn", 8, 6)
