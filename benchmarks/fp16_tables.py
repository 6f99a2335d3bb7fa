"""fp32 vs fp16 embedding tables (``sharding.embedding_dtype``, docs/scaling.md): MovieLens-100K
DIN (jobs/movielens_din.yaml) trained twice in 2 gloo processes without Ray (the training loop
over ``file_env``), same seed; prints test AUC / logloss and the embedding bytes per rank.

Run: PYTHONPATH=. python benchmarks/fp16_tables.py PREPARED_DIR OUT_DIR (a few minutes on 2
cores; PREPARED_DIR = data/movielens-100k/prepared after ``rectrain prepare``)."""
import json
import os
import sys

import torch


def _worker(rank, world, prepared, out, dtype):
    from rectrain.config import load_config
    from rectrain.train.env import file_env
    from rectrain.train.loop import run

    torch.set_num_threads(1)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(here, "jobs", "movielens_din.yaml"), {
        "prepared_dir": prepared, "run_dir": os.path.join(out, dtype),
        "sharding": {"embedding_dtype": dtype}, "train": {"num_workers": world}})
    m = run(cfg, file_env(cfg, rank, world))
    return {k: m[k] for k in ("test_auc", "test_logloss", "best_epoch")}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.support.dist import spawn

    prepared, out = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    res = {d: spawn(_worker, 2, prepared, out, d, timeout=3000)[0] for d in ("fp32", "fp16")}
    print(json.dumps(res, indent=1))
