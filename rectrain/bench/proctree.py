"""Peak memory of a subprocess and all its descendants (an embedded Ray's servers, workers and
actors), sampled by a psutil thread; bytes on disk of a folder.

The sampler polls ``psutil.Process(pid).children(recursive=True)`` every ``interval_s``
seconds and keeps, per process class, the largest resident set (RSS) any one process of the
class reached, and the largest sum over the tree. Classes, by command line (Ray sets worker
titles with ``setproctitle``):

- ``driver``: the subprocess itself;
- ``train_worker``: ``ray::RayTrainWorker...`` (Ray Train workers, one per rank);
- ``ray_worker``: every other ``ray::...`` process and ``default_worker.py`` (Ray Data tasks,
  actors such as the split coordinator or recommend's block actors, idle pooled workers);
- ``ray_system``: the rest of the tree (``gcs_server``, ``raylet``, dashboard, log monitor).

RSS counts shared pages (Ray's object store is shared memory) in every process that maps
them, so the tree sum over-counts them, and a long-lived Ray worker's RSS grows with every
object it ever read (the pages stay mapped). So the sampler also keeps each process's
*private* resident memory, RSS minus shared pages (``memory_info().shared``: the object
store's pages and shared libraries), the figure that says what a process itself holds; the
object store is bounded by its own configured capacity (spilling beyond it).
A process that lives less than one interval may be missed.
"""

from __future__ import annotations

import numbers
import os
import threading
import time

CLASSES = ("driver", "train_worker", "ray_worker", "ray_system")


def _psutil():
    try:
        import psutil
    except ImportError as e:
        raise ImportError("rectrain bench scale samples memory with psutil, which comes with "
                          "the bench extra: pip install -e '.[bench]'") from e
    return psutil


def classify(cmdline: list[str], is_root: bool) -> str:
    """The class (one of :data:`CLASSES`) of a process with this ``cmdline``."""
    if is_root:
        return "driver"
    head = cmdline[0] if cmdline else ""
    if head.startswith("ray::"):
        return "train_worker" if "TrainWorker" in head else "ray_worker"
    if any(a.endswith("default_worker.py") for a in cmdline[:3]):
        return "ray_worker"
    return "ray_system"


def title(cmdline: list[str]) -> str:
    """A short name for a process: its ``ray::`` title up to the first space, ``(`` or ``.``
    (the actor's class, not the method it runs), else the executable's base name (the
    interpreter's script for Python)."""
    if not cmdline:
        return "?"
    head = cmdline[0]
    if head.startswith("ray::"):
        return head.split(" ")[0].split("(")[0].split(".")[0]
    names = [os.path.basename(a) for a in cmdline[:3] if a and not a.startswith("-")]
    if names and names[0].startswith("python") and len(names) > 1:
        return names[1]
    return names[0] if names else "?"


def _pid(pid) -> int:
    """``pid`` checked as a process id: psutil reads None as this process and True as 1."""
    if isinstance(pid, bool) or not isinstance(pid, numbers.Integral) or pid < 1:
        raise ValueError(f"pid must be a process id (an integer >= 1), got {pid!r}")
    return int(pid)


def _root(ps, pid):
    """``psutil.Process(pid)``, or None when no such process exists (it exited)."""
    try:
        return ps.Process(_pid(pid))
    except ps.NoSuchProcess:
        return None


def _mem_mb(mi) -> tuple[float, float]:
    """``(RSS, private)`` MiB of a psutil ``memory_info()``; private = RSS minus shared pages
    (``shared`` is Linux's; elsewhere private = RSS)."""
    return mi.rss / 2**20, (mi.rss - getattr(mi, "shared", 0)) / 2**20


def _tree(ps, pid) -> list:
    """Process ``pid`` and all its descendants now; ``[]`` when ``pid`` has exited (before or
    during the listing)."""
    root = _root(ps, pid)
    if root is None:
        return []
    try:
        return [root] + root.children(recursive=True)
    except ps.Error:
        return []


