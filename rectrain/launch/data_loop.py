"""A pause in Ray Data's scheduling loop after a step in which nothing moved.

Ray Data's streaming executor (the split coordinator's, for a training job) runs its scheduling
loop ``while True`` and blocks only in ``ray.wait(timeout=0.1)`` on its running tasks
(``process_completed_tasks`` in ``ray/data/_internal/execution/streaming_executor_state.py``).
When the read is held back by backpressure (the object-store budget is full because the
training workers are the bottleneck, the normal state of a long epoch), the running read
tasks' outputs are ready but may not be taken, so ``ray.wait`` returns at once, and with no
task running at all it is not called: either way the loop spins. Measured on 2 cores, the
split coordinator then took 0.8 of a core for as long as the budget stayed full, and
training ran at 12-16k instead of 20-27k samples/s (docs/benchmarks.md, "Training's samples/s
at size").

:class:`IdleLoopPause` is a Ray Data ``ExecutionCallback`` (added to
``DataContext.custom_execution_callback_classes`` by :func:`rectrain.launch.cluster.connect`,
so every dataset rectrain creates carries it into its executor): after each loop step in
which no operator made progress, by the definition of Ray's own ``NoProgressGuard`` (no
output taken, no block entered or left an operator's queues) and no task was submitted or
finished, it sleeps :data:`IDLE_PAUSE_S`. That bounds an idle loop to ~50 steps a second and
delays the next dispatch after a consumer frees budget by at most that long (a block takes
seconds to consume); a step that moved anything is never delayed.
"""

from __future__ import annotations

import logging
import math
import os
import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

log = logging.getLogger(__name__)

#: the environment variable that sets :data:`IDLE_PAUSE_S`; its default; the largest value
#: taken (a longer pause only starves the consumers; ``time.sleep`` overflows near 1e10 s)
ENV, DEFAULT_S, MAX_S = "RECTRAIN_DATA_IDLE_PAUSE_S", 0.02, 10.0


def idle_pause_s(environ=None) -> float:
    """Seconds of the pause from ``RECTRAIN_DATA_IDLE_PAUSE_S`` in ``environ`` (default
    ``os.environ``): a number from 0 to :data:`MAX_S`, 0 turns the pause off; unset or
    empty: :data:`DEFAULT_S`.

    Raises:
        ValueError: the value is not a number of seconds from 0 to 10 (text, negative, inf,
            nan, larger); the message names the variable."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not raw:
        return DEFAULT_S
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and 0 <= v <= MAX_S):
        raise ValueError(f"{ENV}={raw!r}: needs a number of seconds from 0 to {MAX_S:g} (0 "
                         f"turns the pause off; unset: {DEFAULT_S})")
    return v


def _pause_at_import() -> float:
    # connect() raises on a bad value in the driver; a process that imports this module
    # elsewhere (a Ray actor running an executor) keeps the default rather than failing there
    try:
        return idle_pause_s()
    except ValueError as e:
        log.warning("%s; using %s", e, DEFAULT_S)
        return DEFAULT_S


#: seconds slept after a scheduling-loop step in which nothing moved; the environment variable
#: ``RECTRAIN_DATA_IDLE_PAUSE_S`` (read in each process that runs an executor; a local Ray's
#: workers inherit the driver's environment) sets it, 0 turns the pause off (for measuring it)
IDLE_PAUSE_S = _pause_at_import()


def progress_state(topology) -> tuple | None:
    """What changes when the executor makes progress: per operator, outputs taken, blocks in
    its input and output queues, tasks submitted and finished (a tuple; ``None`` when the
    executor's internals are not as Ray 2.60 has them)."""
    try:
        return tuple((op.metrics.num_outputs_taken, state.total_enqueued_input_blocks(),
                      state.total_enqueued_output_blocks(), op.metrics.num_tasks_submitted,
                      op.metrics.num_tasks_finished)
                     for op, state in topology.items())
    except Exception:  # noqa: BLE001 - a later Ray's internals: run the loop as Ray wrote it
        return None


class IdleLoopPause(ExecutionCallback):
    """Sleep :data:`IDLE_PAUSE_S` after each step of a streaming executor's loop that moved
    nothing (see the module docstring)."""

    def __init__(self):
        self._last = None

    def on_execution_step(self, executor) -> None:
        # the topology is the executor's private state; without it the loop runs unchanged
        topology = getattr(executor, "_topology", None)
        if not topology:
            return
        now = progress_state(topology)
        if IDLE_PAUSE_S > 0 and now is not None and now == self._last:
            time.sleep(IDLE_PAUSE_S)
        self._last = now
