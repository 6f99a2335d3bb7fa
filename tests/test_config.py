"""Malformed job configs fail with errors that name the file and the field."""

import os

import pytest
import yaml

from rectrain.config import ConfigError, load_config
from tests.support.tiny import tiny_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    (lambda j: j["sharding"].update(types=[]), "sharding.types"),
    (lambda j: j["model"].update(mlp_hidden=[0, 4]), "model.mlp_hidden.0"),
    (lambda j: j["model"].update(attention_hidden=[-1]), "model.attention_hidden.0"),
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


@pytest.mark.parametrize("mutate, field, says", [
    (lambda j: j["model"].update(sasrec_all_steps=True), "model.sasrec_all_steps",
     "not a field of model din (a field of sasrec)"),
    (lambda j: j.update(model={"name": "sasrec", "retrieval_loss": "sampled"}),
     "model.retrieval_loss", "'in_batch' or 'full'"),
    (lambda j: j.update(model={"name": "sasrec", "sasrec_all_steps": True}),
     "model.sasrec_all_steps", "needs model.retrieval_loss: full"),
    (lambda j: j.update(model={"name": "two_tower"}), "dataset.split", "leave-last-out"),
    (lambda j: j.update(model={"name": "dlrm", "cross_layers": 2}), "model.cross_layers",
     "a field of dcnv2"),
    (lambda j: j.update(model={"name": "deepfm2"}), "model.name", "use one of din, dlrm"),
])
def test_model_fields_and_rules_are_named(tmp_path, mutate, field, says):
    job = tiny_job(str(tmp_path))
    mutate(job)
    if job["model"].get("name") in ("two_tower", "sasrec") and field != "dataset.split":
        job["dataset"]["split"] = {"test": 1, "valid": 1}
    path = _write(tmp_path, job)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path}: {field}: " in str(e.value) and says in str(e.value)


@pytest.mark.parametrize("model, field", [
    ({"name": "two_tower", "item_features": ["hist_item_id"]}, "model.item_features.0"),
    ({"name": "two_tower", "user_features": ["age"]}, "model.user_features.0"),
    ({"name": "sasrec", "item_feature": "user_id"}, "model.item_feature"),
    ({"name": "two_tower", "item_features": ["genres", "genres"]}, "model.item_features.1"),
    ({"name": "two_tower", "item_features": ["genres"], "user_features": ["genres"]},
     "model.user_features"),
])
def test_retrieval_feature_lists_checked_at_load(tmp_path, model, field):
    job = tiny_job(str(tmp_path), model=model)
    with pytest.raises(ConfigError, match=f"job.yaml: {field}: "):
        load_config(_write(tmp_path, job))


def test_each_model_has_only_its_fields(tmp_path):
    from rectrain.config import DinSpec, SasrecSpec, TwoTowerSpec

    cfg = load_config(_write(tmp_path, tiny_job(str(tmp_path))))
    assert isinstance(cfg.model, DinSpec) and cfg.model.attention_hidden == [16]
    job = tiny_job(str(tmp_path), model={"name": "sasrec", "seq_layers": 1})
    m = load_config(_write(tmp_path, job)).model
    assert isinstance(m, SasrecSpec) and m.seq_layers == 1 and not hasattr(m, "mlp_hidden")
    assert "attention_hidden" not in TwoTowerSpec.model_fields


@pytest.mark.parametrize("use_gpu", [False, None])
def test_fused_adam_on_cpu_rejected_at_load(tmp_path, monkeypatch, use_gpu):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    job = tiny_job(str(tmp_path), optim={"sparse": "adam"}, train={"use_gpu": use_gpu})
    path = _write(tmp_path, job)
    with pytest.raises(ConfigError, match=f"{path}: optim.sparse: 'adam' has no fused CPU"):
        load_config(path)
    job["ray"] = {"address": "ray://head:10001"}  # a cluster: its GPUs are known once connected
    if use_gpu is None:
        assert load_config(_write(tmp_path, job)).optim.sparse == "adam"
    job["train"]["use_gpu"] = True
    assert load_config(_write(tmp_path, job)).optim.sparse == "adam"


