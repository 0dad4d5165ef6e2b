"""Numba kernels of suspicious order monitoring: one pass over each customer's lines in time order.

Every feature is computed from a bounded state per (customer, family) and per customer, updated
in O(1) per line by `process_line`. The batch kernel `score_sorted` runs that same function over
the lines of each customer in (date, input position) order, and the incremental scorer
(`incremental.SomState`) calls it once per new line: batch and incremental agree by construction.

Windows (the same in the kernels, the plain Polars reference and the DuckDB SQL):
- a month is a calendar month; "trailing 12 months" are the 12 calendar months before the line's
  month, "trailing 6 months" the 6 before it; the monthly average divides by min(12, months since
  the family's first month), so a young account is averaged over its own life;
- "the last 30 days" are the days d-29 .. d of the line's date d, counting the lines before it
  (in time order) and the line itself;
- "order days" are distinct dates with at least one line of the family.

Findings (each a severity = value / threshold of SomConfig; flagged at 1; score = the largest):
- size: line / mean line of the trailing 12 months; line / largest line of the trailing 6;
  log-size control limit (mean + z sd of log1p(line) over the trailing 12 months, sd floored);
  month to date / trailing 12-month monthly average (for the line that takes the month over);
- peers: log1p(line) and log1p(month to date) against the peer reference (peers.py), in peer sd;
- frequency: order days in the last 30 days / usual order days a month (while the last intervals
  are short); usual interval / mean of the last `recent_intervals` intervals;
- pattern: a family new to an established customer that few peers order (weighted up by its
  volume against the peers': x (1 + peer z / peer_z)); a sustained rise (the
  mean of the last `sustained_orders` order days, the largest left out, well above the usual
  order day, and today above it too); the odds of the
  family's share of the customer's units (30 days against the months since it was first ordered);
  the odds of the controlled share of the customer's units (30 days against 12 months);
- cap: month to date above the monthly cap, for a customer whose months stay under it.
Non-controlled lines are scored 0: they only inform the controlled share.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# --- state layouts (float64 vectors, so that save/load is one array) -------------------------

NM = 13  # month ring: the current month and the 12 before it
ND = 32  # ring of the last distinct order days (at most 30 fall in a 30-day window)

# group (customer, family) state
G_FIRST_DAY = 0
G_FIRST_MONTH = 1
G_NDAYS = 2  # distinct order days ever seen
G_CMONTH = 3  # the month the cached trailing sums below are for (-1: none)
G_CACHE = 4  # tot12, cnt12, days12, slog, slog2, max6, maxm12, cfam12, ctot12, cctl12,
# and units and order days of the same season last year (months m-12 and m-11); then what the
# features derive from them alone, the same for every line of the month (divisions and a square
# root a line saved): mean line, mean and sd of log1p(line), monthly average, usual order days a
# month, usual interval, family share and its odds, controlled share and its odds, usual order day
G_NCACHE = 23
(T_MEAN12, T_MU, T_SD, T_AVG12, T_USUAL, T_USUAL_GAP, T_SHARE12, T_SHARE12_ODDS, T_CTL12,
 T_CTL12_ODDS, T_USUAL_DAY) = range(12, 23)
G_MONTHS = G_CACHE + G_NCACHE  # NM slots of: month id, units, lines, order days, max line,
# sum log, sum log^2
G_MSLOT = 7
G_DAYS = G_MONTHS + NM * G_MSLOT  # ND slots of: day, units
G_DSLOT = 2
G_WIN = G_DAYS + ND * G_DSLOT  # the last 30 days: index of the oldest order day in them,
# order days, units (kept as days arrive and leave, instead of a walk over the ring per line)
G_SIZE = G_WIN + 3

# customer state (all families)
C_FIRST_DAY = 0
C_NDAYS = 1
C_FIRST_MONTH = 2
C_MONTH = 3  # the month of the last line, valid for days C_MONTH_LO <= day < C_MONTH_HI
C_MONTH_LO = 4
C_MONTH_HI = 5
C_MONTHS = 6  # NM slots of: month id, units, controlled units
C_MSLOT = 3
C_DAYS = C_MONTHS + NM * C_MSLOT  # ND slots of: day, units, controlled units
C_DSLOT = 3
C_WIN = C_DAYS + ND * C_DSLOT  # the last 30 days: index of the oldest order day in them,
# order days, units, controlled units
C_TRAIL = C_WIN + 4  # the month the trailing sums below are for (-1: none), then the customer's
# units and controlled units in months m-12 .. m-1 (shared by its families: once a month)
C_SIZE = C_TRAIL + 3

# --- configuration vector (from SomConfig, in this order) ------------------------------------

CONFIG_FIELDS = (
    "min_history_months", "min_history_lines", "size_ratio", "size_over_max6", "control_z",
    "control_sd_floor", "month_ratio", "peer_z", "peer_month_z", "frequency_ratio",
    "min_orders_30d", "interval_ratio", "recent_intervals", "new_family_tenure_days",
    "new_family_window_days", "new_family_peer_share", "mix_odds_ratio", "controlled_odds_ratio",
    "min_mix_units", "monthly_cap", "sustained_ratio", "sustained_orders",
    "frequency_min_interval_ratio", "cap_over_usual", "min_mix_days", "sustained_today",
)
(K_MIN_MONTHS, K_MIN_LINES, K_SIZE, K_MAX6, K_CZ, K_SDFLOOR, K_MONTH, K_PEER_Z, K_PEER_MZ,
 K_FREQ, K_MIN30, K_INTERVAL, K_RECENT, K_TENURE, K_WINDOW, K_PEER_SHARE, K_MIX, K_CTRL,
 K_MIN_MIX, K_CAP, K_SUST, K_SUST_N, K_FREQ_INT, K_CAP_USUAL, K_MIX_DAYS, K_TODAY) = range(
    len(CONFIG_FIELDS))

# --- peer vector layout (one row of the peer reference table) --------------------------------

PEER_FIELDS = ("line_log_mean", "line_log_sd", "month_log_mean", "month_log_sd", "share")
P_LINE_MU, P_LINE_SD, P_MONTH_MU, P_MONTH_SD, P_SHARE = range(len(PEER_FIELDS))

# --- findings: one bit each; the feature vector holds the numbers quoted in the reasons -------

R_SIZE = 1 << 0  # line / trailing 12-month mean line
R_MAX6 = 1 << 1  # line / trailing 6-month largest line
R_CONTROL = 1 << 2  # log line above the customer's control limit
R_MONTH = 1 << 3  # month to date / trailing 12-month monthly average
R_PEER = 1 << 4  # line against the peer group
R_PEER_MONTH = 1 << 5  # month to date against the peer group
R_FREQ = 1 << 6  # order days in 30 days against usual
R_INTERVAL = 1 << 7  # shrinking interval
R_NEW_FAMILY = 1 << 8
R_MIX = 1 << 9
R_CONTROLLED = 1 << 10
R_CAP = 1 << 11
R_SUSTAINED = 1 << 12  # the last few order days well above the usual order day
REASON_BITS = {
    "size": R_SIZE, "max6": R_MAX6, "control": R_CONTROL, "month": R_MONTH, "peer": R_PEER,
    "peer_month": R_PEER_MONTH, "frequency": R_FREQ, "interval": R_INTERVAL,
    "new_family": R_NEW_FAMILY, "mix": R_MIX, "controlled": R_CONTROLLED, "cap": R_CAP,
    "sustained": R_SUSTAINED,
}
KIND_BITS = {
    "size": R_SIZE | R_MAX6 | R_CONTROL | R_MONTH | R_PEER | R_PEER_MONTH,
    "frequency": R_FREQ | R_INTERVAL,
    "pattern": R_NEW_FAMILY | R_MIX | R_CONTROLLED | R_SUSTAINED,
    "cap": R_CAP,
}

FEATURES = (
    # severities' underlying ratios / statistics (NaN when not judged)
    "size_ratio", "max6_ratio", "control_z", "month_ratio", "peer_z", "peer_month_z",
    "frequency_ratio", "interval_ratio", "new_family_share", "mix_odds_ratio",
    "controlled_odds_ratio", "cap_ratio", "sustained_ratio",
    # the numbers quoted in the reasons
    "units", "mean_line_12m", "max_line_6m", "control_limit", "month_to_date", "monthly_avg_12m",
    "peer_line_typical", "peer_line_limit", "peer_month_typical", "peer_month_limit",
    "orders_30d", "usual_orders_month", "recent_interval", "usual_interval", "tenure_days",
    "share_30d", "share_12m", "controlled_30d", "controlled_12m", "months_history",
    "recent_day_units", "usual_day_units", "max_month_12m", "customer_days_30d",
)
NF = len(FEATURES)
(F_SIZE, F_MAX6, F_CZ, F_MONTH, F_PEER_Z, F_PEER_MZ, F_FREQ, F_INTERVAL, F_NEWFAM, F_MIX, F_CTRL,
 F_CAP, F_SUST, F_UNITS, F_MEAN12, F_MAX6L, F_CLIMIT, F_MTD, F_AVG12, F_PEER_TYP, F_PEER_LIM,
 F_PEER_MTYP, F_PEER_MLIM, F_N30, F_USUAL_N, F_RECENT_GAP, F_USUAL_GAP, F_TENURE, F_SHARE30,
 F_SHARE12, F_CTRL30, F_CTRL12, F_NHIST, F_RECENT_DAY, F_USUAL_DAY, F_MAXM12, F_CN30) = range(NF)

DAYS_PER_MONTH = 30.436875


@njit(cache=True, error_model="numpy")
def month_of_day(day):
    """Calendar month id (year * 12 + month - 1) of a day count since 1970-01-01."""
    z = day + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    return y * 12 + m - 1


@njit(cache=True, error_model="numpy")
def days_from_civil(y, m, d):
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


@njit(cache=True, error_model="numpy")
def month_first_day(month):
    """Day count of the first day of a month id."""
    return days_from_civil(month // 12, month % 12 + 1, 1)


@njit(cache=True, error_model="numpy")
def new_group_state(g):
    g[:] = 0.0
    g[G_CMONTH] = -1.0
    for s in range(NM):
        g[G_MONTHS + s * G_MSLOT] = -1.0
    for s in range(ND):
        g[G_DAYS + s * G_DSLOT] = -1e9


@njit(cache=True, error_model="numpy")
def new_customer_state(c):
    c[:] = 0.0
    c[C_MONTH_HI] = -1e9
    c[C_TRAIL] = -1.0
    for s in range(NM):
        c[C_MONTHS + s * C_MSLOT] = -1.0
    for s in range(ND):
        c[C_DAYS + s * C_DSLOT] = -1e9


@njit(cache=True, error_model="numpy")
def _odds(p):
    p = min(max(p, 0.05), 0.95)
    return p / (1.0 - p)


@njit(cache=True, error_model="numpy")
def _sev(value, threshold):
    if value != value or threshold <= 0.0:
        return 0.0
    return value / threshold


@njit(cache=True, error_model="numpy", _nrt=False, forceinline=True)
def _trailing_months(gs, gi, c, month):
    """Sums over the months m-12 .. m-1 of the group and of the customer, into g's cache.

    Called once per (group, month), about every third line, so it is written for speed: each
    ring slot's values are taken or replaced by 0.0 (a select, not a branch: which months a
    group skipped is unpredictable), and adding 0.0 leaves a sum's bits as they were. The
    customer's own sums are made once per customer and month (`C_TRAIL`); a family first
    ordered within the 12 months sums the customer's months since then itself."""
    lo12 = month - 12.0
    hi = month - 1.0
    lo6 = month - 6.0
    lo_season = month - 11.0
    tot12 = 0.0
    cnt12 = 0.0
    days12 = 0.0
    slog = 0.0
    slog2 = 0.0
    max6 = 0.0
    maxm12 = 0.0
    stot = 0.0
    sdays = 0.0
    for s in range(NM):
        b = G_MONTHS + s * G_MSLOT
        mid = gs[gi, b]
        inside = (mid >= lo12) & (mid <= hi)
        units = gs[gi, b + 1] if inside else 0.0
        days = gs[gi, b + 3] if inside else 0.0
        tot12 += units
        maxm12 = max(maxm12, units)
        cnt12 += gs[gi, b + 2] if inside else 0.0
        days12 += days
        slog += gs[gi, b + 5] if inside else 0.0
        slog2 += gs[gi, b + 6] if inside else 0.0
        max6 = max(max6, gs[gi, b + 4] if inside & (mid >= lo6) else 0.0)
        season = inside & (mid <= lo_season)
        stot += units if season else 0.0
        sdays += days if season else 0.0
    if c[C_TRAIL] != month:
        ctot12 = 0.0
        cctl12 = 0.0
        for s in range(NM):
            cb = C_MONTHS + s * C_MSLOT
            cmid = c[cb]
            inside = (cmid >= lo12) & (cmid <= hi)
            ctot12 += c[cb + 1] if inside else 0.0
            cctl12 += c[cb + 2] if inside else 0.0
        c[C_TRAIL] = month
        c[C_TRAIL + 1] = ctot12
        c[C_TRAIL + 2] = cctl12
    fam_lo = gs[gi, G_FIRST_MONTH]
    if fam_lo <= lo12:  # the same months, added in the same order: the same bits
        cfam12 = c[C_TRAIL + 1]
    else:
        cfam12 = 0.0
        for s in range(NM):
            cb = C_MONTHS + s * C_MSLOT
            cmid = c[cb]
            cfam12 += c[cb + 1] if (cmid >= fam_lo) & (cmid <= hi) else 0.0
    gs[gi, G_CMONTH] = month
    gs[gi, G_CACHE] = tot12
    gs[gi, G_CACHE + 1] = cnt12
    gs[gi, G_CACHE + 2] = days12
    gs[gi, G_CACHE + 3] = slog
    gs[gi, G_CACHE + 4] = slog2
    gs[gi, G_CACHE + 5] = max6
    gs[gi, G_CACHE + 6] = maxm12
    gs[gi, G_CACHE + 7] = cfam12
    gs[gi, G_CACHE + 8] = c[C_TRAIL + 1]
    gs[gi, G_CACHE + 9] = c[C_TRAIL + 2]
    gs[gi, G_CACHE + 10] = stot
    gs[gi, G_CACHE + 11] = sdays
    # derived values (used only where process_line_lu's conditions hold; NaN or inf otherwise)
    nhist = min(12.0, month - gs[gi, G_FIRST_MONTH])
    gs[gi, G_CACHE + T_MEAN12] = tot12 / cnt12
    gs[gi, G_CACHE + T_MU] = slog / cnt12
    var = (slog2 - slog * slog / cnt12) / (cnt12 - 1.0) if cnt12 > 1 else 0.0
    gs[gi, G_CACHE + T_SD] = math.sqrt(max(var, 0.0))
    gs[gi, G_CACHE + T_AVG12] = tot12 / nhist
    gs[gi, G_CACHE + T_USUAL] = days12 / nhist
    gs[gi, G_CACHE + T_USUAL_GAP] = DAYS_PER_MONTH * nhist / days12
    share12 = tot12 / cfam12
    gs[gi, G_CACHE + T_SHARE12] = share12
    gs[gi, G_CACHE + T_SHARE12_ODDS] = _odds(share12)
    ctl12 = c[C_TRAIL + 2] / c[C_TRAIL + 1]
    gs[gi, G_CACHE + T_CTL12] = ctl12
    gs[gi, G_CACHE + T_CTL12_ODDS] = _odds(ctl12)
    usual_day = tot12 / days12
    # a full year of history: not below the same season last year (winter peaks)
    if nhist >= 12 and sdays > 0:
        usual_day = max(usual_day, stot / sdays)
    gs[gi, G_CACHE + T_USUAL_DAY] = usual_day


