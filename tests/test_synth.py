"""`rectrain synth`: schema, counts, power-law popularity, sessions, learnable labels,
determinism per seed, and a clean pass through the prepare stage."""

import hashlib
import math

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from rectrain.config import config_from_dict
from rectrain.data import storage
from rectrain.data.prepare import prepare
from rectrain.data.sources.synth import (EVENTS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA, SynthSpec,
                                         generate_events, make_world, synth)

SPEC = dict(events=6000, users=300, items=500, files=3, categories=8, seed=7)


def _events(out):
    return pads.dataset(f"{out}/events").to_table()


def _file_digests(out):
    files, _ = storage.list_parquet_files(f"{out}/events")
    return [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files]


@pytest.fixture(scope="module")
def small(tmp_path_factory, ray_local):
    out = str(tmp_path_factory.mktemp("synth") / "raw")
    summary = synth(SynthSpec(**SPEC), out)  # Ray tasks, one per file
    return out, summary


def test_schema_counts_and_ids(small):
    out, summary = small
    ev = _events(out)
    users = pq.read_table(f"{out}/users")
    items = pq.read_table(f"{out}/items")
    assert ev.schema == EVENTS_SCHEMA and users.schema == USERS_SCHEMA
    assert items.schema == ITEMS_SCHEMA
    assert ev.num_rows == summary["events"] == SPEC["events"]
    assert users.num_rows == SPEC["users"] and items.num_rows == SPEC["items"]
    assert len(storage.list_parquet_files(f"{out}/events")[0]) == SPEC["files"]
    e = ev.to_pandas()
    assert e["user_id"].between(1, SPEC["users"]).all()
    assert e["item_id"].between(1, SPEC["items"]).all()
    assert set(e["rating"].unique()) <= {1, 2, 3, 4, 5} and set(e["click"].unique()) == {0, 1}
    assert e.notna().all().all() and (e["timestamp"] > 1_500_000_000).all()
    # item text: non-empty titles that name the item's category noun
    it = items.to_pandas()
    assert (it["title"].str.len() > 5).all() and (it["description"].str.len() > 10).all()
    assert it["tags"].map(len).eq(2).all() and it["tags"].map(lambda t: t[0] != t[1]).all()


