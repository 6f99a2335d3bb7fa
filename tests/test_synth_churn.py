"""``rectrain synth --item-churn`` (issue 14): items first appear across the 180 days and old
items fade. In-process generation (no Ray)."""

import numpy as np
import pytest

from rectrain.data.sources.synth import SynthSpec, generate_events, make_world


def _events(**over):
    spec = SynthSpec(events=40_000, users=800, items=600, categories=8, seed=3, **over)
    w = make_world(spec)
    t = generate_events(spec, 0, 0, spec.users, w)
    day = (t["timestamp"].to_numpy() - spec.start_ts) / 86_400
    return spec, w, t["item_id"].to_numpy(), day


def test_items_first_appear_across_the_span_and_old_items_fade():
    spec, w, item, day = _events(item_churn=0.5, item_half_life_days=30)
    birth_day = w["churn_birth_s"] / 86_400
    assert np.all(day >= birth_day[item - 1])  # no item is drawn before it is born
    first = np.full(spec.items + 1, np.inf)
    np.minimum.at(first, item, day)
    seen = np.isfinite(first)
    # first appearances spread over the window: some in each third of the 180 days
    for lo, hi in ((0, 60), (60, 120), (120, 180)):
        assert ((first[seen] >= lo) & (first[seen] < hi)).sum() >= 30, (lo, hi)
    # the items of day 0 (born before the log) fade: their share of events falls
    old = birth_day[item - 1] == 0
    share = [old[(day >= lo) & (day < lo + 30)].mean() for lo in range(0, 180, 30)]
    assert share[0] > 0.85 and share[-1] < 0.3  # measured: 0.92 ... 0.13
    assert all(a > b for a, b in zip(share, share[1:]))  # falling month by month
    # a late-born item's events sit after its birth, most within two half-lives
    young = birth_day[item - 1] > 90
    age = day[young] - birth_day[item[young] - 1]
    assert np.median(age) < 60


def test_no_churn_leaves_the_log_unchanged_and_bad_settings_are_refused():
    _, w0, item0, day0 = _events()
    assert "churn_flat" not in w0
    _, _, item1, day1 = _events(item_churn=0.0, item_half_life_days=10)
    assert np.array_equal(item0, item1) and np.array_equal(day0, day1)
    with pytest.raises(ValueError, match=r"item_churn must be in \[0, 1\], got 1.5"):
        make_world(SynthSpec(events=10, users=5, items=5, item_churn=1.5))
