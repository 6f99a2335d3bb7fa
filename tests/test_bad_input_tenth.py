"""Bad input against what the tenth session built: the serving context read by batches of
files (rectrain/serve/context.py), the Ray Data idle-loop pause (rectrain/launch/data_loop.py),
CPU seconds per process title (rectrain/bench/proctree.py) and benchmarks/ingest_epochs.py.
Where the input is odd but valid, the batched results equal one computation over the whole
table; where it is bad, the error names the file (column, row, value) or the variable. No Ray.
"""

import math
import re
from types import SimpleNamespace as NS

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rectrain.data.door import PreparedDataError
from rectrain.data.schema import ITEM, POS, USER
from rectrain.serve import context as ctx
from rectrain.serve import reductions

HIST = "hist_item_id"
COLS = [USER, POS, HIST, ITEM]


def _events(rng, n, users, items, pos_hi=6):
    return pa.table({USER: rng.choice(users, n), ITEM: rng.choice(items, n),
                     POS: rng.integers(0, pos_hi, n),  # ties within and across files
                     HIST: [rng.integers(0, 9, int(m)).tolist() for m in rng.integers(0, 3, n)]})


def _with(t, name, col):
    return t.set_column(t.column_names.index(name), name, col)


def _write(root, split, name, t):
    (root / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(t, root / split / name)
    return str(root / split / name)


def _reference(whole, user_keys, item_keys, train_rows, n_recent=2):
    """One computation over the whole table (events in file order): last event per user,
    users, train counts, seen CSR over every split, recent train items."""
    u_raw, pos = whole[USER].to_numpy(zero_copy_only=False), whole[POS].to_numpy()
    order = np.lexsort((pos, u_raw))
    su = u_raw[order]
    last = whole.take(pa.array(order[np.r_[su[1:] != su[:-1], True]])).select(COLS)
    uk, ik = user_keys.to_pylist(), item_keys.to_pylist()
    row_u, row_i = {x: r for r, x in enumerate(uk)}, {x: r for r, x in enumerate(ik)}
    ev = [(row_u.get(a, -1), row_i.get(b, -1), q, k) for k, (a, b, q) in enumerate(zip(
        *(whole[c].to_pylist() for c in (USER, ITEM, POS))))]
    train = [e for e in ev if e[3] < train_rows]
    seen = [sorted({e[1] for e in ev if e[0] == r and e[1] >= 0}) for r in range(len(uk))]
    recent = []
    for r in range(len(uk)):
        mine = sorted((e for e in train if e[0] == r and e[1] >= 0), key=lambda e: (-e[2], e[3]))
        recent.append(list(dict.fromkeys(e[1] for e in mine))[:n_recent])
    return {"last": last.to_pylist(), "users": sorted(set(u_raw.tolist())),
            "train_users": [r in {e[0] for e in train} for r in range(len(uk))],
            "pop": [sum(e[1] == r for e in train) for r in range(len(ik))],
            "seen": seen, "recent": recent}


def _csr_lists(indptr, items):
    return [items[indptr[r]:indptr[r + 1]].tolist() for r in range(len(indptr) - 1)]


def _check_against_whole(p, whole, user_keys, item_keys, train_rows):
    ref = _reference(whole, user_keys, item_keys, train_rows)
    splits = ("train", "valid", "test")
    assert ctx._last_events(p, splits, COLS).to_pylist() == ref["last"]
    assert ctx.serve_users(p).to_pylist() == ref["users"]
    got_users, pop = ctx.train_counts(p, user_keys, item_keys)
    assert got_users.tolist() == ref["train_users"] and pop.tolist() == ref["pop"]
    assert _csr_lists(*ctx.seen_csr(p, splits, user_keys, item_keys)) == ref["seen"]
    assert _csr_lists(*ctx.recent_csr(p, 2, user_keys, item_keys)) == ref["recent"]
    # the sequence's source: an int column (prepare's encoded item id; here the position)
    state = ctx.latest_state(p, user_keys, [(HIST, POS)], 3, [], splits)
    last = {r[USER]: (r[HIST] + [r[POS]])[-3:] for r in ref["last"]}
    assert state[HIST].to_pylist() == [last.get(k, []) for k in user_keys.to_pylist()]


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(reductions, "BATCH_ROWS", 25)  # batches of one to a few files: many merges
    monkeypatch.setattr(reductions, "MERGE_PAIRS", 8)


def test_odd_but_valid_files_give_what_one_whole_table_gives(tmp_path, small_batches):
    """0-row files among others, columns in another order, extra columns, non-nullable fields,
    duplicated (user, item, position) rows, negative and huge (near 2^62) raw ids, ids absent
    from the keys."""
    rng = np.random.default_rng(10)
    users = np.array([-5, 0, 7, 2**62 - 3, 2**62 + 11, 2**62 - 1])  # raw ids: any int64
    items = np.array([-1, 3, 4, 2**62 + 5])
    parts = {"train": [], "valid": [], "test": []}
    for s, k in (("train", 4), ("valid", 1), ("test", 2)):
        for f in range(k):
            parts[s].append(_events(rng, int(rng.integers(10, 30)), users, items))
    t = parts["train"][1]
    parts["train"][1] = pa.concat_tables([t, t.slice(0, 3)])  # duplicated rows
    parts["train"].insert(2, parts["train"][0].slice(0, 0))  # a 0-row file
    parts["test"].append(parts["test"][0].slice(0, 0))
    for s, ts in parts.items():
        for f, t in enumerate(ts):
            if f == 1:  # columns in another order, and one no reader asks for
                t = t.select([HIST, ITEM, POS, USER]).append_column("extra", pa.array(
                    np.zeros(t.num_rows)))
            if f == 3:  # the same types, not nullable
                t = t.cast(pa.schema([pa.field(n, t.schema.field(n).type, nullable=False)
                                      for n in t.column_names]))
            _write(tmp_path, s, f"p{f}.parquet", t)
    whole = pa.concat_tables([t for s in ("train", "valid", "test") for t in parts[s]])
    train_rows = sum(t.num_rows for t in parts["train"])
    user_keys = pa.array(users[[0, 1, 3, 4]])  # users 7 and 2^62-1 are not in the keys
    item_keys = pa.array(items[[1, 0, 3]])  # item 4 is not in the keys
    _check_against_whole(str(tmp_path), whole, user_keys, item_keys, train_rows)


def test_a_single_user_and_a_single_item(tmp_path, small_batches):
    rng = np.random.default_rng(1)
    t = _events(rng, 40, np.array([9]), np.array([2]))
    _write(tmp_path, "train", "p0.parquet", t.slice(0, 30))
    _write(tmp_path, "test", "p0.parquet", t.slice(30))
    _check_against_whole(str(tmp_path), t, pa.array([9]), pa.array([2]), 30)


@pytest.mark.parametrize("kind", ["int32", "string"])
def test_int32_and_string_ids_give_what_one_whole_table_gives(tmp_path, small_batches, kind):
    rng = np.random.default_rng(3)
    users, items = np.arange(0, 12) * 3, np.arange(0, 8) * 5
    parts = [_events(rng, 20, users, items) for _ in range(3)]
    conv = (lambda a: pc.cast(a, pa.int32())) if kind == "int32" else \
        (lambda a: pc.cast(a, pa.string()))
    parts = [_with(_with(t, USER, conv(t[USER])), ITEM, conv(t[ITEM])) for t in parts]
    for f, t in enumerate(parts):
        _write(tmp_path, "train" if f < 2 else "test", f"p{f}.parquet", t)
    whole = pa.concat_tables(parts)
    user_keys, item_keys = conv(pa.array(users[::2])), conv(pa.array(items[1:]))
    _check_against_whole(str(tmp_path), whole, user_keys, item_keys,
                         parts[0].num_rows + parts[1].num_rows)


def test_more_than_2_31_user_item_keys_do_not_overflow(tmp_path, small_batches):
    """70,000 users x 40,000 items = 2.8e9 (user row, item row) keys: int64 arithmetic."""
    n_u, n_i = 70_000, 40_000
    u = np.array([n_u - 1, n_u - 1, 0, n_u - 2, n_u - 1, 53_687])
    i = np.array([n_i - 1, 0, n_i - 1, n_i - 2, n_i - 1, 53_687 % n_i])
    t = pa.table({USER: u, ITEM: i, POS: np.arange(len(u)), HIST: [[1]] * len(u)})
    _write(tmp_path, "train", "p0.parquet", t.slice(0, 3))
    _write(tmp_path, "train", "p1.parquet", t.slice(3))
    uk, ik = pa.array(np.arange(n_u)), pa.array(np.arange(n_i))
    indptr, items = ctx.seen_csr(str(tmp_path), ("train",), uk, ik)
    assert items.dtype == np.int32 and indptr[-1] == 5
    got = {r: items[indptr[r]:indptr[r + 1]].tolist() for r in (0, 53_687, n_u - 2, n_u - 1)}
    assert got == {0: [n_i - 1], 53_687: [53_687 % n_i], n_u - 2: [n_i - 2],
                   n_u - 1: [0, n_i - 1]}
    indptr, items = ctx.recent_csr(str(tmp_path), 5, uk, ik)
    assert items[indptr[n_u - 1]:indptr[n_u]].tolist() == [n_i - 1, 0]


def test_splits_of_0_row_files_and_an_empty_split_folder(tmp_path):
    """Every file has 0 rows: no users to serve (as before), empty results elsewhere; a split
    folder without any file is named."""
    t = _events(np.random.default_rng(0), 5, np.arange(3), np.arange(3)).slice(0, 0)
    _write(tmp_path, "train", "p0.parquet", t)
    _write(tmp_path, "train", "p1.parquet", t)
    p, uk, ik = str(tmp_path), pa.array([1, 2]), pa.array([0])
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(p)}: no users to recommend for"):
        ctx.serve_users(p)
    assert ctx._last_events(p, ("train",), COLS).num_rows == 0  # before: concat_tables([])
    state = ctx.latest_state(p, uk, [(HIST, POS)], 3, [], ("train",))
    assert state[HIST].to_pylist() == [[], []]
    assert [x.tolist() for x in ctx.train_counts(p, uk, ik)] == [[False, False], [0]]
    assert _csr_lists(*ctx.seen_csr(p, ("train",), uk, ik)) == [[], []]
    assert _csr_lists(*ctx.recent_csr(p, 3, uk, ik)) == [[], []]
    fake = NS(prepared=p, cfg=NS(features=[], dataset=NS(item_column="item_id")))
    assert ctx.RunContext._items(fake, str(tmp_path / "none.parquet"), [], []).num_rows == 0
    (tmp_path / "valid").mkdir()
    says = f"^{re.escape(p)}/valid: folder holds no data files"
    with pytest.raises(FileNotFoundError, match=says):
        ctx.seen_csr(p, ("train", "valid"), uk, ik)


