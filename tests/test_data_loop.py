"""The pause in Ray Data's scheduling loop (rectrain/launch/data_loop.py): it sleeps only after
a step in which nothing moved, never without the executor's topology, and every dataset
rectrain's Ray creates carries it."""

from types import SimpleNamespace

import pytest

from rectrain.launch import data_loop


class _State:
    def __init__(self):
        self.inq, self.outq = 0, 0

    def total_enqueued_input_blocks(self):
        return self.inq

    def total_enqueued_output_blocks(self):
        return self.outq


class _Op:
    """Hashable, as the topology's keys (operators) are."""

    def __init__(self, metrics=True):
        if metrics:
            self.metrics = SimpleNamespace(num_outputs_taken=0, num_tasks_submitted=0,
                                           num_tasks_finished=0)


def _op():
    return _Op()


@pytest.fixture
def slept(monkeypatch):
    calls = []
    monkeypatch.setattr(data_loop.time, "sleep", lambda s: calls.append(s))
    return calls


def test_pause_only_after_a_step_that_moved_nothing(slept):
    op, st = _op(), _State()
    ex = SimpleNamespace(_topology={op: st})
    cb = data_loop.IdleLoopPause()
    cb.on_execution_step(ex)                 # first step: nothing to compare with
    assert slept == []
    cb.on_execution_step(ex)                 # nothing moved
    assert slept == [data_loop.IDLE_PAUSE_S]
    for move in (lambda: setattr(op.metrics, "num_outputs_taken", 1),
                 lambda: setattr(st, "inq", 2),
                 lambda: setattr(st, "outq", 1),
                 lambda: setattr(op.metrics, "num_tasks_submitted", 1),
                 lambda: setattr(op.metrics, "num_tasks_finished", 1)):
        move()
        cb.on_execution_step(ex)             # progress: no pause
        assert len(slept) == 1
    cb.on_execution_step(ex)
    assert len(slept) == 2


def test_no_pause_without_the_executors_internals(slept):
    cb = data_loop.IdleLoopPause()
    for ex in (SimpleNamespace(), SimpleNamespace(_topology={}),
               SimpleNamespace(_topology={_Op(metrics=False): _State()})):  # op lacks metrics
        cb.on_execution_step(ex)
        cb.on_execution_step(ex)
    assert slept == []


def test_datasets_carry_the_pause_and_still_split_exactly(ray_local):
    import ray.data

    ds = ray.data.range(1000, override_num_blocks=8)
    assert data_loop.IdleLoopPause in ds.context.custom_execution_callback_classes
    a, b = ds.streaming_split(2, equal=True)
    # consume both halves concurrently (an equal split waits for both consumers)
    import threading

    got = {}

    def drain(i, it):
        got[i] = sorted(x for t in it.iter_batches(batch_size=None, batch_format="numpy")
                        for x in t["id"].tolist())

    th = [threading.Thread(target=drain, args=(i, it)) for i, it in enumerate((a, b))]
    [t.start() for t in th]
    [t.join(120) for t in th]
    assert len(got[0]) == len(got[1]) == 500
    assert sorted(got[0] + got[1]) == list(range(1000))
