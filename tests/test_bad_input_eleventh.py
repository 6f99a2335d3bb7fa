"""Bad input against what the eleventh session built: each training worker reading its own
share of the train files (``train.input: files``, rectrain/data/file_stream.py), the options of
benchmarks/ingest_epochs.py (--blocks, --delivery, --files, --size) and
``rectrain.launch.ray_launch.read_blocks``. Where the input is odd but valid (0-row files, more
ranks than rows, files differing only in nullability, ``memory://``, a manifest without
features) every row is read once per epoch; where it is bad, the error names the file (column,
row, value) or the argument, before any file is read where the footers can tell. No Ray.
"""

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rectrain.data.door import PreparedDataError
from rectrain.data.file_stream import FileStream

ITEM = "item_id"


def _part(start, n, dtype=pa.int64()):
    rows = np.arange(start, start + n)
    return pa.table({"row": rows, ITEM: pa.array(rows % 1000, dtype)})


@pytest.fixture
def make(tmp_path):
    """``make(tables, features=True)``: a prepared folder's train split of ``tables`` (bytes:
    written as they are), with a manifest bounding ``item_id`` by a table of 1,000 rows."""
    def make(tables, features=True):
        root = tmp_path / f"prepared{len(list(tmp_path.iterdir()))}"
        (root / "train").mkdir(parents=True)
        for i, t in enumerate(tables):
            f = root / "train" / f"part-{i:04d}.parquet"
            f.write_bytes(t) if isinstance(t, bytes) else pq.write_table(t, f)
        m = {"rows_per_split": {"train": 0}}
        if features:
            m["features"] = [{"name": ITEM, "kind": "sparse", "table": "item",
                              "num_embeddings": 1000}]
        (root / "manifest.json").write_text(json.dumps(m))
        return str(root / "train")
    return make


def _all_rows(url, world, epoch=0, **kw):
    """Each rank's ``row`` values of ``epoch`` and each rank's table sizes."""
    got, sizes = [], []
    for r in range(world):
        tables = list(FileStream(url, r, world, **kw).tables(epoch))
        sizes.append([t.num_rows for t in tables])
        got.append([x for t in tables for x in t.column("row").to_pylist()])
    return got, sizes


def test_zero_row_files_only_give_no_rows_and_are_never_read(make, monkeypatch):
    import rectrain.data.file_stream as fsm

    monkeypatch.setattr(fsm, "read_checked", lambda *a, **k: pytest.fail("read"))
    url = make([_part(0, 0), _part(0, 0)])
    for r in range(2):
        s = FileStream(url, r, 2)
        assert s.ranges(0) == [] and list(s.tables(0)) == []


def test_zero_row_files_among_others_are_skipped_whatever_their_schema(make):
    """Before: a 0-row file inside a rank's range was read with its group, and one written with
    null-typed columns (as writers of an empty frame do) failed the group's schema check."""
    empty = pa.table({"row": pa.array([], pa.null()), ITEM: pa.array([], pa.int32())})
    url = make([_part(0, 3), empty, _part(3, 3), _part(0, 0)])
    for seed in range(6):  # the 0-row files at every place of the order
        got, _ = _all_rows(url, 1, seed=seed, block_rows=100)
        assert sorted(got[0]) == list(range(6))
        assert all(n for _, _, n in FileStream(url, 0, 1, seed=seed).ranges(0))


def test_more_ranks_than_rows_every_row_once_and_no_empty_tables(make):
    """Before: a rank whose range was empty at a file's edge read that file and yielded a
    table of 0 rows."""
    url = make([_part(0, 2), _part(2, 1)])
    got, sizes = _all_rows(url, 7)
    assert sorted(x for g in got for x in g) == [0, 1, 2]
    assert all(n > 0 for s in sizes for n in s)
    assert sum(1 for g in got if g) == 3


@pytest.mark.parametrize("rank, world", [(2, 2), (5, 2), (-1, 2), (0, 0), (0, -3)])
def test_rank_outside_the_world_or_no_world_is_a_value_error(make, rank, world):
    """Before: world <= 0 was taken as 1 (this rank read every row) and a rank outside
    0..world-1 read nothing or a slice of another rank's rows, without an error."""
    with pytest.raises(ValueError, match=rf"rank {rank} of world {world}"):
        FileStream(make([_part(0, 10)]), rank, world)


