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
from typing import Iterable, Iterator, Optional, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from rectrain.data import storage
from rectrain.data.door import parent, prepared_bounds, read_checked


class RayShard:
    """A rank's shard of a Ray Dataset (from ``ray.train.get_dataset_shard(name)``)."""

    def __init__(self, iterator, columns: Optional[list[str]] = None):
        self.iterator = iterator
        self.columns = columns

    def tables(self, epoch: int = 0) -> Iterator[pa.Table]:
        for t in self.iterator.iter_batches(batch_size=None, batch_format="pyarrow",
                                            prefetch_batches=2):
            yield t.select(self.columns) if self.columns else t


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


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate ``items`` in a background thread, keeping up to ``depth`` of them ready (e.g.
    Arrow slicing and :meth:`FeatureLayout.to_batch` for the next batches while the model runs
    the current one; NumPy/Arrow/torch release the GIL for most of that work). ``depth`` 0
    iterates inline. An exception in the producer is re-raised here; closing the iterator early
    stops the thread after its current item."""
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
            x, err = q.get()
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
