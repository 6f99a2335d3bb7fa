"""Cluster mode cannot starve Ray Data (issue 12, kind 3), without Ray: the CPU check from given
resource figures, and the bounded wait for input blocks on a stalled iterator. Plus the config
rules of elastic training (kind 10)."""

import threading

import pyarrow as pa
import pytest

from rectrain.config import config_from_dict
from rectrain.data.loader import InputStalled, RayShard, prefetch
from rectrain.launch.cluster import cpu_shortfall
from rectrain.launch.ray_launch import elastic_size
from tests.support.tiny import tiny_job


def test_cpu_check_names_what_the_job_needs_and_what_to_change():
    # 2 workers x 2 CPUs on a 4-CPU fixed cluster: nothing left for Ray Data's read
    why = cpu_shortfall(4.0, None, workers=2, cpus_per_worker=2.0, data_cpus=2.0)
    assert why.startswith("the job needs 6 CPUs (train.num_workers 2 x train.cpus_per_worker 2")
    assert "ray.data_cpus 2" in why and "the cluster has 4" in why
    assert "train.num_workers" in why and "train.cpus_per_worker" in why and "add nodes" in why
    # half a CPU left over is not enough either: a read task needs a whole one
    assert cpu_shortfall(4.5, None, 2, 2.0, 0.5) is not None
    # one CPU beside the workers is enough to read (more only reads faster)
    assert cpu_shortfall(5.0, None, 2, 2.0, 2.0) is None
    # an autoscaling cluster that may grow past the need is not stopped (e.g. min_workers 0)
    assert cpu_shortfall(0.0, 16.0, 2, 2.0, 2.0) is None
    grow = cpu_shortfall(0.0, 4.0, 2, 2.0, 2.0)
    assert "the cluster has 0, up to 4 with its autoscaler" in grow


class _StalledIterator:
    """A Ray DataIterator stand-in whose first block never comes (Ray Data's read pending)."""

    def __init__(self):
        self.release = threading.Event()

    def iter_batches(self, **kw):
        self.release.wait(30)
        yield pa.table({"x": [1]})


def test_a_stalled_input_stops_with_the_likely_cause():
    it = _StalledIterator()
    shard = RayShard(it, timeout_s=0.2, split="train")
    with pytest.raises(InputStalled, match=r"no block of the 'train' split arrived within "
                                           r"train\.batch_timeout_s=0\.2 s: Ray Data's read is "
                                           r"likely waiting for a CPU") as e:
        next(shard.tables())
    assert "train.num_workers" in str(e.value) and "ray.data_cpus" in str(e.value)
    it.release.set()


def test_bounded_wait_passes_blocks_through_unchanged():
    class Blocks:
        def iter_batches(self, **kw):
            yield from (pa.table({"x": [i, i + 1], "y": [0, 0]}) for i in range(3))

    got = list(RayShard(Blocks(), columns=["x"], timeout_s=5).tables())
    assert [t.column("x").to_pylist() for t in got] == [[0, 1], [1, 2], [2, 3]]
    assert got[0].column_names == ["x"]
    assert list(RayShard(Blocks(), timeout_s=None).tables())[2].num_rows == 2
    # an error inside the iterator still reaches the consumer as itself
    with pytest.raises(ZeroDivisionError):
        list(prefetch((1 // 0 for _ in range(1)), 1, timeout_s=5))


def test_elastic_config(tmp_path):
    cfg = config_from_dict(tiny_job(str(tmp_path), train={"num_workers": 2, "min_workers": 1},
                                    checkpoint={"max_failures": 1}))
    assert elastic_size(cfg.train.num_workers, cfg.train.min_workers) == (1, 2)
    assert elastic_size(2, None) == elastic_size(2, 2) == 2
    assert config_from_dict(tiny_job(str(tmp_path))).train.batch_timeout_s == 600
    with pytest.raises(ValueError, match="train.min_workers: elastic training .* needs "
                                         "checkpoint.max_failures >= 1"):
        config_from_dict(tiny_job(str(tmp_path), train={"num_workers": 2, "min_workers": 1}))
    with pytest.raises(ValueError, match="train.min_workers: 3 is more than train.num_workers"):
        config_from_dict(tiny_job(str(tmp_path), train={"num_workers": 2, "min_workers": 3},
                                  checkpoint={"max_failures": 1}))
