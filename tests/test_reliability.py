"""Issue 12: a failed run keeps the last good one, prepared data is checked at the trainer's
door, configs that can never work stop early with the reason (in-process, no Ray)."""

import os

import pytest

from rectrain.config import config_from_dict
from rectrain.data.schema import empty_split_reason
from tests.support.prepared import write_prepared
from tests.support.run_dirs import old_run, outside_attempts, tree
from tests.support.tiny import tiny_job


# --- kind 5: configs that can never work stop early, with the reason -------------------------

def test_empty_split_reason_names_the_field_to_change():
    split = {"test": 2, "valid": 0}
    r = empty_split_reason({"train": 10, "valid": 0, "test": 5}, split, 15, "/p")
    assert "/p" in r and "valid split is empty" in r and "dataset.split.valid is 0" in r
    r = empty_split_reason({"train": 0, "valid": 4, "test": 4}, {"test": 2, "valid": 2}, 8, "/p")
    assert "train split is empty" in r and "lower dataset.split.test" in r
    r = empty_split_reason({"train": 0, "valid": 0, "test": 0}, {"test": 2, "valid": 2}, 0, "/p")
    assert "rejected_by_reason" in r
    assert empty_split_reason({"train": 1, "valid": 1, "test": 1}, split, 3, "/p") is None


def test_train_stops_before_ray_on_an_empty_split(tmp_path):
    """A prepared folder whose valid split is empty: train stops on the driver with the reason
    (before: it started Ray and failed on a bare path), and run_dir is left as it was."""
    from rectrain.launch.ray_launch import train

    write_prepared(str(tmp_path / "prepared"), n_valid=0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    cfg = config_from_dict(tiny_job(str(tmp_path)))
    with pytest.raises(ValueError, match=r"valid split is empty.*dataset\.split"):
        train(cfg)
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}"


def test_relative_resume_path_in_the_config_is_resolved_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECTRAIN_BASE_DIR", raising=False)
    cfg = config_from_dict(tiny_job(str(tmp_path), checkpoint={"resume": "old/run"}))
    assert cfg.checkpoint.resume == str(tmp_path / "old" / "run")
    for word in ("latest", "auto", "s3://b/run"):
        assert config_from_dict(tiny_job(str(tmp_path), checkpoint={"resume": word})
                                ).checkpoint.resume == word


def test_cli_paths_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    import rectrain.cli as cli

    seen = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "cmd_recommend", lambda run, k, out, explain=0: seen.update(
        run=run, out=out))
    (tmp_path / "runs" / "a" / "checkpoint").mkdir(parents=True)  # recommend checks it first
    (tmp_path / "runs" / "a" / "checkpoint" / "meta.json").write_text("{}")
    assert cli.main(["recommend", "--checkpoint", "runs/a", "--out", "recs.parquet"]) == 0
    assert seen == {"run": os.path.join(str(tmp_path), "runs/a"),
                    "out": os.path.join(str(tmp_path), "recs.parquet")}


# --- kind 4: ids change under an existing run ----------------------------------------------

def _run_inprocess(job: dict) -> dict:
    """``loop.run`` on one gloo rank in this process (no Ray)."""
    from tests.support.dist import run_one_rank

    return run_one_rank(job)


