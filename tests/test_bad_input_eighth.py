"""Bad input to the eighth session's additions: each fails at config load naming the dotted
field (no Ray, no training)."""

import pytest

from rectrain.config import config_from_dict
from rectrain.launch.ray_launch import read_blocks
from support.tiny import tiny_job


@pytest.mark.parametrize("model, msg", [
    ({"time_bias": True}, "model.time_bias: not a field of model din"),
    ({"name": "hstu", "time_bias": True, "time_buckets": 0}, "model.time_buckets"),
    ({"name": "hstu", "time_buckets": -1}, "model.time_buckets"),
    ({"attention_activation": "relu"}, "model.attention_activation"),
    ({"mlp_activation": "Dice"}, "model.mlp_activation"),
    ({"name": "hstu", "mlp_activation": "dice"}, "model.mlp_activation: not a field of model hstu"),
])
def test_model_fields_rejected(tmp_path, model, msg):
    with pytest.raises(Exception, match=msg):
        config_from_dict(tiny_job(str(tmp_path), model=model))


@pytest.mark.parametrize("value", [-1, "lots", 1.5])
def test_in_process_pairs_rejected(tmp_path, value):
    with pytest.raises(Exception, match="recommend.in_process_pairs"):
        config_from_dict(tiny_job(str(tmp_path), recommend={"in_process_pairs": value}))


def test_read_blocks_degenerate_inputs():
    # empty split, no workers, batch 0: still a valid positive block count
    assert read_blocks(0, 16, 2) == 4 and read_blocks(0, 16, 2, "valid") == 8
    assert read_blocks(100, 16, 0) == 2 and read_blocks(100, 16, 0, "test") == 4
    assert read_blocks(100, 0, 2) == 4 and read_blocks(100, 0, 2, "valid") == 8
