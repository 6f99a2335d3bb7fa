"""Ray Train failure handling on a slice of the real MovieLens-100K: one of 2 workers kills itself
(``os._exit``) after step 6 of the epoch; Ray Train (``FailureConfig(max_failures=1)``) restarts
the worker group, which resumes from the step-4 checkpoint at row 4 * 2 * B of the epoch and
finishes. The run ends with the same rows trained and the same test AUC as an uninterrupted run
with the same seed: that one runs the same training loop on 2 gloo ranks without Ray
(``tests.support.dist.spawn``, a Ray Train start-up less; every_n_steps makes both read the train
split in the same deterministic order, and the metrics do not depend on how valid/test rows are
spread over the ranks)."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rectrain.config import load_config
from rectrain.data import storage
from rectrain.data.prepare import prepare
from rectrain.data.sources.movielens import load_movielens_100k, write_raw_logs
from rectrain.launch.ray_launch import train
from rectrain.train.faults import FAULT_ENV, marker_url
from tests.support.dist import spawn

N_USERS, B, EVERY, FAULT_STEP = 60, 128, 4, 6


def _uninterrupted(rank, world, job):
    """``loop.run`` of ``job`` on this gloo rank, one torch thread like each Ray Train worker
    of :func:`rectrain.launch.ray_launch.train` on 2 cores."""
    import torch

    from rectrain.config import config_from_dict
    from rectrain.train import loop
    from rectrain.train.env import file_env

    torch.set_num_threads(1)
    cfg = config_from_dict(job)
    return loop.run(cfg, file_env(cfg, rank, world))


@pytest.mark.slow
def test_killed_worker_restores_from_checkpoint(tmp_path, ray_local, monkeypatch):
    tables = load_movielens_100k()
    keep = pa.array(np.arange(1, N_USERS + 1))
    tables["events"] = tables["events"].filter(pc.is_in(tables["events"]["user_id"], keep))
    tables["users"] = tables["users"].filter(pc.is_in(tables["users"]["user_id"], keep))
    raw = tmp_path / "raw"
    write_raw_logs(tables, str(raw))

    def cfg(run):
        return load_config("jobs/movielens_din.yaml", {
            "prepared_dir": str(tmp_path / "prepared"), "run_dir": str(tmp_path / run),
            "dataset": {"source": None, "events": str(raw / "events"),
                        "users": {"path": str(raw / "users"), "key": "user_id"},
                        "items": {"path": str(raw / "items"), "key": "item_id"}},
            "train": {"epochs": 1, "batch_size": B, "num_workers": 2, "log_every": 100},
            "checkpoint": {"every_n_steps": EVERY, "max_failures": 1}})

    n_train = prepare(cfg("ref"))["rows_per_split"]["train"]
    assert n_train // (2 * B) > FAULT_STEP + 2  # the fault is mid-epoch
    ref = spawn(_uninterrupted, 2, cfg("ref").model_dump(mode="json"))[0]

    monkeypatch.setenv(FAULT_ENV, f"1:{FAULT_STEP}:exit")
    m = train(cfg("ft"))
    marker = marker_url(str(tmp_path / "ft"), 1, FAULT_STEP)
    assert storage.read_json(marker) == {"step": FAULT_STEP, "rank": 1}  # it did fail
    ep, ep_ref = m["epochs"][0], ref["epochs"][0]
    # resumed at the last checkpoint before the fault; each row of the epoch trained once
    assert ep["resumed_at_row"] == EVERY * 2 * B
    assert ep["train_rows"] == ep_ref["train_rows"] == n_train // (2 * B) * 2 * B
    assert ep["train_rows"] + ep["train_rows_dropped"] == n_train
    assert ep["valid_rows"] == ep_ref["valid_rows"] and m["test_rows"] == ref["test_rows"]
    assert abs(m["test_auc"] - ref["test_auc"]) < 0.005
    assert 0.5 < m["test_auc"] < 1.0
