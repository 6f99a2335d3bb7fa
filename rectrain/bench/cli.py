"""``rectrain bench <name>``: run one benchmark job, or ``all`` of them and write the report.

examples:
  rectrain bench all --size quick                 the whole report (benchmarks/results/)
  rectrain bench trainstep --size tiny --paths a,b
  rectrain bench ingest --config jobs/bench_ingest.yaml
  rectrain bench scale --size quick --events 1000000,10000000
"""

from __future__ import annotations

import json
import math
import os
import time

from rectrain.bench import BENCHES

#: per size knob: train rows of the synthetic DIN and Criteo-shaped sets (the Ray runs read
#: them; enough rows that an epoch outlasts Ray Data's start-up several times), timed steps
#: of the in-memory paths, epochs of the Ray runs
SETTINGS = {
    "tiny": dict(rows=4_096, dlrm_rows=4_096, steps=4, warmup=2, ray_epochs=1, peer_epochs=1,
                 batch=256),
    "quick": dict(rows=409_600, dlrm_rows=2_048_000, steps=20, warmup=3, ray_epochs=2,
                  peer_epochs=2, batch=1024),
    "full": dict(rows=2_048_000, dlrm_rows=8_192_000, steps=40, warmup=5, ray_epochs=2,
                 peer_epochs=5, batch=1024),
}


def add_parser(sub) -> None:
    """Register the ``bench`` verb on an argparse subparsers object."""
    global _PARSER
    sp = _PARSER = sub.add_parser("bench", help="benchmark jobs: " + ", ".join(BENCHES))
    sp.add_argument("name", choices=BENCHES)
    sp.add_argument("--config", default=None,
                    help="a jobs/bench_*.yaml spec (its `bench:` section sets these options)")
    sp.add_argument("--size", choices=sorted(SETTINGS), default="quick",
                    help="tiny (seconds, tests), quick (the report, ~15 min), full")
    sp.add_argument("--out", default=None,
                    help="result folder (default benchmarks/results for --size quick, the "
                         "committed report; benchmarks/results/SIZE otherwise)")
    sp.add_argument("--data", default="data/bench", help="where workloads are written")
    sp.add_argument("--workers", type=int, default=2)
    sp.add_argument("--workloads", default=None,
                    help="comma list of din_synth, dlrm_criteo, din_ml100k (default per bench)")
    sp.add_argument("--paths", default="a,b,c", help="trainstep paths to run (a,b,c)")
    sp.add_argument("--pipeline", choices=["plain", "sparse_dist"], default="plain",
                    help="train step through TorchRec's TrainPipelineSparseDist in (b)/(c)")
    sp.add_argument("--peer-venv", default="benchmarks/.peer-venv")
    sp.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="trainstep on cuda: nccl, CUDA TBE kernels, one process per GPU")
    sp.add_argument("--bf16", action="store_true", help="bf16 autocast of dense layers (cuda)")
    sp.add_argument("--ablations", action="store_true",
                    help="trainstep: also run each optimisation off/on (before/after table); "
                         "on by default in `bench all`")
    sp.add_argument("--events", default=None,
                    help="scale: comma list of log sizes in events (default per --size)")
    sp.add_argument("--budget-s", type=float, default=None,
                    help="scale: skip a stage whose time, extrapolated from the previous "
                         "size, exceeds this (default per --size)")
    sp.add_argument("--recommend", choices=["two_tower", "two_stage"], default="two_tower",
                    help="scale: the recommend stage's method")


def _workloads(names: list[str], data: str, s: dict):
    from rectrain.bench import workloads as w

    out = []
    for n in names:
        if n == "din_synth":
            out.append(w.din_synth(os.path.join(data, "din_synth"), s["rows"]))
        elif n == "dlrm_criteo":
            out.append(w.dlrm_criteo(os.path.join(data, "dlrm_criteo"), s["dlrm_rows"]))
        elif n == "din_ml100k":
            out.append(w.din_ml100k(os.path.join(data, "movielens-100k")))
        else:
            raise ValueError(f"--workloads: unknown {n!r}; known din_synth, dlrm_criteo, "
                             "din_ml100k")
    return out


_PARSER = None  # the bench subparser, for its defaults (a flag set on the command line wins)


def _apply_config(args) -> None:
    """The ``bench:`` section of ``args.config`` onto ``args``, except the options given on the
    command line (a value other than the flag's default), which win over the file."""
    if not args.config:
        return
    import yaml

    with open(args.config) as f:
        spec = yaml.safe_load(f) or {}
    bench = spec.get("bench", {})
    unknown = set(bench) - {"name", "size", "out", "data", "workers", "workloads", "paths",
                            "pipeline", "peer_venv", "device", "bf16", "ablations",
                            "events", "budget_s", "recommend"}
    if unknown:
        raise ValueError(f"{args.config}: bench: unknown keys {sorted(unknown)}")
    if bench.get("name") and bench["name"] != args.name:
        raise ValueError(f"{args.config}: bench.name is {bench['name']!r}, not {args.name!r}")
    for k, v in bench.items():
        if k == "name" or (_PARSER is not None and getattr(args, k, None) is not None
                           and getattr(args, k) != _PARSER.get_default(k)):
            continue
        setattr(args, k, ",".join(map(str, v)) if isinstance(v, list) else v)


