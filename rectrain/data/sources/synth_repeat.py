"""Repeat consumption in synthetic logs (``SynthSpec.repeat > 0``, ``rectrain synth --repeat P``).

Groceries, music and video logs are dominated by re-consumption: a user re-buys what they
bought, the more likely the more recently. Two changes to the events of
:func:`rectrain.data.sources.synth.generate_events` model that, vectorised over a file:

1. **re-consumption**: each event after a user's first is, with probability ``repeat``, a
   re-purchase of the item of the user's event ``k`` steps earlier, ``k - 1 ~
   Geometric(repeat_decay)`` (clipped to the user's first event): recent items come back more.
   Chains (a re-purchase of a re-purchase) resolve to the original item by pointer doubling.
2. **the label depends on it**: an event whose item the user had already met (a re-purchase,
   or the popularity draw falling on it again) gets ``repeat_boost * exp(-dt / repeat_tau_s)``
   added to its score, ``dt`` = seconds since the user last met the item, so the same item
   bought again soon is clicked far more often; the "candidate in history" rule sees only the
   first half of that, a model with match features (rectrain.data.match) both.

Random numbers come from ``SeedSequence([seed, 2, file])``, a stream of their own, so a log with
``repeat: 0`` stays byte-identical to one generated before this option existed.
"""

from __future__ import annotations

import numpy as np


def repeat_items(spec, file_index: int, pos: np.ndarray, ts: np.ndarray,
                 item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-consumption over one file's events (rows grouped by user, in time order).

    Args:
        spec: the :class:`~rectrain.data.sources.synth.SynthSpec` (``repeat``,
            ``repeat_decay``, ``repeat_boost``, ``repeat_tau_s``, ``seed``).
        file_index: the events file (seeds this file's stream).
        pos: int64 ``[n]`` 0-based position of each event in its user's timeline.
        ts: int64 ``[n]`` unix seconds of each event.
        item: int64 ``[n]`` item rows drawn by popularity (0-based).

    Returns:
        ``(item, bonus)``: int64 ``[n]`` items after re-consumption, float64 ``[n]`` the score
        bonus (0 for items new to the user).
    """
    n = len(item)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 2, file_index]))
    back = np.minimum(rng.geometric(spec.repeat_decay, n), pos)  # 0 for a user's first event
    rep = (rng.random(n) < spec.repeat) & (back > 0)
    idx = np.arange(n)
    src = np.where(rep, idx - back, idx)
    while True:  # pointer doubling: every event points at the original of its chain
        nxt = src[src]
        if np.array_equal(nxt, src):
            break
        src = nxt
    item = item[src]
    bonus = np.zeros(n)
    user = np.cumsum(pos == 0) - 1  # user runs within the file
    # previous event of the same (user, item): sort by (user, item, position)
    order = np.lexsort((pos, item, user))
    same = np.r_[False, (user[order][1:] == user[order][:-1])
                 & (item[order][1:] == item[order][:-1])]
    again = order[same]
    dt = (ts[again] - ts[order[np.flatnonzero(same) - 1]]).astype(np.float64)
    bonus[again] = spec.repeat_boost * np.exp(-dt / spec.repeat_tau_s)
    return item, bonus