def test_no_event_files_and_no_items_catalog_is_named(tmp_path):
    fake = NS(prepared=str(tmp_path), cfg=NS(features=[], dataset=NS(item_column="item_id")))
    says = f"^{re.escape(str(tmp_path))}: no items to recommend"
    with pytest.raises(FileNotFoundError, match=says):
        ctx.RunContext._items(fake, str(tmp_path / "catalog" / "items.parquet"), [], [])


@pytest.mark.parametrize("col", [USER, ITEM, POS])
def test_a_null_user_item_or_position_names_file_column_and_row(tmp_path, col):
    """Before: a null user became a served user None, a null position a NaN sort key."""
    rng = np.random.default_rng(2)
    _write(tmp_path, "train", "p0.parquet", _events(rng, 6, np.arange(4), np.arange(4)))
    t = _events(rng, 6, np.arange(4), np.arange(4))
    vals = t[col].to_pylist()
    vals[4] = None
    bad = _write(tmp_path, "train", "p1.parquet", _with(t, col, pa.array(vals, pa.int64())))
    p, says = str(tmp_path), rf"^{re.escape(bad)}: column '{col}' row 4: null \(value None\)"
    with pytest.raises(PreparedDataError, match=says):  # reads user, item and position
        ctx.recent_csr(p, 2, pa.array([0, 1]), pa.array([0, 1]))
    if col != POS:
        with pytest.raises(PreparedDataError, match=says):
            ctx.seen_csr(p, ("train",), pa.array([0, 1]), pa.array([0, 1]))
    if col != ITEM:
        with pytest.raises(PreparedDataError, match=says):
            ctx._last_events(p, ("train",), COLS)


