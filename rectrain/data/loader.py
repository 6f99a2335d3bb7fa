"""Per-worker input: shards of prepared samples as large Arrow blocks, sliced locally into batches.

Two sources give each rank its shard of a split:

- :class:`RayShard` wraps the ``DataIterator`` from ``ray.train.get_dataset_shard`` and iterates
  whole blocks (``iter_batches(batch_size=None, batch_format="pyarrow")``) and slices them
  locally: the conversion to a :class:`~rectrain.data.features.Batch` costs per Arrow/NumPy
  call, not per row, so few large calls beat many small ones (docs/benchmarks.md, "Prepare and
  input throughput": batch 8192 converts 2.7x faster per row than batch 1024).
- :class:`FileShard` reads the split's Parquet files directly with pyarrow (torchrun / one
  process / tests); rank r gets the contiguous row range ``[r*N/W, (r+1)*N/W)``.

:func:`collective_batches` then makes every rank run the same number of steps: before each step
the ranks all-reduce whether they have a batch and all stop as soon as one has none (training,
``drop_last``), or continue while any has rows, padding the others (evaluation, so every row is
scored exactly once while the sharded model's collectives stay matched).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from rectrain.data import storage
from rectrain.data.door import parent, prepared_bounds, read_checked


class InputStalled(TimeoutError):
    """No input block arrived within ``train.batch_timeout_s``."""


class RayShard:
    """A rank's shard of a Ray Dataset (from ``ray.train.get_dataset_shard(name)``).

    With ``timeout_s``, the blocks are pulled through :func:`prefetch` (depth 1, one hand-off
    per block, not per batch) so that a wait of more than ``timeout_s`` seconds for the next
    block raises :class:`InputStalled` instead of blocking forever; Ray Data's ``DataIterator``
    has no timeout of its own."""

    def __init__(self, iterator, columns: Optional[list[str]] = None,
                 timeout_s: Optional[float] = None, split: str = "train"):
        self.iterator = iterator
        self.columns = columns
        self.timeout_s, self.split = timeout_s, split

    def tables(self, epoch: int = 0) -> Iterator[pa.Table]:
        blocks = (t.select(self.columns) if self.columns else t
                  for t in self.iterator.iter_batches(batch_size=None, batch_format="pyarrow",
                                                      prefetch_batches=2))
        if not self.timeout_s:
            yield from blocks
            return
        yield from prefetch(blocks, 1, timeout_s=self.timeout_s, stalled=self._stalled)

    def _stalled(self) -> str:
        return stalled_message(self.split, self.timeout_s, _cluster_cpus())


def _cluster_cpus() -> Optional[tuple[float, float]]:
    """(total, free) logical CPUs of the Ray cluster this process is in, None outside Ray."""
    try:
        import ray
        return (ray.cluster_resources().get("CPU", 0.0),
                ray.available_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 - only decorates an error message
        return None


def stalled_message(split: str, timeout_s: float, cpus: Optional[tuple[float, float]]) -> str:
    """The error text of an input stall: what was waited for, the likely cause (Ray Data's read
    tasks pending for want of a CPU the training workers hold), and the settings to change."""
    seen = (f" (the cluster has {cpus[0]:g} CPUs, {cpus[1]:g} free)" if cpus else "")
    return (f"no block of the {split!r} split arrived within train.batch_timeout_s="
            f"{timeout_s:g} s: Ray Data's read is likely waiting for a CPU that the training "
            f"workers hold{seen}. Give Ray Data CPUs beside the workers (fewer "
            f"train.num_workers or train.cpus_per_worker, ray.data_cpus, more nodes), or raise "
            f"train.batch_timeout_s if the storage is just slow")


class FileShard:
    """Rank ``rank`` of ``world``'s contiguous row range of the Parquet files under ``url``."""

    def __init__(self, url: str, rank: int, world: int, columns: Optional[list[str]] = None):
        files, _ = storage.list_parquet_files(url) if storage.exists(url) else ([], [])
        self.files, self.rank, self.world, self.columns = files, rank, world, columns
        self.url = url

    def tables(self, epoch: int = 0) -> Iterator[pa.Table]:
        if not self.files:
            return
        t = read_checked(self.files, self.columns, prepared_bounds(parent(self.url)))
        n = t.num_rows
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        if hi > lo:
            yield t.slice(lo, hi - lo)


