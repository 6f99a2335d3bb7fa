"""What a rectrain run prints: rectrain's own progress and results, not the stack's chatter.

By default (``rectrain ... --verbose`` turns all of this off, and ``RECTRAIN_VERBOSE=1`` is what
the flag sets, so Ray workers see it too):

- causes fixed before Ray starts (:func:`configure_env`): the token-auth mode of a local Ray is
  set explicitly (to Ray's own default, ``token``; Ray warns only when the mode is unset), the
  preemption watcher (useless on one machine, and it logs an error line at start) is off in
  local mode, Ray Data logs at WARNING (``RAY_DATA_LOG_LEVEL``) with no progress bars, and Ray
  Train logs at WARNING (:func:`train_logging_config`);
- Python warnings of the stack (deprecations, TorchRec planner notices) are ignored in the
  driver (:func:`quiet_driver`) and in every Ray worker (:func:`quiet_worker`, run by the
  worker set-up hook);
- worker output forwarded to the driver (Ray's ``log_to_driver``) goes through
  :func:`filter_batch`: rectrain's own lines (``[rectrain] ...`` and the body of a multi-line
  print such as the sharding plan, printed without Ray's ``(RayTrainWorker pid=...)`` prefix)
  and tracebacks pass, the rest (fbgemm's library-load lines,
  Ray Train's start-up lines, Ray Data's execution summaries) is dropped.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import warnings

#: environment variable behind ``--verbose``: "1" shows everything
ENV = "RECTRAIN_VERBOSE"
PREFIX = "[rectrain]"
#: Ray's own actors: their errors reach the driver as exceptions of ``trainer.fit()``, and their
#: tracebacks in the log are Ray's housekeeping (e.g. PlacementGroupCleaner's state lookups
#: failing with "Found multiple active Ray instances" when other Ray sessions share the machine)
RAY_ACTORS = ("TrainController", "PlacementGroupCleaner", "PreemptionWatcher",
              "SplitCoordinator", "DatasetManager", "StatsActor", "AutoscalingRequester")
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\)|^\S*(Error|Exception)\b.*:")


def set_verbose(on: bool) -> None:
    """Switch ``--verbose`` on or off for this process and the Ray workers it starts."""
    os.environ[ENV] = "1" if on else "0"


def verbose() -> bool:
    """``--verbose`` (``RECTRAIN_VERBOSE=1``) is on."""
    return os.environ.get(ENV, "0") == "1"


def ray_log_level() -> int:
    """``ray.init(logging_level=...)``: INFO with ``--verbose``, else WARNING."""
    return logging.INFO if verbose() else logging.WARNING


def configure_env(local: bool) -> None:
    """Environment settings Ray reads when it is imported or started; call before ``ray.init``
    (``local``: an embedded Ray is about to start, whose processes inherit this environment)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # rank 0's lines arrive as soon as printed
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else each print shows twice
    if local and "ray" not in sys.modules:
        # Ray's default for a new local cluster (ray._private.authentication.
        # authentication_token_setup.enable_token_auth_by_default), set explicitly so that Ray
        # does not warn that it chose it
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if verbose():
        return
    if local:  # one machine: no node preemption to watch
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def train_logging_config():
    """Ray Train's ``RunConfig(logging_config=...)``: WARNING unless ``--verbose``."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def _ignore_stack_warnings() -> None:
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for module in ("torch", "torchrec", "fbgemm_gpu", "ray"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    # torch.fx's once-per-process notice about is_fx_tracing under torch.export (TorchRec)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    logging.getLogger("torchrec").setLevel(logging.ERROR)


def quiet_driver() -> None:
    """Quiet the CLI's own process (no-op with ``--verbose``)."""
    if not verbose():
        _ignore_stack_warnings()


def quiet_worker() -> None:
    """Quiet a Ray worker process (run by the worker set-up hook; no-op with ``--verbose``).
    rectrain's own log records keep showing, prefixed ``[rectrain] LEVEL logger:``."""
    log = logging.getLogger("rectrain")
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter(PREFIX + " %(levelname)s %(name)s: %(message)s"))
        log.addHandler(h)
        log.propagate = False
    if not verbose():
        _ignore_stack_warnings()


def keep_line(line: str, in_traceback: bool) -> tuple[bool, bool]:
    """Whether a forwarded worker line is shown without ``--verbose``: rectrain's own lines and
    Python tracebacks (from the ``Traceback`` line to the end of that batch of lines). Returns
    ``(keep, in_traceback)`` for the next line of the batch."""
    if in_traceback:
        return True, True
    if line.startswith(PREFIX):
        return True, False
    if _TRACEBACK.search(line):
        return True, line.startswith("Traceback")
    return False, False


def filter_batch(lines: list[str], is_err: bool = False) -> tuple[list[str], list[str]]:
    """Split one batch of a worker's forwarded lines into ``(own, other_kept)``: rectrain's
    lines (``[rectrain] ...``, and on stdout the body of a multi-line print whose first line
    ends with ":", such as the sharding plan, up to the next ``[rectrain]`` line), and the
    traceback lines that are kept with Ray's prefix."""
    own, other, tb, block = [], [], False, False
    for line in lines:
        if block and not line.startswith(PREFIX):
            own.append(line)
            continue
        keep, tb = keep_line(line, tb)
        block = not is_err and not tb and line.startswith(PREFIX) and line.endswith(":")
        if keep:
            (own if line.startswith(PREFIX) and not tb else other).append(line)
    return own, other


def _print_filtered(data: dict, print_to_stdstream, ignore_prefix: bool) -> None:
    own, other = filter_batch(data.get("lines") or [], bool(data.get("is_err")))
    if (data.get("actor_name") or "").startswith(RAY_ACTORS):
        other = []
    sink = sys.stderr if data.get("is_err") else sys.stdout
    for line in own:
        print(line, file=sink, flush=True)
    if other:
        print_to_stdstream(dict(data, lines=other), ignore_prefix=ignore_prefix)


def after_init() -> None:
    """After ``ray.init(log_to_driver=True)``: route the workers' forwarded output through
    :func:`filter_batch` (no-op with ``--verbose``). Replaces the handler that Ray 2.60 registers
    as ``ray_print_logs`` on ``ray._private.ray_logging.global_worker_stdstream_dispatcher``."""
    quiet_driver()
    if verbose():
        return
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return  # log_to_driver off: nothing is forwarded
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", functools.partial(
        _print_filtered, print_to_stdstream=ray_worker.print_to_stdstream,
        ignore_prefix=ignore_prefix))