def test_a_type_that_differs_between_files_or_splits_names_both_files(tmp_path):
    """Before: a bare ArrowInvalid from concat_tables (a batch spanning two splits, or the
    last events of two files), without a file name."""
    rng = np.random.default_rng(5)
    t = _events(rng, 8, np.arange(4), np.arange(4))
    first = _write(tmp_path, "train", "p0.parquet", t)
    bad = _write(tmp_path, "test", "p0.parquet", _with(t, USER, pc.cast(t[USER], pa.int32())))
    p = str(tmp_path)
    says = rf"^{re.escape(bad)}: column '{USER}' has type int32, but {re.escape(first)} has " \
        "int64"
    with pytest.raises(PreparedDataError, match=says):
        ctx.seen_csr(p, ("train", "test"), pa.array([0, 1]), pa.array([0, 1]))
    with pytest.raises(PreparedDataError, match=says):
        ctx.serve_users(p)
    # the behaviour sequence as list<int32> in a later file: the last events' second pass
    hist = pa.array(t[HIST].to_pylist(), pa.list_(pa.int32()))
    _write(tmp_path, "test", "p0.parquet",
           _with(_with(t, HIST, hist), POS, pc.add(t[POS], 100)))  # the users' last events
    t2 = pa.table({USER: [99], ITEM: [0], POS: [0], HIST: pa.array([[1]])}).select(
        t.column_names)
    _write(tmp_path, "train", "p1.parquet", t2)  # user 99's last event: only in train
    with pytest.raises(PreparedDataError, match=rf"column '{HIST}' has type list<.*int32>"):
        ctx._last_events(p, ("train", "test"), COLS)
    # string keys against the events' int64 ids (before: ArrowTypeError from index_in)
    with pytest.raises(PreparedDataError, match=rf"^{re.escape(p)}: the events' column "
                                                rf"'{USER}': int64 ids cannot be looked up "
                                                rf"among string keys"):
        ctx.train_counts(p, pa.array(["u0", "u1"]), pa.array([0, 1]))
    # a column some file lacks: storage names the file and the column
    with pytest.raises(ValueError, match=rf"^{re.escape(first)}: .*'?nope'?"):
        list(ctx.iter_split_batches(p, ("train",), [USER, "nope"]))


