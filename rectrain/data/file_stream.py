"""The train split read by each training worker itself (``train.input: files``), streamed file by
file, instead of through Ray Data's read tasks, object store and split coordinator.

Epoch ``e`` lays the split's Parquet files end to end in the seeded order
``default_rng([seed, 7919, e]).permutation(F)`` and rank ``r`` of ``W`` takes the contiguous
row range ``[r*N // W, (r+1)*N // W)`` of that sequence (``N`` rows in all, counted from the
footers): every row once per epoch, the same number of rows on every rank (to one row), and a
different set of files per rank each epoch. Each rank reads only the files that overlap its
range (at most two of them partly), in groups of about ``block_rows`` rows, each file checked by
the door (:func:`rectrain.data.door.read_checked`: file, column, row and value on a bad id); the
loader's local shuffle then permutes each group (:func:`rectrain.data.loader.rebatch`).

Why: on the ingest benchmark (2 workers, 2 cores) Ray Data's delivery alone (read tasks that copy
each block into the object store, the split coordinator's executor, Ray's servers) cost 0.81
CPU-s per DIN epoch of 409,600 rows, more than a single process spends reading *and*
converting them (0.58; docs/benchmarks.md, "Ray Data's delivery alone"). Reading in the worker
costs the read itself and nothing else, but the read then shares the worker's cores with the
model, and nothing reads ahead on other nodes: Ray Data stays the default.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rectrain.data import storage
from rectrain.data.door import parent, prepared_bounds, read_checked

#: rows per group of files read at once (and so per local shuffle), as Ray Data's train blocks
BLOCK_ROWS = 131_072


def file_rows(files: list[str]) -> np.ndarray:
    """Rows of each Parquet file (int64 ``[F]``), from the footers.

    Raises:
        ValueError: a file is not valid Parquet (names the file).
    """
    out = np.zeros(len(files), dtype=np.int64)
    for i, f in enumerate(files):
        fs, path = storage.url_to_fs(f)
        try:
            with fs.open(path, "rb") as fh:
                out[i] = pq.ParquetFile(fh).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{f}: cannot read as Parquet: {e}") from None
    return out


class FileStream:
    """Rank ``rank`` of ``world``'s rows of the split at ``url``, read by this process.

    Args:
        url: folder of the split's Parquet files (any fsspec URL).
        rank, world: this rank and the number of ranks.
        columns: columns to read (None: all).
        seed: ``train.seed``; the file order of epoch ``e`` is
            ``default_rng([seed, 7919, e]).permutation(F)``.
        block_rows: rows per group of files read and yielded at once.

    Raises:
        FileNotFoundError: ``url`` holds no data file.
        ValueError: a file is not valid Parquet.
    """

    def __init__(self, url: str, rank: int, world: int, columns: list[str] | None = None,
                 seed: int = 0, block_rows: int = BLOCK_ROWS):
        self.url, self.rank, self.world = url, rank, max(world, 1)
        self.columns, self.seed, self.block_rows = columns, seed, max(block_rows, 1)
        self.files, _ = storage.list_parquet_files(url)
        self.rows = file_rows(self.files)
        self.bounds = prepared_bounds(parent(url))

    def ranges(self, epoch: int) -> list[tuple[int, int, int]]:
        """``(file index, first row, rows)`` this rank reads in ``epoch``, in reading order."""
        order = np.random.default_rng([self.seed, 7919, epoch]).permutation(len(self.files))
        ends = np.cumsum(self.rows[order])
        starts = ends - self.rows[order]
        n = int(ends[-1]) if len(ends) else 0
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        out = []
        for k in np.flatnonzero((ends > lo) & (starts < hi)):
            a, b = max(lo, int(starts[k])), min(hi, int(ends[k]))
            out.append((int(order[k]), a - int(starts[k]), b - a))
        return out

    def tables(self, epoch: int = 0) -> Iterator[pa.Table]:
        """This rank's rows of ``epoch`` as Arrow tables of about ``block_rows`` rows.

        Raises:
            rectrain.data.door.PreparedDataError: a file breaks the prepared data's bounds or
                its schema differs from the group's first file (names file, column, row,
                value).
        """
        group: list[tuple[int, int, int]] = []
        have = 0
        for r in self.ranges(epoch):
            group.append(r)
            have += r[2]
            if have >= self.block_rows:
                yield self._read(group)
                group, have = [], 0
        if group:
            yield self._read(group)

    def _read(self, group: list[tuple[int, int, int]]) -> pa.Table:
        # the group's files are consecutive in the epoch's order, so this rank's rows of them
        # are one slice of their concatenation
        # one decode thread: the worker's other threads (the step, the conversion ahead of
        # it) and the other workers on the node already hold the cores
        t = read_checked([self.files[i] for i, _, _ in group], self.columns, self.bounds,
                         use_threads=False)
        return t.slice(group[0][1], sum(n for _, _, n in group))
