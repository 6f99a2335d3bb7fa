"""The one place rectrain starts or joins Ray: :func:`connect` (and :func:`init_ray` for a job).

Every ``ray.init`` of the package goes through :func:`connect`, so each run gets the same
settings: the loopback-only binding of a local Ray, the worker set-up hook
(:mod:`rectrain.launch.worker_setup`), token auth when joining a cluster, this process's Ray Data
context, and the output settings of :mod:`rectrain.launch.quiet`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

from rectrain.config import JobConfig
from rectrain.launch import quiet, worker_setup


def cluster_address(address: Optional[str], cfg: Optional[JobConfig] = None) -> Optional[str]:
    """The Ray address to join: ``address``, else ``cfg.ray.address``, else ``$RAY_ADDRESS``;
    ``None`` means an embedded local Ray. Sets ``RAY_AUTH_MODE=token`` when joining a cluster and
    a token is at hand: Ray 2.60 clusters started by ``ray start`` use token auth, a client
    joining by address does not switch to token mode by itself, and Ray reads the mode when it
    is first imported (so this runs before ``import ray``). Also applies
    :func:`rectrain.launch.quiet.configure_env`, for the same reason."""
    addr = address or (cfg.ray.address if cfg is not None else None) or os.environ.get(
        "RAY_ADDRESS")
    if addr and "RAY_AUTH_MODE" not in os.environ and (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or os.path.exists(os.path.expanduser("~/.ray/auth_token"))):
        os.environ["RAY_AUTH_MODE"] = "token"
    quiet.configure_env(local=not addr)
    return addr


@contextlib.contextmanager
def _loopback_only():
    """While starting a local Ray, make its node IP 127.0.0.1 so that every Ray server binds
    loopback only.

    Ray 2.60's ``ray.init`` turns ``_node_ip_address="127.0.0.1"`` into the machine's routable IP
    (``services.resolve_ip_for_localhost``) and its GCS, raylet, object manager, core workers and
    agents then listen on all interfaces (``::``). Ray keeps loopback only where it disables
    clusters (``ray_constants.ENABLE_RAY_CLUSTER``, the ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
    switch, off on macOS/Windows): this flips it for the ``ray.init`` call only, so a later
    connection to a real cluster from the same process is unaffected. Checked with psutil in
    ``tests/test_submit.py::test_local_mode_listens_on_loopback_only``.
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, *,
            dashboard: bool = True) -> dict:
    """Join the Ray cluster at ``address`` or start an embedded local Ray; returns
    ``ray.cluster_resources()``. A Ray already initialised in this process is reused.

    Local mode: ``num_cpus`` logical CPUs (``None``: all), the dashboard (when ``dashboard``)
    and every other Ray server bound to 127.0.0.1, and each worker runs
    :func:`rectrain.launch.worker_setup.preload` at start (Ray's ``worker_process_setup_hook``).
    ``address="local"`` always gives a fresh embedded instance, never a cluster some earlier
    ``ray start`` left running (``ray.init()`` with no address would join that one).

    Raises:
        ValueError: ``RECTRAIN_DATA_IDLE_PAUSE_S`` is not a number of seconds from 0 to 10
            (:func:`rectrain.launch.data_loop.idle_pause_s`).
    """
    addr = cluster_address(address)
    import ray

    _configure_data_context()  # also when Ray was started by someone else
    if ray.is_initialized():
        return ray.cluster_resources()
    # prepare re-raises the first failed task's own error; Ray's "unhandled error" echo of the
    # sibling tasks' errors would only repeat it as tracebacks
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if addr:
        ray.init(address=addr, log_to_driver=True, logging_level=quiet.ray_log_level())
    else:
        with _loopback_only():
            ray.init(address="local", num_cpus=num_cpus,
                     runtime_env={"worker_process_setup_hook": worker_setup.HOOK},
                     include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     log_to_driver=True, _node_ip_address="127.0.0.1",
                     configure_logging=True, logging_level=quiet.ray_log_level())
    quiet.after_init()
    return ray.cluster_resources()


