"""Synthetic behaviour logs at scale: raw Parquet events + users + items, generated with Ray tasks.

The output has the raw-log schema family of the MovieLens adapter (``events`` with user_id,
item_id, timestamp, rating; ``users`` and ``items`` side tables keyed by id, with categorical
features and item text), so the generic prepare stage reads it unchanged. What makes it look
like real logs:

- **power-law popularity and activity**: item ``r``-th most popular has weight ``r^-item_alpha``
  and user activity follows ``r^-user_alpha`` (Zipf), so the top 1% of items hold a large share
  of the events and a few users are very active;
- **sessions**: each user's events form bursts; the gap to the previous event is exponential
  with mean ``session_gap_s`` (a new session, probability ``new_session_prob``) or
  ``within_gap_s`` (same session), inside a ``days``-long window; all events of a session come
  from one category (80% one of the user's three favourite categories) with items drawn by
  popularity inside it;
- **learnable labels**: users and items have latent factors ``[latent_dim]`` built around
  category centres (a user's centre is the mean of their favourite categories'), and
  ``score = affinity_scale * (<u, i> / sqrt(d) - 0.5) + item_bias + N(0, 1)`` gives ``rating``
  (1..5, by fixed score thresholds) and ``click ~ Bernoulli(sigmoid(score))``: the labels
  depend on the user-item pair and on the user's history, so AUC > 0.5 is meaningful;
- **text**: item ``title`` and ``description`` are built from category-specific words, so a
  sentence-embedding model sees the category in them.

Generation is deterministic: the "world" (side tables, latent factors, per-user activity) comes
from ``SeedSequence([seed, 0])`` and events file ``f`` from ``SeedSequence([seed, 1, f])``, so
the same seed and file count give the same bytes. Users are partitioned across files in
contiguous blocks of about ``events / files`` events; each file is one Ray task of vectorised
NumPy (no per-row Python).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data import storage
from rectrain.data.encode import positions_in_lists
from rectrain.data.sources.synth_churn import churn_sample, churn_world

log = logging.getLogger(__name__)

EVENTS_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                           ("timestamp", pa.int64()), ("rating", pa.int64()),
                           ("click", pa.int64())])
USERS_SCHEMA = pa.schema([("user_id", pa.int64()), ("age", pa.int64()), ("gender", pa.string()),
                          ("country", pa.string()), ("device", pa.string())])
ITEMS_SCHEMA = pa.schema([("item_id", pa.int64()), ("title", pa.string()),
                          ("description", pa.string()), ("category", pa.string()),
                          ("tags", pa.list_(pa.string())), ("price", pa.float64())])

# category nouns (the text of category c is built from _CATEGORIES[c % 32])
_CATEGORIES = [
    "hiking boots", "science fiction novel", "espresso machine", "yoga mat", "board game",
    "jazz album", "running shoes", "cookbook", "mechanical keyboard", "tent", "lipstick",
    "dog food", "electric guitar", "watercolour set", "smartphone case", "crime thriller",
    "tea sampler", "winter jacket", "baby stroller", "drone", "garden hose", "chess set",
    "vinyl record player", "protein powder", "fantasy novel", "office chair", "sunscreen",
    "fishing rod", "laptop stand", "cat toy", "history documentary", "ski goggles",
]
_ADJECTIVES = ["classic", "premium", "compact", "vintage", "modern", "lightweight", "deluxe",
               "budget", "professional", "handmade", "eco-friendly", "limited edition", "smart",
               "ultra", "essential", "family", "travel", "heavy-duty", "organic", "wireless"]
_PHRASES = ["loved by beginners", "built to last", "for everyday use", "with a bold design",
            "for serious enthusiasts", "at a fair price", "that ships fast",
            "with great reviews", "for small spaces", "made for gifting"]
_TAGS = ["sale", "new", "bestseller", "eco", "gift", "premium", "bundle", "kids", "outdoor",
         "indoor", "vintage", "tech", "handmade", "travel", "sport", "home"]
_COUNTRIES = ["US", "IN", "BR", "DE", "GB", "FR", "JP", "MX", "ID", "CA", "IT", "ES", "KR", "AU",
              "NL", "TR", "PL", "SE", "AR", "NG", "EG", "ZA", "PH", "VN", "TH", "CO", "CL",
              "PK", "BD", "RU"]
_DEVICES = ["android", "ios", "web", "tablet"]
_RATING_CUTS = np.array([-1.5, -0.5, 0.3, 1.2])  # score -> rating 1..5


@dataclass
class SynthSpec:
    """Sizes and shape parameters of a synthetic log (all counts > 0).

    Attributes:
        events: total events (rows of ``events``).
        users, items: side-table rows (ids ``1..users``, ``1..items``).
        files: events files (= Ray tasks); default ``ceil(events / 1_000_000)``.
        categories: item categories.
        seed: master seed; output is a pure function of (spec, files).
        item_alpha, user_alpha: Zipf exponents of item popularity and user activity.
        latent_dim: size of the user/item latent factors behind the labels.
        affinity_scale: weight of the user-item affinity in the label score (0 = no signal).
        new_session_prob: probability that an event starts a new session.
        session_gap_s, within_gap_s: mean gap (seconds) before a new session / within one.
        start_ts: unix seconds of the earliest possible first event.
        days: length of the log window; every event lies in ``[start_ts, start_ts + days]``
            (a user whose gaps would overrun it has their timeline compressed).
        repeat, repeat_decay, repeat_boost, repeat_tau_s: re-consumption (probability an
            event re-buys an earlier item of the user; geometric decay over events back; label
            score bonus of an item met again and its time scale in seconds), see
            :mod:`rectrain.data.sources.synth_repeat`; ``repeat: 0`` (default) is off.
        item_churn, item_half_life_days: items born across the window with fading
            popularity (:mod:`rectrain.data.sources.synth_churn`; 0 = none).
    """

    events: int
    users: int = 100_000
    items: int = 50_000
    files: Optional[int] = None
    categories: int = 32
    seed: int = 0
    item_alpha: float = 1.05
    user_alpha: float = 0.9
    latent_dim: int = 8
    affinity_scale: float = 2.0
    new_session_prob: float = 0.12
    session_gap_s: float = 3 * 86_400.0
    within_gap_s: float = 90.0
    start_ts: int = 1_600_000_000
    days: float = 180.0
    repeat: float = 0.0
    repeat_decay: float = 0.3
    repeat_boost: float = 3.0
    repeat_tau_s: float = 7 * 86_400.0
    item_churn: float = 0.0  # share of items born during the window (synth_churn.py)
    item_half_life_days: float = 45.0  # churn: popularity half-life after birth

    def __post_init__(self):
        for k in ("events", "users", "items", "categories", "latent_dim"):
            if getattr(self, k) < 1:
                raise ValueError(f"synth: {k} must be >= 1, got {getattr(self, k)}")
        if self.files is None:
            self.files = max(1, math.ceil(self.events / 1_000_000))
        if self.files < 1:
            raise ValueError(f"synth: files must be >= 1, got {self.files}")
        if not 0.0 <= self.new_session_prob <= 1.0:
            raise ValueError(f"synth: new_session_prob must be in [0, 1], got "
                             f"{self.new_session_prob}")
        if not (0.0 <= self.repeat <= 1.0 and 0.0 < self.repeat_decay <= 1.0):
            raise ValueError(f"synth: repeat must be in [0, 1] and repeat_decay in (0, 1], got "
                             f"{self.repeat}, {self.repeat_decay}")
        # here, not in make_world: `rectrain synth` builds the spec before Ray starts
        if not 0.0 <= self.item_churn <= 1.0:
            raise ValueError(f"synth: item_churn must be in [0, 1], got {self.item_churn} "
                             f"(--item-churn)")
        if not self.item_half_life_days > 0:  # NaN too: it would zero every item's weight
            raise ValueError(f"synth: item_half_life_days must be > 0, got "
                             f"{self.item_half_life_days} (--item-half-life-days)")


def _zipf_weights(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Weights ``rank^-alpha`` (sum 1) assigned to ``n`` ids in a random order."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    w /= w.sum()
    return w[rng.permutation(n)]


def _join(*cols, sep=" ") -> pa.Array:
    return pc.binary_join_element_wise(*cols, sep)


def _pick(words: list[str], idx: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(words, dtype=object)[idx], pa.string())


def make_world(spec: SynthSpec) -> dict:
    """Side tables and the latent state the event tasks sample from (vectorised NumPy).

    Returns a dict with ``users`` / ``items`` (Arrow tables, schemas ``USERS_SCHEMA`` /
    ``ITEMS_SCHEMA``), ``user_counts`` int64 ``[U]`` (events per user, summing to
    ``spec.events``), ``user_factors`` float32 ``[U, d]``, ``user_favs`` int64 ``[U, 3]``,
    ``item_factors`` float32 ``[I, d]``, ``item_bias`` float32 ``[I]``, ``item_cat`` int64
    ``[I]``, ``cat_weight`` float64 ``[C]`` and the category-sorted popularity CDF
    (``order``, ``cum``, ``cat_lo``, ``cat_mass``) used by :func:`_sample_items`.
    """
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0]))
    U, I, C, d = spec.users, spec.items, spec.categories, spec.latent_dim
    # categories: popularity (Zipf) and latent centres
    cat_weight = _zipf_weights(C, 0.8, rng)
    centres = rng.normal(0.0, 1.0, (C, d))
    # items: category, popularity, latent factors, text, tags, price
    item_cat = rng.choice(C, size=I, p=cat_weight)
    pop = _zipf_weights(I, spec.item_alpha, rng)
    item_factors = (centres[item_cat] + rng.normal(0.0, 0.6, (I, d))).astype(np.float32)
    item_bias = rng.normal(0.0, 0.5, I).astype(np.float32)
    noun = np.asarray(_CATEGORIES, dtype=object)[item_cat % len(_CATEGORIES)]
    noun = np.where(item_cat >= len(_CATEGORIES),
                    noun + " " + (item_cat // len(_CATEGORIES)).astype(str), noun)
    noun = pa.array(noun, pa.string())
    adj = rng.integers(0, len(_ADJECTIVES), I)
    # the adjective and phrase are not pure noise: they lean on the item bias
    adj = np.where(item_bias > 0.4, adj % 7, adj)
    title = _join(_pick(_ADJECTIVES, adj), noun,
                  pc.cast(pa.array(rng.integers(100, 1000, I)), pa.string()))
    phrase = _pick(_PHRASES, np.where(item_bias > 0.4, rng.integers(0, 4, I),
                                      rng.integers(0, len(_PHRASES), I)))
    description = _join(pa.array(np.full(I, "A"), pa.string()),
                        _pick(_ADJECTIVES, rng.integers(0, len(_ADJECTIVES), I)), noun, phrase)
    description = pc.binary_join_element_wise(description, pa.array(np.full(I, "."),
                                                                    pa.string()), "")
    t0 = rng.integers(0, 3, I)
    t1 = (t0 + 1 + rng.integers(0, 2, I)) % 3  # two distinct tags of the category's three
    tag_idx = (item_cat[:, None] * 3 + np.stack([t0, t1], axis=1)) % len(_TAGS)
    tags = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * I + 1, 2, dtype=np.int32)),
                                    _pick(_TAGS, tag_idx.ravel()))
    price = np.round(np.exp(rng.normal(3.0 + (item_cat % 5) * 0.3, 0.7, I)), 2)
    items = pa.Table.from_arrays(
        [pa.array(np.arange(1, I + 1, dtype=np.int64)), title, description,
         pa.array(np.asarray([f"cat_{c:03d}" for c in range(C)], dtype=object)[item_cat],
                  pa.string()), tags, pa.array(price)], schema=ITEMS_SCHEMA)
    # users: favourite categories, latent factors, activity, demographics
    favs = rng.choice(C, size=(U, 3), p=cat_weight)
    user_factors = (centres[favs].mean(axis=1) + rng.normal(0.0, 0.5, (U, d))).astype(np.float32)
    user_counts = rng.multinomial(spec.events, _zipf_weights(U, spec.user_alpha, rng))
    users = pa.Table.from_arrays(
        [pa.array(np.arange(1, U + 1, dtype=np.int64)),
         pa.array(np.clip(rng.normal(35, 12, U), 13, 90).astype(np.int64)),
         _pick(["F", "M", "X"], rng.choice(3, U, p=[0.48, 0.48, 0.04])),
         _pick(_COUNTRIES, rng.choice(len(_COUNTRIES), U,
                                      p=_zipf_weights(len(_COUNTRIES), 1.0, rng))),
         _pick(_DEVICES, rng.choice(len(_DEVICES), U, p=[0.45, 0.3, 0.2, 0.05]))],
        schema=USERS_SCHEMA)
    # category-sorted popularity CDF: an item of category c is searchsorted in [lo_c, lo_c+mass_c)
    order = np.lexsort((np.arange(I), item_cat))
    cum = np.cumsum(pop[order])
    cat_mass = np.bincount(item_cat, weights=pop, minlength=C)
    cat_lo = np.concatenate([[0.0], np.cumsum(cat_mass)[:-1]])
    churn = {} if not spec.item_churn else churn_world(
        I, spec.item_churn, spec.item_half_life_days, spec.days, spec.seed, pop, item_cat, C)
    return {**churn, "users": users, "items": items, "user_counts": user_counts.astype(np.int64),
            "user_factors": user_factors, "user_favs": favs.astype(np.int64),
            "item_factors": item_factors, "item_bias": item_bias, "item_cat": item_cat,
            "cat_weight": cat_weight, "order": order, "cum": cum, "cat_lo": cat_lo,
            "cat_mass": cat_mass}


def _sample_items(cat: np.ndarray, u: np.ndarray, w: dict) -> np.ndarray:
    """Item rows drawn by popularity inside category ``cat`` (inverse CDF, one searchsorted)."""
    target = w["cat_lo"][cat] + u * w["cat_mass"][cat]
    idx = np.searchsorted(w["cum"], target, side="right")
    return w["order"][np.minimum(idx, len(w["order"]) - 1)]


def file_user_ranges(user_counts: np.ndarray, files: int) -> list[tuple[int, int]]:
    """Contiguous user blocks ``[lo, hi)`` with about ``sum(counts) / files`` events each."""
    cs = np.cumsum(user_counts)
    cuts = np.searchsorted(cs, np.arange(1, files) * cs[-1] / files, side="left")
    bounds = np.concatenate([[0], cuts, [len(user_counts)]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def generate_events(spec: SynthSpec, file_index: int, lo: int, hi: int, w: dict) -> pa.Table:
    """Events of users ``lo..hi-1`` (0-based rows of the users table) for file ``file_index``.

    Vectorised over all events of the file. Returns a table with schema ``EVENTS_SCHEMA``,
    rows grouped by user and in time order within a user.
    """
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 1, file_index]))
    counts = w["user_counts"][lo:hi]
    n = int(counts.sum())
    nu = hi - lo
    uidx = np.repeat(np.arange(nu), counts)  # local user index per event
    pos = positions_in_lists(counts)
    new_session = (pos == 0) | (rng.random(n) < spec.new_session_prob)
    gaps = np.where(new_session, rng.exponential(spec.session_gap_s, n),
                    rng.exponential(spec.within_gap_s, n))
    gaps[pos == 0] = 0.0
    cs = np.cumsum(gaps)
    active = counts > 0
    first = (np.cumsum(counts) - counts)[active]
    last = first + counts[active] - 1
    since_first = cs - np.repeat(cs[first], counts[active])  # seconds since the user's 1st event
    # users start in the first quarter of the window; a user whose gaps would overrun the
    # window (very active users) has the timeline compressed to fit it
    window = spec.days * 86_400.0
    offset = rng.uniform(0.0, 0.25 * window, nu)[active]
    span = cs[last] - cs[first]
    squeeze = np.minimum(1.0, (window - offset) / np.maximum(span, 1.0))
    ts = (spec.start_ts + np.repeat(offset, counts[active])
          + since_first * np.repeat(squeeze, counts[active])).astype(np.int64)
    # one category per session: 80% a favourite of the user, else by category popularity
    session = np.cumsum(new_session) - 1
    n_sess = int(session[-1]) + 1 if n else 0
    sess_user = uidx[new_session]
    fav = w["user_favs"][lo:hi][sess_user, rng.integers(0, 3, n_sess)]
    other = rng.choice(spec.categories, size=n_sess, p=w["cat_weight"])
    sess_cat = np.where(rng.random(n_sess) < 0.8, fav, other)
    item = (churn_sample(sess_cat[session], rng.random(n), ts, spec.start_ts, w, _sample_items)
            if "churn_flat" in w else _sample_items(sess_cat[session], rng.random(n), w))
    bonus = 0.0
    if spec.repeat > 0:  # its own random stream: repeat 0 keeps the same bytes
        from rectrain.data.sources.synth_repeat import repeat_items
        item, bonus = repeat_items(spec, file_index, pos, ts, item)
    uf = w["user_factors"][lo:hi][uidx]
    affinity = np.einsum("ij,ij->i", uf, w["item_factors"][item]) / math.sqrt(spec.latent_dim)
    score = (spec.affinity_scale * (affinity - 0.5) + w["item_bias"][item]
             + rng.normal(0.0, 1.0, n) + bonus)
    rating = 1 + np.searchsorted(_RATING_CUTS, score)
    click = (rng.random(n) < 1.0 / (1.0 + np.exp(-score))).astype(np.int64)
    return pa.Table.from_arrays(
        [pa.array(uidx + lo + 1, pa.int64()), pa.array(item + 1, pa.int64()), pa.array(ts),
         pa.array(rating.astype(np.int64)), pa.array(click)], schema=EVENTS_SCHEMA)


def _write_file(spec: SynthSpec, file_index: int, lo: int, hi: int, w: dict, url: str) -> dict:
    t0 = time.perf_counter()
    t = generate_events(spec, file_index, lo, hi, w)
    t1 = time.perf_counter()
    storage.write_parquet(t, url)
    return {"file": url, "rows": t.num_rows, "users": hi - lo,
            "generate_s": t1 - t0, "write_s": time.perf_counter() - t1}


def synth(spec: SynthSpec, out: str, use_ray: bool = True) -> dict:
    """Write a synthetic log under ``out`` (any fsspec URL) and return a summary.

    Layout: ``out/events/part-00000.parquet`` ... (``spec.files`` files, one Ray task each when
    ``use_ray``; in this process otherwise), ``out/users/part-0.parquet``,
    ``out/items/part-0.parquet``, ``out/synth.json`` (the spec and the summary).
    An existing ``out/events`` folder is removed first (so no stale parts stay).

    Returns ``{"events", "users", "items", "files", "seconds": {...}, "events_per_s",
    "spec"}``. Raises ValueError for an invalid spec.
    """
    t0 = time.perf_counter()
    w = make_world(spec)
    t_world = time.perf_counter() - t0
    storage.remove(storage.join(out, "events"))
    storage.write_parquet(w.pop("users"), storage.join(out, "users", "part-0.parquet"))
    storage.write_parquet(w.pop("items"), storage.join(out, "items", "part-0.parquet"))
    ranges = file_user_ranges(w["user_counts"], spec.files)
    urls = [storage.join(out, "events", f"part-{f:05d}.parquet") for f in range(spec.files)]
    t1 = time.perf_counter()
    if use_ray:
        import ray

        w_ref = ray.put(w)
        task = ray.remote(num_cpus=1)(_write_file)
        stats = ray.get([task.remote(spec, f, lo, hi, w_ref, url)
                         for f, ((lo, hi), url) in enumerate(zip(ranges, urls))])
    else:
        stats = [_write_file(spec, f, lo, hi, w, url)
                 for f, ((lo, hi), url) in enumerate(zip(ranges, urls))]
    t_events = time.perf_counter() - t1
    n = sum(s["rows"] for s in stats)
    if n != spec.events:
        raise AssertionError(f"synth wrote {n} events, expected {spec.events}")
    total = time.perf_counter() - t0
    summary = {"events": n, "users": spec.users, "items": spec.items, "files": spec.files,
               "seconds": {"world_and_side_tables": round(t_world, 3),
                           "events": round(t_events, 3), "total": round(total, 3),
                           "task_generate_sum": round(sum(s["generate_s"] for s in stats), 3),
                           "task_write_sum": round(sum(s["write_s"] for s in stats), 3)},
               "events_per_s": n / total, "spec": asdict(spec)}
    storage.write_json(summary, storage.join(out, "synth.json"))
    return summary