class TreeSampler:
    """``with TreeSampler(pid) as s: ...``; then :meth:`result`. Peak RSS in MiB.

    A process's class is kept once it was seen as a Ray Train worker (a worker's title follows
    the method it runs, e.g. ``ray::RayTrainWorker.init_train_context``)."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        """Raises ValueError: ``pid`` is not a process id or no such process exists (nothing
        to sample), or ``interval_s`` is not a number of seconds > 0 (0 would spin a core)."""
        self.psutil = _psutil()
        self.root = _root(self.psutil, pid)
        if self.root is None:
            raise ValueError(f"TreeSampler: no process with pid {pid} (it exited, or never "
                             f"existed): nothing to sample")
        if isinstance(interval_s, bool) or not isinstance(interval_s, numbers.Real) \
                or not 0 < interval_s < float("inf"):
            raise ValueError(f"TreeSampler: interval_s must be a number of seconds > 0, got "
                             f"{interval_s!r}")
        self.interval_s = interval_s
        self.procs: dict[int, dict] = {}  # pid -> {"cls", "rss", "title", "private"} (peaks)
        self.tree_peak = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._loop, name="rectrain-rss", daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        """One poll of the tree (processes that exit meanwhile are skipped)."""
        ps = self.psutil
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except ps.Error:
            return
        total = 0.0
        for p in procs:
            try:
                mi = p.memory_info()
                cmd = p.cmdline()
            except ps.Error:
                continue
            rss, private = _mem_mb(mi)
            c = classify(cmd, p.pid == self.root.pid)
            rec = self.procs.setdefault(p.pid, {"cls": c, "rss": 0.0, "title": "",
                                                "private": 0.0, "private_title": ""})
            if c == "train_worker":
                rec["cls"] = c
            name = "driver" if c == "driver" else title(cmd)
            if rss >= rec["rss"]:
                rec["rss"], rec["title"] = rss, name
            if private >= rec["private"]:
                rec["private"], rec["private_title"] = private, name
            total += rss
        self.tree_peak = max(self.tree_peak, total)
        self.samples += 1

    def result(self) -> dict:
        """``{"peak_rss_mb": {class: MiB}, "peak_private_mb": {class: MiB}, "processes":
        {class: distinct processes seen}, "tree_peak_rss_mb", "top_processes_mb": {title: MiB}
        and "top_private_mb" (the 10 largest), "samples"}``; a class never seen has peak 0."""
        peak = {c: 0.0 for c in CLASSES}
        peak_priv = {c: 0.0 for c in CLASSES}
        count = {c: 0 for c in CLASSES}
        by_title: dict[str, float] = {}
        by_title_priv: dict[str, float] = {}
        for rec in self.procs.values():
            peak[rec["cls"]] = max(peak[rec["cls"]], rec["rss"])
            peak_priv[rec["cls"]] = max(peak_priv[rec["cls"]], rec["private"])
            count[rec["cls"]] += 1
            by_title[rec["title"]] = max(by_title.get(rec["title"], 0.0), rec["rss"])
            t = rec["private_title"]
            by_title_priv[t] = max(by_title_priv.get(t, 0.0), rec["private"])

        def top(d):
            return {k: round(v, 1) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:10]}
        return {"peak_rss_mb": {c: round(v, 1) for c, v in peak.items()},
                "peak_private_mb": {c: round(v, 1) for c, v in peak_priv.items()},
                "processes": count, "tree_peak_rss_mb": round(self.tree_peak, 1),
                "top_processes_mb": top(by_title), "top_private_mb": top(by_title_priv),
                "samples": self.samples}


def cpu_snapshot(pid: int) -> dict[int, tuple[str, float, str]]:
    """``{pid: (class, CPU seconds so far, title)}`` of process ``pid`` and all its descendants
    (user + system time of all of a process's threads, psutil ``cpu_times``); classes as in
    :func:`classify`, titles as in :func:`title` (``driver`` for ``pid``). Processes that exit
    meanwhile are skipped; ``{}`` when ``pid`` itself has exited.

    Raises:
        ValueError: ``pid`` is not a process id (an integer >= 1)."""
    ps = _psutil()
    out = {}
    for p in _tree(ps, pid):
        try:
            t = p.cpu_times()
            cmd = p.cmdline()
        except ps.Error:
            continue
        root = p.pid == pid
        out[p.pid] = (classify(cmd, root), t.user + t.system, "driver" if root else title(cmd))
    return out


def rss_by_title(pid: int, private: bool = False) -> dict[str, float]:
    """The largest resident set (MiB) per process title (:func:`title`; ``driver`` for ``pid``
    itself) among ``pid`` and its descendants now, one psutil pass; with ``private``, RSS
    minus shared pages (see the module docstring). ``{}`` when ``pid`` has exited (as when
    it exits during the pass).

    Raises:
        ValueError: ``pid`` is not a process id (an integer >= 1)."""
    ps = _psutil()
    out: dict[str, float] = {}
    for p in _tree(ps, pid):
        try:
            rss = _mem_mb(p.memory_info())[1 if private else 0]
            cmd = p.cmdline()
        except ps.Error:
            continue
        name = "driver" if p.pid == pid else title(cmd)
        out[name] = round(max(out.get(name, 0.0), rss), 1)
    return out


def cpu_seconds(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per class spent between two :func:`cpu_snapshot` calls (a process first seen
    in ``after`` counts from its start; one that exited in between is lost), plus ``"total"``.
    A pid whose CPU time went down was reused by a new process: counted from its start."""
    out = {c: 0.0 for c in CLASSES}
    for pid, (cls, t, _) in after.items():
        out[cls] += _spent(before, pid, t)
    out["total"] = sum(out.values())
    return out


def _spent(before: dict, pid: int, t: float) -> float:
    """CPU seconds of ``pid`` since ``before`` (all of ``t`` when ``pid`` is new or reused)."""
    b = before[pid][1] if pid in before else 0.0
    return t - b if t >= b else t


def cpu_seconds_by_title(before: dict, after: dict) -> dict[str, float]:
    """As :func:`cpu_seconds`, summed per process title instead of class (e.g. the split
    coordinator, the read tasks' pooled workers and each Ray server apart), largest first."""
    out: dict[str, float] = {}
    for pid, (_, t, name) in after.items():
        out[name] = out.get(name, 0.0) + _spent(before, pid, t)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def dir_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    n = 0
    for root, _, files in os.walk(path):
        for f in files:
            fp = os.path.join(root, f)
            if not os.path.islink(fp):
                try:
                    n += os.path.getsize(fp)
                except OSError:
                    pass
    return n


def wait_sampled(popen, interval_s: float = 0.5) -> tuple[int, float, dict]:
    """Wait for the ``subprocess.Popen`` ``popen`` while sampling its tree; returns
    ``(exit code, wall seconds from now, TreeSampler.result())``."""
    t0 = time.perf_counter()
    with TreeSampler(popen.pid, interval_s) as s:
        rc = popen.wait()
    return rc, time.perf_counter() - t0, s.result()
