"""``rectrain recommend --config`` with bad input, in this process (``actors: 0``, no Ray): a
clear error naming the field before any model is loaded or block written, and nothing under
``out`` the user had is lost or mixed with lists of other settings."""

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rectrain.config import config_from_dict
from rectrain.config.load import ConfigError
from rectrain.launch.recommend_job import recommend_job
from tests.support.prepared import write_prepared
from tests.support.recommend_runs import save_untrained
from tests.support.tiny import tiny_job

TWO_TOWER = {"name": "two_tower", "embedding_dim": 8, "sequence_features": ["hist_item_id"],
             "item_features": ["genres"], "tower_hidden": [8], "temperature": 0.5}


def _prepared(path: str, item_offset: int = 0, test: bool = True) -> str:
    """write_prepared plus the event position column serving reads (``_pos`` = ``_ts``)."""
    write_prepared(path)
    for f in glob.glob(f"{path}/*/*.parquet"):
        t = pq.read_table(f)
        t = t.set_column(t.column_names.index("_item"), "_item", pc.add(t["_item"], item_offset))
        pq.write_table(t.append_column("_pos", t["_ts"]), f)
    if not test:
        for f in glob.glob(f"{path}/test/*"):
            os.remove(f)
        os.rmdir(f"{path}/test")
    return path