@pytest.mark.parametrize("block_rows", [0, -5])
def test_block_rows_below_one_is_a_value_error(make, block_rows):
    """Before: taken as 1 (every file its own group) without an error."""
    with pytest.raises(ValueError, match=f"block_rows {block_rows}"):
        FileStream(make([_part(0, 10)]), 0, 1, block_rows=block_rows)


def test_negative_seed_or_epoch_is_a_value_error_naming_it(make):
    """Before: numpy's bare "expected non-negative integer", in the worker, at the first
    epoch."""
    url = make([_part(0, 10)])
    with pytest.raises(ValueError, match=r"seed -1 \(train.seed\)"):
        FileStream(url, 0, 1, seed=-1)
    with pytest.raises(ValueError, match="epoch -2"):
        list(FileStream(url, 0, 1).tables(-2))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_id_type_differing_between_files_is_named_on_every_rank(make, world):
    """Before: caught only when both files fell into one rank's group (with two ranks each
    rank read one of them and went on, one with int32 ids, the other with int64)."""
    url = make([_part(0, 5, pa.int32()), _part(5, 5, pa.int64())])
    for r in range(world):
        with pytest.raises(PreparedDataError, match=r"part-0001.parquet: column 'item_id' has "
                                                    r"type int64, but .*part-0000.parquet has "
                                                    r"int32"):
            FileStream(url, r, world)


def test_missing_column_is_named_before_any_read(make):
    """Before: "cannot read as Parquet: No match for FieldRef.Name(...)" (a valid Parquet file)
    from the rank that read it, or, with columns=None, nothing on a rank reading it alone."""
    url = make([_part(0, 5), _part(5, 5).drop([ITEM])])
    for kw in ({}, {"columns": ["row", ITEM]}):
        with pytest.raises(PreparedDataError, match=r"part-0001.parquet: no column \['item_id'\]"):
            FileStream(url, 1, 2, block_rows=1, **kw)
    with pytest.raises(PreparedDataError, match=r"part-0000.parquet: no column \['nope'\]"):
        FileStream(url, 0, 1, columns=["row", "nope"])
    # reading all columns, a file with more columns than the first differs too
    with pytest.raises(PreparedDataError, match=r"part-0001.parquet: columns \['extra'\] that "
                                                r".*part-0000.parquet lacks"):
        FileStream(make([_part(0, 5), _part(5, 5).append_column("extra", pa.array([1] * 5))]),
                   0, 2)
    # columns the other file lacks but this job does not read are fine
    got, _ = _all_rows(url, 2, columns=["row"])
    assert sorted(got[0] + got[1]) == list(range(10))


def test_files_differing_only_in_required_columns_concatenate(make):
    """Before: the group's schema check failed with "columns ['row', 'item_id'] differ" (the
    same names and types; one writer marked them required)."""
    req = pa.schema([pa.field("row", pa.int64(), nullable=False),
                     pa.field(ITEM, pa.int64(), nullable=False)])
    url = make([_part(0, 4), _part(4, 4).cast(req)])
    got, sizes = _all_rows(url, 1, seed=0, block_rows=100)
    assert sorted(got[0]) == list(range(8)) and sizes == [[8]]


@pytest.mark.parametrize("data", [b"not parquet", b""])
def test_a_file_that_is_not_parquet_is_named(make, data):
    with pytest.raises(ValueError, match="part-0001.parquet: cannot read as Parquet"):
        FileStream(make([_part(0, 4), data]), 0, 1)


@pytest.mark.parametrize("ids, row, what", [
    ([1, None, 2], 1, r"null id \(value None\)"),
    ([1, 2, 1000], 2, r"id at or beyond its table's size \(value 1000\)"),
    ([-4, 2, 3], 0, r"negative id \(value -4\)")])
def test_a_bad_id_names_file_column_row_value_on_the_rank_reading_it(make, ids, row, what):
    url = make([_part(0, 4), pa.table({"row": [4, 5, 6], ITEM: pa.array(ids, pa.int64())})])
    for world in (1, 2, 7):
        for r in range(world):
            s = FileStream(url, r, world, seed=0)
            if 1 not in [k for k, _, _ in s.ranges(0)]:
                continue  # this rank does not read the bad file
            with pytest.raises(PreparedDataError,
                               match=rf"part-0001.parquet: column 'item_id' row {row}: {what}"):
                list(s.tables(0))


def test_a_manifest_without_features_reads_without_bounds(make):
    """Nothing to check ids against (the batch check at the model's door stays): read as is."""
    url = make([_part(0, 3), pa.table({"row": [3], ITEM: pa.array([5000])})], features=False)
    s = FileStream(url, 0, 1)
    assert s.bounds == {} and sorted(_all_rows(url, 1)[0][0]) == [0, 1, 2, 3]


