"""A failed run keeps the last good one: ``rectrain train`` writes into an attempt folder and
promotes it into ``run_dir`` only on success (driver side; no Ray here).

``run_dir/.attempts/<id>/`` receives everything a run writes (checkpoints, ``metrics.json``,
predictions, TensorBoard events, worker placement, fault markers, Ray Train's storage). The
workers see the attempt folder as their ``run_dir``, so a worker group restarted by Ray Train
(``checkpoint.max_failures``) resumes from the attempt's own latest checkpoint
(``resume: auto``). A resume from ``run_dir`` (``--resume``, ``latest``, ``auto``) first copies
the checkpoint it resumes from, and the run's best checkpoint, into the attempt.

On success :func:`promote` replaces the run outputs of ``run_dir`` (:data:`RUN_OUTPUTS`, the
names a run writes, incl. ``recommendations/`` made from the old checkpoint) by the attempt's,
so no file of an earlier run is left beside the new ones; other files in ``run_dir`` are not
touched. On failure ``run_dir`` is as it was and the attempt stays for inspection or an explicit
``--resume run_dir/.attempts/<id>``; the next run deletes it.
"""

from __future__ import annotations

import posixpath
import time
import uuid

from rectrain.data import storage

ATTEMPTS = ".attempts"
#: what a run (and ``recommend`` with its default output) writes into ``run_dir``
RUN_OUTPUTS = ("checkpoint", "checkpoints", "checkpoint.tmp", "metrics.json", "predictions",
               "tensorboard", "workers", "faults", "ray", "recommendations")


def _entries(url: str) -> list[str]:
    fs, path = storage.url_to_fs(url)
    return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)] \
        if fs.exists(path) else []


def _copy(src: str, dst: str) -> None:
    fs, s = storage.url_to_fs(src)
    _, d = storage.url_to_fs(dst)
    fs.makedirs(posixpath.dirname(d), exist_ok=True)
    fs.copy(s, d, recursive=True)


def start_attempt(cfg):
    """A fresh attempt folder for ``cfg`` (whose ``checkpoint.resume`` is already resolved:
    None, ``auto`` or a checkpoint URL). Returns ``(cfg for the workers, attempt url)``: a copy
    of ``cfg`` whose ``run_dir`` is the attempt and whose ``resume`` is ``auto``, with the
    checkpoint to resume from (and, from ``run_dir``, its best checkpoint) copied in first.

    Earlier attempts (failed runs) are deleted, except one the resume URL lies in.
    """
    from rectrain.train.resume import checkpoints_url, resolve_resume

    run_dir = cfg.run_dir
    root = storage.join(run_dir, ATTEMPTS)
    resume = cfg.checkpoint.resume
    if resume == "auto":
        resume = resolve_resume(run_dir, "auto")
    for name in _entries(root):
        old = storage.join(root, name)
        if not (resume and resume.startswith(old.rstrip("/") + "/")):
            storage.remove(old)
    attempt = storage.join(root, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    out = cfg.model_copy(deep=True)
    out.run_dir = attempt
    out.checkpoint.resume = "auto"
    if resume:
        meta = storage.read_json(storage.join(resume, "meta.json"))
        _copy(resume, storage.join(checkpoints_url(attempt), f"step-{int(meta['step']):08d}"))
        # the best checkpoint of the run resumed from (run_dir or one of its attempts);
        # a checkpoint of another run brings no best (its best weights are not here)
        up = posixpath.dirname(resume.rstrip("/"))
        src_run = posixpath.dirname(up) if posixpath.basename(up) == "checkpoints" else up
        best = storage.join(src_run, "checkpoint")
        if src_run.startswith(run_dir.rstrip("/")) and best.rstrip("/") != resume.rstrip("/") \
                and storage.exists(storage.join(best, "meta.json")):
            _copy(best, storage.join(attempt, "checkpoint"))
    fs, path = storage.url_to_fs(attempt)
    fs.makedirs(path, exist_ok=True)
    return out, attempt


def promote(attempt: str, run_dir: str) -> None:
    """Replace ``run_dir``'s run outputs by the attempt's (see the module doc), then delete the
    attempt folder. The old outputs are first moved into a sibling ``.attempts/previous-*``
    folder, so a crash in between leaves them recoverable, never mixed with the new ones."""
    prev = storage.join(run_dir, ATTEMPTS, f"previous-{posixpath.basename(attempt)}")
    for name in _entries(run_dir):
        if name in RUN_OUTPUTS:
            fs, path = storage.url_to_fs(prev)
            fs.makedirs(path, exist_ok=True)
            storage.move(storage.join(run_dir, name), storage.join(prev, name))
    for name in _entries(attempt):
        storage.move(storage.join(attempt, name), storage.join(run_dir, name))
    storage.remove(attempt)
    storage.remove(prev)