def _runs(tmp: str, **prep) -> dict:
    job = tiny_job(tmp, dataset={"split": {"test": 1, "valid": 1}})
    job["prepared_dir"] = _prepared(f"{tmp}/prepared", **prep)
    return {"job": job, "din": save_untrained(job, f"{tmp}/din"),
            "two_tower": save_untrained({**job, "model": TWO_TOWER}, f"{tmp}/tt")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _runs(str(tmp_path_factory.mktemp("bad")))


def _rec(runs, out, **over):
    kw = dict(ranking_run=runs["din"], actors=0, k=3, out=str(out), evaluate=False)
    return recommend_job(config_from_dict(runs["job"]), **{**kw, **over})


@pytest.mark.parametrize("params, field", [({"nlists": 4}, "index_params.nlists"),
                                           ({"m": 0}, "index_params.m"),
                                           ({"nprobe": -1}, "index_params.nprobe")])
def test_index_params_faiss_would_abort_on_are_config_errors(runs, params, field):
    job = {**runs["job"], "recommend": {"index": "hnsw", "index_params": params}}
    with pytest.raises(ConfigError, match=f"recommend.{field}"):
        config_from_dict(job)


def test_ranking_run_as_retriever_and_missing_test_split_fail_before_any_block(runs, tmp_path):
    with pytest.raises(ValueError, match=r"recommend.retrieval_run: .*din run.*retrieval run"):
        _rec(runs, tmp_path / "a", mode="two_stage", retrieval_run=runs["din"])
    other = _runs(str(tmp_path / "other"), test=False)
    with pytest.raises(ValueError, match=r"recommend.evaluate: .*no test/ split"):
        _rec(other, tmp_path / "b", evaluate=True)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
    assert _rec(other, tmp_path / "b")["users"] == 30  # evaluate: false needs no test split


def test_retriever_of_other_items_is_an_error_not_empty_lists(runs, tmp_path):
    other = _runs(str(tmp_path / "other"), item_offset=1000)
    with pytest.raises(ValueError, match=r"recommend.retrieval_run: .*shares no item id"):
        _rec(runs, tmp_path / "o", mode="two_stage", retrieval_run=other["two_tower"])


def test_out_with_blocks_of_other_settings_is_refused_and_kept(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = _rec(runs, out)
    blocks = sorted(os.listdir(out / "blocks"))
    assert _rec(runs, out)["blocks_skipped"] == first["blocks"]  # same settings: resumed
    with pytest.raises(ValueError, match=r"recommend.k: 3 there, 5 now"):
        _rec(runs, out, k=5)
    with pytest.raises(ValueError, match=r"recommend.mode: 'brute_force' there"):
        _rec(runs, out, mode="two_stage", retrieval_run=runs["two_tower"])
    assert sorted(os.listdir(out / "blocks")) == blocks
    assert (out / "notes.txt").read_text() == "mine"
    assert pq.read_table(out / "top_k.parquet")["rank"].to_numpy().max() == 3
    os.remove(out / "recommend_spec.json")  # blocks of an earlier release: settings unknown
    with pytest.raises(ValueError, match="unrecorded settings"):
        _rec(runs, out)


def test_user_who_saw_every_item_is_counted_not_silently_dropped(tmp_path, capsys):
    r = _runs(str(tmp_path / "r"))
    f = sorted(glob.glob(f"{tmp_path}/r/prepared/train/*.parquet"))[0]
    t = pq.read_table(f)
    items = pc.unique(pa.concat_tables(
        [pq.read_table(x, columns=["_item"]) for x in glob.glob(f"{tmp_path}/r/prepared/*/*")])
        ["_item"])
    extra = t.slice(0, len(items))  # user 7 has a train event of every item
    extra = extra.set_column(extra.column_names.index("_user"), "_user",
                             pa.array(np.full(len(items), 7)))
    extra = extra.set_column(extra.column_names.index("_item"), "_item", items)
    pq.write_table(pa.concat_tables([t, extra]), f)
    s = _rec(r, tmp_path / "o", exclude="all_seen", k=5)
    assert s["users"] == 30 and s["users_without_list"] == 1 and s["rows"] == 29 * 5
    assert "1 of 30 users get no list" in capsys.readouterr().out


def test_bad_out_gone_data_short_candidates_and_bad_flags_are_one_line_errors(runs, tmp_path):
    import json
    import shutil

    afile = tmp_path / "lists.parquet"
    afile.write_text("mine")
    with pytest.raises(ValueError, match=r"recommend.out: .* is a file"):
        _rec(runs, afile)
    assert afile.read_text() == "mine"
    with pytest.raises(ValueError, match=r"recommend.candidates: .* at most 2 .* k: 3"):
        _rec(runs, tmp_path / "c", mode="two_stage", retrieval_run=runs["two_tower"],
             candidates=2)
    with pytest.raises(ValueError, match=r"^recommend.actors: .*greater than or equal to 0, "
                                         r"got -1$"):
        _rec(runs, tmp_path / "a", actors=-1)
    moved = shutil.copytree(runs["din"], tmp_path / "din")
    meta = moved / "checkpoint" / "meta.json"
    m = json.loads(meta.read_text())
    m["config"]["prepared_dir"] = str(tmp_path / "gone")
    meta.write_text(json.dumps(m))
    with pytest.raises(FileNotFoundError, match=r"recommend.ranking_run: .*gone.*manifest"):
        _rec(runs, tmp_path / "g", ranking_run=str(moved))
    assert not any(os.path.exists(tmp_path / d) for d in "cag")


def test_short_lists_from_an_ivf_index_that_probes_few_items_are_counted(runs, tmp_path,
                                                                          capsys):
    # 50 items in 50 lists, 2 probed: about 2 items found per user, k = 3
    s = _rec(runs, tmp_path / "ivf", mode="two_stage", retrieval_run=runs["two_tower"],
             index="ivf", index_params={"nlist": 1000, "nprobe": 2}, candidates=3,
             sources=[{"name": "retrieval"}], exclude="none")
    assert s["users_with_short_list"] > 0 and s["rows"] < 30 * 3
    assert f"{s['users_with_short_list']} of 30 users get fewer than k=3" in capsys.readouterr().out


@pytest.mark.parametrize("rec, field", [({"scoring": "unsharded", "workers": 2}, "workers"),
                                        ({"actor_memory_gb": -1}, "actor_memory_gb"),
                                        ({"scoring": "sharded", "explain": 2}, "explain")])
def test_scoring_settings_that_conflict_are_config_errors(runs, rec, field):
    with pytest.raises(ConfigError, match=f"recommend.{field}"):
        config_from_dict({**runs["job"], "recommend": rec})


def test_auto_scoring_shards_the_ranker_only_when_its_tables_exceed_the_budget(runs):
    """The chooser reads the stored config and manifest (no model, no Ray); its table bytes
    are those of the unsharded model's EBC/EC weights (fp32)."""
    import torch

    from rectrain.config.sections import RecommendSpec
    from rectrain.serve.loading import load_model
    from rectrain.serve.sharded import choose_scoring
    from rectrain.train.planning import embedding_modules

    model = load_model(runs["din"]).model
    nbytes = sum(p.numel() * p.element_size() for m in embedding_modules(model)
                 for p in m.parameters())
    assert nbytes > 0 and all(p.dtype == torch.float32 for m in embedding_modules(model)
                              for p in m.parameters())
    spec = lambda **kw: RecommendSpec(ranking_run=runs["din"], **kw)  # noqa: E731
    path, why = choose_scoring(spec())  # default budget: 8 GiB
    assert path == "unsharded" and f"ranking tables {nbytes:,} bytes" in why and "<=" in why
    path, why = choose_scoring(spec(actor_memory_gb=(nbytes - 1) / 2**30))
    assert path == "sharded" and f"{nbytes:,} bytes" in why and "> actor_memory_gb" in why
    assert "2 workers" in why  # the run's train.num_workers
    assert choose_scoring(spec(actor_memory_gb=nbytes / 2**30))[0] == "unsharded"
    assert choose_scoring(spec(actor_memory_gb=1e-9, workers=3))[1].endswith("3 workers")
    assert choose_scoring(spec(actor_memory_gb=1e-9, scoring="unsharded"))[0] == "unsharded"
    with pytest.raises(ValueError, match=r"^recommend.explain: .* exceed actor_memory_gb"):
        choose_scoring(spec(actor_memory_gb=1e-9, explain=2))
    # a retrieval run serves through its index: never sharded
    tt = RecommendSpec(ranking_run=runs["two_tower"], actor_memory_gb=1e-9)
    assert choose_scoring(tt)[0] == "unsharded"
    with pytest.raises(ValueError, match=r"^recommend.scoring: .*two_tower run"):
        choose_scoring(tt.model_copy(update={"scoring": "sharded"}))
