"""train.input: files — each worker reads its own share of the train files (no Ray here)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rectrain.data.door import PreparedDataError
from rectrain.data.file_stream import FileStream, file_rows

SIZES = [103, 97, 55, 9, 1, 40]


@pytest.fixture
def split(tmp_path):
    """A prepared-like train split: files of SIZES rows, column ``row`` numbering all rows, an
    id column ``item_id`` bounded by the manifest's table of 1,000 rows."""
    d = tmp_path / "prepared" / "train"
    d.mkdir(parents=True)
    start = 0
    for i, n in enumerate(SIZES):
        rows = np.arange(start, start + n)
        pq.write_table(pa.table({"row": rows, "item_id": rows % 1000,
                                 "hist_item_id": pa.array([[int(r % 7)] * 3 for r in rows])}),
                       d / f"part-{i:04d}.parquet")
        start += n
    (tmp_path / "prepared" / "manifest.json").write_text(json.dumps({
        "features": [{"name": "item_id", "kind": "sparse", "table": "item",
                      "num_embeddings": 1000}], "rows_per_split": {"train": start}}))
    return str(d)


def _rows(stream, epoch):
    return np.concatenate([t.column("row").to_numpy() for t in stream.tables(epoch)])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_row_once_per_epoch_equal_shares_new_files_each_epoch(split, world):
    total = sum(SIZES)
    shares = {}
    for epoch in range(3):
        got = [_rows(FileStream(split, r, world, ["row"], seed=5, block_rows=64), epoch)
               for r in range(world)]
        assert sorted(np.concatenate(got).tolist()) == list(range(total))  # each row once
        assert max(map(len, got)) - min(map(len, got)) <= 1  # equal to one row
        shares[epoch] = [frozenset(g.tolist()) for g in got]
    if world > 1:  # the file order, and so each rank's rows, changes with the epoch
        assert shares[0] != shares[1] or shares[1] != shares[2]
    # the same epoch and seed give the same rows in the same order
    a = _rows(FileStream(split, 0, world, ["row"], seed=5), 1)
    assert np.array_equal(a, _rows(FileStream(split, 0, world, ["row"], seed=5), 1))


def test_groups_of_block_rows_and_only_the_files_it_needs(split, monkeypatch):
    import rectrain.data.file_stream as fsm

    read = []
    real = fsm.read_checked
    def spy(files, cols, bounds, **kw):
        read.append(len(files))
        return real(files, cols, bounds, **kw)

    monkeypatch.setattr(fsm, "read_checked", spy)
    s = FileStream(split, 1, 3, ["row", "item_id"], seed=0, block_rows=100)
    tables = list(s.tables(0))
    assert [t.column_names for t in tables] == [["row", "item_id"]] * len(tables)
    assert all(t.num_rows >= 100 for t in tables[:-1])
    assert sum(read) == len(s.ranges(0)) < len(SIZES)  # rank 1 of 3 reads part of the files
    total = sum(SIZES)
    assert sum(n for _, _, n in s.ranges(0)) == sum(t.num_rows for t in tables) == (
        2 * total // 3 - total // 3)


def test_file_rows_from_footers_and_a_bad_file_named(split, tmp_path):
    files = sorted(str(p) for p in (tmp_path / "prepared" / "train").iterdir())
    assert file_rows(files).tolist() == SIZES
    bad = tmp_path / "prepared" / "train" / "part-9999.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="part-9999.parquet: cannot read as Parquet"):
        FileStream(split, 0, 2)


def test_an_id_outside_its_table_names_file_column_row_value(split, tmp_path):
    f = tmp_path / "prepared" / "train" / "part-0002.parquet"
    t = pq.read_table(f)
    ids = t.column("item_id").to_numpy().copy()
    ids[4] = 5000
    pq.write_table(t.set_column(1, "item_id", pa.array(ids)), f)
    with pytest.raises(PreparedDataError, match=r"part-0002.parquet: column 'item_id' row 4"):
        for _ in FileStream(split, 0, 1, seed=0).tables(0):
            pass


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no data files"):
        FileStream(str(tmp_path / "train"), 0, 1)