def _small_job(tmp, **over):
    return tiny_job(tmp, train={"epochs": 1, "batch_size": 16, "eval_batch_size": 64,
                                "num_workers": 1, "log_every": 100}, **over)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prepared folder and one finished 1-epoch run on it."""
    tmp = str(tmp_path_factory.mktemp("trained"))
    write_prepared(f"{tmp}/prepared", n_train=96, n_valid=48, n_test=48)
    m = _run_inprocess(_small_job(tmp))
    return tmp, m


def _edit_manifest(tmp, **changes):
    import json

    path = f"{tmp}/prepared/manifest.json"
    original = open(path).read()
    m = json.loads(original)
    m.update(changes)
    with open(path, "w") as f:
        json.dump(m, f)
    return path, original


@pytest.mark.parametrize("change", ["table_size", "same_sizes"])
def test_resume_recommend_export_stop_when_the_data_changed(trained, change):
    """Prepared again into the same prepared_dir: --resume, recommend and export stop with a
    message saying the data changed since the checkpoint (before: a size mismatch deep in DCP,
    or, with equal sizes, silently remapped ids)."""
    from rectrain.serve.loading import load_model
    from tests.support.prepared import tiny_manifest

    tmp, _ = trained
    assert "data" in json_meta(f"{tmp}/run/checkpoint")
    tables = dict(tiny_manifest()["tables"])
    if change == "table_size":
        tables["item"] += 5
        changes = {"tables": tables}
        says = r"table item: 51 rows at the checkpoint, 56 now"
    else:
        changes = {"fingerprint": "f" * 64}  # other vocabularies, same table sizes
        says = "same table sizes"
    path, original = _edit_manifest(tmp, **changes)
    try:
        pattern = rf"changed since this checkpoint.*{says}.*another prepared_dir"
        with pytest.raises(ValueError, match=pattern):
            load_model(f"{tmp}/run")  # recommend and export load through this
        with pytest.raises(ValueError, match=pattern):
            _run_inprocess(_small_job(tmp, checkpoint={"resume": "latest"}))
    finally:
        open(path, "w").write(original)
    assert load_model(f"{tmp}/run").meta["epoch"] == 0  # unchanged data loads


def json_meta(url):
    from rectrain.data import storage

    return storage.read_json(f"{url}/meta.json")


def test_fingerprint_covers_vocabularies_and_is_stable():
    import pyarrow as pa

    from rectrain.data.schema import fingerprint, vocab_digest

    a = pa.array(["a", "b", "c"])
    assert vocab_digest(a) == vocab_digest(pa.chunked_array([["a"], ["b", "c"]]))
    assert vocab_digest(a) != vocab_digest(pa.array(["a", "c", "b"]))  # same size, ids moved
    base = ({"item_id": "int64"}, {"item": 4}, [{"name": "item_id"}], {})
    assert fingerprint(*base, {"item_id": vocab_digest(a)}) == \
        fingerprint(*base, {"item_id": vocab_digest(a)})
    assert fingerprint(*base, {"item_id": vocab_digest(a)}) != \
        fingerprint(*base, {"item_id": vocab_digest(pa.array(["a", "c", "b"]))})


# --- kind 2: prepared data checked at the trainer's door -----------------------------------

def _layout(tmp):
    from rectrain.data.features import FeatureLayout
    from tests.support.prepared import tiny_manifest
    from tests.support.tiny import tiny_cfg

    return FeatureLayout(tiny_cfg(tmp), tiny_manifest())


def _with(table, name, arr):
    return table.set_column(table.column_names.index(name), name, arr)


def _bad_batches():
    import numpy as np
    import pyarrow as pa

    from tests.support.prepared import batch_table
    from tests.support.tiny import N_ITEMS

    t = batch_table(0)
    item = t["item_id"].to_numpy().copy()
    over = item.copy()
    over[5] = N_ITEMS + 1  # == the item table's size (N_ITEMS + 1 rows)
    neg = item.copy()
    neg[3] = -1
    hist = t["hist_item_id"].to_pylist()
    hist[4] = [1, None, 2]
    lab = t["label"].to_numpy().copy()
    lab[7] = np.nan
    return {
        "beyond": (_with(t, "item_id", pa.array(over)),
                   rf"column 'item_id' row 5: id at or beyond.*value {N_ITEMS + 1}.*'item' has "
                   rf"{N_ITEMS + 1} rows"),
        "negative": (_with(t, "item_id", pa.array(neg)), r"column 'item_id' row 3: negative id "
                                                         r"\(value -1\)"),
        "null_element": (_with(t, "hist_item_id", pa.array(hist, pa.list_(pa.int64()))),
                         r"column 'hist_item_id' row 4: null element.*\[1, None, 2\]"),
        "float_ids": (_with(t, "item_id", pa.array(item.astype(np.float64))),
                      r"column 'item_id' has type double; a sparse feature needs an integer id"),
        "nan_label": (_with(t, "label", pa.array(lab)), r"column 'label' row 7: NaN label"),
    }


@pytest.mark.parametrize("case", ["beyond", "negative", "null_element", "float_ids",
                                  "nan_label"])
def test_to_batch_stops_at_the_door_with_column_row_value(tmp_path, case):
    """Before: ids beyond a table were zeroed by FBGEMM in sharded training, a negative id gave
    a bare IndexError, a null list element became int64 min, float ids were truncated."""
    from rectrain.data.door import PreparedDataError

    table, says = _bad_batches()[case]
    with pytest.raises(PreparedDataError, match=rf"^batch: {says}.*rectrain prepare"):
        _layout(str(tmp_path)).to_batch(table)


def _prepared_with_bad_file(tmp):
    import json

    import pyarrow.parquet as pq

    from tests.support.prepared import tiny_manifest

    write_prepared(f"{tmp}/prepared", n_train=60, n_valid=20, n_test=20)
    m = json.load(open(f"{tmp}/prepared/manifest.json"))
    tables = tiny_manifest()["tables"]
    m["features"] = [{"name": n, "kind": k, "table": t, "num_embeddings": tables[t]}
                     for n, k, t in [("user_id", "sparse", "user_id"), ("item_id", "sparse", "item"),
                                     ("hist_item_id", "sequence", "item"),
                                     ("age_bucket", "sparse", "age_bucket"),
                                     ("genres", "multi_hot", "genres")]]
    json.dump(m, open(f"{tmp}/prepared/manifest.json", "w"))
    bad, says = _bad_batches()["negative"]
    path = f"{tmp}/prepared/train/part-1.parquet"
    good = pq.read_table(path)
    pq.write_table(_with(good.slice(0, len(bad)), "item_id", bad["item_id"]), path)
    return path


def test_file_reading_paths_name_the_file_and_the_sharded_and_unsharded_paths_agree(tmp_path):
    """FileShard (torchrun / tests), the deterministic order and read_split (recommend,
    export's callers) give one error naming the file, column, row within the file and value."""
    from rectrain.data.door import PreparedDataError
    from rectrain.data.loader import FileShard
    from rectrain.data.order import GlobalOrder
    from rectrain.data.schema import read_split

    tmp = str(tmp_path)
    path = _prepared_with_bad_file(tmp)
    msgs = []
    for read in (lambda: list(FileShard(f"{tmp}/prepared/train", 0, 1).tables()),
                 lambda: GlobalOrder(f"{tmp}/prepared/train", 0).table,
                 lambda: read_split(f"{tmp}/prepared", "train", ["item_id"])):
        with pytest.raises(PreparedDataError) as e:
            read()
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] == msgs[2]
    assert msgs[0].startswith(f"{path}: column 'item_id' row 3: negative id (value -1)")


