"""A run folder as an earlier, finished run left it, for the tests of "a failed run keeps the
last good one, a successful one replaces it" (tests/test_reliability.py, and the successful
Ray Train run of tests/test_uneven_shards.py)."""

from __future__ import annotations

import json
from pathlib import Path

#: files of an earlier run (run outputs, a failed attempt's leftovers) and one of the user's
OLD_RUN = {"metrics.json": '{"old": 1}', "checkpoint/meta.json": '{"step": 9}',
           "checkpoints/step-00000009/meta.json": '{"step": 9}',
           "predictions/test.parquet": "old", "recommendations/top_k.parquet": "old",
           "notes.txt": "mine"}


def old_run(run: Path) -> None:
    """Write :data:`OLD_RUN` under ``run``."""
    for rel, text in OLD_RUN.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)


def tree(root: Path) -> list[str]:
    """Paths of the files under ``root``, relative to it, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def outside_attempts(run: Path) -> dict:
    """``{relative path: text}`` of the files of ``run`` outside ``.attempts/``."""
    return {p: (run / p).read_text() for p in tree(run) if not p.startswith(".attempts")}


def assert_replaced_by_a_new_run(run: Path, metrics: dict) -> None:
    """After a successful run into ``run`` (which held :func:`old_run` and possibly a failed
    attempt): no run output of the earlier run is left, the user's file is kept, the new run's
    predictions and best checkpoint are there, and no attempt folder is left."""
    files = [p for p in tree(run) if not p.startswith(".attempts")]
    assert "recommendations/top_k.parquet" not in files and "notes.txt" in files
    assert "checkpoints/step-00000009/meta.json" not in files
    assert (run / "predictions" / "test.parquet").stat().st_size > 100
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["epoch"] == metrics["best_epoch"] and "old" not in metrics
    assert not (run / ".attempts").exists() or not any((run / ".attempts").iterdir())
