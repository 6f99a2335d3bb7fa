"""A deterministic, world-size-independent order of the train split, so that a checkpoint's data
position is one number and a resume continues at the exact row.

Ray Data's ``streaming_split`` hands blocks to workers as they ask for them, so which rows a rank
has consumed after ``k`` steps is not reproducible and a mid-epoch position cannot be skipped to
exactly. With :class:`GlobalOrder` (used when ``checkpoint.every_n_steps`` is set):

- epoch ``e`` visits the train rows in the permutation ``default_rng([seed, e]).permutation(N)``
  of the row index over the split's Parquet files (sorted by name, rows in file order);
- global step ``g`` of an epoch started at row ``start`` consumes the ``W * B`` permuted rows
  ``[start + g*W*B, start + (g+1)*W*B)``; rank ``r`` of ``W`` takes the ``B`` rows
  ``[.. + r*B, .. + (r+1)*B)`` of that window;
- the data position saved in a checkpoint is ``(epoch, rows_done)`` with ``rows_done`` the
  number of permuted rows consumed in that epoch, whatever the world size. A resume with ``W'``
  workers continues at ``rows_done`` with windows of ``W' * B``: every row of the epoch is
  trained on exactly once up to the tail of fewer than ``W * B`` rows that no full global batch
  covers (dropped, as ``drop_last`` does, and counted in ``metrics.json``).

Cost: every rank reads the whole train split (all columns the model needs) into memory once;
fine for datasets that fit a worker's memory (MovieLens-100K: 81k rows). Larger splits should
keep Ray Data's streaming order, which checkpoints at epoch boundaries only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from rectrain.data import storage
from rectrain.data.door import parent, prepared_bounds, read_checked


class GlobalOrder:
    """The train split in a seeded per-epoch permutation, dealt in global batches.

    Args:
        url: folder of the split's Parquet files (any fsspec URL).
        seed: ``train.seed``; epoch ``e`` uses ``numpy.random.default_rng([seed, e])``.
        columns: columns to read (None: all).

    Raises:
        FileNotFoundError: ``url`` holds no data file.
    """

    def __init__(self, url: str, seed: int, columns: list[str] | None = None):
        self.url, self.seed, self.columns = url, seed, columns
        self._table: pa.Table | None = None

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            files, _ = storage.list_parquet_files(self.url)
            self._table = read_checked(files, self.columns, prepared_bounds(
                parent(self.url))).combine_chunks()
        return self._table

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def permutation(self, epoch: int) -> np.ndarray:
        """Row indices int64 ``[N]`` in epoch ``epoch``'s order."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def steps(self, start: int, world: int, batch_size: int) -> int:
        """Full global batches left in an epoch from row ``start``."""
        return max(0, (self.num_rows - start) // (world * batch_size))

    def batches(self, epoch: int, start: int, rank: int, world: int,
                batch_size: int) -> Iterator[pa.Table]:
        """This rank's ``batch_size``-row tables, one per global step, from row ``start`` of
        epoch ``epoch``'s permutation (every rank yields the same number of tables)."""
        perm = self.permutation(epoch)
        g = world * batch_size
        for lo in range(start, self.num_rows - g + 1, g):
            yield self.table.take(pa.array(perm[lo + rank * batch_size:
                                                lo + (rank + 1) * batch_size]))
