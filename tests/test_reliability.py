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