@njit(cache=True, error_model="numpy", _nrt=False, forceinline=True)
def _window_sums(v, win, ring, dslot, old, nd):
    """The 30-day sums of state vector v (at v[win + 2:]) added again from the order days
    old .. nd-1 of its ring (at v[ring:], dslot values a day), the new day not yet counted.
    Subtracting the days that left is exact while every sum is a whole number below 2**53 (the
    usual dosage units); a fractional unit leaves a rounding residue that outlives its day
    (449 + 14 + 37 came to 499.99999999999994 after a 49.3 left, below a 500 threshold, and
    days of 0 units kept a share made of residues), so then the sums are made afresh."""
    for k in range(1, dslot):
        v[win + 1 + k] = 0.0
    for j in range(old, nd):
        b = ring + (j % ND) * dslot
        for k in range(1, dslot):
            v[win + 1 + k] += v[b + k]


LOG1P_TABLE = 1 << 16  # whole numbers below this get log1p from a table (`_log1p`)


@njit(cache=True, error_model="numpy")
def log1p_table(n):
    """math.log1p(0 .. n-1), for `_log1p`."""
    t = np.empty(n)
    for k in range(n):
        t[k] = math.log1p(k)
    return t


@njit(cache=True, error_model="numpy", _nrt=False, forceinline=True)
def _log1p(x, table):
    """math.log1p(x), read from `table` (log1p_table) when x is a whole number it covers: the
    same value, without the libm call (dosage units and monthly totals are whole numbers; the
    call was about a tenth of the time of a line). The sign of x goes onto the table's value:
    log1p(-0.0) is -0.0 (and every other entry is positive), so the batch (table) and the
    incremental scorer (libm) agree bit for bit."""
    if 0.0 <= x < table.shape[0]:
        k = int(x)
        if k == x:
            return math.copysign(table[k], x)
    return math.log1p(x)


