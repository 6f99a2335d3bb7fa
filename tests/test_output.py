"""What a run prints (rectrain.launch.quiet), ``--verbose`` and Ctrl-C, without starting Ray."""

from __future__ import annotations

import os

import pytest

from rectrain import cli
from rectrain.launch import quiet

NOISE = [
    "Successfully loaded: 'fbgemm_gpu_tbe_cache.so'",
    "Requesting resources: {'CPU': 1.0} * 2",
    "[2026-12-01 10:25:50,809 E 6174 6210] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: '3be9' has constructor arguments in the object store",
    "/x/torchrec/distributed/planner/planners.py:552: FutureWarning: HeuristicalStorageReservation",
    "  else HeuristicalStorageReservation(",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current()...`",
    "✔️  Dataset dataset_0 execution finished in 15.31 seconds",
]


def test_filter_keeps_rectrain_lines_and_tracebacks_only():
    own, other = quiet.filter_batch(NOISE + ["[rectrain] epoch 0 step 20 loss 1.1749"])
    assert own == ["[rectrain] epoch 0 step 20 loss 1.1749"] and other == []
    tb = ["Traceback (most recent call last):", '  File "loop.py", line 3, in run',
          "    step()", "RuntimeError: boom"]
    own, other = quiet.filter_batch(["noise"] + tb)
    assert own == [] and other == tb
    assert quiet.filter_batch(["ValueError: bad value"]) == ([], ["ValueError: bad value"])


def test_filter_keeps_the_body_of_a_multi_line_rectrain_print():
    plan = ["[rectrain] sharding plan (2 ranks):", "module: ec", "", "param | sharding type",
            "item  | table_wise"]
    own, other = quiet.filter_batch(NOISE[:2] + plan + ["[rectrain] epoch 0 step 20"])
    assert own == plan + ["[rectrain] epoch 0 step 20"] and other == []
    # a line ending in ":" on stderr (a log record) opens no block
    own, _ = quiet.filter_batch(["[rectrain] WARNING x: note:", "Successfully loaded: 'a.so'"],
                                is_err=True)
    assert own == ["[rectrain] WARNING x: note:"]


def test_filtered_printer_drops_ray_actor_tracebacks(capsys):
    forwarded = []

    def ray_printer(data, ignore_prefix):
        forwarded.append(data["lines"])

    tb = ["Traceback (most recent call last):", "RuntimeError: Found multiple active Ray "
          "instances"]
    quiet._print_filtered({"lines": ["[rectrain] hi", *tb], "is_err": False,
                           "actor_name": "RayTrainWorker"}, ray_printer, False)
    quiet._print_filtered({"lines": tb, "is_err": True, "actor_name": "PlacementGroupCleaner"},
                          ray_printer, False)
    assert capsys.readouterr().out == "[rectrain] hi\n"  # without Ray's worker prefix
    assert forwarded == [tb]


@pytest.fixture
def clean_env(monkeypatch):
    """No quiet/verbose settings in the environment; whatever a test sets is undone after it."""
    for k in (quiet.ENV, "RAY_DATA_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS",
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_AUTH_MODE", "RAY_DEDUP_LOGS",
              "RAY_TRAIN_ENABLE_PRINT_PATCH"):
        monkeypatch.setenv(k, "")  # records the original value (or its absence) for teardown
        monkeypatch.delenv(k)
    return monkeypatch


def test_quiet_env_settings_and_verbose_keeps_ray_defaults(clean_env):
    quiet.configure_env(local=True)
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING"
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    for k in ("RAY_DATA_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS",
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        clean_env.delenv(k)
    quiet.set_verbose(True)
    quiet.configure_env(local=True)
    assert "RAY_DATA_LOG_LEVEL" not in os.environ
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    assert quiet.ray_log_level() == 20 and quiet.train_logging_config().log_level == "INFO"


def test_cluster_keeps_the_preemption_watcher(clean_env):
    quiet.configure_env(local=False)
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    assert quiet.train_logging_config().log_level == "WARNING"


@pytest.mark.parametrize("argv", [["--verbose", "synth"], ["synth", "--verbose"],
                                  ["synth", "-v"]])
def test_verbose_flag_before_or_after_the_verb(argv, clean_env):
    seen = {}
    clean_env.setattr(cli, "cmd_synth", lambda args: seen.setdefault("v", quiet.verbose()))
    verb_at = argv.index("synth") + 1
    argv[verb_at:verb_at] = ["--events", "5", "--out", "unused"]
    assert cli.main(argv) == 0
    assert seen["v"] is True


def test_without_verbose_the_run_is_quiet(clean_env):
    seen = {}
    clean_env.setattr(cli, "cmd_synth", lambda args: seen.setdefault("v", quiet.verbose()))
    assert cli.main(["synth", "--events", "5", "--out", "unused"]) == 0
    assert seen["v"] is False


def test_ctrl_c_stops_with_one_line_and_status_130(clean_env, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    clean_env.setattr(cli, "cmd_synth", interrupted)
    assert cli.main(["synth", "--events", "5", "--out", "unused"]) == cli.INTERRUPTED == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[rectrain] interrupted (Ctrl-C): stopped"]


def test_ctrl_c_under_ray_train_is_reported_as_an_interrupt():
    """Ray Train's ``fit`` installs its own SIGINT handler (graceful abort, then SystemExit /
    exit status 1); within ``_noting_sigint`` that handler is wrapped so the signal is noted,
    and the previous handler is back afterwards."""
    import os
    import signal

    from rectrain.launch.ray_launch import _noting_sigint

    before = signal.getsignal(signal.SIGINT)
    calls = []
    with _noting_sigint() as seen:
        signal.signal(signal.SIGINT, lambda s, f: calls.append(s))  # as Ray Train does
        os.kill(os.getpid(), signal.SIGINT)
        signal.getsignal(signal.SIGINT)  # let the handler run
    assert seen == [signal.SIGINT] and calls == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before
