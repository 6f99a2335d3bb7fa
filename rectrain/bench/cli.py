"""``rectrain bench <name>``: run one benchmark job, or ``all`` of them and write the report.

examples:
  rectrain bench all --size quick                 the whole report (benchmarks/results/)
  rectrain bench trainstep --size tiny --paths a,b
  rectrain bench ingest --config jobs/bench_ingest.yaml
  rectrain bench scale --size quick --events 1000000,10000000
"""

from __future__ import annotations

import argparse
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


#: the options' defaults: the parser leaves an option it was not given unset
#: (``argparse.SUPPRESS``), so :func:`_apply_config` can tell a flag given on the command line
#: (even at its default value) from one left out, which the ``bench:`` file may fill
DEFAULTS = {"size": "quick", "out": None, "data": "data/bench", "workers": 2, "workloads": None,
            "paths": "a,b,c", "pipeline": "plain", "peer_venv": "benchmarks/.peer-venv",
            "device": "cpu", "bf16": False, "ablations": False, "events": None,
            "budget_s": None, "recommend": "two_tower"}
#: the options with a fixed set of values (their flags' ``choices``)
CHOICES = {"size": sorted(SETTINGS), "pipeline": ["plain", "sparse_dist"],
           "device": ["cpu", "cuda"], "recommend": ["two_tower", "two_stage"]}


def _opt(sp, flag: str, **kw) -> None:
    dest = flag.lstrip("-").replace("-", "_")
    if dest in CHOICES:
        kw["choices"] = CHOICES[dest]
    sp.add_argument(flag, default=argparse.SUPPRESS, **kw)


def add_parser(sub) -> None:
    """Register the ``bench`` verb on an argparse subparsers object."""
    sp = sub.add_parser("bench", help="benchmark jobs: " + ", ".join(BENCHES))
    sp.add_argument("name", choices=BENCHES)
    sp.add_argument("--config", default=None,
                    help="a jobs/bench_*.yaml spec (its `bench:` section sets the options not "
                         "given on the command line)")
    _opt(sp, "--size", help="tiny (seconds, tests), quick (the report, ~15 min), full")
    _opt(sp, "--out", help="result folder (default benchmarks/results for --size quick, the "
                           "committed report; benchmarks/results/SIZE otherwise)")
    _opt(sp, "--data", help="where workloads are written (default data/bench)")
    _opt(sp, "--workers", type=int, help="default 2")
    _opt(sp, "--workloads",
         help="comma list of din_synth, dlrm_criteo, din_ml100k (default per bench)")
    _opt(sp, "--paths", help="trainstep paths to run (a,b,c)")
    _opt(sp, "--pipeline", help="train step through TorchRec's TrainPipelineSparseDist in (b)/(c)")
    _opt(sp, "--peer-venv", help="default benchmarks/.peer-venv")
    _opt(sp, "--device", help="trainstep on cuda: nccl, CUDA TBE kernels, one process per GPU")
    _opt(sp, "--bf16", action="store_true", help="bf16 autocast of dense layers (cuda)")
    _opt(sp, "--ablations", action="store_true",
         help="trainstep: also run each optimisation off/on (before/after table); "
              "on by default in `bench all`")
    _opt(sp, "--events", help="scale: comma list of log sizes in events (default per --size)")
    _opt(sp, "--budget-s", type=float,
         help="scale: skip a stage whose time, extrapolated from the previous "
              "size, exceeds this (default per --size)")
    _opt(sp, "--recommend", help="scale: the recommend stage's method (default two_tower)")


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


def _apply_config(args) -> None:
    """The ``bench:`` section of ``args.config`` onto ``args``, except the options given on the
    command line (set on ``args``, even at their default value), which win over the file;
    then the defaults (:data:`DEFAULTS`) for the options set by neither.

    Raises:
        ValueError: the file is not a YAML mapping, ``bench`` is not a mapping, or a key of
            it is unknown, names another bench, or has a bad value (``FILE: bench.KEY: ...``).
    """
    if args.config:
        from pathlib import Path

        from rectrain.config.load import read_yaml_mapping

        where = args.config
        bench = read_yaml_mapping(Path(args.config), error=ValueError).get("bench", {})
        if bench is None:
            bench = {}
        if not isinstance(bench, dict):
            raise ValueError(f"{where}: bench: expected a mapping of options, got "
                             f"{bench!r}")
        known = ["name", *DEFAULTS]
        for k in bench:
            if k not in known:
                raise ValueError(f"{where}: bench.{k}: unknown key; known: {', '.join(known)}")
        if bench.get("name") and bench["name"] != args.name:
            raise ValueError(f"{where}: bench.name is {bench['name']!r}, not {args.name!r}")
        for k, v in bench.items():
            if k == "name" or v is None or getattr(args, k, None) is not None:
                continue  # given on the command line: it wins (a null in the file: unset)
            setattr(args, k, _file_value(where, k, v))
    for k, v in DEFAULTS.items():
        if not hasattr(args, k):
            setattr(args, k, v)


def _file_value(where: str, key: str, v):
    """The ``bench.KEY`` value ``v`` of the file ``where``, checked as its flag would be."""
    field = f"{where}: bench.{key}"
    if key in CHOICES and v not in CHOICES[key]:
        raise ValueError(f"{field}: {v!r} is not one of {', '.join(CHOICES[key])}")
    if key == "workers" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{field}: expected an integer >= 1, got {v!r}")
    if key in ("bf16", "ablations") and not isinstance(v, bool):
        raise ValueError(f"{field}: expected true or false, got {v!r}")
    if key in ("workloads", "paths", "events") and isinstance(v, list):  # comma lists
        if not v:
            raise ValueError(f"{field}: empty list; give one or more values, or drop the key")
        v = ",".join(map(str, v))
    if key in ("out", "data", "peer_venv", "workloads", "paths") and not isinstance(v, str):
        raise ValueError(f"{field}: expected a string, got {v!r}")
    if key == "events":
        try:
            scale_events(v)
        except ValueError as e:
            raise ValueError(f"{field}: {str(e).removeprefix('--events: ')}") from None
    if key == "budget_s":
        try:
            budget_seconds(v)
        except ValueError as e:
            raise ValueError(f"{field}: {str(e).removeprefix('--budget-s: ')}") from None
    return v


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
        v = math.nan if isinstance(value, bool) else float(value)
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
    events = scale_events(args.events) if getattr(args, "events", None) is not None else None
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
    total = sum({"ingest": 4 * len(wl_of["ingest"]) if "ingest" in wl_of else 0,
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
                                        epochs=max(3, s["ray_epochs"]), progress=bar)
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