@njit(cache=True, error_model="numpy")
def process_line(gs, gi, c, day, units, controlled, peers, pi, cfg, feat, full):
    """Add one line to its group state `gs[gi]` and customer state `c`, with the peer row
    `peers[pi]` (pi < 0: no peers); fill `feat` (the numbers only
    the reasons quote are filled for flagged lines, or for all with `full`); return
    (score, reason bits). Lines must arrive in time order per customer."""
    return process_line_lu(gs, gi, c, day, units, math.log1p(units), controlled, peers, pi, cfg,
                           feat, full, np.empty(0))


@njit(cache=True, error_model="numpy", _nrt=False, forceinline=True)
def process_line_lu(gs, gi, c, day, units, lu, controlled, peers, pi, cfg, feat, full, table):
    """`process_line` with log1p(units) given (the batch computes it once per line, in
    `scatter_by_customer`, for the peer pass and this one). Inlined by LLVM where it is called
    (a call per line passing a dozen arrays costs about a tenth of the line's time), and
    compiled without reference counting (`_nrt=False`: it allocates nothing), since Numba's
    inliner would otherwise add an atomic increment and decrement per array argument and line."""
    has_peer = pi >= 0
    if c[C_MONTH_LO] <= day < c[C_MONTH_HI]:
        month = int(c[C_MONTH])
    else:
        month = month_of_day(day)
        c[C_MONTH] = month
        c[C_MONTH_LO] = month_first_day(month)
        c[C_MONTH_HI] = month_first_day(month + 1)

    # ---- customer state ----
    if c[C_NDAYS] == 0.0:
        c[C_FIRST_DAY] = day
        c[C_FIRST_MONTH] = month
    slot = month % NM
    base = C_MONTHS + slot * C_MSLOT
    if c[base] != month:
        c[base] = month
        c[base + 1] = 0.0
        c[base + 2] = 0.0
    c[base + 1] += units
    if controlled:
        c[base + 2] += units
    nd = int(c[C_NDAYS])
    last = C_DAYS + ((nd - 1) % ND) * C_DSLOT
    if nd > 0 and c[last] == day:
        dbase = last
    else:
        dbase = C_DAYS + (nd % ND) * C_DSLOT
        c[dbase] = day
        c[dbase + 1] = 0.0
        c[dbase + 2] = 0.0
        c[C_NDAYS] = nd + 1
        # the 30-day window moves: days before day-29 leave it (at most 30 days are in it, so
        # they are still in the ring)
        c[C_WIN + 1] += 1.0
        old = int(c[C_WIN])
        while old < nd:
            ob = C_DAYS + (old % ND) * C_DSLOT
            if c[ob] >= day - 29:
                break
            c[C_WIN + 1] -= 1.0
            c[C_WIN + 2] -= c[ob + 1]
            c[C_WIN + 3] -= c[ob + 2]
            old += 1
        c[C_WIN] = old
        if c[C_WIN + 2] != math.floor(c[C_WIN + 2]) or c[C_WIN + 3] != math.floor(c[C_WIN + 3]):
            _window_sums(c, C_WIN, C_DAYS, C_DSLOT, old, nd)
    c[dbase + 1] += units
    c[C_WIN + 2] += units
    if controlled:
        c[dbase + 2] += units
        c[C_WIN + 3] += units

    # ---- group state ----
    first_line = gs[gi, G_NDAYS] == 0.0
    if first_line:
        gs[gi, G_FIRST_DAY] = day
        gs[gi, G_FIRST_MONTH] = month
    nd = int(gs[gi, G_NDAYS])
    last = G_DAYS + ((nd - 1) % ND) * G_DSLOT
    new_day = not (nd > 0 and gs[gi, last] == day)
    if new_day:
        dbase = G_DAYS + (nd % ND) * G_DSLOT
        gs[gi, dbase] = day
        gs[gi, dbase + 1] = 0.0
        gs[gi, G_NDAYS] = nd + 1
        gs[gi, G_WIN + 1] += 1.0
        old = int(gs[gi, G_WIN])
        while old < nd:
            ob = G_DAYS + (old % ND) * G_DSLOT
            if gs[gi, ob] >= day - 29:
                break
            gs[gi, G_WIN + 1] -= 1.0
            gs[gi, G_WIN + 2] -= gs[gi, ob + 1]
            old += 1
        gs[gi, G_WIN] = old
        if gs[gi, G_WIN + 2] != math.floor(gs[gi, G_WIN + 2]):
            _window_sums(gs[gi], G_WIN, G_DAYS, G_DSLOT, old, nd)
        nd += 1
    else:
        dbase = last
    gs[gi, dbase + 1] += units
    gs[gi, G_WIN + 2] += units
    base = G_MONTHS + slot * G_MSLOT
    if gs[gi, base] != month:
        gs[gi, base] = month
        for k in range(1, G_MSLOT):
            gs[gi, base + k] = 0.0
    gs[gi, base + 1] += units
    gs[gi, base + 2] += 1.0
    if new_day:
        gs[gi, base + 3] += 1.0
    if units > gs[gi, base + 4]:
        gs[gi, base + 4] = units
    gs[gi, base + 5] += lu
    gs[gi, base + 6] += lu * lu
    mtd = gs[gi, base + 1]

    # ---- trailing months (m-12 .. m-1) of the group and the customer ----
    # Past months are complete once a line of month m arrives (time order), so their sums are
    # computed once per (group, month) and kept in the state (at every line, so that the state
    # does not depend on which lines were scored).
    if gs[gi, G_CMONTH] != month:
        _trailing_months(gs, gi, c, month)
    if not controlled and not full:  # scored 0 below: its features would be seen by nobody
        return 0.0, 0
    nan = np.nan
    # Features are locals (registers), written to `feat` only for a line the reasons will quote
    # (flagged, or `full`): storing some forty numbers per line cost a fifth of the kernel.
    f_size = f_max6 = f_cz = f_month = f_peer_z = f_peer_mz = f_freq = f_interval = nan
    f_newfam = f_mix = f_ctrl = f_cap = f_sust = nan
    f_mean12 = f_max6l = f_avg12 = f_usual_n = f_recent_gap = f_usual_gap = nan
    f_share30 = f_share12 = f_ctrl30 = f_ctrl12 = f_recent_day = f_usual_day = f_maxm12 = nan
    tot12 = gs[gi, G_CACHE]
    cnt12 = gs[gi, G_CACHE + 1]
    days12 = gs[gi, G_CACHE + 2]
    max6 = gs[gi, G_CACHE + 5]
    maxm12 = gs[gi, G_CACHE + 6]
    cfam12 = gs[gi, G_CACHE + 7]  # customer units in the trailing months since the family's first
    ctot12 = gs[gi, G_CACHE + 8]
    nhist = min(12.0, month - gs[gi, G_FIRST_MONTH])

    # ---- last 30 days (days d-29 .. d, this line included) ----
    n30 = gs[gi, G_WIN + 1]
    u30 = gs[gi, G_WIN + 2]
    cn30 = c[C_WIN + 1]
    c30 = c[C_WIN + 2]
    k30 = c[C_WIN + 3]

    score = 0.0
    bits = 0
    sev = 0.0
    mu = 0.0
    sd = 0.0
    psd = 0.0
    msd = 0.0
    history = nhist >= cfg[K_MIN_MONTHS]

    # ---- size against the customer's history ----
    if history and cnt12 >= cfg[K_MIN_LINES] and cnt12 > 0:
        f_mean12 = gs[gi, G_CACHE + T_MEAN12]
        f_size = units / f_mean12 if f_mean12 > 0 else nan
        sev = _sev(f_size, cfg[K_SIZE])
        if sev >= 1.0:
            bits |= R_SIZE
        score = max(score, sev)
        if max6 > 0:
            f_max6l = max6
            f_max6 = units / max6
            sev = _sev(f_max6, cfg[K_MAX6])
            if sev >= 1.0:
                bits |= R_MAX6
            score = max(score, sev)
        mu = gs[gi, G_CACHE + T_MU]
        sd = max(gs[gi, G_CACHE + T_SD], cfg[K_SDFLOOR])
        f_cz = (lu - mu) / sd
        sev = _sev(f_cz, cfg[K_CZ])
        if sev >= 1.0:
            bits |= R_CONTROL
        score = max(score, sev)
    if history and tot12 > 0 and cnt12 >= cfg[K_MIN_LINES] and units * cnt12 >= tot12:
        f_avg12 = gs[gi, G_CACHE + T_AVG12]
        f_month = mtd / f_avg12
        # the line must take the month over the limit (later lines of that month are not new)
        sev = _sev(f_month, cfg[K_MONTH])
        if (mtd - units) / f_avg12 >= cfg[K_MONTH]:
            sev = min(sev, 0.999)
        if sev >= 1.0:
            bits |= R_MONTH
        score = max(score, sev)

    # ---- size against the peer group ----
    if has_peer:
        psd = max(peers[pi, P_LINE_SD], cfg[K_SDFLOOR])
        f_peer_z = (lu - peers[pi, P_LINE_MU]) / psd
        sev = _sev(f_peer_z, cfg[K_PEER_Z])
        if sev >= 1.0:
            bits |= R_PEER
        score = max(score, sev)
        msd = max(peers[pi, P_MONTH_SD], cfg[K_SDFLOOR])
        f_peer_mz = (_log1p(mtd, table) - peers[pi, P_MONTH_MU]) / msd
        sev = _sev(f_peer_mz, cfg[K_PEER_MZ]) if lu >= peers[pi, P_LINE_MU] else 0.0
        if sev >= 1.0:
            bits |= R_PEER_MONTH
        score = max(score, sev)

    # ---- frequency ----
    if history and days12 > 0:
        f_usual_n = gs[gi, G_CACHE + T_USUAL]
        r = int(cfg[K_RECENT])
        if nd - 1 >= r:
            back = gs[gi, G_DAYS + ((nd - 1 - r) % ND) * G_DSLOT]
            f_recent_gap = (day - back) / r
            f_usual_gap = gs[gi, G_CACHE + T_USUAL_GAP]
            f_interval = f_usual_gap / max(f_recent_gap, 1.0)
            sev = _sev(f_interval, cfg[K_INTERVAL])
            if sev >= 1.0:
                bits |= R_INTERVAL
            score = max(score, sev)
        if n30 >= cfg[K_MIN30]:
            f_freq = n30 / max(f_usual_n, 1.0)
            if f_interval == f_interval and f_interval >= cfg[K_FREQ_INT]:
                sev = _sev(f_freq, cfg[K_FREQ])
                if sev >= 1.0:
                    bits |= R_FREQ
                score = max(score, sev)

    # ---- pattern: new family, family mix, controlled share ----
    tenure = gs[gi, G_FIRST_DAY] - c[C_FIRST_DAY]
    if tenure >= cfg[K_TENURE] and day - gs[gi, G_FIRST_DAY] < cfg[K_WINDOW]:
        f_newfam = peers[pi, P_SHARE] if has_peer else 0.0
        sev = cfg[K_PEER_SHARE] / max(f_newfam, 0.01)
        if has_peer and f_peer_z > 0:  # ...the more so at a volume above the peers'
            sev *= 1.0 + f_peer_z / cfg[K_PEER_Z]
        sev = min(sev, 10.0)
        if sev >= 1.0:
            bits |= R_NEW_FAMILY
        score = max(score, sev)
    cust_history = month - c[C_FIRST_MONTH] >= cfg[K_MIN_MONTHS]
    enough_days = cn30 >= cfg[K_MIX_DAYS]
    if history and cfam12 > 0 and c30 > 0 and enough_days:
        f_share30 = u30 / c30
        f_share12 = gs[gi, G_CACHE + T_SHARE12]
        if u30 >= cfg[K_MIN_MIX]:
            f_mix = _odds(f_share30) / gs[gi, G_CACHE + T_SHARE12_ODDS]
            sev = _sev(f_mix, cfg[K_MIX])
            if sev >= 1.0:
                bits |= R_MIX
            score = max(score, sev)
    if cust_history and controlled and ctot12 > 0 and c30 > 0 and enough_days:
        f_ctrl30 = k30 / c30
        f_ctrl12 = gs[gi, G_CACHE + T_CTL12]
        f_ctrl = _odds(f_ctrl30) / gs[gi, G_CACHE + T_CTL12_ODDS]
        sev = _sev(f_ctrl, cfg[K_CTRL])
        if sev >= 1.0:
            bits |= R_CONTROLLED
        score = max(score, sev)

    # ---- sustained: the last order days against the usual order day ----
    ns = int(cfg[K_SUST_N])
    usual_day = gs[gi, G_CACHE + T_USUAL_DAY]
    if history and days12 > 0 and nd >= ns and usual_day > 0:  # order days of 0 units: no usual
        # mean of the last ns order days without the largest (one restock is not a rise)
        total = 0.0
        largest = 0.0
        for k in range(ns):
            v = gs[gi, G_DAYS + ((nd - 1 - k) % ND) * G_DSLOT + 1]
            total += v
            if v > largest:
                largest = v
        f_recent_day = (total - largest) / (ns - 1)
        today_units = gs[gi, dbase + 1]
        f_usual_day = usual_day
        f_sust = f_recent_day / f_usual_day
        sev = _sev(f_sust, cfg[K_SUST])
        if today_units < cfg[K_TODAY] * f_usual_day:  # the rise is over (no echo)
            sev = min(sev, 0.999)
        if sev >= 1.0:
            bits |= R_SUSTAINED
        score = max(score, sev)

    # ---- monthly cap (for customers whose usual month is under it) ----
    if history:
        f_maxm12 = maxm12
    if cfg[K_CAP] > 0 and history and mtd >= cfg[K_CAP_USUAL] * maxm12:
        f_cap = mtd / cfg[K_CAP]
        sev = f_cap
        # Already over the cap, and unusual, before this line: flagged then (no echo). A month
        # that crossed the cap while still usual is flagged when it becomes unusual.
        if mtd - units > cfg[K_CAP] and mtd - units >= cfg[K_CAP_USUAL] * maxm12:
            sev = min(sev, 1.0)
        if sev > 1.0:
            bits |= R_CAP
        score = max(score, sev)
    if not controlled:  # non-controlled lines only inform the controlled share
        score = 0.0
        bits = 0
    if bits != 0 or full:
        feat[F_SIZE] = f_size
        feat[F_MAX6] = f_max6
        feat[F_CZ] = f_cz
        feat[F_MONTH] = f_month
        feat[F_PEER_Z] = f_peer_z
        feat[F_PEER_MZ] = f_peer_mz
        feat[F_FREQ] = f_freq
        feat[F_INTERVAL] = f_interval
        feat[F_NEWFAM] = f_newfam
        feat[F_MIX] = f_mix
        feat[F_CTRL] = f_ctrl
        feat[F_CAP] = f_cap
        feat[F_SUST] = f_sust
        feat[F_UNITS] = units
        feat[F_MEAN12] = f_mean12
        feat[F_MAX6L] = f_max6l
        # numbers quoted by the reasons only
        feat[F_CLIMIT] = math.expm1(mu + cfg[K_CZ] * sd) if f_cz == f_cz else nan
        feat[F_MTD] = mtd
        feat[F_AVG12] = f_avg12
        if has_peer:
            feat[F_PEER_TYP] = math.expm1(peers[pi, P_LINE_MU])
            feat[F_PEER_LIM] = math.expm1(peers[pi, P_LINE_MU] + cfg[K_PEER_Z] * psd)
            feat[F_PEER_MTYP] = math.expm1(peers[pi, P_MONTH_MU])
            feat[F_PEER_MLIM] = math.expm1(peers[pi, P_MONTH_MU] + cfg[K_PEER_MZ] * msd)
        else:
            feat[F_PEER_TYP] = feat[F_PEER_LIM] = feat[F_PEER_MTYP] = feat[F_PEER_MLIM] = nan
        feat[F_N30] = n30
        feat[F_USUAL_N] = f_usual_n
        feat[F_RECENT_GAP] = f_recent_gap
        feat[F_USUAL_GAP] = f_usual_gap
        feat[F_TENURE] = day - c[C_FIRST_DAY]
        feat[F_SHARE30] = f_share30
        feat[F_SHARE12] = f_share12
        feat[F_CTRL30] = f_ctrl30
        feat[F_CTRL12] = f_ctrl12
        feat[F_NHIST] = nhist
        feat[F_RECENT_DAY] = f_recent_day
        feat[F_USUAL_DAY] = f_usual_day
        feat[F_MAXM12] = f_maxm12
        feat[F_CN30] = cn30
    return score, bits