def test_a_schema_mismatch_between_prepared_files_names_the_file(tmp_path):
    """Before: a bare ArrowInvalid from concat_tables / Ray Data, without a file name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rectrain.data.door import PreparedDataError, check_footers, prepared_bounds
    from rectrain.data.loader import FileShard

    tmp = str(tmp_path)
    _prepared_with_bad_file(tmp)
    path = f"{tmp}/prepared/train/part-2.parquet"
    t = pq.read_table(path)
    pq.write_table(_with(t, "user_id", t["user_id"].cast(pa.int32())), path)
    pq.write_table(pq.read_table(f"{tmp}/prepared/train/part-0.parquet"),
                   f"{tmp}/prepared/train/part-1.parquet")  # the negative id out of the way
    says = rf"^{path}: column 'user_id' has type int32, but .*part-0.parquet has int64"
    with pytest.raises(PreparedDataError, match=says):
        list(FileShard(f"{tmp}/prepared/train", 0, 1).tables())
    with pytest.raises(PreparedDataError, match=says):  # the driver, before Ray Data reads
        check_footers(f"{tmp}/prepared", prepared_bounds(f"{tmp}/prepared"), ("train",))


# --- kind 1: a failed run keeps the last good run -------------------------------------------

def test_a_failed_run_keeps_the_last_good_one_and_success_leaves_no_stale_file(tmp_path):
    """Before: a new run deleted checkpoint/ and metrics.json up front and left the old
    predictions beside its own outputs."""
    from rectrain.train.attempt import promote, start_attempt

    run = tmp_path / "run"
    old_run(run)
    before = {p: (run / p).read_text() for p in tree(run)}
    cfg = config_from_dict(tiny_job(str(tmp_path)))
    wcfg, attempt = start_attempt(cfg)
    assert wcfg.run_dir == attempt and wcfg.checkpoint.resume == "auto"
    (tmp_path / attempt / "checkpoints").mkdir(parents=True)  # the run fails after this
    assert {p: (run / p).read_text() for p in tree(run) if not p.startswith(".attempts")} \
        == before
    # the next run succeeds: it wrote a checkpoint and metrics, no predictions
    wcfg, attempt2 = start_attempt(cfg)
    assert not os.path.exists(attempt)  # the failed attempt is gone
    for rel in ("metrics.json", "checkpoint/meta.json"):
        os.makedirs(os.path.dirname(f"{attempt2}/{rel}"), exist_ok=True)
        open(f"{attempt2}/{rel}", "w").write("new")
    promote(attempt2, str(run))
    assert tree(run) == ["checkpoint/meta.json", "metrics.json", "notes.txt"]
    assert (run / "metrics.json").read_text() == "new"
    assert not (run / ".attempts").exists() or not any((run / ".attempts").iterdir())


def test_resume_copies_the_checkpoint_and_the_best_into_the_attempt(tmp_path):
    from rectrain.train.attempt import start_attempt

    run = tmp_path / "run"
    old_run(run)
    cfg = config_from_dict(tiny_job(str(tmp_path), checkpoint={
        "resume": str(run / "checkpoints" / "step-00000009")}))
    wcfg, attempt = start_attempt(cfg)
    assert wcfg.checkpoint.resume == "auto"  # a restarted worker group finds the attempt's own
    assert os.path.exists(f"{attempt}/checkpoints/step-00000009/meta.json")
    assert os.path.exists(f"{attempt}/checkpoint/meta.json")
    assert (run / "metrics.json").read_text() == '{"old": 1}'


def test_export_replaces_its_folder_only_when_complete(trained, tmp_path, monkeypatch):
    """A failed export keeps the previous one intact; a successful one leaves no file of the
    earlier export (before: it wrote into the folder in place and kept stale files)."""
    import rectrain.serve.export as export_mod

    tmp, _ = trained
    out = tmp_path / "export"
    out.mkdir()
    (out / "serving.json").write_text("{}")
    (out / "model.pt2").write_text("old")
    (out / "stale.txt").write_text("from an earlier export")

    real = export_mod._export_program

    def half_then_fail(wrapper, layout, path, name):
        open(path, "w").write("half-written")
        raise ValueError("export failed midway")

    monkeypatch.setattr(export_mod, "_export_program", half_then_fail)
    with pytest.raises(ValueError, match="midway"):
        export_mod.export(f"{tmp}/run", str(out))
    assert (out / "model.pt2").read_text() == "old" and (out / "stale.txt").exists()
    monkeypatch.setattr(export_mod, "_export_program", real)
    paths = export_mod.export(f"{tmp}/run", str(out))
    assert paths == [str(out / "model.pt2")]
    assert sorted(os.listdir(out)) == ["model.pt2", "serving.json"]
    assert not [p for p in os.listdir(tmp_path) if p != "export"]  # no temporary folder left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not an export"):
        export_mod.export(f"{tmp}/run", str(tmp_path / "mine"))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_train_that_fails_keeps_the_run_dir(tmp_path, ray_local, monkeypatch):
    """Under Ray Train with 2 workers: a run whose rank 1 raises mid-epoch stops with that
    rank's error (not a collective hang) and leaves the earlier run's checkpoint, metrics and
    predictions as they were (before: deleted up front, predictions left stale). That the next,
    successful run replaces every run output and keeps the user's file is checked on the
    successful Ray Train run of tests/test_uneven_shards.py (one Ray Train run fewer)."""
    from rectrain.launch.ray_launch import train
    from rectrain.train.faults import FAULT_ENV

    tmp = str(tmp_path)
    write_prepared(f"{tmp}/prepared", n_train=96, n_valid=48, n_test=48)
    run = tmp_path / "run"
    old_run(run)
    before = outside_attempts(run)
    job = _small_job(tmp)
    job["train"]["num_workers"] = 2  # 96 rows: 3 steps of 2 x 16
    monkeypatch.setenv(FAULT_ENV, "1:2:raise")  # rank 1 raises before its 3rd step
    with pytest.raises(Exception) as e:  # bounded: its peer must not wait forever (timeout)
        train(config_from_dict(job))
    texts, c = [], e.value
    while c is not None and len(texts) < 5:  # the message may sit on a wrapped cause
        texts.append(str(c))
        c = c.__cause__ or c.__context__
    assert "injected fault on rank 1 at step 2" in "\n".join(texts)  # the job stops with it
    assert outside_attempts(run) == before
    assert list((run / ".attempts").iterdir())  # the failed attempt is kept for inspection


@pytest.mark.parametrize("case", ["beyond", "negative"])
def test_the_driver_names_the_file_row_and_value_before_the_streaming_read(tmp_path, case):
    """Ray Data's batches do not know their file: the driver reads each prepared file's footer
    statistics first and, for a file out of bounds, names file, column, row and value (before:
    the batch row only)."""
    import pyarrow.parquet as pq

    from rectrain.data.door import PreparedDataError, check_footers, prepared_bounds

    tmp = str(tmp_path)
    _prepared_with_bad_file(tmp)  # part-1 holds a negative id at row 3
    path = f"{tmp}/prepared/train/part-1.parquet"
    if case == "beyond":
        bad, says = _bad_batches()["beyond"]
        pq.write_table(_with(pq.read_table(path), "item_id", bad["item_id"]), path)
        from tests.support.tiny import N_ITEMS
        says = rf"row 5: id at or beyond its table's size \(value {N_ITEMS + 1}\)"
    else:
        says = r"row 3: negative id \(value -1\)"
    with pytest.raises(PreparedDataError, match=rf"^{path}: column 'item_id' {says}"):
        check_footers(f"{tmp}/prepared", prepared_bounds(f"{tmp}/prepared"), ("train",),
                      "label")
    pq.write_table(pq.read_table(f"{tmp}/prepared/train/part-0.parquet"), path)
    check_footers(f"{tmp}/prepared", prepared_bounds(f"{tmp}/prepared"), ("train",), "label")