def init_ray(cfg: JobConfig, address: Optional[str] = None) -> dict:
    """Connect to Ray for the job ``cfg``; returns the cluster's resources.

    With an address (argument, ``cfg.ray.address`` or ``RAY_ADDRESS``) join that cluster.
    Otherwise start an embedded local Ray whose logical CPU count is
    ``num_workers * cpus_per_worker + data_cpus``: training workers reserve their CPUs and Ray
    Data keeps ``data_cpus`` for reading (with only as many CPUs as workers, Ray Data's read
    stays backpressured forever). See :func:`connect`.
    """
    addr = cluster_address(address, cfg)
    tc = cfg.train
    num_cpus = tc.num_workers * tc.cpus_per_worker + cfg.ray.data_cpus
    return connect(addr, num_cpus=int(max(num_cpus, 1) + 0.999))


def _configure_data_context() -> None:
    """This process's Ray Data settings for every dataset rectrain creates."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = quiet.verbose()
    ctx.print_on_execution_start = quiet.verbose()
    # Ray 2.60's Parquet DataSourceV2 starts every execution (every epoch) with a ListFiles
    # step that took 7-10 s of wall time (0.16 s CPU) for 125 local files on 2 cores, before
    # the first block; the V1 datasource gave its first block in 0.1-0.6 s on the same files
    # (first batch of epoch 1 of a 2M-row Criteo run: 11.9 s -> 0.3 s; docs/benchmarks.md)
    ctx.use_datasource_v2 = False
    # the scheduling loop spins while no task is in flight (backpressured read, drained
    # input): a short pause then gives the training workers their cores back
    from rectrain.launch.data_loop import IdleLoopPause, idle_pause_s
    idle_pause_s()  # a bad RECTRAIN_DATA_IDLE_PAUSE_S fails here, not in a Ray actor
    if IdleLoopPause not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(IdleLoopPause)



def cpu_shortfall(total_cpus: float, max_cpus: Optional[float], workers: int,
                  cpus_per_worker: float, data_cpus: float) -> Optional[str]:
    """Why a cluster cannot run the job's training workers AND Ray Data's read, or None.

    ``total_cpus``: the cluster's logical CPUs now (``ray.cluster_resources()["CPU"]``);
    ``max_cpus``: what its autoscaler may grow to (Ray's cluster config, ``None`` without an
    autoscaler). The workers hold ``workers * cpus_per_worker`` CPUs for the whole run and each
    Ray Data read task needs one CPU of its own: with less than one CPU left over, the read never
    starts and the job waits forever (issue 12, kind 3). Pure: no Ray.
    """
    have = max(total_cpus, max_cpus or 0)
    train = workers * cpus_per_worker
    if have - train >= 1:
        return None
    need = train + max(data_cpus, 1.0)
    grow = (f", up to {max_cpus:g} with its autoscaler" if max_cpus and max_cpus > total_cpus
            else "")
    return (f"the job needs {need:g} CPUs (train.num_workers {workers} x train.cpus_per_worker "
            f"{cpus_per_worker:g} for the training workers + ray.data_cpus {data_cpus:g} for "
            f"Ray Data's read) but the cluster has {total_cpus:g}{grow}: the workers would take "
            f"every CPU and the read could never start. Lower train.num_workers or "
            f"train.cpus_per_worker, or add nodes")


def check_cluster_cpus(cfg: JobConfig) -> None:
    """Stop before training when the joined cluster cannot give Ray Data a CPU beside the
    training workers (:func:`cpu_shortfall`; Ray's own check would be an endless wait).

    Raises:
        ValueError: the message of :func:`cpu_shortfall` (the CLI prints it as one line).
    """
    import ray
    from ray._private.state import state

    try:  # the autoscaler's node groups; None on a fixed cluster
        max_cpus = (state.get_max_resources_from_cluster_config() or {}).get("CPU")
    except Exception:  # noqa: BLE001 - an older GCS without the key: judge by what is there
        max_cpus = None
    tc = cfg.train
    why = cpu_shortfall(ray.cluster_resources().get("CPU", 0.0), max_cpus, tc.num_workers,
                        tc.cpus_per_worker, cfg.ray.data_cpus)
    if why:
        raise ValueError(why)
