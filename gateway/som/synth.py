"""Synthetic order histories with labelled suspicious orders, for tuning and evaluating SOM.

21 CFR 1301.74(b) names three kinds of suspicious order: unusual size, unusual frequency, and
substantial deviation from a normal pattern. The generator builds a realistic background and
injects labelled anomalies of each kind, plus benign events that a naive rule would flag, so that
precision means something.

Background (label False):
- customers of several classes of trade (retail and chain pharmacies, hospitals and clinics,
  practitioners, long-term care), in several states, each with a main ordering cadence;
- per (customer, family) series: a monthly level drawn by class and family, steady growth or
  decline, winter seasonality, order-to-order noise, quantities in whole packages of an NDC;
- non-controlled lines (`controlled` False) on many pharmacy orders (1305.21(c));
- benign restocks: one-off orders of 1.4-2x the usual order;
- benign new families: a customer starts a family that most of its peers already order, at a
  normal volume;
- large customers whose ordinary month is above the 8,000 unit cap (the fixed cap's false positives).

Anomalies (label True, `anomaly` names the kind, `anomaly_detail` the variant):
- size: one order that takes the month to 3-8x the customer's usual month in that family;
- frequency: for 8-13 weeks, a customer orders 3-5x as often as its cadence (weekly instead of
  monthly), each order of ordinary size;
- pattern / new_family: a customer starts a high-risk family that its peers rarely order, at a
  volume far above theirs;
- pattern / mix_shift: the share of a high-risk family jumps (2-3.5x) while another family falls;
- pattern / controlled_share: every controlled family rises 2-3x while non-controlled lines stay;
- cap: a customer that stays under 8,000 units a month in a family goes over it for one calendar
  month (the month's lines are labelled).

Everything is vectorised NumPy (no Python loop per row or per customer), deterministic for a seed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from gateway.som import io as som_io
from gateway.som.errors import SomError

__all__ = [
    "ANOMALY_KINDS",
    "CLASSES",
    "FAMILIES",
    "MONTHLY_CAP",
    "SynthRates",
    "synthesize",
    "write_synthetic",
]

MONTHLY_CAP = 8_000  # dosage units a month of one family (litigation rule 4, domain.md §6)
ANOMALY_KINDS = ("size", "frequency", "pattern", "cap")
MIN_DAYS_FOR_ANOMALIES = 120  # shorter histories get no injected anomalies
_DAYS_PER_MONTH = 30.44

# Classes of trade (ARCOS BUYER_BUS_ACT spelling) and their share of customers.
CLASSES = ("RETAIL PHARMACY", "CHAIN PHARMACY", "HOSP/CLINIC", "PRACTITIONER", "LONG TERM CARE")
_CLASS_SHARE = np.array([0.42, 0.25, 0.13, 0.12, 0.08])
# Customer-level volume multiplier by class (chains and hospitals are larger).
_CLASS_SCALE = np.array([1.0, 1.9, 1.4, 0.12, 0.7])
# Ordering cadence (days between orders) by class: options and probabilities.
_CADENCE = (
    ((7, 14, 30), (0.45, 0.30, 0.25)),
    ((7, 14), (0.8, 0.2)),
    ((3, 7, 14), (0.3, 0.6, 0.1)),
    ((30, 60), (0.75, 0.25)),
    ((7, 14, 30), (0.5, 0.3, 0.2)),
)

# name, controlled, high risk, monthly units for a median retail pharmacy.
_FAMILY_TABLE = (
    ("oxycodone", True, True, 2500),
    ("hydrocodone", True, True, 3500),
    ("morphine", True, True, 600),
    ("hydromorphone", True, True, 450),
    ("oxymorphone", True, True, 300),
    ("fentanyl", True, True, 150),
    ("methadone", True, True, 400),
    ("tapentadol", True, True, 300),
    ("codeine", True, False, 800),
    ("tramadol", True, False, 3000),
    ("alprazolam", True, False, 3000),
    ("buprenorphine", True, False, 900),
    ("amphetamine", True, False, 2000),
    ("methylphenidate", True, False, 1200),
    ("ibuprofen", False, False, 5000),
    ("amoxicillin", False, False, 3000),
    ("gabapentin", False, False, 6000),
)
FAMILIES = tuple(row[0] for row in _FAMILY_TABLE)
_CONTROLLED = np.array([row[1] for row in _FAMILY_TABLE])
_HIGH_RISK = np.array([row[2] for row in _FAMILY_TABLE])
_FAMILY_UNITS = np.array([row[3] for row in _FAMILY_TABLE], dtype=np.float64)

# Probability that a customer of a class orders a family (rows: CLASSES, columns: FAMILIES).
_ADOPTION = np.array([
    # oxy  hydro morph hymor oxym  fent  meth  tap   cod   tram  alpr  bup   amph  mph   ibu   amox  gaba
    [0.95, 0.95, 0.60, 0.40, 0.03, 0.30, 0.06, 0.10, 0.50, 0.85, 0.90, 0.50, 0.70, 0.60, 0.50, 0.50, 0.60],
    [0.98, 0.98, 0.75, 0.55, 0.04, 0.40, 0.05, 0.12, 0.60, 0.90, 0.95, 0.55, 0.80, 0.70, 0.60, 0.60, 0.70],
    [0.90, 0.70, 0.95, 0.90, 0.05, 0.90, 0.30, 0.04, 0.30, 0.60, 0.70, 0.30, 0.10, 0.10, 0.20, 0.20, 0.20],
    [0.12, 0.20, 0.03, 0.02, 0.01, 0.02, 0.05, 0.02, 0.10, 0.40, 0.30, 0.70, 0.15, 0.15, 0.00, 0.00, 0.00],
    [0.90, 0.80, 0.70, 0.40, 0.02, 0.50, 0.04, 0.04, 0.30, 0.80, 0.80, 0.10, 0.02, 0.02, 0.30, 0.30, 0.30],
])
# Family mix differs by class: multiplier on the family's monthly units.
_CLASS_FAMILY_MIX = np.ones((len(CLASSES), len(FAMILIES)))
_CLASS_FAMILY_MIX[2, [2, 3, 5]] = 4.0  # hospitals: morphine, hydromorphone, fentanyl
_CLASS_FAMILY_MIX[3, 11] = 3.0  # practitioners: buprenorphine (office-based treatment)
_CLASS_FAMILY_MIX[4, [2, 5]] = 2.0  # long-term care: morphine, fentanyl

# Where a rarely ordered high-risk family can start as a pattern anomaly: adoption below this.
_RARE = 0.12
# Where a family can start benignly: adoption at least this, and not high risk.
_COMMON = 0.40

# anomaly_detail: the pattern variant of a labelled line, or the benign event of an unlabelled one.
_DETAILS = ("", "new_family", "mix_shift", "controlled_share", "restock", "benign_new_family")
# Codes of the kinds (index in ("",) + ANOMALY_KINDS) and of the details (index in _DETAILS).
_SIZE, _FREQUENCY, _PATTERN, _CAP = 1, 2, 3, 4
_NEW_FAMILY, _MIX_SHIFT, _CONTROLLED_SHARE, _RESTOCK, _BENIGN_NEW_FAMILY = 1, 2, 3, 4, 5

# Three NDCs per family (11-digit 5-4-2 form), with their package sizes in dosage units.
_PACKAGE_SIZES = np.array([30, 100, 500])

_STATES = ("CA", "TX", "FL", "NY", "PA", "OH", "IL", "GA", "NC", "MI", "WV", "KY", "TN", "AZ")
_STATE_WEIGHT = np.array([12, 9, 7, 6, 4, 4, 4, 3, 3, 3, 1, 1.5, 2, 2.5])


@dataclass(frozen=True)
class SynthRates:
    """Expected number of injected events per customer over the whole history, by kind.

    The defaults make labelled lines about 0.3-0.5% of all lines: rare, as real suspicious orders
    are, yet numerous enough to measure recall on a few hundred customers.
    """

    size: float = 0.30
    frequency: float = 0.15
    pattern: float = 0.20
    cap: float = 0.06
    restock: float = 0.015  # share of ordinary orders that are benign one-off restocks
    benign_new_family: float = 0.08  # share of common, low-risk series that start late


def _dea_numbers(rng: np.random.Generator, cls: np.ndarray) -> np.ndarray:
    """Distinct, check-digit valid DEA numbers (domain.md §5) for the customers."""
    n = cls.size
    # Practitioners: A/B/F/M + initial of a surname; businesses: A/B/F + 9.
    first_biz = np.frombuffer(b"ABF", dtype=np.uint8)
    first_prac = np.frombuffer(b"ABFM", dtype=np.uint8)
    first = np.where(cls == 3, first_prac[rng.integers(0, 4, n)], first_biz[rng.integers(0, 3, n)])
    second = np.where(cls == 3, rng.integers(ord("A"), ord("Z") + 1, n), ord("9")).astype(np.uint8)
    number = rng.choice(1_000_000, size=n, replace=n > 1_000_000)
    digits = (number[:, None] // 10 ** np.arange(5, -1, -1)) % 10
    check = ((digits[:, 0] + digits[:, 2] + digits[:, 4]) + 2 * (digits[:, 1] + digits[:, 3] + digits[:, 5])) % 10
    chars = np.empty((n, 9), dtype=np.uint8)
    chars[:, 0] = first
    chars[:, 1] = second
    chars[:, 2:8] = digits + ord("0")
    chars[:, 8] = check + ord("0")
    return chars.view("S9").ravel().astype("U9")


def _ndc_table(rng: np.random.Generator) -> np.ndarray:
    """NDC strings, shape (families, 3): one labeler per family, three package codes."""
    labeler = rng.choice(np.arange(100, 99_999), size=len(FAMILIES), replace=False)
    product = rng.integers(1, 9_999, size=(len(FAMILIES), 3))
    out = np.empty((len(FAMILIES), 3), dtype="U13")
    for f in range(len(FAMILIES)):  # 51 strings: a table, not rows
        for k in range(3):
            out[f, k] = f"{labeler[f]:05d}-{product[f, k]:04d}-{k + 1:02d}"
    return out


def _order_ids(order_year: np.ndarray) -> pl.Series:
    """CSOS order numbers (1305.21(b)): two year digits + "X" + six characters, unique here."""
    n = order_year.size
    alphabet = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
    counter = np.arange(n, dtype=np.int64)
    chars = np.empty((n, 9), dtype=np.uint8)
    yy = order_year % 100
    chars[:, 0] = yy // 10 + ord("0")
    chars[:, 1] = yy % 10 + ord("0")
    chars[:, 2] = ord("X")
    for k in range(6):
        chars[:, 8 - k] = alphabet[(counter // 36**k) % 36]
    return pl.Series("order_id", chars.view("S9").ravel()).cast(pl.String)


def _segment_starts(keys: np.ndarray) -> np.ndarray:
    """Index where each run of equal sorted keys starts."""
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])


def _date_order(key: np.ndarray, day: np.ndarray, in_order: np.ndarray) -> np.ndarray:
    """np.argsort(key, kind="stable") where key = (day, customer, family), cheaply: the events
    generated series by series, in (customer, family) order, need only a radix sort by day; the
    few others (injected series, bursts) are sorted on their own and merged in."""
    if day.size == 0 or day.max() > np.iinfo(np.int16).max:
        return np.argsort(key, kind="stable")
    main = np.flatnonzero(in_order)
    extra = np.flatnonzero(~in_order)
    main = main[np.argsort(day[main].astype(np.int16), kind="stable")]  # radix sort
    extra = extra[np.argsort(key[extra], kind="stable")]
    # Each extra event goes after the main events of equal key, as a stable sort would put it.
    at = np.searchsorted(key[main], key[extra], side="right") + np.arange(extra.size)
    order = np.empty(day.size, dtype=np.int64)
    slot = np.ones(day.size, dtype=bool)
    slot[at] = False
    order[at] = extra
    order[slot] = main
    return order


def _pick(rng: np.random.Generator, candidates: np.ndarray, expected: float, n_customers: int) -> np.ndarray:
    """Draw about `expected` events per customer from candidate indices (without replacement)."""
    if candidates.size == 0:
        return candidates
    k = min(candidates.size, rng.poisson(expected * n_customers))
    return np.sort(rng.choice(candidates, size=k, replace=False))


MAX_CUSTOMERS = 1_000_000
"""The most customers a history can have: _dea_numbers draws distinct numbers from a million,
and past that two customers would share a DEA number (one customer to the scorer, with the
labels of both)."""


def _check_options(customers: int, days: int, seed: int, start: dt.date) -> None:
    """SomError with a code for parameters that cannot give a history the scorer takes: too few
    or too many customers, a negative seed (NumPy takes none), or days outside the dates
    io.read_orders takes (som_io.DATE_RANGE), since such a history would be refused in full."""
    if not 1 <= customers <= MAX_CUSTOMERS:
        raise SomError("som_bad_customers", f"customers must be 1 to {MAX_CUSTOMERS:,}, not {customers:,}")
    if seed < 0:
        raise SomError("som_bad_seed", f"the seed must be zero or positive, not {seed}")
    lo, hi = som_io.DATE_RANGE
    if days < 1 or start < lo or (hi - start).days < days - 1:
        last = (hi - start).days + 1
        raise SomError("som_bad_dates",
                       f"{days} days from {start}: a history has at least one day, all of them within "
                       f"{lo} .. {hi}" + (f" (at most {last:,} days from {start})" if start >= lo and last > 0
                                           else ""))


def synthesize(
    customers: int = 1000,
    days: int = 730,
    seed: int = 0,
    *,
    start: dt.date = dt.date(2024, 1, 1),
    rates: SynthRates = SynthRates(),
) -> pl.DataFrame:
    """A labelled synthetic order history in the native SOM table shape.

    Columns: order_id, line (int32), customer, customer_type, state, family, ndc, date,
    dosage_units (int64), controlled, label (bool), anomaly ("" | "size" | "frequency" | "pattern" |
    "cap"), anomaly_detail (for pattern lines the variant: "new_family" | "mix_shift" |
    "controlled_share"; for unlabelled lines a benign event worth telling apart: "restock" |
    "benign_new_family"; else ""). Rows are in date order, then
    customer, order and line. The same arguments always give the same frame.
    """
    _check_options(customers, days, seed, start)
    rng = np.random.default_rng(seed)
    if days < MIN_DAYS_FOR_ANOMALIES:  # too short a history to call anything unusual
        rates = replace(rates, size=0.0, frequency=0.0, pattern=0.0, cap=0.0)
    n_fam = len(FAMILIES)
    min_history = min(180, days // 3)  # anomalies start after this much history

    # --- customers -------------------------------------------------------------------------
    cls = rng.choice(len(CLASSES), size=customers, p=_CLASS_SHARE)
    state = rng.choice(len(_STATES), size=customers, p=_STATE_WEIGHT / _STATE_WEIGHT.sum())
    dea = _dea_numbers(rng, cls)
    cust_scale = _CLASS_SCALE[cls] * rng.lognormal(0.0, 0.5, customers)
    growth = rng.normal(0.03, 0.08, customers)  # yearly, steady
    growth[rng.random(customers) < 0.05] = 0.30  # a few fast-growing businesses, still benign
    season_amp = rng.uniform(0.05, 0.25, customers)
    season_peak = rng.normal(15, 20, customers)  # day of year: mid-January, flu season
    cadence = np.empty(customers, dtype=np.int64)
    u = rng.random(customers)
    for c, (options, probs) in enumerate(_CADENCE):  # five classes
        idx = np.searchsorted(np.cumsum(probs), u, side="right").clip(0, len(options) - 1)
        cadence = np.where(cls == c, np.asarray(options)[idx], cadence)

    # --- series: one per (customer, family) ordered ------------------------------------------
    adopt_p = _ADOPTION[cls]
    has = rng.random((customers, n_fam)) < adopt_p
    # Everyone orders at least the most common controlled family of its class.
    main_family = np.argmax(np.where(_CONTROLLED, _ADOPTION, 0.0), axis=1)[cls]
    has[np.arange(customers), main_family] = True
    s_cust, s_fam = np.nonzero(has)
    n_series = s_cust.size
    s_month = (_FAMILY_UNITS[s_fam] * _CLASS_FAMILY_MIX[cls[s_cust], s_fam] * cust_scale[s_cust]
               * rng.lognormal(0.0, 0.35, n_series))
    s_month = np.maximum(s_month, 20.0)
    # Slow movers are ordered half as often.
    s_interval = np.where((s_month < 300) & (cadence[s_cust] < 30), 2 * cadence[s_cust], cadence[s_cust])
    s_phase = rng.integers(0, s_interval)
    s_start = np.zeros(n_series, dtype=np.int64)
    s_end = np.full(n_series, days, dtype=np.int64)
    # Benign new families: common, low-risk families that some customers start mid-history.
    common = (_ADOPTION[cls[s_cust], s_fam] >= _COMMON) & ~_HIGH_RISK[s_fam] & (s_fam != main_family[s_cust])
    late = common & (rng.random(n_series) < rates.benign_new_family)
    s_start[late] = rng.integers(days // 5, max(days // 5 + 1, 4 * days // 5), late.sum())
    # Package: the largest pack no bigger than half an ordinary order (at least the smallest).
    order_units = s_month * s_interval / _DAYS_PER_MONTH
    s_pack = np.clip(np.searchsorted(_PACKAGE_SIZES, order_units / 2, side="right") - 1, 0, 2)
    s_anom = np.zeros(n_series, dtype=np.int8)  # kind code when the whole series is an anomaly
    s_detail = np.where(late, _BENIGN_NEW_FAMILY, 0).astype(np.int8)

    n_regular = n_series  # series appended below (new families) come after these
    # Pattern / new family: a rarely ordered high-risk family, at a volume far above peers'.
    rare = (_ADOPTION[cls] < _RARE) & _HIGH_RISK & ~has & (_ADOPTION[cls] > 0)
    rc, rf = np.nonzero(rare)
    n_new = min(customers, rng.poisson(rates.pattern * 0.5 * customers)) if days > min_history + 30 else 0
    pick_c = rng.choice(customers, size=n_new, replace=False) if n_new else np.zeros(0, np.int64)
    pick_c = np.sort(pick_c)
    # For each picked customer, a random rare family (customers without one are skipped).
    first_rare = np.searchsorted(rc, pick_c, side="left")
    count_rare = np.searchsorted(rc, pick_c, side="right") - first_rare
    ok = count_rare > 0
    pick_c = pick_c[ok]
    pick_f = rf[first_rare[ok] + (rng.random(ok.sum()) * count_rare[ok]).astype(np.int64)]
    n_new = pick_c.size
    if n_new:
        new_month = (_FAMILY_UNITS[0] * max(_CLASS_SCALE[0], 1.0) * np.maximum(cust_scale[pick_c], 0.3)
                     * rng.uniform(1.0, 2.5, n_new))
        new_start = rng.integers(min_history, max(min_history + 1, days - 30), n_new)
        new_end = np.minimum(days, new_start + rng.integers(60, 150, n_new))
        new_interval = np.minimum(cadence[pick_c], 30)
        s_cust = np.r_[s_cust, pick_c]
        s_fam = np.r_[s_fam, pick_f]
        s_month = np.r_[s_month, new_month]
        s_interval = np.r_[s_interval, new_interval]
        s_phase = np.r_[s_phase, rng.integers(0, new_interval)]
        s_start = np.r_[s_start, new_start]
        s_end = np.r_[s_end, new_end]
        new_units = new_month * new_interval / _DAYS_PER_MONTH
        s_pack = np.r_[s_pack, np.clip(np.searchsorted(_PACKAGE_SIZES, new_units / 2, side="right") - 1, 0, 2)]
        s_anom = np.r_[s_anom, np.full(n_new, _PATTERN, np.int8)]
        s_detail = np.r_[s_detail, np.full(n_new, _NEW_FAMILY, np.int8)]
    n_series = s_cust.size
    s_ndc = rng.integers(0, 3, n_series)  # which of the family's NDCs (packaging varies inside)

    # --- events: regular orders of every series ----------------------------------------------
    first_day = s_start + (s_phase - s_start) % s_interval
    n_ev = np.maximum(0, (s_end - 1 - first_day) // s_interval + 1)
    e_series = np.repeat(np.arange(n_series), n_ev)
    offsets = np.cumsum(n_ev) - n_ev
    k = np.arange(e_series.size) - np.repeat(offsets, n_ev)
    jitter_span = np.maximum(1, s_interval // 7)[e_series]
    jitter = (rng.random(e_series.size) * (2 * jitter_span + 1)).astype(np.int64) - jitter_span
    e_day = first_day[e_series] + k * s_interval[e_series] + jitter
    keep = (e_day >= s_start[e_series]) & (e_day < s_end[e_series]) & (rng.random(e_series.size) > 0.04)
    e_series, e_day = e_series[keep], e_day[keep]
    e_mult = rng.lognormal(0.0, 0.22, e_series.size)  # order-to-order noise
    e_kind = s_anom[e_series].copy()
    e_detail = s_detail[e_series].copy()

    # Benign one-off restocks.
    restock = (rng.random(e_series.size) < rates.restock) & (e_kind == 0)
    e_mult[restock] *= rng.uniform(1.4, 2.0, restock.sum())
    e_detail[restock] = _RESTOCK

    # Regular controlled series (not injected ones) eligible for anomalies after enough history.
    regular = s_anom == 0
    eligible = (regular & _CONTROLLED[s_fam])[e_series] & (e_day >= min_history + s_start[e_series]) & (e_day < days - 14)
    e_idx = np.flatnonzero(eligible)

    # Size: one order takes the month to 3-8x the usual month (the order itself adds the excess).
    size_ev = _pick(rng, e_idx, rates.size, customers)
    factor = rng.uniform(3.0, 8.0, size_ev.size)
    order_share = s_interval[e_series[size_ev]] / _DAYS_PER_MONTH  # this order's usual part of a month
    e_mult[size_ev] = np.maximum(e_mult[size_ev], 1.0) * (1.0 + (factor - 1.0) / np.minimum(order_share, 1.0))
    e_kind[size_ev] = _SIZE
    e_detail[size_ev] = 0

    # Pattern / mix shift: a high-risk family x2-3.5 for 2-4 months, another family of the same
    # customer falls to 30-60%.
    hr_series = np.flatnonzero(regular & _HIGH_RISK[s_fam] & (s_start == 0))
    mix = _pick(rng, hr_series, rates.pattern * 0.4, customers)
    mix_start = rng.integers(min_history, max(min_history + 1, days - 60), mix.size)
    mix_len = rng.integers(60, 120, mix.size)
    mix_factor = rng.uniform(2.0, 3.5, mix.size)
    # Controlled share: every controlled family of a customer with non-controlled lines x2-3.
    nc_cust = np.unique(s_cust[regular & ~_CONTROLLED[s_fam] & (cadence[s_cust] >= 7)])
    share = _pick(rng, nc_cust, rates.pattern * 0.1, customers)
    share_start = rng.integers(min_history, max(min_history + 1, days - 60), share.size)
    share_len = rng.integers(35, 70, share.size)
    share_factor = rng.uniform(2.0, 3.0, share.size)
    if mix.size or share.size:
        win_series = np.full(n_series, -1, dtype=np.int64)
        win_series[mix] = np.arange(mix.size)
        w = win_series[e_series]
        in_mix = (w >= 0)
        in_mix[in_mix] = ((e_day[in_mix] >= mix_start[w[in_mix]])
                          & (e_day[in_mix] < mix_start[w[in_mix]] + mix_len[w[in_mix]]))
        in_mix &= e_kind == 0
        e_mult[in_mix] *= mix_factor[w[in_mix]]
        e_kind[in_mix] = _PATTERN
        e_detail[in_mix] = _MIX_SHIFT
        # The customer's other families fall during the shift (unlabelled: a fall is not suspicious).
        cust_win = np.full(customers, -1, dtype=np.int64)
        cust_win[s_cust[mix]] = np.arange(mix.size)
        cw = cust_win[s_cust][e_series]  # compose the small maps first: one gather over events
        falls = (cw >= 0) & ~in_mix & (e_kind == 0)
        falls[falls] = ((e_series[falls] != mix[cw[falls]])
                        & (e_day[falls] >= mix_start[cw[falls]])
                        & (e_day[falls] < mix_start[cw[falls]] + mix_len[cw[falls]])
                        & _CONTROLLED[s_fam[e_series[falls]]])
        e_mult[falls] *= rng.uniform(0.3, 0.6, falls.sum())
        # Controlled share.
        cust_share = np.full(customers, -1, dtype=np.int64)
        cust_share[share] = np.arange(share.size)
        sw = cust_share[s_cust][e_series]
        rise = (sw >= 0) & regular[e_series]
        rise[rise] = ((e_day[rise] >= share_start[sw[rise]])
                      & (e_day[rise] < share_start[sw[rise]] + share_len[sw[rise]])
                      & _CONTROLLED[s_fam[e_series[rise]]])
        rise &= e_kind == 0
        e_mult[rise] *= share_factor[sw[rise]]
        e_kind[rise] = _PATTERN
        e_detail[rise] = _CONTROLLED_SHARE

    # Cap: a series usually at 3,500-7,000 units a month goes over 8,000 in one month.
    cap_series = np.flatnonzero(regular & _CONTROLLED[s_fam] & (s_month > 3500) & (s_month < 7000)
                                & (s_start == 0))
    caps = _pick(rng, cap_series, rates.cap, customers)
    if caps.size:
        # Calendar months since the start, as the cap counts them.
        month_of_day = (np.datetime64(start, "D") + np.arange(days).astype("timedelta64[D]")).astype("datetime64[M]")
        e_month = month_of_day.astype(np.int64)[e_day]
        first_month = int(np.datetime64(start, "M").astype(np.int64))
        cap_month = first_month + rng.integers(min_history // 30 + 1, max(min_history // 30 + 2, days // 30 - 1), caps.size)
        cap_factor = rng.uniform(9_500, 13_000, caps.size) / s_month[caps]
        cs = np.full(n_series, -1, dtype=np.int64)
        cs[caps] = np.arange(caps.size)
        cw = cs[e_series]
        hit = cw >= 0
        hit[hit] = (e_month[hit] == cap_month[cw[hit]]) & (e_kind[hit] == 0)
        e_mult[hit] *= cap_factor[cw[hit]]
        e_kind[hit] = _CAP
        e_detail[hit] = 0

    in_order = np.ones(e_series.size, bool)  # events still in (series, day) generation order
    # Frequency: for 8-13 weeks a fortnightly-or-slower series is ordered 3-5x as often (a monthly
    # customer ordering weekly), each order of ordinary size.
    freq_series = np.flatnonzero(regular & _CONTROLLED[s_fam] & (s_start == 0) & (s_interval >= 14))
    freq = _pick(rng, freq_series, rates.frequency, customers)
    if freq.size:
        f_start = rng.integers(min_history, max(min_history + 1, days - 90), freq.size)
        f_len = rng.integers(56, 92, freq.size)
        f_interval = np.maximum(1, np.round(s_interval[freq] / rng.uniform(3.0, 5.0, freq.size))).astype(np.int64)
        # Drop the regular orders of the window; the burst replaces them.
        fs = np.full(n_series, -1, dtype=np.int64)
        fs[freq] = np.arange(freq.size)
        fw = fs[e_series]
        drop = fw >= 0
        drop[drop] = (e_day[drop] >= f_start[fw[drop]]) & (e_day[drop] < f_start[fw[drop]] + f_len[fw[drop]])
        drop &= e_kind == 0
        keep = ~drop
        e_series, e_day, e_mult = e_series[keep], e_day[keep], e_mult[keep]
        e_kind, e_detail = e_kind[keep], e_detail[keep]
        n_burst = (f_len - 1) // f_interval + 1
        b_series = np.repeat(freq, n_burst)
        b_k = np.arange(b_series.size) - np.repeat(np.cumsum(n_burst) - n_burst, n_burst)
        b_day = np.repeat(f_start, n_burst) + b_k * np.repeat(f_interval, n_burst)
        ok = b_day < days
        b_series, b_day = b_series[ok], b_day[ok]
        in_order = np.r_[np.ones(e_series.size, bool), np.zeros(b_series.size, bool)]
        e_series = np.r_[e_series, b_series]
        e_day = np.r_[e_day, b_day]
        e_mult = np.r_[e_mult, rng.uniform(0.6, 1.0, b_series.size) * rng.lognormal(0.0, 0.1, b_series.size)]
        e_kind = np.r_[e_kind, np.full(b_series.size, _FREQUENCY, np.int8)]
        e_detail = np.r_[e_detail, np.zeros(b_series.size, np.int8)]

    # --- quantities --------------------------------------------------------------------------
    # Growth and seasonality are the customer's, evaluated once a week (a small table) rather
    # than once a line.
    c_of = s_cust[e_series]
    n_weeks = days // 7 + 1
    mid_day = np.arange(n_weeks) * 7 + 3.5
    trend = (np.exp(np.outer(np.log1p(growth), mid_day / 365.25))
             * (1.0 + season_amp[:, None] * np.cos(2 * np.pi * (mid_day[None, :] - season_peak[:, None]) / 365.25)))
    # Burst orders are sized on the usual order, not on the shortened interval.
    s_order = s_month * s_interval / _DAYS_PER_MONTH
    units = s_order[e_series] * trend.ravel()[c_of * n_weeks + e_day // 7] * e_mult
    pack = _PACKAGE_SIZES[s_pack[e_series]]
    units = np.maximum(1, np.rint(units / pack)).astype(np.int64) * pack

    # --- orders: lines of one customer on one day form one order -----------------------------
    fam_of = s_fam[e_series]
    sort_key = (e_day.astype(np.int64) * (customers + 1) + c_of) * (n_fam + 1) + fam_of
    order = _date_order(sort_key, e_day, (e_series < n_regular) & in_order)
    e_series, e_day, units = e_series[order], e_day[order], units[order]
    e_kind, e_detail = e_kind[order], e_detail[order]
    c_of, fam_of = c_of[order], fam_of[order]
    okey = e_day.astype(np.int64) * (customers + 1) + c_of
    starts = _segment_starts(okey)
    order_no = np.zeros(okey.size, dtype=np.int64)
    if okey.size:
        order_no[starts[1:]] = 1
        order_no = np.cumsum(order_no)
    line = (np.arange(okey.size) - starts[order_no] + 1).astype(np.int32)
    dates = np.datetime64(start, "D") + e_day.astype("timedelta64[D]")
    order_year = dates[starts].astype("datetime64[Y]").astype(np.int64) + 1970

    # Integer codes first, strings gathered in one parallel select.
    frame = pl.DataFrame({
        "_o": order_no, "line": line, "_c": c_of, "_t": cls[c_of], "_s": state[c_of], "_f": fam_of,
        "_n": fam_of * 3 + s_ndc[e_series], "date": pl.Series(dates, dtype=pl.Date), "dosage_units": units,
        "controlled": _CONTROLLED[fam_of], "_k": e_kind, "_d": e_detail,
    })
    return frame.select(
        order_id=pl.lit(_order_ids(order_year)).gather(pl.col("_o")),
        line="line",
        customer=pl.lit(pl.Series(dea)).gather(pl.col("_c")),
        customer_type=pl.lit(pl.Series(CLASSES)).gather(pl.col("_t")),
        state=pl.lit(pl.Series(_STATES)).gather(pl.col("_s")),
        family=pl.lit(pl.Series(FAMILIES)).gather(pl.col("_f")),
        ndc=pl.lit(pl.Series(_ndc_table(rng).ravel())).gather(pl.col("_n")),
        date="date",
        dosage_units="dosage_units",
        controlled="controlled",
        label=pl.col("_k") > 0,
        anomaly=pl.lit(pl.Series(("",) + ANOMALY_KINDS)).gather(pl.col("_k")),
        anomaly_detail=pl.lit(pl.Series(_DETAILS)).gather(pl.col("_d")),
    )


def write_synthetic(frame: pl.DataFrame, path: str) -> None:
    """Write Parquet or CSV, chosen by the file's extension (.parquet/.pq or .csv), all or nothing
    (a failed write leaves a previous file as it was). The directory must exist; a write the OS
    refuses raises SomError som_output_unwritable with its message."""
    lower = str(path).lower()
    if not lower.endswith((".parquet", ".pq", ".csv")):
        raise ValueError(f"unknown output format for {path!r}: use .parquet or .csv")
    try:
        with som_io.atomic_output(path) as tmp:
            if lower.endswith(".csv"):
                frame.write_csv(tmp)
            else:
                frame.write_parquet(tmp, statistics=True)
    except (OSError, pl.exceptions.PolarsError) as exc:  # the frame is ours: only the OS fails here
        raise SomError("som_output_unwritable", f"{path}: {exc}") from None
