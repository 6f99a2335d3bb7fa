"""Loading a job YAML: ``extends:`` chains, validation, error messages, path resolution, and the
checks that depend on the machine the job is launched from (before Ray starts)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml
from pydantic import ValidationError

from rectrain.config.job import JobConfig
from rectrain.config.models import MODEL_SPECS


class ConfigError(ValueError):
    """A job configuration is malformed; the message names the file and the field."""


#: sparse optimisers with a fused FBGEMM CPU kernel (rectrain.train.sharding has the same list)
CPU_SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


def read_yaml_mapping(path: Path, error: type[Exception] = ConfigError) -> dict:
    """The YAML file ``path`` as a dict.

    Raises:
        ``error`` (default :class:`ConfigError`): not valid YAML, or its top level is not a
            mapping (the message names the file).
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, unreadable or binary file
        raise error(f"{path}: cannot read as a YAML text file: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike, overrides: Optional[dict] = None) -> JobConfig:
    """Load and validate a job YAML.

    ``extends: BASE.yaml`` (a path relative to the file, or a list of them, applied in order)
    deep-merges the file over its bases, recursively: mappings merge key by key, any other
    value (a list such as ``features``, a scalar) replaces the base's. Relative paths in the
    file (dataset, prepared_dir, run_dir) are resolved against the current directory (or
    ``$RECTRAIN_BASE_DIR`` when set, as in the cluster image). ``overrides`` is a nested dict
    merged over the YAML (used by the CLI and tests). Also checks what depends on where the job
    runs (:func:`check_launch`), so nothing here imports Ray.

    Raises:
        ConfigError: a file is missing, is not YAML, is not a mapping, an ``extends`` chain has
            a cycle, or a field is invalid (message names the file and the dotted field path).
    """
    p = Path(path)
    origins: dict = {}
    raw = _read_chain(p, (), origins)
    if overrides:
        raw = _deep_merge(raw, overrides)
        origins.update({k: "the command line" for k in _key_paths(overrides)})
    cfg = config_from_dict(raw, source=str(p), origins=origins)
    check_launch(cfg, source=str(p))
    return cfg


def job_dict(path: str | os.PathLike) -> dict:
    """The raw mapping of a job YAML with its ``extends`` chain merged in (not validated; what
    :func:`load_config` validates). Raises :class:`ConfigError` as :func:`load_config` does."""
    return _read_chain(Path(path), (), {})


def _key_paths(raw: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping (lists and scalars are leaves)."""
    out = []
    for k, v in raw.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out.extend(_key_paths(v, (*prefix, k)))
    return out


def _read_chain(p: Path, stack: tuple[Path, ...], origins: dict) -> dict:
    """``p``'s mapping merged over its ``extends`` bases (``stack``: the files extending it).

    ``origins`` gets, for every key path of the result, the file that set it (the last one in
    merge order), so an error in a value set by a base names that base too."""
    where = f"{stack[0]}: " if stack else ""
    if not p.exists():
        raise ConfigError(f"{where}{p}: config file not found")
    if not p.is_file():
        raise ConfigError(f"{where}{p}: not a file (a job config is one YAML file)")
    real = p.resolve()
    if real in {s.resolve() for s in stack}:
        chain = " -> ".join(str(s) for s in (*stack, p))
        raise ConfigError(f"{stack[0]}: extends: cycle {chain}")
    raw = read_yaml_mapping(p)
    bases = raw.pop("extends", None)
    if bases is None:
        origins.update({k: str(p) for k in _key_paths(raw)})
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{p}: extends: expected a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, _read_chain(p.parent / b, (*stack, p), origins))
    origins.update({k: str(p) for k in _key_paths(raw)})
    return _deep_merge(merged, raw)


def config_from_dict(raw: dict, source: str = "<dict>",
                     origins: Optional[dict] = None) -> JobConfig:
    """Validate a config dict; raises :class:`ConfigError` naming ``source`` and the field.

    ``origins`` (key path -> file, from an ``extends`` chain): a bad value that a base file set
    is reported as ``<source>: <field> (set in <base>): ...``."""
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(f"{source}: {_set_in(_describe(err, raw), err, source, origins)}"
                                    for err in e.errors())) from None
    # RECTRAIN_BASE_DIR: where relative paths resolve on cluster nodes whose shared storage is
    # mounted at a fixed place (cluster/Dockerfile); default the current directory
    base = Path(os.environ.get("RECTRAIN_BASE_DIR") or Path.cwd())
    cfg.prepared_dir = _resolve(cfg.prepared_dir, base)
    cfg.run_dir = _resolve(cfg.run_dir, base)
    ds = cfg.dataset
    ds.events = _resolve(ds.events, base)
    for side in (ds.users, ds.items):
        if side is not None:
            side.path = _resolve(side.path, base)
    rec = cfg.recommend
    for name in ("retrieval_run", "ranking_run", "reference", "out"):
        if getattr(rec, name):
            setattr(rec, name, _resolve(getattr(rec, name), base))
    if cfg.checkpoint.resume not in (None, "latest", "auto"):  # a path, not a worker's cwd
        cfg.checkpoint.resume = _resolve(cfg.checkpoint.resume, base)
    return cfg


def _set_in(text: str, err: dict, source: str, origins: Optional[dict]) -> str:
    """``text`` with ``(set in FILE)`` after the field when another file of the chain set it
    (the longest key path of the error's location that a file set; not for a missing field)."""
    loc = tuple(err["loc"])
    if len(loc) >= 2 and loc[0] == "model" and loc[1] in MODEL_SPECS:
        loc = loc[:1] + loc[2:]
    if not origins or err["type"] == "missing":
        return text
    for n in range(len(loc), 0, -1):
        where = origins.get(loc[:n])
        if where is not None:
            if where == source:
                return text
            field = ".".join(str(x) for x in loc)
            return text.replace(f"{field}: ", f"{field} (set in {where}): ", 1) \
                if text.startswith(f"{field}: ") else f"{text} (set in {where})"
    return text


def _describe(err: dict, raw: dict) -> str:
    """``"<dotted field>: <message>"`` for one pydantic error (the union's tag dropped)."""
    loc = list(err["loc"])
    if len(loc) >= 2 and loc[0] == "model" and loc[1] in MODEL_SPECS:
        loc.pop(1)  # model.sasrec.retrieval_loss -> model.retrieval_loss
    msg = err["msg"]
    field = ".".join(str(x) for x in loc)
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
        # cross-field rules (JobConfig and section validators) put the dotted field in
        # their message: not "recommend: recommend.explain: ..."
        if not loc or msg.startswith(f"{field}.") or msg.startswith(f"{field}:"):
            return msg
    if err["type"] == "model_name":
        return msg  # "model.name: use one of ..."
    if err["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "model":
        name = (raw.get("model") or {}).get("name", "din")
        others = sorted(n for n, c in MODEL_SPECS.items() if loc[1] in c.model_fields)
        msg = (f"not a field of model {name}" + (f" (a field of {', '.join(others)})"
                                                 if others else ""))
    return f"{field or '<root>'}: {msg}"


def check_launch(cfg: JobConfig, source: str = "<dict>") -> None:
    """Rules that depend on where the job will run, checked before Ray starts.

    Fused ``optim.sparse: adam`` has no FBGEMM CPU kernel: rejected when the run will be on
    CPU, i.e. ``train.use_gpu: false``, or ``use_gpu`` unset with no ``ray.address`` (nor
    ``$RAY_ADDRESS``) and fewer CUDA devices on this machine than ``train.num_workers`` (the
    rule :func:`rectrain.launch.ray_launch.train` uses for an embedded Ray).

    Raises:
        ConfigError: naming ``source`` and ``optim.sparse``.
    """
    if cfg.optim.sparse in CPU_SPARSE_OPTIMIZERS:
        return
    tc = cfg.train
    if tc.use_gpu is None:
        if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
            return  # a cluster: its GPUs are known only once connected
        gpus = _local_gpus()
        if gpus >= tc.num_workers:
            return
        why = (f"train.use_gpu is unset, no ray.address is set and this machine has "
               f"{gpus} CUDA device(s) for {tc.num_workers} workers")
    elif tc.use_gpu:
        return
    else:
        why = "train.use_gpu is false"
    raise ConfigError(f"{source}: optim.sparse: {cfg.optim.sparse!r} has no fused CPU kernel in "
                      f"FBGEMM and this run would be on CPU ({why}); use one of "
                      f"{', '.join(CPU_SPARSE_OPTIMIZERS)} on CPU (adam needs GPUs)")


def _local_gpus() -> int:
    """NVIDIA GPUs visible on this machine, without importing torch (seconds to import): the
    driver's ``/proc/driver/nvidia/gpus`` entries, limited by ``CUDA_VISIBLE_DEVICES``."""
    try:
        n = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    return n


def _resolve(value: str, base: Path) -> str:
    if "://" in value or os.path.isabs(value):
        return value
    return str((base / value).resolve())


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
