"""The scorer's features in plain Polars (group-bys, joins, window expressions; no Numba).

Written independently of kernels.py from the window definitions in its docstring, so that the
two can check each other (tests/som/test_kernels.py) and so that the benchmark compares like
with like. Slower than the kernels by design of the tool, not of the algorithm.
"""

from __future__ import annotations

import polars as pl

from gateway.som import kernels as K
from gateway.som.config import SomConfig
from gateway.som.io import read_orders
from gateway.som.peers import ALL, SUM_COLUMNS, _levels, exact_from_float

GROUP = ["customer", "family"]
_NAN = float("nan")


def _month(e: pl.Expr) -> pl.Expr:
    return e.dt.year().cast(pl.Int64) * 12 + e.dt.month().cast(pl.Int64) - 1


def _lines(df: pl.DataFrame) -> pl.DataFrame:
    cols = [pl.col("customer").cast(pl.String), pl.col("family").cast(pl.String), pl.col("date"),
            pl.col("dosage_units").alias("u")]
    cols.append(pl.col("controlled").fill_null(True) if "controlled" in df.columns
                else pl.lit(True).alias("controlled"))
    for c in ("customer_type", "state"):
        cols.append(pl.col(c).cast(pl.String).fill_null("") if c in df.columns
                    else pl.lit("").alias(c))
    lines = df.select(cols).with_row_index("_row").with_columns(
        pl.col("date").cast(pl.Int32).alias("day"), _month(pl.col("date")).alias("m"),
        pl.col("u").log1p().alias("lu"))
    # Class of trade and state of a customer: those of its earliest line (same-day lines in
    # input order).
    lines = lines.sort("customer", "day", "_row")
    return lines.with_columns(pl.col("customer_type").first().over("customer"),
                              pl.col("state").first().over("customer"))


def peer_reference_polars(df: pl.DataFrame) -> pl.DataFrame:
    """The same table as peers.peer_reference, computed with Polars group-bys."""
    lines = _lines(read_orders(df))
    cell = ["customer_type", "state"]
    line_stats = lines.group_by([*cell, "family"]).agg(
        pl.col("customer").n_unique().alias("customers"), pl.len().alias("lines"),
        pl.col("lu").sum().alias("line_log_sum"), (pl.col("lu") ** 2).sum().alias("line_log_sumsq"))
    month_stats = (lines.group_by([*cell, "customer", "family", "m"]).agg(pl.col("u").sum())
                   .with_columns(pl.col("u").log1p().alias("lm"))
                   .group_by([*cell, "family"]).agg(
                       pl.len().alias("months"), pl.col("lm").sum().alias("month_log_sum"),
                       (pl.col("lm") ** 2).sum().alias("month_log_sumsq")))
    cells = lines.group_by(cell).agg(pl.col("customer").n_unique().alias("cell_customers"))
    c = line_stats.join(month_stats, on=[*cell, "family"]).join(cells, on=cell)

    return _levels(exact_from_float(c.with_columns(pl.col(x).cast(pl.Float64) for x in SUM_COLUMNS)))


def _trailing(monthly: pl.DataFrame, keys: list[str], targets: pl.DataFrame, cols: list[str],
              max6: list[str] = (), max12: list[str] = (), season: list[str] = ()
              ) -> pl.DataFrame:
    """Sums of `cols` over the 12 calendar months before each target month, and maxima of `max6`
    over the 6 before it (months without lines count as nothing)."""
    shifted = pl.concat([monthly.with_columns((pl.col("m") + k).alias("m"),
                                              pl.lit(k).alias("_k")) for k in range(1, 13)])
    shifted = shifted.join(targets.select([*keys, "m"]).unique(), on=[*keys, "m"], how="semi")
    aggs = [pl.col(c).sum().alias(c + "12") for c in cols]
    aggs += [pl.col(c).filter(pl.col("_k") <= 6).max().alias(c + "6") for c in max6]
    aggs += [pl.col(c).max().alias(c + "_max12") for c in max12]
    aggs += [pl.col(c).filter(pl.col("_k") >= 11).sum().alias(c + "_season") for c in season]
    return shifted.group_by([*keys, "m"]).agg(aggs)