def test_power_law_popularity_and_activity(small):
    out, _ = small
    e = _events(out).to_pandas()
    counts = np.sort(np.bincount(e["item_id"], minlength=SPEC["items"] + 1)[1:])[::-1]
    top1 = counts[: max(1, SPEC["items"] // 100)].sum() / counts.sum()
    assert top1 > 0.10, top1  # uniform popularity would give 0.01
    per_user = np.sort(e.groupby("user_id").size().to_numpy())[::-1]
    assert per_user[: SPEC["users"] // 10].sum() / per_user.sum() > 0.3  # top 10% of users


def test_sessions_are_bursts(small):
    out, _ = small
    e = _events(out).to_pandas().sort_values(["user_id", "timestamp"], kind="stable")
    gaps = e.groupby("user_id")["timestamp"].diff().dropna().to_numpy()
    assert (gaps >= 0).all()
    assert np.mean(gaps < 600) > 0.6  # most gaps: within a session (mean 90 s)
    assert np.mean(gaps > 86_400) > 0.03  # and new sessions days later
    spec = SynthSpec(**SPEC)
    assert e["timestamp"].min() >= spec.start_ts
    assert e["timestamp"].max() <= spec.start_ts + spec.days * 86_400  # inside the log window


def test_labels_carry_user_item_signal():
    spec = SynthSpec(**SPEC)
    w = make_world(spec)
    w.pop("users"), w.pop("items")
    t = generate_events(spec, 0, 0, spec.users, w)
    u = t["user_id"].to_numpy() - 1
    i = t["item_id"].to_numpy() - 1
    affinity = np.einsum("ij,ij->i", w["user_factors"][u], w["item_factors"][i])
    score = affinity / math.sqrt(spec.latent_dim) * spec.affinity_scale + w["item_bias"][i]
    assert roc_auc_score(t["click"].to_numpy(), score) > 0.65
    # without the affinity the labels are the item bias plus noise only
    flat = SynthSpec(**{**SPEC, "affinity_scale": 0.0})
    t0 = generate_events(flat, 0, 0, spec.users, w)
    assert abs(roc_auc_score(t0["click"].to_numpy(), affinity) - 0.5) < 0.05


def test_deterministic_per_seed(small, tmp_path):
    out, _ = small
    again = str(tmp_path / "again")
    synth(SynthSpec(**SPEC), again, use_ray=False)  # in-process gives the same bytes as Ray
    assert _file_digests(again) == _file_digests(out)
    for table in ("users", "items"):
        assert pq.read_table(f"{again}/{table}").equals(pq.read_table(f"{out}/{table}"))
    other = str(tmp_path / "other")
    synth(SynthSpec(**{**SPEC, "seed": 8}), other, use_ray=False)
    assert not _events(other).equals(_events(out))


def test_cli_synth_writes_the_requested_counts(tmp_path, ray_local):
    from rectrain.cli import main

    out = str(tmp_path / "cli")
    assert main(["synth", "--events", "500", "--users", "50", "--items", "40", "--files", "2",
                 "--seed", "3", "--out", out]) == 0
    assert _events(out).num_rows == 500 and len(_file_digests(out)) == 2
    assert pq.read_table(f"{out}/items").num_rows == 40
    assert storage.read_json(f"{out}/synth.json")["spec"]["seed"] == 3


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="events must be >= 1"):
        SynthSpec(events=0)


def test_prepare_reads_synth_without_rejects(small, tmp_path):
    out, _ = small
    cfg = config_from_dict({
        "name": "synth_tiny", "prepared_dir": str(tmp_path / "prepared"),
        "run_dir": str(tmp_path / "run"),
        "dataset": {"events": f"{out}/events",
                    "users": {"path": f"{out}/users", "key": "user_id"},
                    "items": {"path": f"{out}/items", "key": "item_id"},
                    "label": {"column": "click"}, "sequence_length": 5,
                    "split": {"test": 1, "valid": 1}},
        "features": [
            {"name": "user_id", "kind": "sparse", "source": "user_id"},
            {"name": "item_id", "kind": "sparse", "source": "item_id", "table": "item"},
            {"name": "hist_item_id", "kind": "sequence", "source": "item_id", "table": "item"},
            {"name": "country", "kind": "sparse", "source": "country"},
            {"name": "category", "kind": "sparse", "source": "category"},
            {"name": "tags", "kind": "multi_hot", "source": "tags"},
            {"name": "price", "kind": "dense", "source": "price"},
        ],
    })
    m = prepare(cfg)
    assert m["rows_read"] == SPEC["events"] == m["rows_used"]
    assert m["rows_rejected"] == 0 and m["rejected_by_reason"] == {}
    per_user = _events(out).to_pandas().groupby("user_id").size()
    assert m["rows_per_split"]["test"] == len(per_user)
    assert m["rows_per_split"]["valid"] == int((per_user >= 2).sum())
    assert m["tables"]["item"] == SPEC["items"] + 1


def test_job_warns_when_the_log_on_disk_has_other_sizes(small):
    """A job with ``dataset.source: synth`` uses a log already on disk; when that log was
    written with other sizes than the job's ``dataset.synth``, the mismatch is reported."""
    from rectrain.launch.jobs import synth_mismatch

    out, _ = small

    def cfg(**sizes):
        return config_from_dict({
            "name": "s", "prepared_dir": f"{out}/../p", "run_dir": f"{out}/../r",
            "dataset": {"source": "synth", "synth": sizes, "events": f"{out}/events",
                        "users": {"path": f"{out}/users", "key": "user_id"},
                        "items": {"path": f"{out}/items", "key": "item_id"},
                        "label": {"column": "click"}},
            "features": [{"name": "item_id", "kind": "sparse", "source": "item_id",
                          "table": "item"},
                         {"name": "hist_item_id", "kind": "sequence", "source": "item_id",
                          "table": "item"}]})

    assert synth_mismatch(cfg(**SPEC)) == {}
    assert synth_mismatch(cfg(**{**SPEC, "users": 20000, "files": 1})) == {"users": (300, 20000)}