# --- batch ----------------------------------------------------------------------------------


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, nogil=True, error_model="numpy")
def _probe(keys, lo, codes, first, k, table_k, table_v):
    """Code keys from position lo on until the table is half full; returns (next position, k)."""
    cap = table_k.shape[0]
    mask = np.uint64(cap - 1)
    limit = cap // 2
    n = keys.shape[0]
    prev_key = np.uint64(0)
    prev_code = -1
    i = lo
    while i < n:
        key = keys[i]
        if prev_code >= 0 and key == prev_key:
            codes[i] = prev_code
            i += 1
            continue
        j = np.int64(((key * _GOLDEN) >> np.uint64(17)) & mask)
        while True:
            v = table_v[j]
            if v < 0:
                if k >= limit:
                    return i, k  # grow first
                table_k[j] = key
                table_v[j] = k
                first[k] = i
                v = k
                k += 1
                break
            if table_k[j] == key:
                break
            j = (j + 1) & (cap - 1)
        codes[i] = v
        prev_key = key
        prev_code = v
        i += 1
    return i, k


@njit(cache=True, nogil=True, error_model="numpy")
def dense_codes(keys):
    """Dense codes 0..k-1 in order of first appearance for a uint64 key array (open addressing);
    returns (codes, first index of each code)."""
    n = keys.shape[0]
    codes = np.empty(n, np.int32)
    first = np.empty(max(n, 1), np.int64)
    cap = 1 << 12
    table_k = np.zeros(cap, np.uint64)
    table_v = np.full(cap, -1, np.int64)
    i, k = _probe(keys, 0, codes, first, 0, table_k, table_v)
    while i < n:
        ncap = cap * 4
        nk = np.zeros(ncap, np.uint64)
        nv = np.full(ncap, -1, np.int64)
        nmask = np.uint64(ncap - 1)
        for t in range(cap):
            if table_v[t] >= 0:
                jj = np.int64(((table_k[t] * _GOLDEN) >> np.uint64(17)) & nmask)
                while nv[jj] >= 0:
                    jj = (jj + 1) & (ncap - 1)
                nk[jj] = table_k[t]
                nv[jj] = table_v[t]
        table_k = nk
        table_v = nv
        cap = ncap
        i, k = _probe(keys, i, codes, first, k, table_k, table_v)
    return codes, first[:k].copy()


