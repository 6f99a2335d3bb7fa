"""The train split read by each training worker itself (``train.input: files``), streamed file by
file, instead of through Ray Data's read tasks, object store and split coordinator.

Epoch ``e`` lays the split's Parquet files end to end in the seeded order
``default_rng([seed, 7919, e]).permutation(F)`` and rank ``r`` of ``W`` takes the contiguous
row range ``[r*N // W, (r+1)*N // W)`` of that sequence (``N`` rows in all, counted from the
footers): every row once per epoch, the same number of rows on every rank (to one row), and a
different set of files per rank each epoch. Each rank reads only the files that overlap its
range (at most two of them partly), in groups of about ``block_rows`` rows, each file checked by
the door (:func:`rectrain.data.door.read_checked`: file, column, row and value on a bad id); the
loader's local shuffle then permutes each group (:func:`rectrain.data.loader.rebatch`). Every
file's footer schema is checked once, when the stream is made, so that a file lacking a column
or of other types fails on every rank alike, before any read.

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
from rectrain.data.door import (_HINT, PreparedDataError, parent, prepared_bounds,
                                 read_checked, require_columns, type_differs)

#: rows per group of files read at once (and so per local shuffle), as Ray Data's train blocks
BLOCK_ROWS = 131_072


def file_rows(files: list[str]) -> np.ndarray:
    """Rows of each Parquet file (int64 ``[F]``), from the footers.

    Raises:
        ValueError: a file is not valid Parquet (names the file).
    """
    return _footers(files)[0]


def _footers(files: list[str]) -> tuple[np.ndarray, list[pa.Schema]]:
    """Rows (int64 ``[F]``) and Arrow schema of each Parquet file, from the footers.

    Raises:
        ValueError: a file is not valid Parquet (names the file).
    """
    out = np.zeros(len(files), dtype=np.int64)
    schemas = []
    for i, f in enumerate(files):
        fs, path = storage.url_to_fs(f)
        try:
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                out[i] = meta.num_rows
                schemas.append(meta.schema.to_arrow_schema())
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{f}: cannot read as Parquet: {e}") from None
    return out, schemas


def _check_schemas(files: list[str], rows: np.ndarray, schemas: list[pa.Schema],
                   columns: list[str] | None, prepared_dir: str) -> None:
    """Every non-empty file holds ``columns`` (None: exactly the first non-empty file's), of
    the same types as the first non-empty file: a rank reads only its own files, so without
    this a file that differs fails only on the rank, and in the epoch, that reads it (or not at
    all, when it is in another group than the file it differs from), and a missing column fails
    as "cannot read as Parquet". Files of 0 rows are never read (:meth:`FileStream.ranges`),
    so their schema does not matter (writers often give an empty file null-typed columns).

    Raises:
        rectrain.data.door.PreparedDataError: names the file and the columns it lacks (or,
            reading all columns, has in addition), or the file, column and both types.
    """
    full = [k for k in range(len(files)) if rows[k]]
    if not full:
        return
    first = schemas[full[0]]
    names = list(columns) if columns is not None else first.names
    for k in full:
        have = schemas[k]
        require_columns(files[k], have, names, prepared_dir)
        extra = [c for c in have.names if c not in names] if columns is None else []
        if extra:  # all columns read: the groups' tables would differ in columns
            raise PreparedDataError(f"{files[k]}: columns {extra} that {files[full[0]]} lacks: "
                                    f"every prepared file of a split needs the same schema; "
                                    f"{_HINT}")
        for c in names:
            if k != full[0] and have.field(c).type != first.field(c).type:
                raise type_differs(files[k], c, have.field(c).type, files[full[0]],
                                   first.field(c).type)


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
        ValueError: ``world`` or ``block_rows`` below 1, ``rank`` outside ``0..world-1`` or a
            negative ``seed`` (numpy's seed sequence takes none); a file is not valid Parquet.
        FileNotFoundError: ``url`` holds no data file.
        rectrain.data.door.PreparedDataError: a non-empty file lacks one of ``columns`` or
            its types differ from the first non-empty file's (names the file and column).
    """

    def __init__(self, url: str, rank: int, world: int, columns: list[str] | None = None,
                 seed: int = 0, block_rows: int = BLOCK_ROWS):
        # the ranks come from Ray Train's context: one out of range is a caller's bug, which
        # clamping would turn into silently missing or doubled rows
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of world {world}: need world >= 1 and "
                             f"0 <= rank < world")
        if block_rows < 1:
            raise ValueError(f"block_rows {block_rows}: need at least 1 row per group")
        if seed < 0:
            raise ValueError(f"seed {seed} (train.seed): the file order needs a seed >= 0")
        self.url, self.rank, self.world = url, rank, world
        self.columns, self.seed, self.block_rows = columns, seed, block_rows
        self.files, _ = storage.list_parquet_files(url)
        self.rows, schemas = _footers(self.files)
        _check_schemas(self.files, self.rows, schemas, columns, parent(url))
        self.bounds = prepared_bounds(parent(url))

    def ranges(self, epoch: int) -> list[tuple[int, int, int]]:
        """``(file index, first row, rows)`` this rank reads in ``epoch``, in reading order;
        only files it reads rows of (none of 0 rows, none when its range is empty).

        Raises:
            ValueError: a negative ``epoch``.
        """
        if epoch < 0:
            raise ValueError(f"epoch {epoch}: the file order needs an epoch >= 0")
        order = np.random.default_rng([self.seed, 7919, epoch]).permutation(len(self.files))
        ends = np.cumsum(self.rows[order])
        starts = ends - self.rows[order]
        n = int(ends[-1]) if len(ends) else 0
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        out = []
        for k in np.flatnonzero((ends > lo) & (starts < hi)):
            a, b = max(lo, int(starts[k])), min(hi, int(ends[k]))
            if b == a:  # a 0-row file inside the range, or an empty range at a file's edge
                continue
            out.append((int(order[k]), a - int(starts[k]), b - a))
        return out

    def tables(self, epoch: int = 0) -> Iterator[pa.Table]:
        """This rank's rows of ``epoch`` as Arrow tables of about ``block_rows`` rows.

        Raises:
            ValueError: a negative ``epoch``.
            rectrain.data.door.PreparedDataError: a file breaks the prepared data's bounds
                (names file, column, row, value), or (rewritten since the stream was made)
                its schema differs from the group's first file.
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