def test_a_users_catalog_with_duplicate_or_null_ids_is_named(tmp_path):
    """Before: a duplicated user was served twice, the second copy as a user without events
    (fallback list); index_in maps the id to its first row only."""
    from rectrain.serve.checks import unique_keys

    _write(tmp_path, "train", "p0.parquet",
           _events(np.random.default_rng(0), 5, np.arange(3), np.arange(3)))
    url = _write(tmp_path, "catalog", "users.parquet", pa.table({USER: [4, 8, 15, 8, 4]}))
    at = f"^{re.escape(url)}: column '{USER}' row"
    dup = rf"{at} 3: duplicate id \(value 8, also at row 1\)"
    with pytest.raises(PreparedDataError, match=dup):
        ctx.serve_users(str(tmp_path))
    pq.write_table(pa.table({USER: [4, None, 15]}), url)
    with pytest.raises(PreparedDataError, match=rf"{at} 1: null id"):
        ctx.serve_users(str(tmp_path))
    with pytest.raises(PreparedDataError, match=r"^items.parquet: column '_item' row 2: "
                                                r"duplicate id \(value 'b', also at row 0\)"):
        unique_keys(pa.chunked_array([["b", "a"], ["b"]]), "items.parquet", ITEM)
    unique_keys(pa.array([2**62, -1, 0]), "items.parquet", ITEM)  # unique: no error