@njit(cache=True, nogil=True, error_model="numpy")
def recode(local, table, out):
    """out[i] = table[local[i]]: a part's own codes turned into the codes of the whole."""
    for i in range(local.shape[0]):
        out[i] = table[local[i]]


@njit(cache=True, error_model="numpy")
def order_by_customer_day(ccode, ncust, day):
    """Permutation sorting lines by (customer code, day, input position): a stable counting sort
    by customer, then a check that days are non-decreasing inside each customer; customers whose
    days are not get an insertion sort (stable), cheap when the input is nearly in time order."""
    n = ccode.shape[0]
    start = np.zeros(ncust + 1, np.int64)
    for i in range(n):
        start[ccode[i] + 1] += 1
    for c in range(ncust):
        start[c + 1] += start[c]
    pos = start[:-1].copy()
    perm = np.empty(n, np.int64)
    for i in range(n):
        c = ccode[i]
        perm[pos[c]] = i
        pos[c] += 1
    for c in range(ncust):
        a = start[c]
        b = start[c + 1]
        ok = True
        for j in range(a + 1, b):
            if day[perm[j]] < day[perm[j - 1]]:
                ok = False
                break
        if not ok:
            seg = perm[a:b]
            keys = day[seg].astype(np.int64) * n + seg
            perm[a:b] = seg[np.argsort(keys)]
    return perm, start