def scale_events(text) -> list[int]:
    """``--events`` of ``bench scale``: comma-separated whole positive numbers of events
    (``1e6`` allowed), distinct (each size has one work folder).

    Raises:
        ValueError: naming ``--events`` and the bad item.
    """
    out = []
    for x in str(text).split(","):
        try:
            v = float(x)
        except ValueError:
            raise ValueError(f"--events: {x.strip()!r} is not a number of events (expected a "
                             f"comma list such as 1000000,1e7)") from None
        if not (math.isfinite(v) and v >= 1 and v == int(v)):
            raise ValueError(f"--events: {x.strip()} is not a whole number of events >= 1")
        if int(v) in out:
            raise ValueError(f"--events: {int(v):,} is listed twice")
        out.append(int(v))
    return out


def budget_seconds(value) -> float:
    """``--budget-s`` (or ``bench.budget_s``) as seconds > 0; 0 would skip every stage after
    the first size (an extrapolated time is never below 0).

    Raises:
        ValueError: naming ``--budget-s`` and the value.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not v > 0:
        raise ValueError(f"--budget-s: must be a number of seconds > 0, got {value!r} (a large "
                         f"value such as 1e9 skips nothing)")
    return v


def result_dir(size: str, out: str | None = None) -> str:
    """Where a benchmark run writes: ``out`` when given, else ``benchmarks/results`` for the
    ``quick`` size (the committed report) and ``benchmarks/results/<size>`` (git-ignored) for
    the others, so a tiny or full run never overwrites the report."""
    if out is not None:
        return out
    return "benchmarks/results" if size == "quick" else f"benchmarks/results/{size}"


def run(args) -> dict:
    """Run the benchmark(s) named by ``args.name``; returns {bench: result}."""
    from tqdm import tqdm

    _apply_config(args)
    # before any folder, Ray or subprocess: a bad size would fail each stage three times
    events = scale_events(args.events) if getattr(args, "events", None) else None
    if getattr(args, "budget_s", None) is not None:
        args.budget_s = budget_seconds(args.budget_s)
    s = SETTINGS[args.size]
    args.out = result_dir(args.size, args.out)
    # absolute: Ray Train workers run in their own working directory, and the job dicts the
    # benches hand them carry these paths
    args.out, args.data = os.path.abspath(args.out), os.path.abspath(args.data)
    os.makedirs(args.out, exist_ok=True)
    names = ["ingest", "trainstep", "scaling", "peers"] if args.name == "all" else [args.name]
    default_wl = {"ingest": "din_synth,dlrm_criteo", "trainstep": "din_synth,dlrm_criteo",
                  "peers": "din_ml100k"}
    paths = set(args.paths.split(","))
    # progress units: ingest 2/workload, trainstep 3/workload, scaling 6, peers 3, scale 4/size
    if "scale" in names:
        from rectrain.bench.scale import SIZES, STAGES
        n_scale = len(STAGES) * len(events or SIZES[args.size]["events"])
    wl_of = {n: (args.workloads or default_wl.get(n, "")).split(",") for n in names}
    total = sum({"ingest": 2 * len(wl_of["ingest"]) if "ingest" in wl_of else 0,
                 "trainstep": (5 if args.ablations or args.name == "all" else 3)
                 * len(wl_of.get("trainstep", [])),
                 "scaling": 6, "peers": 3,
                 "scale": n_scale if "scale" in names else 0}[n] for n in names)
    results, t0 = {}, time.perf_counter()
    with tqdm(total=total, unit="stage", dynamic_ncols=True) as bar:
        for n in names:
            t = time.perf_counter()
            if n == "ingest":
                from rectrain.bench.ingest import run_ingest
                results[n] = run_ingest(_workloads(wl_of[n], args.data, s), args.out,
                                        batch=s["batch"], world=args.workers,
                                        epochs=max(2, s["ray_epochs"]), progress=bar)
            elif n == "trainstep":
                from rectrain.bench.trainstep import run_trainstep
                results[n] = run_trainstep(_workloads(wl_of[n], args.data, s), args.out,
                                           batch=s["batch"], world=args.workers,
                                           steps=s["steps"], warmup=s["warmup"],
                                           ray_epochs=s["ray_epochs"], pipeline=args.pipeline,
                                           paths=paths, device=args.device, bf16=args.bf16,
                                           ablations=args.ablations or args.name == "all",
                                           progress=bar)
            elif n == "scaling":
                from rectrain.bench.scaling import run_scaling
                results[n] = run_scaling(args.data, args.out, args.size, progress=bar)
            elif n == "scale":
                from rectrain.bench.scale import run_scale
                results[n] = run_scale(args.out, args.size, events,
                                       getattr(args, "budget_s", None),
                                       getattr(args, "recommend", "two_tower"), progress=bar)
            elif n == "peers":
                from rectrain.bench.peers import run_peers
                wl = _workloads(wl_of[n], args.data, s)[0]
                results[n] = run_peers(wl, args.out, args.peer_venv, epochs=s["peer_epochs"],
                                       batch=1024,
                                       world=args.workers, progress=bar)
            results[n]["bench_seconds"] = time.perf_counter() - t
    if args.name == "all":
        from rectrain.bench.summary import write_summary
        write_summary(args.out, results, args.size, time.perf_counter() - t0)
    print(f"[rectrain] bench {args.name} ({args.size}) done in "
          f"{time.perf_counter() - t0:.0f} s; results in {args.out}/", flush=True)
    for n, r in results.items():
        print(f"  {n}: {os.path.join(args.out, n + '.json')}", flush=True)
    return json.loads(json.dumps(results, default=float))
