"""Item churn for ``rectrain synth`` (``--item-churn``): items are born across the log's window
and their popularity fades, so later time windows hold ids an earlier window never saw and old
ids go cold (what continual training and ``encoding: zch`` eviction are for; issue 14).

Model: item i has a birth time ``b_i`` (0 for a ``1 - item_churn`` share of the items, chosen at
random, else uniform in ``[0, days)``) and, at time t, the weight
``pop_i * 0.5 ** ((t - b_i) / half_life)`` for ``t >= b_i`` and 0 before (exponential decay of
novelty, as in the temporal-popularity models of news and video recommendation, e.g. Yang &
Leskovec, "Patterns of temporal variation in online media", WSDM 2011). ``pop_i`` is the
static Zipf popularity of :func:`rectrain.data.sources.synth.make_world`. Time is cut into
:data:`BINS` equal bins; an event draws its item from the weights of its bin,
inside its session's category, by one ``searchsorted`` over the bins' concatenated CDFs
(vectorised, no per-row Python); weights are taken at the bin's start, so an item born inside a
bin appears from the next one and never before its birth. A category with no weight in a bin
(none of its items born yet) draws from all the bin's items; a bin with none at all (only with
``item_churn = 1``) falls back to the static draw.

Randomness comes from ``SeedSequence([seed, 2])``, so ``item_churn = 0`` leaves the log
byte-identical to one generated without this module.
"""

from __future__ import annotations

import numpy as np

#: time bins of the churn model (3-day bins for the default 180-day window)
BINS = 60


def churn_world(n_items: int, item_churn: float, half_life_days: float, days: float,
                seed: int, pop: np.ndarray, item_cat: np.ndarray, categories: int) -> dict:
    """The churn model's arrays, merged into the synth world dict.

    Args:
        pop: float64 ``[I]`` static item weights; item_cat: int64 ``[I]`` categories.

    Returns:
        ``churn_birth_s`` float64 ``[I]`` (seconds after the window start), ``churn_flat``
        float64 ``[BINS * I]`` (per bin, the category-sorted weight CDF normalised to 1, plus
        ``2 * bin``), ``churn_lo`` / ``churn_mass`` float64 ``[BINS, C]``, ``churn_bin_s``.

    Raises:
        ValueError: ``item_churn`` outside [0, 1] or ``half_life_days <= 0``.
    """
    if not 0.0 <= item_churn <= 1.0:
        raise ValueError(f"synth: item_churn must be in [0, 1], got {item_churn}")
    if not half_life_days > 0:
        raise ValueError(f"synth: item_half_life_days must be > 0, got {half_life_days}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    window = days * 86_400.0
    born_late = rng.random(n_items) < item_churn
    birth = np.where(born_late, rng.uniform(0.0, window, n_items), 0.0)
    bin_s = window / BINS
    start = np.arange(BINS) * bin_s  # weights at a bin's start: nobody is drawn before birth
    age = start[:, None] - birth[None, :]  # [BINS, I] seconds since birth
    wt = np.where(age >= 0, pop[None, :] * 0.5 ** (np.maximum(age, 0) / (half_life_days * 86_400)),
                  0.0)
    order = np.lexsort((np.arange(n_items), item_cat))
    sorted_wt = wt[:, order]
    total = np.maximum(sorted_wt.sum(axis=1, keepdims=True), 1e-300)
    cum = np.cumsum(sorted_wt, axis=1) / total
    mass = np.stack([np.bincount(item_cat, weights=wt[t], minlength=categories)
                     for t in range(BINS)]) / total
    lo = np.concatenate([np.zeros((BINS, 1)), np.cumsum(mass, axis=1)[:, :-1]], axis=1)
    flat = (cum + 2.0 * np.arange(BINS)[:, None]).ravel()
    return {"churn_birth_s": birth, "churn_flat": flat, "churn_lo": lo, "churn_mass": mass,
            "churn_bin_s": bin_s, "churn_order": order}


def churn_sample(cat: np.ndarray, u: np.ndarray, ts: np.ndarray, start_ts: int, w: dict,
                 static_sample) -> np.ndarray:
    """Item rows (0-based) for events of category ``cat`` int64 ``[n]`` at unix seconds ``ts``
    ``[n]``, ``u`` uniform ``[n]``; ``static_sample(cat, u, w)`` serves categories that have no
    born item in the event's bin."""
    n_items = len(w["churn_order"])
    b = np.clip(((ts - start_ts) / w["churn_bin_s"]).astype(np.int64), 0, BINS - 1)
    mass = w["churn_mass"][b, cat]
    target = w["churn_lo"][b, cat] + u * mass + 2.0 * b
    idx = np.searchsorted(w["churn_flat"], target, side="right") - b * n_items
    item = w["churn_order"][np.clip(idx, 0, n_items - 1)]
    empty = mass <= 0
    if empty.any():  # the whole bin's CDF (lo 0, mass 1) instead of the category's
        j = np.searchsorted(w["churn_flat"], u[empty] + 2.0 * b[empty], side="right")
        item[empty] = w["churn_order"][np.clip(j - b[empty] * n_items, 0, n_items - 1)]
        none = empty.copy()
        none[empty] = w["churn_mass"][b[empty]].sum(axis=1) <= 0
        if none.any():
            item[none] = static_sample(cat[none], u[none], w)
    return item
