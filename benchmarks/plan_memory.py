"""Per-rank memory of a table larger than one worker's budget (docs/scaling.md): 2 gloo
processes, a 2M x 64 item table (488 MiB) with train.memory_per_worker_gb 0.4; prints the plan
and, per rank, resident and peak memory before and after DMP sharding and the bytes of the
shards it holds. Run: PYTHONPATH=. python benchmarks/plan_memory.py (about a minute)."""
import json
import os
import resource

import torch

from tests.support.dist import spawn

ROWS, DIM, GB = 2_000_000, 64, 0.4


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(rank, world):
    from rectrain.data.features import FeatureLayout
    from rectrain.models import build_model
    from rectrain.train.sharding import shard_model
    from tests.support.prepared import tiny_manifest
    from tests.support.tiny import tiny_cfg
    cfg = tiny_cfg("/tmp/plan_memory", model={"embedding_dim": DIM},
                   sharding={"types": ["table_wise", "row_wise"]},
                   train={"batch_size": 256, "num_workers": 2, "memory_per_worker_gb": GB})
    m = tiny_manifest()
    m["tables"]["item"] = ROWS
    layout = FeatureLayout(cfg, m)
    model = build_model(layout, cfg.model, sparse_device=torch.device("meta"))
    r0, peak0 = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rep = []
    dmp, opt, plan = shard_model(model, cfg.sharding, cfg.optim, torch.device("cpu"),
                                 cfg.train, rep)
    r1, peak1 = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    local = sum(s.tensor.numel() * s.tensor.element_size() for k, t in dmp.state_dict().items()
                if hasattr(t, "local_shards") for s in t.local_shards())
    return {"rank": rank, "rss_before_mb": r0, "rss_after_mb": r1, "peak_before_mb": peak0,
            "peak_after_mb": peak1, "local_weight_mb": local / 2**20,
            "planned_mb": rep[0].storage_per_rank()[rank]["ddr_bytes"] / 2**20,
            "item_table_mb": ROWS * DIM * 4 / 2**20,
            "text": rep[0].format() if rank == 0 else ""}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = spawn(worker, 2)
    print(out[0].pop("text"))
    out[1].pop("text")
    for r in out:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}))