# --- RECTRAIN_DATA_IDLE_PAUSE_S and the IdleLoopPause callback ------------------------------

@pytest.mark.parametrize("raw", ["abc", "-0.5", "inf", "nan", "1e400", "1e10", "0x10"])
def test_a_bad_idle_pause_is_a_value_error_naming_the_variable(raw, monkeypatch):
    """Before: ``float()`` at import (text: a bare ValueError inside whichever process imported
    it first, a Ray actor among them); inf: an OverflowError from time.sleep inside the
    executor (as 1e10); negative and nan: the pause silently off."""
    from rectrain.launch import cluster, data_loop

    says = rf"^RECTRAIN_DATA_IDLE_PAUSE_S='{re.escape(raw)}': needs a number of seconds"
    with pytest.raises(ValueError, match=says + " from 0 to 10 "):
        data_loop.idle_pause_s({"RECTRAIN_DATA_IDLE_PAUSE_S": raw})
    monkeypatch.setenv("RECTRAIN_DATA_IDLE_PAUSE_S", raw)
    warned = []
    monkeypatch.setattr(data_loop, "log", NS(warning=lambda msg, *a: warned.append(msg % a)))
    assert data_loop._pause_at_import() == data_loop.DEFAULT_S  # an import never fails
    assert warned and warned[0].startswith(f"RECTRAIN_DATA_IDLE_PAUSE_S={raw!r}")
    with pytest.raises(ValueError, match="RECTRAIN_DATA_IDLE_PAUSE_S"):
        cluster._configure_data_context()  # what connect() calls first


def test_good_idle_pauses_and_registering_twice_adds_the_callback_once(monkeypatch):
    from ray.data import DataContext

    from rectrain.launch import cluster, data_loop

    env = "RECTRAIN_DATA_IDLE_PAUSE_S"
    assert [data_loop.idle_pause_s(e) for e in ({}, {env: ""}, {env: " 0 "}, {env: "0.5"})] \
        == [0.02, 0.02, 0.0, 0.5]
    monkeypatch.delenv(env, raising=False)
    cluster._configure_data_context()
    cluster._configure_data_context()  # connect() called twice in one process
    classes = DataContext.get_current().custom_execution_callback_classes
    assert classes.count(data_loop.IdleLoopPause) == 1


def test_progress_state_of_odd_topologies_never_pauses(monkeypatch):
    from rectrain.launch import data_loop

    slept = []
    monkeypatch.setattr(data_loop.time, "sleep", slept.append)

    class Raising:
        @property
        def metrics(self):
            raise RuntimeError("gone")

    odd = [[1, 2], {Raising(): None}, {object(): NS()}, "topology", 7]
    for topo in odd:
        assert data_loop.progress_state(topo) is None
        cb = data_loop.IdleLoopPause()
        for _ in range(3):
            cb.on_execution_step(NS(_topology=topo))
    assert slept == []
    # nothing moved, but the pause is off (0)
    monkeypatch.setattr(data_loop, "IDLE_PAUSE_S", 0.0)
    op = NS(metrics=NS(num_outputs_taken=0, num_tasks_submitted=0, num_tasks_finished=0))
    st = NS(total_enqueued_input_blocks=lambda: 0, total_enqueued_output_blocks=lambda: 0)
    topo, cb = {_Key(op): st}, data_loop.IdleLoopPause()
    for _ in range(3):
        cb.on_execution_step(NS(_topology=topo))
    assert slept == []


