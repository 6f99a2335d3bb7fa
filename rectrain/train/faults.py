"""Fault injection for tests: one hook, ``RECTRAIN_FAULT="RANK:STEP:MODE"``.

Rank ``RANK`` fails when it is about to run global training step ``STEP`` (0-based: after
``STEP`` steps are done, i.e. after any checkpoint saved at step ``STEP``):

- ``raise``: raises :class:`InjectedFault` (a RuntimeError), so a test can check that one
  failing rank stops the whole job with the original error;
- ``exit``: ``os._exit(1)``, a killed worker, so a test can check that Ray Train restarts the
  worker group and the run resumes from its latest checkpoint. It first writes the marker
  ``RUN_DIR/faults/rank<R>-step<S>.json`` and never fires while the marker exists, so the
  restarted worker does not fail again;
- ``pause``: writes the same marker, then sleeps (up to an hour) instead of stepping, so a test
  can kill a node while the whole group stands at a known step (the other ranks wait in the
  next collective); never fires while the marker exists either.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from rectrain.data import storage

FAULT_ENV = "RECTRAIN_FAULT"


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` fault."""


def marker_url(run_dir: str, rank: int, step: int) -> str:
    return storage.join(run_dir, "faults", f"rank{rank}-step{step}.json")


def fault_hook(rank: int, run_dir: str) -> Callable[[int], None]:
    """``check(step)`` to call before every training step (a no-op unless ``RECTRAIN_FAULT``
    names this rank).

    Raises:
        ValueError: ``RECTRAIN_FAULT`` is not ``RANK:STEP:raise|exit|pause``.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return lambda step: None
    try:
        r, s, mode = spec.split(":")
        r, s = int(r), int(s)
        assert mode in ("raise", "exit", "pause")
    except (ValueError, AssertionError):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected RANK:STEP:raise|exit|pause") from None
    if r != rank:
        return lambda step: None
    marker = marker_url(run_dir, rank, s)

    def check(step: int) -> None:
        if step != s:
            return
        if mode == "raise":
            raise InjectedFault(f"injected fault on rank {rank} at step {step} ({FAULT_ENV})")
        if storage.exists(marker):
            return
        storage.write_json({"step": step, "rank": rank}, marker)
        print(f"[rectrain] fault injection: rank {rank} {mode}s before step {step}", flush=True)
        if mode == "pause":
            time.sleep(3600)
            return
        os._exit(1)

    return check