@njit(cache=True, nogil=True, error_model="numpy")
def count_customers(ccode, lo, hi, ncust):
    """Lines per customer code among input lines lo..hi."""
    cnt = np.zeros(ncust, np.int64)
    for i in range(lo, hi):
        cnt[ccode[i]] += 1
    return cnt


@njit(cache=True, nogil=True, error_model="numpy")
def scatter_by_customer(lo, hi, pos, ccode, fcode, day, units, controlled, perm, s_c, s_f, s_day,
                        s_u, s_ctl, s_lu, table):
    """The placing pass of a counting sort by customer over input lines lo..hi: each line goes to
    its customer's next slot `pos[c]` with its values (a stable sort when parts of the input are
    placed from disjoint slot ranges, earlier parts first). The reads are sequential and the
    writes go to one short run per customer, which is far cheaper than gathering through the
    permutation afterwards (one random read per line and column)."""
    for i in range(lo, hi):
        c = ccode[i]
        k = pos[c]
        pos[c] = k + 1
        perm[k] = i
        s_c[k] = c
        s_f[k] = fcode[i]
        s_day[k] = day[i]
        s_u[k] = units[i]
        s_ctl[k] = controlled[i]
        s_lu[k] = _log1p(units[i], table)


@njit(cache=True, nogil=True, error_model="numpy")
def sort_days(start, c_lo, c_hi, perm, s_f, s_day, s_u, s_ctl, s_lu):
    """Customers c_lo..c_hi of the by-customer order: where a customer's days are not
    non-decreasing (input not in time order), sort its lines by (day, input position); a check
    only when they are."""
    n = perm.shape[0]
    for c in range(c_lo, c_hi):
        a = start[c]
        b = start[c + 1]
        ok = True
        for j in range(a + 1, b):
            if s_day[j] < s_day[j - 1]:
                ok = False
                break
        if ok:
            continue
        keys = s_day[a:b].astype(np.int64) * n + perm[a:b]
        order = np.argsort(keys) + a
        perm[a:b] = perm[order]
        s_f[a:b] = s_f[order]
        s_day[a:b] = s_day[order]
        s_u[a:b] = s_u[order]
        s_ctl[a:b] = s_ctl[order]
        s_lu[a:b] = s_lu[order]


# Peer sums in fixed point: each log1p term (and its square) is rounded to a multiple of
# 2**-PEER_FRAC_BITS and added as an integer, so a sum is exact and the same whatever the order of
# its terms: one process, threads, or partitions merged afterwards give the same bits. The
# rounding (< 5e-13 a term) is far below any threshold's precision.
PEER_FRAC_BITS = 40
PEER_SCALE = float(1 << PEER_FRAC_BITS)
PEER_FRAC_MASK = (1 << PEER_FRAC_BITS) - 1
# peer_sums' accumulator: customers, lines, months (counts), then the four sums (log1p of line
# units and its square, log1p of monthly units and its square) as their fractions (units of
# 2**-PEER_FRAC_BITS, each below 2**PEER_FRAC_BITS when returned) and whole parts.
PS_CUSTOMERS, PS_LINES, PS_MONTHS, PS_FRAC, PS_WHOLE = 0, 1, 2, 3, 7
PS_SIZE = 11
_PS_CARRY = 1 << 62  # a fraction is carried into the whole part before it could overflow