def rebatch(tables: Iterable[pa.Table], batch_size: int, drop_last: bool,
            rng: Optional[np.random.Generator] = None) -> Iterator[pa.Table]:
    """Slice a stream of Arrow tables into tables of exactly ``batch_size`` rows (the last may be
    shorter unless ``drop_last``). With ``rng``, each incoming block's rows are permuted first
    (a vectorised local shuffle)."""
    buf: list[pa.Table] = []
    n = 0
    for t in tables:
        if t.num_rows == 0:
            continue
        if rng is not None:
            t = t.take(pa.array(rng.permutation(t.num_rows)))
        buf.append(t)
        n += t.num_rows
        if n < batch_size:
            continue
        cat = pa.concat_tables(buf)
        off = 0
        while n - off >= batch_size:
            yield cat.slice(off, batch_size)
            off += batch_size
        buf, n = ([cat.slice(off)] if n > off else []), n - off
    if n and not drop_last:
        yield pa.concat_tables(buf)


T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int, timeout_s: Optional[float] = None,
             stalled: Optional[Callable[[], str]] = None) -> Iterator[T]:
    """Iterate ``items`` in a background thread, keeping up to ``depth`` of them ready (e.g.
    Arrow slicing and :meth:`FeatureLayout.to_batch` for the next batches while the model runs
    the current one; NumPy/Arrow/torch release the GIL for most of that work). ``depth`` 0
    iterates inline. An exception in the producer is re-raised here; closing the iterator early
    stops the thread after its current item.

    With ``timeout_s`` (and ``depth`` >= 1), waiting longer than that for the next item raises
    :class:`InputStalled` with the message ``stalled()``; the producer thread, stuck in
    ``items``, is left behind (a daemon)."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put((x, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((done, e))

    th = threading.Thread(target=produce, name="rectrain-prefetch", daemon=True)
    th.start()
    try:
        while True:
            try:
                x, err = q.get(timeout=timeout_s)
            except queue.Empty:
                raise InputStalled(stalled() if stalled else
                                   f"no item within {timeout_s:g} s") from None
            if x is done:
                if err is not None:
                    raise err
                return
            yield x
    finally:
        stop.set()


def _agree(flag: int, op) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([flag], dtype=torch.int64)
    dist.all_reduce(t, op=op)
    return int(t.item())


def collective_batches(batches: Iterator[pa.Table], mode: str
                       ) -> Iterator[tuple[Optional[pa.Table], int]]:
    """Yield ``(table, n_real)`` so that all ranks take the same number of steps.

    ``mode="train"``: stop on every rank as soon as any rank is exhausted (``MIN`` all-reduce).
    ``mode="eval"``: continue while any rank has rows (``MAX``); a rank with no rows left gets
    ``(None, 0)`` and must still run the step (on :func:`padding_table` rows).
    """
    op = dist.ReduceOp.MIN if mode == "train" else dist.ReduceOp.MAX
    for_batches = iter(batches)
    while True:
        t = next(for_batches, None)
        if not _agree(0 if t is None else 1, op):
            return
        yield t, (0 if t is None else t.num_rows)


def padding_table(schema: pa.Schema, n: int) -> pa.Table:
    """``n`` filler rows for ``schema``: 0 for numbers, empty lists, empty strings."""
    cols = {}
    for field in schema:
        ty = field.type
        if pa.types.is_list(ty) or pa.types.is_large_list(ty):
            cols[field.name] = pa.array([[]] * n, ty)
        elif pa.types.is_string(ty) or pa.types.is_large_string(ty):
            cols[field.name] = pa.array([""] * n, ty)
        else:
            cols[field.name] = pc.cast(pa.array(np.zeros(n, dtype=np.int64)), ty)
    return pa.table(cols, schema=schema)


def padded_eval_tables(source, layout, batch_size: int, keep=(), out=None):
    """Evaluation batches of a shard, collective over ranks: yields ``(table, n_real, raw)``
    where ``table`` is exactly ``batch_size`` rows of ``layout.columns`` (real rows first, then
    padding rows that the caller discards), ``n_real`` the real rows (0 on a rank that has run
    out while others have not) and ``raw`` the unselected real rows (None when ``n_real`` is 0).
    Each column in ``keep`` of the real rows is appended to ``out[column]`` (numpy)."""
    for t, n_real in collective_batches(rebatch(source.tables(), batch_size, False), "eval"):
        raw = t
        if t is not None:
            for k in keep:
                out[k].append(t.column(k).to_numpy(zero_copy_only=False))
            t = t.select(layout.columns)
        if n_real < batch_size:
            filler = padding_table(layout.arrow_schema() if t is None else t.schema,
                                   batch_size - n_real)
            t = filler if t is None else pa.concat_tables([t, filler])
        yield t, n_real, raw
