"""Where the seconds of one recommend job go: wall seconds per phase, kept in
``summary.json["timings"]`` and printed as one line (docs/recommend.md, "Where the time goes").

Cheap by design: a ``time.perf_counter()`` pair per phase on the driver, and per block /
actor a few integers that travel back with the block's counts (epoch milliseconds, so the
driver can line up the actors' clocks with its own on one machine; on a cluster the actor
figures are as good as the nodes' clock sync).
"""

from __future__ import annotations

import contextlib
import time

#: the phases in the order they happen (absent ones are skipped in the printed line)
PHASES = {
    "driver_start_s": "start-up (Python, imports)",
    "plan_s": "plan",
    "models_s": "models",
    "context_s": "serving context",
    "index_s": "index",
    "ray_init_s": "Ray init",
    "share_s": "object store",
    "actor_start_s": "actor start",
    "actor_load_s": "actor fetch",
    "shard_load_s": "sharded model load (slowest rank)",
    "first_block_s": "first block",
    "blocks_s": "blocks",
    "write_s": "block writes (in blocks)",
    "finalize_s": "final files",
    "metrics_s": "list metrics",
    "total_s": "total",
}


def process_age_s() -> float:
    """Seconds since this process started (its Python start-up and imports, for the CLI)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


class Phases:
    """Wall seconds per phase (:data:`PHASES` keys), accumulated."""

    def __init__(self):
        self.s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.s[name] = self.s.get(name, 0.0) + float(seconds)

    def update(self, other: dict[str, float]) -> None:
        for k, v in other.items():
            self.add(k, v)

    def rounded(self) -> dict[str, float]:
        return {k: round(self.s[k], 3) for k in PHASES if k in self.s}

    def line(self) -> str:
        """``start-up 6.1 s, plan 0.2 s, ...`` in phase order."""
        return ", ".join(f"{PHASES[k]} {v:.1f} s" for k, v in self.rounded().items())


def actor_phases(stats: list[dict], started_ms: int) -> dict[str, float]:
    """Actor phases from the blocks' counts, each actor's figures reported with its first
    block (``actor_t0_ms``, ``actor_ready_ms``: epoch ms): ``actor_start_s`` (the dataset's
    start to the first actor entering its constructor: worker processes starting and
    importing torch / torchrec as Ray unpickles the UDF), ``actor_load_s`` (the slowest
    actor's constructor: fetching the shared runs and index), ``first_block_s`` (the dataset's
    start to the first block written). ``started_ms``: epoch ms when the driver started the
    dataset."""
    mine = [s for s in stats if s.get("actor_t0_ms")]
    out = {}
    if mine:
        out["actor_start_s"] = max(0, min(s["actor_t0_ms"] for s in mine) - started_ms) / 1000
        out["actor_load_s"] = max(s["actor_ready_ms"] - s["actor_t0_ms"] for s in mine) / 1000
    done = [s["done_ms"] for s in stats if s.get("done_ms")]
    if done:
        out["first_block_s"] = max(0, min(done) - started_ms) / 1000
    return out
