"""Many epochs of the ingest report's Ray Data path for one workload, with each epoch's CPU
seconds per process title (``rectrain.bench.proctree.cpu_seconds_by_title``), to see where the
Ray path's CPU goes once the first epoch's start-up is over.

    PYTHONPATH=. python benchmarks/ingest_epochs.py --workload din_synth --epochs 12 \
        --data /tmp/ingest_prof/data

The workload's prepared data is written under ``--data`` on first use (as ``rectrain bench
ingest`` does). Prints one line per epoch: seconds, rows, Ray CPU seconds, rows per CPU second,
and the titles that spent the most; then the median and least CPU seconds of the epochs after
the first. ``--blocks N`` reads in N blocks instead of training's count; ``--delivery`` has
the workers only receive the blocks (Ray Data's delivery cost alone); ``--files`` has them read
their own shares of the files (``train.input: files``; not with ``--blocks``) instead;
``--size full`` takes the ``full`` bench size's workload (DIN 2,048,000 rows) instead of
``quick``'s.
"""

from __future__ import annotations

import argparse

from rectrain.bench.cli import SETTINGS, _workloads
from rectrain.bench.ingest import run_ray_ingest


def _int_at_least(low: int):
    """argparse type: an integer >= ``low`` (argparse names the option in its error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} is below {low}")
        return v
    return parse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="din_synth",
                    choices=("din_synth", "dlrm_criteo", "din_ml100k"))
    ap.add_argument("--epochs", type=_int_at_least(1), default=12)
    ap.add_argument("--data", default="data/bench", help="where the workloads are written")
    ap.add_argument("--batch", type=_int_at_least(1), default=1024)
    ap.add_argument("--top", type=_int_at_least(0), default=6,
                    help="titles shown per epoch (0: none)")
    ap.add_argument("--size", choices=("quick", "full"), default="quick")
    ap.add_argument("--blocks", type=_int_at_least(1), default=None,
                    help="the read's block count (default: training's, read_blocks)")
    ap.add_argument("--delivery", action="store_true",
                    help="workers only receive the blocks (no shuffle, no to_batch)")
    ap.add_argument("--files", action="store_true",
                    help="train.input: files (the workers read their own shares of the files)")
    a = ap.parse_args(argv)
    if a.files and a.blocks is not None:  # the workers' own reads have no Ray Data blocks
        ap.error("--blocks is the Ray Data read's block count: not with --files")
    wl = _workloads([a.workload], a.data, SETTINGS[a.size])[0]
    epochs = run_ray_ingest(wl, a.batch, 2, a.epochs, convert=not a.delivery, blocks=a.blocks,
                            source="files" if a.files else "ray_data")
    for e in epochs:
        tot = e["cpu_seconds"]["total"]
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(e["cpu_by_title"].items())[:a.top])
        per_cpu = f"{e['rows'] / tot:,.0f}" if tot > 0 else "-"  # no CPU time sampled
        print(f"epoch {e['epoch']}: {e['seconds']:.2f} s, {e['rows']:,} rows, Ray CPU "
              f"{tot:.2f} s, {per_cpu} rows/CPU s" + (f" | {top}" if top else ""))
    steady = sorted(e["cpu_seconds"]["total"] for e in epochs[1:]) or [float("nan")]
    head = "files read by the workers" if a.files else f"{epochs[0]['blocks']} blocks"
    print(f"{head}; Ray CPU s per epoch after the first: median "
          f"{steady[len(steady) // 2]:.2f}, least {steady[0]:.2f}")


if __name__ == "__main__":
    main()
