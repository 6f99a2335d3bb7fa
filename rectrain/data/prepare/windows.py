"""Time windows of the event log: which events of a prepare train, validate and test.

The protocol (docs/protocol.md, "train on T, evaluate on T+1"), for ``dataset.window: N``:

- train: the events of window N (``windows.cumulative``: of windows 0..N);
- valid: the first ``valid_fraction`` of window N+1 by time; test: the rest of window N+1;
- every earlier event still feeds the behaviour sequences (strictly before each event), and
  is counted in the manifest as ``window.rows_before``; events after window N+1 are
  ``window.rows_after``. Both are read and validated, and excluded from every split.

Windows come from ``windows.size`` (seconds from ``windows.start``, default the first event's
timestamp) or ``windows.boundaries``; prepare writes one window per call (the loop over windows
is the driver's, e.g. ``rectrain continual``).
"""

from __future__ import annotations

import numpy as np

from rectrain.config.sections import parse_duration


#: the split codes of :func:`split_codes` (0..2 are rectrain.data.schema.SPLITS)
BEFORE, AFTER = 3, 4


def window_bounds(spec, ts_min: int, ts_max: int) -> dict:
    """The edges of the prepare of ``spec.window`` (``spec``: a DatasetSpec with ``windows``)
    over events with timestamps in ``[ts_min, ts_max]`` (unix s).

    Returns ``{"index", "num_windows", "boundaries", "cumulative", "train": [start, end],
    "valid": [start, end], "test": [start, end]}`` (half-open intervals, unix s).

    Raises:
        ValueError: no ``dataset.window`` set, ``windows.start`` after the last event, fewer
            than two windows, or window N+1 does not exist (names the field and the number of
            windows).
    """
    w = spec.windows
    if spec.window is None:
        raise ValueError("dataset.window: dataset.windows is set, so name the window to "
                         "prepare (0-based; its successor is the evaluation window)")
    if w.boundaries is not None:
        edges = list(w.boundaries)
    else:
        size = parse_duration(w.size)
        start = w.start if w.start is not None else int(ts_min)
        if start > ts_max:
            raise ValueError(f"dataset.windows.start: {start} is after the last event "
                             f"({int(ts_max)}, unix s), so every window is empty; lower start "
                             f"or leave it unset (the first event's timestamp)")
        n = max(1, -(-(int(ts_max) + 1 - start) // size))
        edges = [start + i * size for i in range(n + 1)]
    n_windows, k = len(edges) - 1, spec.window
    if n_windows < 2:
        raise ValueError(f"dataset.windows: the log (unix s {int(ts_min)}..{int(ts_max)}) makes "
                         f"{n_windows} window, and window N needs a window N+1 to evaluate on; "
                         f"give a smaller size or more boundaries")
    if k + 1 >= n_windows:
        raise ValueError(f"dataset.window: {k} has no next window to evaluate on: the log "
                         f"has {n_windows} windows (0..{n_windows - 1}), so the last "
                         f"preparable window is {n_windows - 2}")
    lo, hi = edges[k + 1], edges[k + 2]
    cut = lo + int(round(w.valid_fraction * (hi - lo)))
    return {"index": k, "num_windows": n_windows, "boundaries": edges,
            "cumulative": w.cumulative,
            "train": [edges[0] if w.cumulative else edges[k], edges[k + 1]],
            "valid": [lo, cut], "test": [cut, hi]}


def split_codes(ts: np.ndarray, bounds: dict) -> np.ndarray:
    """int8 split code per timestamp (unix s): 0 train, 1 valid, 2 test, :data:`BEFORE`
    (earlier than the train window: history only), :data:`AFTER` (later than window N+1)."""
    ts = np.asarray(ts, dtype=np.int64)
    out = np.full(len(ts), AFTER, dtype=np.int8)
    out[ts < bounds["test"][1]] = 2
    out[ts < bounds["valid"][1]] = 1
    out[ts < bounds["train"][1]] = 0
    out[ts < bounds["train"][0]] = BEFORE
    return out
