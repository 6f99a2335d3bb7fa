"""The job stages the CLI and the benchmarks run: dataset adapters, prepare, synthetic logs.

Each function connects to Ray itself through :mod:`rectrain.launch.cluster`, so callers (the
CLI, :mod:`rectrain.bench.workloads`) never touch Ray.
"""

from __future__ import annotations

import posixpath
from typing import Optional

from rectrain.config import ConfigError, JobConfig
from rectrain.launch.cluster import connect, init_ray


def write_source(cfg: JobConfig, source_name: Optional[str], source_path: Optional[str]) -> None:
    """Run the dataset adapter: write raw behaviour logs where ``cfg.dataset`` expects them.

    Raises:
        ConfigError: unknown adapter, or ``dataset.events/users/items`` are not the folders
            the adapter writes (``<raw>/events``, ``<raw>/users``, ``<raw>/items``).
    """
    name = source_name or cfg.dataset.source
    if name not in ("movielens-100k", "synth"):
        raise ConfigError(f"unknown dataset source {name!r}; known: movielens-100k, synth")
    from rectrain.data.sources.movielens import load_movielens_100k, write_raw_logs

    raw_dir = posixpath.dirname(cfg.dataset.events.rstrip("/"))
    expected = {"events": cfg.dataset.events,
                "users": cfg.dataset.users.path if cfg.dataset.users else None,
                "items": cfg.dataset.items.path if cfg.dataset.items else None}
    for role, path in expected.items():
        if path is not None and path.rstrip("/") != posixpath.join(raw_dir, role):
            raise ConfigError(f"dataset.{role}: the {name} adapter writes {raw_dir}/{role}, "
                              f"but the config reads {path}")
    if name == "synth":
        return write_synth_source(cfg)
    tables = load_movielens_100k(source_path)
    write_raw_logs(tables, raw_dir)
    print(f"[rectrain] {name}: raw logs written to {raw_dir} "
          f"({', '.join(f'{k} {v.num_rows}' for k, v in tables.items())} rows)", flush=True)


def write_synth_source(cfg: JobConfig) -> None:
    """``dataset.source: synth``: write a synthetic log where ``cfg.dataset`` expects it."""
    from rectrain.data.sources.synth import SynthSpec, synth

    raw_dir = posixpath.dirname(cfg.dataset.events.rstrip("/"))
    sizes = (cfg.dataset.synth.model_dump() if cfg.dataset.synth is not None else {})
    init_ray(cfg)
    s = synth(SynthSpec(**sizes), raw_dir)
    print(f"[rectrain] synth: {s['events']:,} events, {s['users']:,} users, {s['items']:,} "
          f"items in {s['files']} files -> {raw_dir} ({s['seconds']['total']:.1f} s)", flush=True)


def synth_mismatch(cfg: JobConfig) -> dict:
    """``{field: (on disk, in the job)}`` for each ``dataset.synth`` field that differs from the
    spec recorded in the existing log's ``synth.json`` (empty when they agree or nothing is
    recorded)."""
    from rectrain.data import storage
    from rectrain.data.sources.synth import SynthSpec

    url = storage.join(posixpath.dirname(cfg.dataset.events.rstrip("/")), "synth.json")
    if not storage.exists(url):
        return {}
    on_disk = storage.read_json(url).get("spec", {})
    job = vars(SynthSpec(**(cfg.dataset.synth.model_dump() if cfg.dataset.synth else {})))
    return {k: (on_disk[k], v) for k, v in job.items()
            if k in on_disk and k != "files" and on_disk[k] != v}


def _warn_if_other_synth(cfg: JobConfig) -> None:
    diff = synth_mismatch(cfg)
    if diff:
        print(f"[rectrain] warning: the synthetic log in {cfg.dataset.events} was written with "
              + ", ".join(f"{k}={a}" for k, (a, _) in diff.items()) + ", the job's dataset.synth "
              "says " + ", ".join(f"{k}={b}" for k, (_, b) in diff.items()) + "; using the log "
              "on disk (delete it to have the job write its own)", flush=True)


def prepare_job(cfg: JobConfig, source: Optional[str] = None, source_path: Optional[str] = None,
                address: Optional[str] = None) -> dict:
    """``rectrain prepare``: run the dataset adapter when asked (``source``) or when the job
    names one (``dataset.source``) and its raw logs are missing, then prepare the samples
    (:func:`rectrain.data.prepare.prepare`, Ray Data). Returns the manifest dict."""
    from rectrain.data import storage
    from rectrain.data.prepare import prepare

    if source or (cfg.dataset.source and not storage.exists(cfg.dataset.events)):
        write_source(cfg, source, source_path)
    elif cfg.dataset.source == "synth":
        _warn_if_other_synth(cfg)
    init_ray(cfg, address)
    m = prepare(cfg)
    print(f"[rectrain] prepared {cfg.prepared_dir}: rows per split {m['rows_per_split']}, "
          f"rejected {m['rows_rejected']} {m['rejected_by_reason']}, tables {m['tables']} "
          f"({m['seconds']['total']:.1f} s)", flush=True)
    return m


def synth_job(spec, out: str, address: Optional[str] = None,
              num_cpus: Optional[int] = None) -> dict:
    """``rectrain synth``: a synthetic behaviour log (``SynthSpec`` ``spec``) under ``out``, one
    Ray task per events file, on the cluster at ``address`` or an embedded Ray with
    ``num_cpus`` CPUs (default all). Returns the summary of
    :func:`rectrain.data.sources.synth.synth`."""
    from rectrain.data.sources.synth import synth

    connect(address, num_cpus=num_cpus, dashboard=False)
    s = synth(spec, out)
    print(f"[rectrain] synth: {s['events']:,} events, {s['users']:,} users, {s['items']:,} "
          f"items in {s['files']} files -> {out} in {s['seconds']['total']:.1f} s "
          f"({s['events_per_s']:,.0f} events/s)", flush=True)
    return s
