"""Benchmark jobs (``rectrain bench <name>``): ingest, train step, scaling, peers, all, and
scale (cost curves of the whole job against the log size; not part of ``all``).

Each job writes ``<out>/<name>.json`` (results + machine + settings), ``<out>/<name>.md`` (a
Markdown table) and ``<out>/<name>_*.png`` (matplotlib plots), and shows a tqdm progress bar
while it runs. Workloads (synthetic DIN logs, a Criteo-shaped DLRM set, MovieLens-100K) are in
:mod:`rectrain.bench.workloads`. Timings taken on a loaded machine mean little in absolute
terms; every job reports ratios of paths measured in the same run.
"""

#: benchmark names accepted by ``rectrain bench``
BENCHES = ("ingest", "trainstep", "scaling", "peers", "all", "scale")