def test_memory_urls_read_and_name_the_file():
    fs = fsspec.filesystem("memory")
    root = "/adv11/prepared"
    fs.makedirs(f"{root}/train", exist_ok=True)
    try:
        for i, t in enumerate([_part(0, 5), _part(5, 7)]):
            with fs.open(f"{root}/train/part-{i}.parquet", "wb") as f:
                pq.write_table(t, f)
        with fs.open(f"{root}/manifest.json", "w") as f:
            f.write(json.dumps({"features": [{"name": ITEM, "kind": "sparse", "table": "item",
                                              "num_embeddings": 1000}]}))
        url = f"memory://{root.lstrip('/')}/train"
        got, _ = _all_rows(url, 3, epoch=2)
        assert sorted(x for g in got for x in g) == list(range(12))
        assert FileStream(url, 0, 1).files[0].startswith("memory://")
        with fs.open(f"{root}/train/part-1.parquet", "wb") as f:
            pq.write_table(pa.table({"row": [5], ITEM: pa.array([1000])}), f)
        with pytest.raises(PreparedDataError, match=r"memory://.*part-1.parquet: column "
                                                    r"'item_id' row 0: id at or beyond"):
            list(FileStream(url, 0, 1).tables(0))
    finally:
        fs.rm(root, recursive=True)


@pytest.mark.parametrize("argv, option", [
    (["--blocks", "0"], "--blocks"), (["--blocks", "-3"], "--blocks"),
    (["--blocks", "x"], "--blocks"), (["--size", "huge"], "--size"),
    (["--delivery=yes"], "--delivery"), (["--files=1"], "--files")])
def test_ingest_epochs_bad_new_options_are_argparse_errors(argv, option, capsys, monkeypatch):
    from benchmarks import ingest_epochs

    monkeypatch.setattr(ingest_epochs, "run_ray_ingest", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(SystemExit) as e:
        ingest_epochs.main(argv)
    assert e.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_ingest_epochs_blocks_with_files_is_an_argparse_error(capsys, monkeypatch):
    """Before: --blocks was silently dropped (the files source has no blocks) and the summary
    said "0 blocks"."""
    from benchmarks import ingest_epochs

    monkeypatch.setattr(ingest_epochs, "run_ray_ingest", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(SystemExit) as e:
        ingest_epochs.main(["--files", "--blocks", "8"])
    assert e.value.code == 2 and "--blocks" in capsys.readouterr().err


def test_ingest_epochs_files_delivery_and_full_size_reach_the_run(capsys, monkeypatch):
    from benchmarks import ingest_epochs

    seen = {}
    monkeypatch.setattr(ingest_epochs, "_workloads",
                        lambda names, data, s: seen.update(settings=s) or [names[0]])

    def fake(wl, b, w, n, convert=True, blocks=None, source="ray_data"):
        seen.update(convert=convert, blocks=blocks, source=source)
        return [{"epoch": k, "seconds": 1.0, "rows": 10, "blocks": 0,
                 "cpu_seconds": {"total": 1.0}, "cpu_by_title": {}} for k in range(n)]

    monkeypatch.setattr(ingest_epochs, "run_ray_ingest", fake)
    ingest_epochs.main(["--epochs", "2", "--files", "--delivery", "--size", "full"])
    assert capsys.readouterr().out.splitlines()[-1] == (
        "files read by the workers; Ray CPU s per epoch after the first: median 1.00, "
        "least 1.00")
    assert seen["settings"] is ingest_epochs.SETTINGS["full"]
    assert {k: seen[k] for k in ("convert", "blocks", "source")} == {
        "convert": False, "blocks": None, "source": "files"}


def test_read_blocks_negative_rows_and_unknown_split_are_value_errors():
    """Before: negative rows gave the minimum count and a misspelt split evaluation's blocks,
    without an error. Zero rows, zero workers and batch size 0 stay as the eighth session left
    them (the minimum count)."""
    from rectrain.launch.ray_launch import read_blocks

    with pytest.raises(ValueError, match="-5 rows of split 'train'"):
        read_blocks(-5, 16, 2)
    with pytest.raises(ValueError, match="unknown split 'trian'"):
        read_blocks(100, 16, 2, "trian")
    assert read_blocks(0, 16, 2) == 4 and read_blocks(0, 16, 0, "test") == 4
