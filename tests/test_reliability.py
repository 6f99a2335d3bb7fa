"""Issue 12: a failed run keeps the last good one, prepared data is checked at the trainer's
door, configs that can never work stop early with the reason (in-process, no Ray)."""

import os

import pytest

from rectrain.config import config_from_dict
from rectrain.data.schema import empty_split_reason
from tests.support.prepared import write_prepared
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
    assert cli.main(["recommend", "--checkpoint", "runs/a", "--out", "recs.parquet"]) == 0
    assert seen == {"run": os.path.join(str(tmp_path), "runs/a"),
                    "out": os.path.join(str(tmp_path), "recs.parquet")}


# --- kind 4: ids change under an existing run ----------------------------------------------

def _run_inprocess(job: dict) -> dict:
    """``loop.run`` on one gloo rank in this process (no Ray)."""
    import torch.distributed as dist

    from rectrain.train import loop
    from rectrain.train.env import file_env
    from tests.support.ports import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        cfg = config_from_dict(job)
        return loop.run(cfg, file_env(cfg, 0, 1))
    finally:
        dist.destroy_process_group()


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
