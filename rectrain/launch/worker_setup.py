"""Code every Ray worker process of a rectrain job runs once at start, before any task.

Registered as the job's ``runtime_env["worker_process_setup_hook"]`` (Ray's worker set-up hook,
https://docs.ray.io/en/latest/ray-core/api/doc/ray.runtime_env.RuntimeEnv.html) by
:func:`rectrain.launch.cluster.connect` (local mode) and
:func:`rectrain.launch.submit.build_runtime_env` (cluster jobs).
"""

#: dotted path Ray imports in each worker
HOOK = "rectrain.launch.worker_setup.preload"


def preload() -> None:
    """Quiet the stack's output in this worker (:func:`rectrain.launch.quiet.quiet_worker`) and
    import pandas before any task runs.

    Import pandas (about 0.2 s once pyarrow is loaded) before the worker runs any task.

    Ray Data and pyarrow import pandas lazily, inside whichever task first needs it. A task
    stopped by ``ray.cancel(force=False)`` (Ray Data stops the running tasks of a failed or
    early-stopped dataset that way; prepare did so for a failed file's siblings until
    2026-11-30) gets a ``KeyboardInterrupt``. Arriving in the middle of that first ``import
    pandas`` it leaves ``pandas.core`` in ``sys.modules`` while the package itself is dropped;
    the worker is then reused and every later ``pd.core`` lookup fails with ``module 'pandas'
    has no attribute 'core'`` (CI, 2026-11-30). Imported here, at worker start, no task can
    interrupt it.
    """
    import pandas  # noqa: F401

    from rectrain.launch.quiet import quiet_worker

    quiet_worker()