@njit(cache=True, error_model="numpy", _nrt=False, forceinline=True)
def _add_fixed(acc, ts, f, k, x):
    """Add x (>= 0, at most about 5e5: log1p of a float, squared) to sum k of acc[ts, f]."""
    i = PS_FRAC + k
    acc[ts, f, i] += np.int64(math.floor(x * PEER_SCALE + 0.5))
    if acc[ts, f, i] >= _PS_CARRY:
        acc[ts, f, PS_WHOLE + k] += acc[ts, f, i] >> PEER_FRAC_BITS
        acc[ts, f, i] &= PEER_FRAC_MASK


@njit(cache=True, nogil=True, error_model="numpy")
def peer_sums(s_c, s_f, s_day, s_u, s_lu, lo, hi, nfam, cust_ts, nts, table):
    """First pass over sorted lines lo..hi (whole customers): per (class-of-trade/state cell,
    family) sums for the peer reference table: customers, lines, sum and sum of squares of
    log1p(line units) and of log1p(monthly units), as int64 (layout PS_*: exact fixed point)."""
    acc = np.zeros((nts, nfam, PS_SIZE), np.int64)
    cur_month = np.full(nfam, -1, np.int64)
    cur_tot = np.zeros(nfam)
    touched = np.empty(nfam, np.int64)
    ntouched = 0
    prev_c = -1
    ts = 0
    m = 0
    m_lo = 0
    m_hi = 0
    for k in range(lo, hi + 1):
        c = s_c[k] if k < hi else -2
        if c != prev_c:
            for t in range(ntouched):
                f = touched[t]
                lm = _log1p(cur_tot[f], table)
                acc[ts, f, PS_MONTHS] += 1
                _add_fixed(acc, ts, f, 2, lm)
                _add_fixed(acc, ts, f, 3, lm * lm)
                cur_month[f] = -1
                cur_tot[f] = 0.0
            ntouched = 0
            if k == hi:
                break
            prev_c = c
            ts = cust_ts[c]
        f = s_f[k]
        u = s_u[k]
        d = s_day[k]
        if not m_lo <= d < m_hi:  # the month changes rarely along a customer's days
            m = month_of_day(d)
            m_lo = month_first_day(m)
            m_hi = month_first_day(m + 1)
        if cur_month[f] < 0:
            touched[ntouched] = f
            ntouched += 1
            acc[ts, f, PS_CUSTOMERS] += 1
        elif cur_month[f] != m:
            lm = _log1p(cur_tot[f], table)
            acc[ts, f, PS_MONTHS] += 1
            _add_fixed(acc, ts, f, 2, lm)
            _add_fixed(acc, ts, f, 3, lm * lm)
            cur_tot[f] = 0.0
        cur_month[f] = m
        cur_tot[f] += u
        lu = s_lu[k]
        acc[ts, f, PS_LINES] += 1
        _add_fixed(acc, ts, f, 0, lu)
        _add_fixed(acc, ts, f, 1, lu * lu)
    for ts in range(nts):  # fractions below 2**PEER_FRAC_BITS: parts add without overflow
        for f in range(nfam):
            for j in range(4):
                acc[ts, f, PS_WHOLE + j] += acc[ts, f, PS_FRAC + j] >> PEER_FRAC_BITS
                acc[ts, f, PS_FRAC + j] &= PEER_FRAC_MASK
    return acc


@njit(cache=True, error_model="numpy", _nrt=False, forceinline=True)
def _scatter(perm, lo, hi, buf_score, buf_bits, score, bits):
    """score[perm[k]] = buf_score[k - lo] (and bits) for sorted lines lo..hi."""
    for k in range(lo, hi):
        i = perm[k]
        score[i] = buf_score[k - lo]
        bits[i] = buf_bits[k - lo]


@njit(cache=True, nogil=True, error_model="numpy", _nrt=False)
def _score_lines(s_c, s_f, s_day, s_u, s_ctl, s_lu, k, hi, perm, cust_ts, peer_row, peers, cfg,
                 keep_features, score, bits, feats, gstate, cstate, seen, touched, feat, run, fpos,
                 ffeat, table, buf_score, buf_bits):
    """The loop of `score_range` from sorted line k on: stops at hi, or when the flagged-line
    buffers fpos/ffeat are full (returns the next line; `run` carries the loop's counters:
    current customer, its cell, families touched, flagged lines). Compiled without reference
    counting: it allocates nothing, and an atomic count per array and line cost a third of the
    time (a locked instruction also waits for the scattered score writes to land).

    Scores and bits go to their input positions through buf_score/buf_bits: written there in
    sorted order, then scattered a bufferful at a time. A scattered write per line between the
    line's computations cost a sixth of the time; a tight loop of them costs little."""
    prev_c = run[0]
    ts = run[1]
    ntouched = run[2]
    nflag = run[3]
    cap = fpos.shape[0]
    nbuf = buf_score.shape[0]
    kb = k  # the sorted line at buf_score[0]
    while k < hi and nflag < cap:
        c = s_c[k]
        if c != prev_c:
            for t in range(ntouched):
                seen[touched[t]] = False
            ntouched = 0
            new_customer_state(cstate)
            prev_c = c
            ts = cust_ts[c]
        f = s_f[k]
        if not seen[f]:
            seen[f] = True
            touched[ntouched] = f
            ntouched += 1
            new_group_state(gstate[f])
        sc, b = process_line_lu(gstate, f, cstate, s_day[k], s_u[k], s_lu[k], s_ctl[k], peers,
                                peer_row[ts, f], cfg, feat, keep_features, table)
        buf_score[k - kb] = sc
        buf_bits[k - kb] = b
        if k - kb + 1 == nbuf:
            _scatter(perm, kb, k + 1, buf_score, buf_bits, score, bits)
            kb = k + 1
        if keep_features:
            i = perm[k]
            for j in range(NF):
                feats[i, j] = feat[j]
        if b != 0:
            fpos[nflag] = perm[k]
            for j in range(NF):
                ffeat[nflag, j] = feat[j]
            nflag += 1
        k += 1
    _scatter(perm, kb, k, buf_score, buf_bits, score, bits)
    run[0] = prev_c
    run[1] = ts
    run[2] = ntouched
    run[3] = nflag
    return k


