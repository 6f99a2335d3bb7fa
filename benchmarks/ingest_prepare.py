"""Ingest throughput in one run: synth -> prepare -> Parquet -> Batch, against raw pyarrow reads.

    PYTHONPATH=. python benchmarks/ingest_prepare.py --events 1000000 --out runs/bench/ingest

Steps (all on the same files, one process + an embedded local Ray with ``--cpus`` CPUs):

1. ``synth``: ``rectrain synth`` writes ``--events`` events (Ray task per file).
2. raw read: ``pyarrow.parquet.read_table`` of every raw events file (the floor for prepare).
3. ``prepare``: the generic prepare stage on those logs (``jobs/synth_din.yaml``'s features),
   with its own per-phase timings from the manifest.
4. raw read of the prepared train split: ``pyarrow.parquet.read_table`` of every file, only the
   columns the model reads (the floor for the input path).
5. Parquet -> Batch: the training input path of one rank on the same files
   (``rectrain.data.loader.FileShard`` -> ``rebatch`` -> ``FeatureLayout.to_batch``: KJT,
   dense, labels), once per ``--batch-sizes`` value.

Writes ``<out>/ingest_prepare.json`` with rows, seconds and rows/s of each step and the ratios
``prepare / raw read`` and ``to_batch path / raw read``. Absolute numbers depend on the machine
and its load; the ratios are measured in one run on the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _raw_read(files: list[str], columns=None) -> tuple[int, float]:
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    n = 0
    for f in files:
        n += pq.read_table(f, columns=columns).num_rows
    return n, time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--files", type=int, default=None, help="events files (default 1 per 1M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 8192],
                   help="rows per Batch (one measurement each)")
    p.add_argument("--sequence-length", type=int, default=20)
    p.add_argument("--config", default=os.path.join(ROOT, "jobs", "synth_din.yaml"))
    p.add_argument("--out", default="runs/bench/ingest_prepare")
    p.add_argument("--skip-synth", action="store_true", help="reuse <out>/raw")
    p.add_argument("--reuse-prepared", action="store_true",
                   help="reuse <out>/raw and <out>/prepared: only steps 2, 4, 5 (no Ray)")
    args = p.parse_args(argv)

    import ray

    from rectrain.config import load_config
    from rectrain.data import storage
    from rectrain.data.features import FeatureLayout
    from rectrain.data.loader import FileShard, rebatch
    from rectrain.data.prepare import prepare
    from rectrain.data.schema import load_manifest
    from rectrain.data.sources.synth import SynthSpec, synth

    out = os.path.abspath(args.out)
    raw = os.path.join(out, "raw")
    if not args.reuse_prepared:
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="WARNING")
        from ray.data import DataContext
        DataContext.get_current().enable_progress_bars = False
    res: dict = {"events": args.events, "cpus": args.cpus, "batch_sizes": args.batch_sizes,
                 "machine": platform.platform(), "loadavg_start": os.getloadavg()}

    # 1. synth
    if not (args.skip_synth or args.reuse_prepared):
        s = synth(SynthSpec(events=args.events, users=args.users, items=args.items,
                            files=args.files, seed=args.seed), raw)
        res["synth"] = {"rows": s["events"], "seconds": s["seconds"]["total"],
                        "rows_per_s": s["events_per_s"],
                        "rows_per_s_per_cpu": s["events_per_s"] / args.cpus, "files": s["files"]}
    ev_files, _ = storage.list_parquet_files(os.path.join(raw, "events"))

    # 2. raw read of the raw events
    n, sec = _raw_read(ev_files)
    res["raw_read_events"] = {"rows": n, "seconds": sec, "rows_per_s": n / sec}

    # 3. prepare
    cfg = load_config(args.config, {
        "prepared_dir": os.path.join(out, "prepared"), "run_dir": os.path.join(out, "run"),
        "dataset": {"source": None, "events": os.path.join(raw, "events"),
                    "users": {"path": os.path.join(raw, "users"), "key": "user_id"},
                    "items": {"path": os.path.join(raw, "items"), "key": "item_id"},
                    "sequence_length": args.sequence_length}})
    if args.reuse_prepared:
        m = load_manifest(cfg.prepared_dir)
    else:
        t0 = time.perf_counter()
        m = prepare(cfg)
        sec = time.perf_counter() - t0
        res["prepare"] = {"rows": m["rows_read"], "rejected": m["rows_rejected"],
                          "seconds": sec, "rows_per_s": m["rows_read"] / sec,
                          "phases_s": m["seconds"], "rows_per_split": m["rows_per_split"]}

    # 4. raw read of the prepared train split (model columns only)
    layout = FeatureLayout(cfg, m)
    train_url = os.path.join(cfg.prepared_dir, "train")
    train_files, _ = storage.list_parquet_files(train_url)
    n, sec = _raw_read(train_files, layout.columns)
    res["raw_read_train"] = {"rows": n, "seconds": sec, "rows_per_s": n / sec,
                             "files": len(train_files)}

    # 5. Parquet -> Batch (loader + features), same files and columns, per batch size: the
    #    conversion is vectorised per batch, so its fixed per-batch cost shows at small sizes
    res["parquet_to_batch"] = {}
    for bs in args.batch_sizes:
        t0 = time.perf_counter()
        rows = 0
        for t in rebatch(FileShard(train_url, 0, 1, layout.columns).tables(), bs,
                         drop_last=False):
            rows += layout.to_batch(t).batch_size
        sec = time.perf_counter() - t0
        res["parquet_to_batch"][str(bs)] = {"rows": rows, "seconds": sec, "rows_per_s": rows / sec}

    res["ratios"] = {
        **({"prepare_over_raw_read": res["prepare"]["rows_per_s"]
            / res["raw_read_events"]["rows_per_s"]} if "prepare" in res else {}),
        **{f"parquet_to_batch_{bs}_over_raw_read": v["rows_per_s"]
           / res["raw_read_train"]["rows_per_s"] for bs, v in res["parquet_to_batch"].items()},
    }
    res["loadavg_end"] = os.getloadavg()
    if ray.is_initialized():
        ray.shutdown()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ingest_prepare.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
