"""Read tasks over the events files: contiguous runs of files grouped by bytes.

A Ray task per file costs more than reading a small file (task scheduling, its result objects
and, downstream, one bucket split per read table): with thousands of files of a few rows,
prepare spent its time on tasks, not rows. Files are grouped, in listing order, into tasks of
up to :data:`TASK_BYTES` and :data:`TASK_FILES` files (a larger file is a task of its own; a
file is never split), the way Ray Data's file-based datasources pack small files into one read
task. The grouping goes into the manifest (``read_tasks``), with a warning when there are many
files (:data:`WARN_MIN_FILES` or more) and most are small (under :data:`SMALL_FILE_BYTES`).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

TASK_BYTES = 64 * 2**20  # Parquet bytes per read task (on disk, compressed)
TASK_FILES = 256  # files per read task at most, so small inputs still spread over the CPUs
SMALL_FILE_BYTES = 2**20  # a file below this is "small" (warned about when most are)
WARN_MIN_FILES = 100  # fewer files cost little however small they are: no warning


def group_files(sizes: list[int], task_bytes: int = TASK_BYTES, task_files: int = TASK_FILES
                ) -> list[list[int]]:
    """Indices of ``sizes`` (bytes per file, listing order) in contiguous groups: a group
    takes files while its bytes stay within ``task_bytes`` and it has fewer than
    ``task_files``; a file of ``task_bytes`` or more is a group of its own. Every index is in
    exactly one group, in order."""
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_bytes = 0
    for i, n in enumerate(sizes):
        if cur and (cur_bytes + n > task_bytes or len(cur) >= task_files):
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += n
    if cur:
        groups.append(cur)
    return groups


def describe(groups: list[list[int]], sizes: list[int], what: str) -> dict:
    """The manifest's ``read_tasks`` entry (counts; bytes on disk) and, with at least
    :data:`WARN_MIN_FILES` files of which more than half are small, a logged warning naming
    ``what`` (the events URL)."""
    per_task = np.array([len(g) for g in groups]) if groups else np.zeros(1, dtype=int)
    sz = np.asarray(sizes, dtype=np.int64)
    small = int((sz < SMALL_FILE_BYTES).sum())
    info = {"tasks": len(groups), "files": len(sizes),
            "files_per_task": {"min": int(per_task.min()), "max": int(per_task.max()),
                               "mean": round(float(per_task.mean()), 2)},
            "task_bytes": TASK_BYTES, "task_files": TASK_FILES,
            "small_files": small, "mean_file_bytes": int(sz.mean()) if sz.size else 0}
    if sz.size >= WARN_MIN_FILES and small * 2 > sz.size:
        log.warning(
            "%s: %d of %d events files are under %d KiB (mean %d bytes): read %d files per "
            "task (%d tasks); fewer, larger files (64-512 MiB) prepare and train faster",
            what, small, sz.size, SMALL_FILE_BYTES // 1024, info["mean_file_bytes"],
            per_task.max(), len(groups))
    return info