@njit(cache=True, nogil=True, error_model="numpy")
def score_range(s_c, s_f, s_day, s_u, s_ctl, s_lu, lo, hi, perm, nfam, cust_ts, peer_row, peers,
                cfg, keep_features, score, bits, feats, table, fcap=1024):
    """Score sorted lines lo..hi (whole customers); results go to each line's input position in
    `score`, `bits` (and `feats` with keep_features). Returns the input positions and feature
    rows of the flagged lines (for their reasons), collected in buffers of `fcap` rows at first,
    doubled when full (`fcap` below 1 is taken as 1: a buffer of 0 rows would double forever)."""
    fcap = max(fcap, 1)
    gstate = np.empty((nfam, G_SIZE))
    cstate = np.empty(C_SIZE)
    seen = np.zeros(nfam, np.bool_)
    touched = np.empty(nfam, np.int64)
    feat = np.empty(NF)
    run = np.array([-1, 0, 0, 0], np.int64)
    buf_score = np.empty(1024)
    buf_bits = np.empty(1024, np.int32)
    fpos = np.empty(fcap, np.int64)
    ffeat = np.empty((fcap, NF))
    k = lo
    while True:
        k = _score_lines(s_c, s_f, s_day, s_u, s_ctl, s_lu, k, hi, perm, cust_ts, peer_row, peers,
                         cfg, keep_features, score, bits, feats, gstate, cstate, seen, touched,
                         feat, run, fpos, ffeat, table, buf_score, buf_bits)
        if k >= hi:
            break
        fcap *= 2
        fpos2 = np.empty(fcap, np.int64)
        fpos2[:run[3]] = fpos
        fpos = fpos2
        ffeat2 = np.empty((fcap, NF))
        ffeat2[:run[3]] = ffeat
        ffeat = ffeat2
    nflag = run[3]
    return fpos[:nflag].copy(), ffeat[:nflag].copy()


@njit(cache=True, nogil=True, error_model="numpy", _nrt=False)
def advance_states(s_c, s_f, s_g, s_day, s_u, s_ctl, s_lu, lo, hi, cstates, gstates, cust_cell,
                   peer_row, peers, cfg, feat, table):
    """Sorted lines lo..hi (whole customers) added to the states: customer s_c[k]'s row of
    `cstates` and group s_g[k]'s row of `gstates`, line by line as `process_line` adds them,
    without keeping scores (the bulk load of a live state). Allocates nothing (`feat` is
    scratch), hence no reference counting."""
    for k in range(lo, hi):
        c = s_c[k]
        f = s_f[k]
        process_line_lu(gstates, s_g[k], cstates[c], s_day[k], s_u[k], s_lu[k], s_ctl[k], peers,
                        peer_row[cust_cell[c], f], cfg, feat, False, table)


# --- reasons text ---------------------------------------------------------------------------
# The templates of score.TEMPLATES as a program: per template its finding bit and a run of
# (op, arg) pairs. Numbers are written as Python's f"{n:,}" writes them (score._fmt).

OP_TEXT, OP_FAM, OP_PEER, OP_INT, OP_ONE, OP_PCT = range(6)  # arg: literal, -, -, feature x3
_SAFE = 2.0 ** 53  # beyond, a float's rounding to an integer is no longer exact


@njit(cache=True, nogil=True, error_model="numpy")
def _put_int(out, pos, v, commas):
    """Write the integer v at out[pos:] in decimal, with thousands separators when `commas`;
    return the position after it."""
    if v < 0:
        out[pos] = 45  # "-"
        pos += 1
        v = -v
    digits = 1
    t = v
    while t >= 10:
        t //= 10
        digits += 1
    end = pos + digits + ((digits - 1) // 3 if commas else 0)
    k = end - 1
    d = 0
    while True:
        out[k] = 48 + v % 10
        v //= 10
        k -= 1
        d += 1
        if v == 0:
            break
        if commas and d % 3 == 0:
            out[k] = 44  # ","
            k -= 1
    return end


@njit(cache=True, nogil=True, error_model="numpy")
def render_reasons(bits, feats, fam, fam_text, fam_off, peer, peer_text, peer_off, tbit, tstart,
                   op, arg, lit, lit_off):
    """The reasons of m flagged lines as UTF-8 bytes: line j's text is out[off[j]:off[j+1]],
    its clauses (templates whose bit is set, in template order) joined by "; ". `fam`/`peer`:
    codes into the texts fam_text/peer_text (cut at fam_off/peer_off). Returns (out, off, odd):
    `odd` marks lines with a number that is not finite or too large to round exactly here (left
    empty, for the Python rendering)."""
    m = bits.shape[0]
    nt = tbit.shape[0]
    size = 0
    for j in range(m):  # an upper bound of the bytes: 32 per number
        for t in range(nt):
            if bits[j] & tbit[t]:
                size += 2
                for q in range(tstart[t], tstart[t + 1]):
                    o = op[q]
                    if o == OP_TEXT:
                        size += lit_off[arg[q] + 1] - lit_off[arg[q]]
                    elif o == OP_FAM:
                        size += fam_off[fam[j] + 1] - fam_off[fam[j]]
                    elif o == OP_PEER:
                        size += peer_off[peer[j] + 1] - peer_off[peer[j]]
                    else:
                        size += 32
    out = np.empty(size, np.uint8)
    off = np.zeros(m + 1, np.int64)
    odd = np.zeros(m, np.bool_)
    pos = 0
    for j in range(m):
        line_start = pos
        first = True
        for t in range(nt):
            if not bits[j] & tbit[t]:
                continue
            if not first:
                out[pos] = 59  # "; "
                out[pos + 1] = 32
                pos += 2
            first = False
            for q in range(tstart[t], tstart[t + 1]):
                o = op[q]
                if o == OP_TEXT or o == OP_FAM or o == OP_PEER:
                    if o == OP_TEXT:
                        src, a, b = lit, lit_off[arg[q]], lit_off[arg[q] + 1]
                    elif o == OP_FAM:
                        src, a, b = fam_text, fam_off[fam[j]], fam_off[fam[j] + 1]
                    else:
                        src, a, b = peer_text, peer_off[peer[j]], peer_off[peer[j] + 1]
                    for s in range(a, b):
                        out[pos] = src[s]
                        pos += 1
                    continue
                x = feats[j, arg[q]]
                if o == OP_INT and 0.0 < x < 0.5:
                    o = OP_ONE  # under half a unit (score._fmt): 0.4, not 0
                scale = 1.0 if o == OP_INT else (10.0 if o == OP_ONE else 100.0)
                y = np.floor(x * scale + 0.5)  # score._r_int, in float until checked
                if not abs(y) < _SAFE:  # NaN too
                    odd[j] = True
                    continue
                v = np.int64(y)
                if o == OP_INT:
                    pos = _put_int(out, pos, v, True)
                elif o == OP_ONE:  # one decimal: "-" for a negative, then |t| // 10 "." |t| % 10
                    if v < 0:
                        out[pos] = 45
                        pos += 1
                        v = -v
                    pos = _put_int(out, pos, v // 10, True)
                    out[pos] = 46  # "."
                    out[pos + 1] = 48 + v % 10
                    pos += 2
                else:  # percent
                    pos = _put_int(out, pos, v, False)
                    out[pos] = 37  # "%"
                    pos += 1
        if odd[j]:
            pos = line_start
        off[j + 1] = pos
    return out, off, odd
