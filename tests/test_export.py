"""`rectrain export`: a 2-worker sharded run's model, gathered into one torch.export artifact,
scores the test rows in a plain PyTorch process (no Ray, no torchrec) exactly as the sharded
model did during training (predictions/test.parquet)."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from rectrain.cli import main as cli_main
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