def test_malformed_config_fails_in_the_cli_before_ray(tmp_path):
    """`rectrain train --config bad.yaml` exits non-zero naming file and field, and loading a
    config in-process imports neither Ray nor (for a non-adam job) torch."""
    import subprocess
    import sys

    bad = tiny_job(str(tmp_path))
    bad["model"]["sasrec_all_steps"] = True
    path = str(tmp_path / "bad.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(bad, f)
    code = ("import sys; from rectrain.config import ConfigError, load_config\n"
            "try: load_config(sys.argv[1])\n"
            "except ConfigError as e: print(e)\n"
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'imported'\n")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert f"{path}: model.sasrec_all_steps: not a field of model din" in out.stdout
    cli = subprocess.run([sys.executable, "-m", "rectrain.cli", "train", "--config", path],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert cli.returncode != 0
    assert f"{path}: model.sasrec_all_steps: " in cli.stderr
    assert "Started a local Ray instance" not in cli.stdout + cli.stderr


def test_extends_merges_recursively_relative_to_the_file(tmp_path):
    job = tiny_job(str(tmp_path))
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "root.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "bases" / "mid.yaml").write_text(
        "extends: root.yaml\ntrain: {epochs: 3}\nmodel: {mlp_hidden: [8]}\n")
    (tmp_path / "job.yaml").write_text(
        "extends: bases/mid.yaml\nname: child\ntrain: {batch_size: 4}\n"
        "features:\n  - {name: user_id, kind: sparse, source: user_id}\n"
        "  - {name: item_id, kind: sparse, source: item_id, table: item}\n"
        "  - {name: hist_item_id, kind: sequence, source: item_id, table: item}\n")
    cfg = load_config(tmp_path / "job.yaml")
    assert cfg.name == "child" and cfg.train.epochs == 3 and cfg.train.batch_size == 4
    assert cfg.train.eval_batch_size == 32  # deep merge keeps the root's other keys
    assert cfg.model.mlp_hidden == [8] and cfg.model.attention_hidden == [16]
    assert [f.name for f in cfg.features] == ["user_id", "item_id", "hist_item_id"]  # replaced


def test_extends_cycles_and_missing_bases_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: extends: cycle .*a.yaml -> .*b.yaml -> "):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: .*nope.yaml: config file not found"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: {x: 1}\n")
    with pytest.raises(ConfigError, match=r"d.yaml: extends: expected a path"):
        load_config(tmp_path / "d.yaml")


def test_shipped_variant_is_small_and_extends_the_base():
    text = open(os.path.join(ROOT, "jobs", "movielens_dlrm.yaml")).read()
    assert "extends: movielens/base.yaml" in text and len(text.splitlines()) <= 40
    cfg = load_config(os.path.join(ROOT, "jobs", "movielens_dlrm.yaml"))
    assert cfg.model.name == "dlrm" and cfg.dataset.label.aux_thresholds == [2, 3, 5]


def test_config_reference_is_up_to_date():
    """docs/config.md is what `python -m rectrain.config.reference` prints (regenerate it)."""
    from rectrain.config.reference import reference

    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        committed = f.read()
    assert committed == reference(), "run: python -m rectrain.config.reference > docs/config.md"
    for name in ("sasrec_all_steps", "attention_hidden", "tower_hidden", "cross_rank"):
        assert f"| `{name}` |" in committed
    # every type link of the reference lands on a section it writes
    import re
    anchors = set(re.findall(r'<a id="([^"]+)"', committed))
    assert set(re.findall(r"\]\(#([^)]+)\)", committed)) <= anchors


def test_unreadable_config_files_are_named(tmp_path):
    """A folder, a binary file or a folder named by ``extends:`` fail with the path, not a
    traceback."""
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {tmp_path}\n")
    for path, says in ((str(tmp_path), "not a file"), (str(binary), "cannot read"),
                       (str(child), "not a file")):
        with pytest.raises(ConfigError, match="not a file|cannot read") as e:
            load_config(path)
        assert says in str(e.value) and str(tmp_path) in str(e.value)


def test_cli_rejects_a_missing_checkpoint_without_loading_torch(tmp_path):
    """``recommend`` / ``export`` of a path with no checkpoint stop with the path before the
    serving code (torch, torchrec) is imported."""
    import subprocess
    import sys

    code = ("import sys; from rectrain import cli; rc = cli.main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    for argv in (["recommend", "--checkpoint", str(tmp_path / "nope")],
                 ["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
        assert r.returncode == 2, r.stderr
        assert f"{tmp_path / 'nope'}: no complete checkpoint" in r.stderr


def test_a_bad_value_set_by_a_base_names_the_base(tmp_path):
    """An error in a value that an ``extends`` base set names the base as well as the job file
    (before: only the job file, where the field does not appear)."""
    job = tiny_job(str(tmp_path))
    job["dataset"]["sequence_length"] = -3
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "leaf.yaml").write_text("extends: base.yaml\nname: leaf\ntrain: {epochs: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "leaf.yaml"))
    lines = str(e.value).splitlines()
    leaf, base = str(tmp_path / "leaf.yaml"), str(tmp_path / "base.yaml")
    assert f"{leaf}: dataset.sequence_length (set in {base}): " in lines[0]
    assert lines[1].startswith(f"{leaf}: train.epochs: ") and "set in" not in lines[1]
    with pytest.raises(ConfigError, match=r"train.epochs \(set in the command line\)"):
        load_config(str(tmp_path / "leaf.yaml"), {"train": {"epochs": -1},
                                                  "dataset": {"sequence_length": 4}})