def features(df: pl.DataFrame, config: SomConfig = SomConfig(),
             peers: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per input line (input order): score, flag, findings bits and kernels.FEATURES columns."""
    df = read_orders(df)
    if peers is None:
        peers = peer_reference_polars(df)
    cfg = config
    x = _lines(df)

    # ---- the group's days and months ----
    days = x.group_by([*GROUP, "day"]).agg(pl.col("u").sum().alias("du"), pl.col("m").first())
    days = days.sort([*GROUP, "day"]).with_columns(
        pl.col("day").rank("ordinal").over(GROUP).alias("nd"),
        pl.col("day").shift(int(cfg.recent_intervals)).over(GROUP).alias("back"),
        pl.col("du").shift(1).rolling_sum(int(cfg.sustained_orders) - 1).over(GROUP)
        .alias("_prev_sum"),
        pl.col("du").shift(1).rolling_max(int(cfg.sustained_orders) - 1).over(GROUP)
        .alias("_prev_max"))
    # rolling windows of 30 days by day number: sums over days in [d-29, d]
    days = days.with_columns(pl.col("day").cast(pl.Int64).alias("_di"))
    roll = (days.sort([*GROUP, "_di"])
            .rolling(index_column="_di", period="30i", group_by=GROUP)
            .agg(pl.len().alias("n30"), pl.col("du").sum().alias("u30_full")))
    days = days.join(roll, on=[*GROUP, "_di"])
    monthly = x.group_by([*GROUP, "m"]).agg(
        pl.col("u").sum().alias("tot"), pl.len().cast(pl.Float64).alias("cnt"),
        pl.col("day").n_unique().cast(pl.Float64).alias("ndays"), pl.col("u").max().alias("maxl"),
        pl.col("lu").sum().alias("slog"), (pl.col("lu") ** 2).sum().alias("slog2"))
    trail = _trailing(monthly, GROUP, x, ["tot", "cnt", "ndays", "slog", "slog2"], ["maxl"],
                      max12=["tot"], season=["tot", "ndays"])

    # ---- the customer's days and months ----
    x = x.with_columns(pl.when(pl.col("controlled")).then(pl.col("u")).otherwise(0.0).alias("cu"))
    cdays = x.group_by(["customer", "day"]).agg(pl.col("u").sum().alias("cdu"),
                                                 pl.col("cu").sum().alias("ccu"))
    cdays = cdays.with_columns(pl.col("day").cast(pl.Int64).alias("_di"))
    croll = (cdays.sort(["customer", "_di"])
             .rolling(index_column="_di", period="30i", group_by="customer")
             .agg(pl.col("cdu").sum().alias("c30_full"), pl.col("ccu").sum().alias("k30_full"),
                  pl.len().alias("cn30")))
    cdays = cdays.join(croll, on=["customer", "_di"])
    cmonthly = x.group_by(["customer", "m"]).agg(pl.col("u").sum().alias("ctot"),
                                                  pl.col("cu").sum().alias("cctl"))
    ctrail = _trailing(cmonthly, ["customer"], x, ["ctot", "cctl"])
    # the customer's units over the trailing months since the family's first month
    firsts = x.group_by(GROUP).agg(pl.col("m").min().alias("first_m"))
    targets = x.select([*GROUP, "m"]).unique().join(firsts, on=GROUP)
    fam_months = pl.concat([cmonthly.select("customer", (pl.col("m") + k).alias("m"),
                                            pl.lit(k).alias("_k"), "ctot") for k in range(1, 13)])
    cfam = (targets.join(fam_months, on=["customer", "m"])
            .filter(pl.col("m") - pl.col("_k") >= pl.col("first_m"))
            .group_by([*GROUP, "m"]).agg(pl.col("ctot").sum().alias("cfam12")))

    # ---- per line ----
    x = x.with_columns(
        pl.col("u").cum_sum().over([*GROUP, "m"]).alias("mtd"),
        pl.col("u").cum_sum().over([*GROUP, "day"]).alias("gdtd"),
        pl.col("u").sum().over([*GROUP, "day"]).alias("gday"),
        pl.col("u").cum_sum().over(["customer", "day"]).alias("cdtd"),
        pl.col("cu").cum_sum().over(["customer", "day"]).alias("kdtd"),
        pl.col("m").min().over(GROUP).alias("first_m"),
        pl.col("day").min().over(GROUP).alias("gfirst"),
        pl.col("day").min().over("customer").alias("cfirst"),
    )
    x = (x.join(days.select([*GROUP, "day", "nd", "back", "n30", "u30_full", "_prev_sum", "_prev_max"]),
                on=[*GROUP, "day"], how="left")
         .join(cdays.select(["customer", "day", "cdu", "ccu", "c30_full", "k30_full", "cn30"]),
               on=["customer", "day"], how="left")
         .join(trail, on=[*GROUP, "m"], how="left")
         .join(ctrail, on=["customer", "m"], how="left")
         .join(cfam, on=[*GROUP, "m"], how="left"))
    x = x.with_columns(pl.col(c).fill_null(0.0) for c in
                       ("tot12", "cnt12", "ndays12", "slog12", "slog212", "maxl6", "ctot12",
                        "cctl12", "cfam12", "tot_max12", "tot_season", "ndays_season"))
    x = x.with_columns(
        # this line's 30 days: earlier days in full, today up to and including the line
        (pl.col("u30_full") - pl.col("gday") + pl.col("gdtd")).alias("u30"),
        (pl.col("c30_full") - pl.col("cdu") + pl.col("cdtd")).alias("c30"),
        # the mean of the last order days without the largest, today up to and including the line
        ((pl.col("_prev_sum") + pl.col("gdtd")
          - pl.max_horizontal(pl.col("_prev_max"), pl.col("gdtd")))
         / (int(cfg.sustained_orders) - 1)).alias("recent_day"),
        (pl.col("k30_full") - pl.col("ccu") + pl.col("kdtd")).alias("k30"),
        pl.min_horizontal(pl.lit(12), pl.col("m") - pl.col("first_m")).cast(pl.Float64)
        .alias("nhist"),
    )
    x = _judge(x, cfg, peers)
    return x.sort("_row").select(["score", "flag", "findings", *K.FEATURES])


def _peer_join(x: pl.DataFrame, peers: pl.DataFrame, min_customers: int) -> pl.DataFrame:
    cols = ["customers", *K.PEER_FIELDS]
    p = peers.select("customer_type", "state", "family", *cols)
    out = x
    for i, (t, s) in enumerate(((pl.col("customer_type"), pl.col("state")),
                                (pl.col("customer_type"), pl.lit(ALL)),
                                (pl.lit(ALL), pl.lit(ALL)))):
        level = p.rename({c: f"{c}_{i}" for c in cols}).rename(
            {"customer_type": "_t", "state": "_s"})
        out = out.with_columns(t.alias("_t"), s.alias("_s")).join(
            level, on=["_t", "_s", "family"], how="left").drop("_t", "_s")
    use = [pl.col(f"customers_{i}").fill_null(0) >= min_customers for i in range(3)]
    for c in K.PEER_FIELDS:
        e = (pl.when(use[0]).then(pl.col(f"{c}_0")).when(use[1]).then(pl.col(f"{c}_1"))
             .when(use[2]).then(pl.col(f"{c}_2")))
        out = out.with_columns(e.fill_nan(0.0).fill_null(_NAN).alias("p_" + c))
    out = out.with_columns((use[0] | use[1] | use[2]).alias("has_peer"))
    return out.drop([f"{c}_{i}" for c in cols for i in range(3)])


def _odds(p: pl.Expr) -> pl.Expr:
    p = p.clip(0.05, 0.95)
    return p / (1.0 - p)


def _sev(value: pl.Expr, threshold: float) -> pl.Expr:
    return (value / threshold).fill_nan(0.0).fill_null(0.0) if threshold > 0 else pl.lit(0.0)


def _judge(x: pl.DataFrame, cfg: SomConfig, peers: pl.DataFrame) -> pl.DataFrame:
    x = _peer_join(x, peers, cfg.min_peer_customers)
    nan = pl.lit(_NAN)
    history = pl.col("nhist") >= cfg.min_history_months
    size_ok = history & (pl.col("cnt12") >= cfg.min_history_lines) & (pl.col("cnt12") > 0)
    mean12 = pl.col("tot12") / pl.col("cnt12")
    mu = pl.col("slog12") / pl.col("cnt12")
    var = pl.when(pl.col("cnt12") > 1).then(
        (pl.col("slog212") - pl.col("slog12") ** 2 / pl.col("cnt12")) / (pl.col("cnt12") - 1)
    ).otherwise(0.0)
    sd = pl.max_horizontal(var.clip(lower_bound=0).sqrt(), pl.lit(cfg.control_sd_floor))
    avg12 = pl.col("tot12") / pl.col("nhist")
    month_ok = (history & (pl.col("tot12") > 0) & (pl.col("cnt12") >= cfg.min_history_lines)
                & (pl.col("u") * pl.col("cnt12") >= pl.col("tot12")))
    psd = pl.max_horizontal(pl.col("p_line_log_sd"), pl.lit(cfg.control_sd_floor))
    msd = pl.max_horizontal(pl.col("p_month_log_sd"), pl.lit(cfg.control_sd_floor))
    freq_ok = history & (pl.col("ndays12") > 0)
    usual = pl.col("ndays12") / pl.col("nhist")
    r = int(cfg.recent_intervals)
    recent = (pl.col("day") - pl.col("back")) / r
    usual_gap = K.DAYS_PER_MONTH * pl.col("nhist") / pl.col("ndays12")
    new_fam = ((pl.col("gfirst") - pl.col("cfirst")) >= cfg.new_family_tenure_days) & (
        (pl.col("day") - pl.col("gfirst")) < cfg.new_family_window_days)
    cust_hist = (pl.col("m") - pl.col("cfirst").cast(pl.Int32).cast(pl.Date).pipe(_month)
                 >= cfg.min_history_months)
    days_ok = pl.col("cn30") >= cfg.min_mix_days
    mix_ok = history & (pl.col("cfam12") > 0) & (pl.col("c30") > 0) & days_ok
    ctl_ok = (cust_hist & pl.col("controlled") & (pl.col("ctot12") > 0) & (pl.col("c30") > 0)
              & days_ok)
    share30 = pl.col("u30") / pl.col("c30")
    share12 = pl.col("tot12") / pl.col("cfam12")
    ctl30 = pl.col("k30") / pl.col("c30")
    ctl12 = pl.col("cctl12") / pl.col("ctot12")
    usual_day = pl.col("tot12") / pl.col("ndays12")
    usual_day = pl.when((pl.col("nhist") >= 12) & (pl.col("ndays_season") > 0)).then(
        pl.max_horizontal(usual_day, pl.col("tot_season") / pl.col("ndays_season"))
    ).otherwise(usual_day)
    sust_ok = (history & (pl.col("ndays12") > 0) & (pl.col("nd") >= cfg.sustained_orders)
               & (usual_day > 0))
    f = {
        "size_ratio": pl.when(size_ok & (mean12 > 0)).then(pl.col("u") / mean12),
        "max6_ratio": pl.when(size_ok & (pl.col("maxl6") > 0)).then(pl.col("u") / pl.col("maxl6")),
        "control_z": pl.when(size_ok).then((pl.col("lu") - mu) / sd),
        "month_ratio": pl.when(month_ok).then(pl.col("mtd") / avg12),
        "peer_z": pl.when("has_peer").then((pl.col("lu") - pl.col("p_line_log_mean")) / psd),
        "peer_month_z": pl.when("has_peer").then(
            (pl.col("mtd").log1p() - pl.col("p_month_log_mean")) / msd),
        "frequency_ratio": pl.when(freq_ok & (pl.col("n30") >= cfg.min_orders_30d)).then(
            pl.col("n30") / pl.max_horizontal(usual, pl.lit(1.0))),
        "interval_ratio": pl.when(freq_ok & (pl.col("nd") - 1 >= r)).then(
            usual_gap / pl.max_horizontal(recent, pl.lit(1.0))),
        "new_family_share": pl.when(new_fam).then(
            pl.when("has_peer").then(pl.col("p_share")).otherwise(0.0)),
        "mix_odds_ratio": pl.when(mix_ok & (pl.col("u30") >= cfg.min_mix_units)).then(
            _odds(share30) / _odds(share12)),
        "controlled_odds_ratio": pl.when(ctl_ok).then(_odds(ctl30) / _odds(ctl12)),
        "cap_ratio": pl.when(history & (pl.col("mtd") >= cfg.cap_over_usual * pl.col("tot_max12"))).then(
            pl.col("mtd") / cfg.monthly_cap) if cfg.monthly_cap > 0 else nan,
        "sustained_ratio": pl.when(sust_ok).then(pl.col("recent_day") / usual_day),
        "units": pl.col("u"),
        "mean_line_12m": pl.when(size_ok).then(mean12),
        "max_line_6m": pl.when(size_ok & (pl.col("maxl6") > 0)).then(pl.col("maxl6")),
        "control_limit": pl.when(size_ok).then((mu + cfg.control_z * sd).exp() - 1),
        "month_to_date": pl.col("mtd"),
        "monthly_avg_12m": pl.when(month_ok).then(avg12),
        "peer_line_typical": pl.when("has_peer").then(pl.col("p_line_log_mean").exp() - 1),
        "peer_line_limit": pl.when("has_peer").then(
            (pl.col("p_line_log_mean") + cfg.peer_z * psd).exp() - 1),
        "peer_month_typical": pl.when("has_peer").then(pl.col("p_month_log_mean").exp() - 1),
        "peer_month_limit": pl.when("has_peer").then(
            (pl.col("p_month_log_mean") + cfg.peer_month_z * msd).exp() - 1),
        "orders_30d": pl.col("n30").cast(pl.Float64),
        "usual_orders_month": pl.when(freq_ok).then(usual),
        "recent_interval": pl.when(freq_ok & (pl.col("nd") - 1 >= r)).then(recent),
        "usual_interval": pl.when(freq_ok & (pl.col("nd") - 1 >= r)).then(usual_gap),
        "tenure_days": (pl.col("day") - pl.col("cfirst")).cast(pl.Float64),
        "share_30d": pl.when(mix_ok).then(share30),
        "share_12m": pl.when(mix_ok).then(share12),
        "controlled_30d": pl.when(ctl_ok).then(ctl30),
        "controlled_12m": pl.when(ctl_ok).then(ctl12),
        "months_history": pl.col("nhist"),
        "recent_day_units": pl.when(sust_ok).then(pl.col("recent_day")),
        "usual_day_units": pl.when(sust_ok).then(usual_day),
        "max_month_12m": pl.when(history).then(pl.col("tot_max12")),
        "customer_days_30d": pl.col("cn30").cast(pl.Float64),
    }
    x = x.with_columns(e.cast(pl.Float64).fill_null(_NAN).alias(k) for k, e in f.items())
    sevs = {
        K.R_SIZE: _sev(pl.col("size_ratio"), cfg.size_ratio),
        K.R_MAX6: _sev(pl.col("max6_ratio"), cfg.size_over_max6),
        K.R_CONTROL: _sev(pl.col("control_z"), cfg.control_z),
        K.R_MONTH: pl.when((pl.col("mtd") - pl.col("u")) / avg12 >= cfg.month_ratio).then(
            pl.min_horizontal(_sev(pl.col("month_ratio"), cfg.month_ratio), pl.lit(0.999)))
        .otherwise(_sev(pl.col("month_ratio"), cfg.month_ratio)),
        K.R_PEER: _sev(pl.col("peer_z"), cfg.peer_z),
        K.R_PEER_MONTH: pl.when(pl.col("lu") >= pl.col("p_line_log_mean")).then(
            _sev(pl.col("peer_month_z"), cfg.peer_month_z)).otherwise(0.0),
        # no interval yet (fewer than recent_intervals + 1 order days): not judged, as in the
        # kernel (Polars orders NaN above every number: NaN >= x would be true)
        K.R_FREQ: pl.when(pl.col("interval_ratio").is_not_nan()
                          & (pl.col("interval_ratio") >= cfg.frequency_min_interval_ratio)).then(
            _sev(pl.col("frequency_ratio"), cfg.frequency_ratio)).otherwise(0.0),
        K.R_INTERVAL: _sev(pl.col("interval_ratio"), cfg.interval_ratio),
        K.R_NEW_FAMILY: pl.when(pl.col("new_family_share").is_nan()).then(0.0).otherwise(
            pl.min_horizontal(pl.lit(10.0), cfg.new_family_peer_share
                              / pl.max_horizontal(pl.col("new_family_share"), pl.lit(0.01))
                              * pl.when(pl.col("has_peer") & (pl.col("peer_z") > 0))
                              .then(1.0 + pl.col("peer_z") / cfg.peer_z).otherwise(1.0))),
        K.R_MIX: _sev(pl.col("mix_odds_ratio"), cfg.mix_odds_ratio),
        K.R_CONTROLLED: _sev(pl.col("controlled_odds_ratio"), cfg.controlled_odds_ratio),
        K.R_SUSTAINED: pl.when(pl.col("gdtd") < cfg.sustained_today * pl.col("usual_day_units"))
        .then(pl.min_horizontal(_sev(pl.col("sustained_ratio"), cfg.sustained_ratio), pl.lit(0.999)))
        .otherwise(_sev(pl.col("sustained_ratio"), cfg.sustained_ratio)),
    }
    cap = pl.col("cap_ratio").fill_nan(0.0)
    before = pl.col("mtd") - pl.col("u")  # the month before this line: flagged then already?
    cap = pl.when((before > cfg.monthly_cap)
                  & (before >= cfg.cap_over_usual * pl.col("tot_max12"))).then(
        pl.min_horizontal(cap, pl.lit(1.0))).otherwise(cap)
    bits = pl.lit(0, pl.Int32)
    for bit, s in sevs.items():
        bits = bits | pl.when(s >= 1.0).then(pl.lit(bit, pl.Int32)).otherwise(0)
    bits = bits | pl.when(cap > 1.0).then(pl.lit(K.R_CAP, pl.Int32)).otherwise(0)
    score = pl.max_horizontal(pl.lit(0.0), *sevs.values(), cap)
    x = x.with_columns(
        pl.when(pl.col("controlled")).then(score).otherwise(0.0).alias("score"),
        pl.when(pl.col("controlled")).then(bits).otherwise(0).alias("findings"))
    return x.with_columns((pl.col("findings") != 0).alias("flag"))