class _Key:
    """A hashable operator holding ``metrics``."""

    def __init__(self, op):
        self.metrics = op.metrics


# --- proctree: CPU seconds per title; benchmarks/ingest_epochs.py ---------------------------

def test_cpu_seconds_of_a_reused_pid_count_from_its_start():
    """Before: a pid reused within the interval gave negative seconds (new - old process)."""
    from rectrain.bench.proctree import cpu_seconds, cpu_seconds_by_title

    before = {5: ("ray_worker", 40.0, "ray::IDLE"), 6: ("ray_system", 1.0, "raylet")}
    after = {5: ("ray_worker", 3.0, "ray::_read"), 6: ("ray_system", 1.5, "raylet"),
             7: ("driver", 2.0, "driver")}
    assert cpu_seconds_by_title(before, after) == {"ray::_read": 3.0, "driver": 2.0,
                                                   "raylet": 0.5}
    got = cpu_seconds(before, after)
    assert got["ray_worker"] == 3.0 and math.isclose(got["total"], 5.5)
    assert cpu_seconds_by_title({}, {}) == {} and cpu_seconds({}, {})["total"] == 0.0


@pytest.mark.parametrize("argv, option", [
    (["--workload", "din_sinth"], "--workload"), (["--epochs", "0"], "--epochs"),
    (["--epochs", "-2"], "--epochs"), (["--epochs", "x"], "--epochs"),
    (["--top", "-1"], "--top"), (["--batch", "0"], "--batch")])
def test_ingest_epochs_bad_options_are_argparse_errors(argv, option, capsys, monkeypatch):
    """Before: --workload went to the bench CLI's ``--workloads`` ValueError (a traceback);
    --epochs 0 or below started Ray and printed nothing; --top -1 dropped the last title."""
    from benchmarks import ingest_epochs

    monkeypatch.setattr(ingest_epochs, "run_ray_ingest", lambda *a: pytest.fail("ran"))
    with pytest.raises(SystemExit) as e:
        ingest_epochs.main(argv)
    assert e.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_ingest_epochs_top_0_and_an_epoch_without_cpu_seconds(capsys, monkeypatch):
    from benchmarks import ingest_epochs

    monkeypatch.setattr(ingest_epochs, "_workloads", lambda names, data, s: [names[0]])
    seen = {}

    def fake(wl, b, w, n, convert=True, blocks=None, source="ray_data"):
        seen.update(convert=convert, blocks=blocks, source=source)
        return [{"epoch": k, "seconds": 1.0, "rows": 10, "blocks": blocks or 4,
                 "cpu_seconds": {"total": 0.0 if k else 2.0},
                 "cpu_by_title": {"ray::SplitCoordinator": 1.5}} for k in range(n)]

    monkeypatch.setattr(ingest_epochs, "run_ray_ingest", fake)
    ingest_epochs.main(["--epochs", "2", "--top", "0"])
    assert capsys.readouterr().out.splitlines() == [
        "epoch 0: 1.00 s, 10 rows, Ray CPU 2.00 s, 5 rows/CPU s",
        "epoch 1: 1.00 s, 10 rows, Ray CPU 0.00 s, - rows/CPU s",
        "4 blocks; Ray CPU s per epoch after the first: median 0.00, least 0.00"]
    assert seen == {"convert": True, "blocks": None, "source": "ray_data"}
    # one epoch: no epoch after the first to summarise; --blocks and --delivery reach the run
    # (--blocks with --files is an argparse error since the eleventh session)
    ingest_epochs.main(["--epochs", "1", "--top", "0", "--blocks", "8", "--delivery"])
    assert capsys.readouterr().out.splitlines()[-1] == (
        "8 blocks; Ray CPU s per epoch after the first: median nan, least nan")
    assert seen == {"convert": False, "blocks": 8, "source": "ray_data"}
