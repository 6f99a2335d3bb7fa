"""Malformed job configs fail with errors that name the file and the field."""

import pytest
import yaml

from rectrain.config import ConfigError, load_config
from tests.support.tiny import tiny_job


def _write(tmp_path, job) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job))
    return str(p)


def test_shipped_job_loads():
    cfg = load_config("jobs/movielens_din.yaml")
    assert cfg.dataset.label.threshold == 4
    assert cfg.dataset.sequence_length == 50
    assert cfg.train.num_workers == 2
    kinds = {f.name: f.kind for f in cfg.features}
    assert kinds["hist_item_id"] == "sequence" and kinds["genres"] == "multi_hot"


@pytest.mark.parametrize("mutate, field", [
    (lambda j: j["features"][0].update(kind="sparce"), "features.0.kind"),
    (lambda j: j["dataset"].pop("label"), "dataset.label"),
    (lambda j: j["train"].update(batch_size=0), "train.batch_size"),
    (lambda j: j["train"].update(batch_sise=5), "train.batch_sise"),
    (lambda j: j["dataset"].update(on_invalid="ignore"), "dataset.on_invalid"),
    (lambda j: j["features"][3].update(transform={"floor_div": 10, "prefix": 1}),
     "features.3.transform"),
    (lambda j: j["sharding"].update(types=["diagonal"]), "sharding.types.0"),
])
def test_bad_field_is_named(tmp_path, mutate, field):
    job = tiny_job(str(tmp_path))
    job.setdefault("sharding", {})
    mutate(job)
    path = _write(tmp_path, job)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert path in str(e.value) and field in str(e.value)


def test_sequence_must_share_table_with_its_source(tmp_path):
    job = tiny_job(str(tmp_path))
    job["features"][2]["table"] = "other"
    with pytest.raises(ConfigError, match="hist_item_id.*share table 'item'"):
        load_config(_write(tmp_path, job))


def test_model_must_name_existing_features(tmp_path):
    job = tiny_job(str(tmp_path))
    job["model"]["sequence_features"] = ["hist_item_id", "movie"]
    with pytest.raises(ConfigError, match="model.sequence_features.1: no feature named 'movie'"):
        load_config(_write(tmp_path, job))


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


@pytest.mark.parametrize("name", ["label", "label_value", "_user"])
def test_feature_names_cannot_shadow_sample_columns(tmp_path, name):
    job = tiny_job(str(tmp_path))
    job["features"].append({"name": name, "kind": "sparse", "source": "age"})
    with pytest.raises(ConfigError, match=f"features.6.name: '{name}' is reserved"):
        load_config(_write(tmp_path, job))
