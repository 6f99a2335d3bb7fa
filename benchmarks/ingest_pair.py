"""The ingest report's one-process read + ``to_batch``, alone and then two copies at once, to show
what running two busy processes side by side does to the CPU seconds of the same work on this
machine (the Ray paths always run two workers at once; the one-process baseline runs alone).

    PYTHONPATH=. python benchmarks/ingest_pair.py --workload din_synth --data /tmp/ingest_prof/data

Prints, for each of ``--repeats`` rounds, the CPU seconds of the work alone and of each of the
two copies run at once (torch on one thread in every process), then the least of each.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

from benchmarks.ingest_epochs import _int_at_least


def _work(args) -> float:
    name, data, size = args
    import torch

    from rectrain.bench.cli import SETTINGS, _workloads
    from rectrain.bench.ingest import run_pyarrow

    torch.set_num_threads(1)
    wl = _workloads([name], data, SETTINGS[size])[0]
    return run_pyarrow(wl, SETTINGS[size]["batch"], repeats=1)["read_to_batch_cpu_s"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="din_synth", choices=("din_synth", "dlrm_criteo"))
    ap.add_argument("--data", default="data/bench", help="where the workloads are written")
    ap.add_argument("--size", choices=("quick", "full"), default="quick")
    ap.add_argument("--repeats", type=_int_at_least(1), default=4)
    a = ap.parse_args(argv)
    job = (a.workload, a.data, a.size)
    ctx = mp.get_context("spawn")
    alone, pair = [], []
    with ctx.Pool(2) as pool:
        pool.map(_work, [job, job])  # writes the workload's data once, warms both processes
        for r in range(a.repeats):
            alone.append(pool.apply(_work, (job,)))
            both = pool.map(_work, [job, job], chunksize=1)
            pair.extend(both)
            print(f"round {r}: alone {alone[-1]:.2f} CPU-s; two at once {both[0]:.2f} and "
                  f"{both[1]:.2f} CPU-s")
    print(f"least: alone {min(alone):.2f}, two at once {min(pair):.2f} CPU-s "
          f"({min(pair) / min(alone):.2f}x)")


if __name__ == "__main__":
    main()
