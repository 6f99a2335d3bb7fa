"""`rectrain export`: a 2-worker sharded run's model, gathered into one torch.export artifact,
scores the test rows in a plain PyTorch process (no Ray, no torchrec) exactly as the sharded
model did during training (predictions/test.parquet); an mse model exports the predicted value,
a retrieval model its two towers."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from rectrain.cli import main as cli_main
from rectrain.serve.export import export, load_serving_model
from tests.support.dist import spawn
from tests.support.prepared import write_prepared
from tests.support.tiny import tiny_job

SERVE = r"""
import json, sys, torch
import fbgemm_gpu  # registers the jagged-tensor operators the graph calls
model = torch.export.load(sys.argv[1]).module()
inputs = torch.load(sys.argv[2], weights_only=True)
with torch.inference_mode():
    scores = model(inputs["dense"], inputs["values"], inputs["lengths"])
    one = model(inputs["dense1"], inputs["values1"], inputs["lengths1"])  # a batch of 1 row
json.dump({"scores": scores.tolist(), "one": one.tolist(), "dtype": str(scores.dtype),
           "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"ray", "torchrec"})},
          sys.stdout)
"""


def _train(rank, world, job):
    from rectrain.config import config_from_dict
    from rectrain.train import loop
    from rectrain.train.env import file_env
    cfg = config_from_dict(job)
    return loop.run(cfg, file_env(cfg, rank, world))["test_auc"]


def test_export_matches_sharded_scores(tmp_path):
    tmp = str(tmp_path)
    write_prepared(f"{tmp}/prepared", n_train=192, n_valid=64, n_test=77)
    job = tiny_job(tmp, prepared_dir=f"{tmp}/prepared", run_dir=f"{tmp}/run",
                   sharding={"types": ["row_wise"]},
                   train={"epochs": 1, "batch_size": 32, "num_workers": 2},
                   checkpoint={"at_epoch_end": False})
    spawn(_train, 2, job)
    assert cli_main(["export", "--checkpoint", f"{tmp}/run", "--out", f"{tmp}/model"]) == 0
    with open(f"{tmp}/model/serving.json") as f:
        contract = json.load(f)
    assert contract["sparse_keys"] == ["user_id", "age_bucket", "genres", "item_id",
                                       "hist_item_id"]

    # the test rows as plain tensors, in the documented input format
    from rectrain.config import config_from_dict
    from rectrain.data.features import FeatureLayout
    from rectrain.data.schema import load_manifest
    cfg = config_from_dict(job)
    layout = FeatureLayout(cfg, load_manifest(cfg.prepared_dir))
    test = pads.dataset(f"{tmp}/prepared/test").to_table()
    inputs = {}
    for suffix, rows in (("", test), ("1", test.slice(3, 1))):
        kjt = layout.to_batch(rows.select(layout.columns)).sparse
        inputs["dense" + suffix] = torch.from_numpy(np.stack(
            [rows[f].to_numpy().astype(np.float32) for f in contract["dense_features"]], axis=1))
        inputs["values" + suffix] = kjt.values()
        inputs["lengths" + suffix] = kjt.lengths().long()
    torch.save(inputs, f"{tmp}/inputs.pt")
    out = subprocess.run([sys.executable, "-c", SERVE, f"{tmp}/model/model.pt2",
                          f"{tmp}/inputs.pt"], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    served = json.loads(out.stdout)
    assert served["loaded"] == [] and served["dtype"] == "torch.float32"

    # the sharded model's scores of the same rows, written by the training loop
    pred = pq.read_table(f"{tmp}/run/predictions/test.parquet")
    by_ts = dict(zip(pred["timestamp"].to_pylist(), pred["score"].to_pylist()))
    sharded = np.array([by_ts[t] for t in test["_ts"].to_pylist()])
    assert len(sharded) == 77 and np.ptp(sharded) > 1e-4  # rows are really told apart
    np.testing.assert_allclose(np.array(served["scores"]), sharded, rtol=0, atol=1e-5)
    np.testing.assert_allclose(served["one"], sharded[3:4], rtol=0, atol=1e-5)


def _saved_unsharded(tmp: str, **model) -> tuple:
    """An unsharded model of ``tiny_job`` (untrained, seed 0) saved as the run's best
    checkpoint; returns ``(cfg, layout, model, test rows)``."""
    from rectrain.checkpoint import save_checkpoint
    from rectrain.config import config_from_dict
    from rectrain.data.features import FeatureLayout
    from rectrain.data.schema import load_manifest
    from rectrain.models import build_model

    write_prepared(f"{tmp}/prepared", n_train=48, n_valid=16, n_test=16)
    cfg = config_from_dict(tiny_job(tmp, prepared_dir=f"{tmp}/prepared", run_dir=f"{tmp}/run",
                                    model=model))
    layout = FeatureLayout(cfg, load_manifest(cfg.prepared_dir))
    torch.manual_seed(0)
    net = build_model(layout, cfg.model).eval()
    if hasattr(net, "head"):
        with torch.no_grad():
            net.head.bias.fill_(3.5)  # a rating-sized output: a sigmoid would squash it to < 1
    save_checkpoint(f"{tmp}/run/checkpoint", net,
                    meta={"epoch": 0, "config": cfg.model_dump(mode="json")})
    test = pads.dataset(f"{tmp}/prepared/test").to_table()
    if layout.regression:  # to_batch reads the label value of an mse job
        test = test.append_column("label_value", test["label"])
    return cfg, layout, net, test


def _plain(layout, rows) -> tuple:
    batch = layout.to_batch(rows.select(layout.columns))
    dense = torch.from_numpy(np.stack([rows[f.name].to_numpy().astype(np.float32)
                                       for f in layout.dense], axis=1))
    return batch, (dense, batch.sparse.values(), batch.sparse.lengths().long())


def test_export_mse_model_gives_the_predicted_value(tmp_path):
    """model.loss: mse exports the predicted label value itself (no sigmoid)."""
    from rectrain.models.base import main_logits
    tmp = str(tmp_path)
    _, layout, net, test = _saved_unsharded(tmp, name="dlrm", loss="mse")
    assert cli_main(["export", "--checkpoint", f"{tmp}/run", "--out", f"{tmp}/model"]) == 0
    with open(f"{tmp}/model/serving.json") as f:
        contract = json.load(f)
    assert "predicted label value" in contract["output"] and contract["task"] == "ranking"
    batch, inputs = _plain(layout, test)
    served = torch.export.load(f"{tmp}/model/model.pt2").module()(*inputs)
    with torch.no_grad():
        want = main_logits(net(batch))
    assert served.shape == (16,) and served.min() > 1.5  # not a probability
    torch.testing.assert_close(served, want, rtol=0, atol=1e-5)


def test_export_retrieval_model_as_two_towers(tmp_path):
    """A retrieval model exports a user and an item program whose vectors are the model's."""
    tmp = str(tmp_path)
    _, layout, net, test = _saved_unsharded(tmp, name="two_tower", item_features=["genres"],
                                            tower_hidden=[16, 8])
    paths = export(f"{tmp}/run", f"{tmp}/model")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["user.pt2", "item.pt2"]
    with open(f"{tmp}/model/serving.json") as f:
        contract = json.load(f)
    assert contract["task"] == "retrieval" and contract["temperature"] == net.temperature
    batch, inputs = _plain(layout, test)
    user = torch.export.load(paths[0]).module()(*inputs)
    item = torch.export.load(paths[1]).module()(*inputs)
    with torch.no_grad():
        u, v = net(batch)
    assert user.shape == u.shape and item.shape == v.shape and u.shape[0] == 16
    torch.testing.assert_close(user, u, rtol=0, atol=1e-5)
    torch.testing.assert_close(item, v, rtol=0, atol=1e-5)
    # one row works too (the batch size is dynamic down to 1)
    one = torch.export.load(paths[0]).module()(*_plain(layout, test.slice(3, 1))[1])
    torch.testing.assert_close(one, u[3:4], rtol=0, atol=1e-5)


def test_sasrec_export_refuses_naming_the_model(tmp_path):
    """SASRec's causal self-attention tower cannot be captured with a dynamic batch size: export
    says so and names the model; the single-score wrapper refuses any retrieval model."""
    tmp = str(tmp_path)
    _saved_unsharded(tmp, name="sasrec", seq_heads=2)
    with pytest.raises(ValueError, match="'sasrec' is a retrieval model"):
        load_serving_model(f"{tmp}/run")
    with pytest.raises(ValueError, match="model 'sasrec': cannot export user.pt2"):
        export(f"{tmp}/run", f"{tmp}/model")
