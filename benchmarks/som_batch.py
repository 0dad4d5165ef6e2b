"""Batch scoring of order lines: the Numba scorer against DuckDB SQL and pure Polars.

Run: `python -m benchmarks.som_batch [--data FILE] [--lines 10000000] [--skip-polars] [--skip-duckdb]
[--results-dir DIR]`.
Measured in the same run, on the same synthetic history (gateway.som.synth), with the same
features. Every result is checked line by line against the in-memory Numba scores and flags (DuckDB
and Polars in memory, each whole command's and each partitioned run's output file); a run where
any disagrees is reported and exits 1:
- in memory: the data already loaded (a Polars DataFrame; DuckDB reads it through Arrow), result
  materialised in memory; lines/s and the ratio to DuckDB. For Numba the timed region is one
  `score_orders(df)` call: checking the table, coding customers and families, ordering the lines,
  the peer reference, the kernel, the reasons of the flagged lines and the output DataFrame (the
  input columns, score, flag, reasons); kernels compiled beforehand (as the on-disk cache does).
  The same stages are also timed one by one;
- whole commands in fresh processes: Parquet in, Parquet out with the input columns kept, start-up
  included; wall time and peak memory (max RSS of the process);
- incremental scoring: latency of one `SomState.update` in process (p50, p99, max);
- 1 vs 2 workers through the partitioned runner (gateway.som.partition.score_file), each as a
  whole command in a fresh process (one worker scores in that process; two start two more).
Figures are provisional on a shared machine; ratios are within one run. Results go to
benchmarks/results/som_batch.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.common import (BenchmarkError, add_results_option, positive, run_main, scratch, stop_process,
                               table, write_results)
from gateway.som import kernels as K
from gateway.som.config import SomConfig

def _odds(p: str) -> str:
    q = f"least(greatest({p}, 0.05), 0.95)"
    return f"({q} / (1 - {q}))"


def features_sql(source: str, cfg: SomConfig = SomConfig(), *, columns: list[str],
                 keep_input: bool = False, reasons: bool = False) -> str:
    """A query over `source` (a table or read_parquet(...)) with a `_row` column, or, with
    keep_input, the source's own columns, giving score, flag, findings and the features."""
    ctl = "coalesce(controlled, TRUE)" if "controlled" in columns else "TRUE"
    ctype = "coalesce(CAST(customer_type AS VARCHAR), '')" if "customer_type" in columns else "''"
    cstate = "coalesce(CAST(state AS VARCHAR), '')" if "state" in columns else "''"
    row = "_row" if not keep_input else "row_number() OVER () - 1"
    r = int(cfg.recent_intervals)
    s = int(cfg.sustained_orders)
    frame = (f"OVER (PARTITION BY customer, family ORDER BY day ROWS BETWEEN {s - 1} PRECEDING "
             f"AND 1 PRECEDING)")
    c = cfg
    sev = {
        "size": f"coalesce(size_ratio / {c.size_ratio}, 0)",
        "max6": f"coalesce(max6_ratio / {c.size_over_max6}, 0)",
        "control": f"coalesce(control_z / {c.control_z}, 0)",
        "month": f"CASE WHEN coalesce((mtd - u) / avg12 >= {c.month_ratio}, FALSE) THEN "
                 f"least(coalesce(month_ratio / {c.month_ratio}, 0), 0.999) "
                 f"ELSE coalesce(month_ratio / {c.month_ratio}, 0) END",
        "peer": f"coalesce(peer_z / {c.peer_z}, 0)",
        "peer_month": f"CASE WHEN coalesce(lu >= p_mu, FALSE) THEN "
                      f"coalesce(peer_month_z / {c.peer_month_z}, 0) ELSE 0 END",
        "frequency": f"CASE WHEN coalesce(interval_ratio >= {c.frequency_min_interval_ratio}, "
                     f"FALSE) THEN coalesce(frequency_ratio / {c.frequency_ratio}, 0) ELSE 0 END",
        "interval": f"coalesce(interval_ratio / {c.interval_ratio}, 0)",
        "new_family": f"CASE WHEN new_family_share IS NULL THEN 0 ELSE least(10.0, "
                      f"{c.new_family_peer_share} / greatest(new_family_share, 0.01) * "
                      f"CASE WHEN coalesce(peer_z > 0, FALSE) THEN 1 + peer_z / {c.peer_z} "
                      f"ELSE 1 END) END",
        "mix": f"coalesce(mix_odds_ratio / {c.mix_odds_ratio}, 0)",
        "controlled": f"coalesce(controlled_odds_ratio / {c.controlled_odds_ratio}, 0)",
        "sustained": f"CASE WHEN coalesce(mtd_day < {c.sustained_today} * usual_day_units, FALSE) "
                     f"THEN least(coalesce(sustained_ratio / {c.sustained_ratio}, 0), 0.999) "
                     f"ELSE coalesce(sustained_ratio / {c.sustained_ratio}, 0) END",
    }
    cap = (f"CASE WHEN mtd - u > {c.monthly_cap} AND mtd - u >= {c.cap_over_usual} * max_month_12m "
           f"THEN least(coalesce(cap_ratio, 0), 1.0) "
           f"ELSE coalesce(cap_ratio, 0) END")
    bits = " + ".join(f"CASE WHEN sev_{k} >= 1 THEN {K.REASON_BITS[k]} ELSE 0 END" for k in sev)
    bits += f" + CASE WHEN sev_cap > 1 THEN {K.R_CAP} ELSE 0 END"
    feature_cols = ", ".join(K.FEATURES)
    reasons_sql = ""
    if reasons:
        parts = [
            (K.R_CAP, "printf('%s: %.0f units this month exceed the monthly cap of %.0f', family, mtd, "
                      f"{c.monthly_cap})"),
            (K.R_SIZE, "printf('%s: %.0f units = %.1fx the trailing 12-month average order of %.0f', "
                       "family, u, size_ratio, mean_line_12m)"),
            (K.R_MAX6, "printf('%s: %.0f units = %.1fx the largest order of the trailing 6 months', "
                       "family, u, max6_ratio)"),
            (K.R_CONTROL, "printf('%s: %.0f units above the control limit of %.0f', family, u, "
                          "control_limit)"),
            (K.R_MONTH, "printf('%s: %.0f units this month = %.1fx the monthly average of %.0f', "
                        "family, mtd, month_ratio, monthly_avg_12m)"),
            (K.R_PEER, "printf('%s: %.0f units above the peer limit of %.0f', family, u, "
                       "peer_line_limit)"),
            (K.R_PEER_MONTH, "printf('%s: %.0f units this month above the peer limit of %.0f', "
                             "family, mtd, peer_month_limit)"),
            (K.R_FREQ, "printf('%s: %.0f order days in 30 days = %.1fx the usual', family, "
                       "orders_30d, frequency_ratio)"),
            (K.R_INTERVAL, "printf('%s: interval shrank to %.1f days from %.1f', family, "
                           "recent_interval, usual_interval)"),
            (K.R_NEW_FAMILY, "printf('%s: new family after %.0f days', family, tenure_days)"),
            (K.R_MIX, "printf('%s: %.0f%% of units in 30 days against %.0f%%', family, "
                      "100 * share_30d, 100 * share_12m)"),
            (K.R_CONTROLLED, "printf('controlled share %.0f%% against %.0f%%', 100 * controlled_30d, "
                             "100 * controlled_12m)"),
            (K.R_SUSTAINED, "printf('%s: last order days at least %.0f units = %.1fx usual', "
                            "family, recent_day_units, sustained_ratio)"),
        ]
        clauses = ", ".join(f"CASE WHEN findings & {bit} <> 0 THEN {expr} END" for bit, expr in parts)
        reasons_sql = f", CASE WHEN findings <> 0 THEN concat_ws('; ', {clauses}) ELSE '' END AS reasons"

    return f"""
WITH
src0 AS (
  SELECT {row} AS _row, CAST(customer AS VARCHAR) AS customer, CAST(family AS VARCHAR) AS family,
         CAST(date - DATE '1970-01-01' AS BIGINT) AS day, year(date) * 12 + month(date) - 1 AS m,
         CAST(dosage_units AS DOUBLE) AS u, {ctl} AS controlled, {ctype} AS ctype0,
         {cstate} AS cstate0
  FROM {source}),
cust AS (
  SELECT customer, arg_min(ctype0, (day, _row)) AS ctype, arg_min(cstate0, (day, _row)) AS cstate,
         min(day) AS cfirst, min(m) AS cfirst_m
  FROM src0 GROUP BY customer),
x AS (
  SELECT s._row, s.customer, s.family, s.day, s.m, s.u, s.controlled, ln(1 + s.u) AS lu,
         CASE WHEN s.controlled THEN s.u ELSE 0 END AS cu, c.ctype, c.cstate, c.cfirst, c.cfirst_m
  FROM src0 s JOIN cust c USING (customer)),
pcell AS (
  SELECT ctype, cstate, family, count(DISTINCT customer) AS customers, count(*) AS lines,
         sum(lu) AS ls, sum(lu * lu) AS lss
  FROM x GROUP BY ALL),
pmon AS (
  SELECT ctype, cstate, family, count(*) AS months, sum(ln(1 + tot)) AS ms,
         sum(ln(1 + tot) * ln(1 + tot)) AS mss
  FROM (SELECT ctype, cstate, customer, family, m, sum(u) AS tot FROM x GROUP BY ALL)
  GROUP BY ALL),
ccnt AS (SELECT ctype, cstate, count(*) AS cell_customers FROM cust GROUP BY ALL),
tcnt AS (SELECT ctype, sum(cell_customers) AS cell_customers FROM ccnt GROUP BY ALL),
lvl0 AS (
  SELECT ctype, cstate, family, customers, cell_customers, lines, ls, lss, months, ms, mss
  FROM pcell JOIN pmon USING (ctype, cstate, family) JOIN ccnt USING (ctype, cstate)),
lvl1 AS (
  SELECT l.ctype, '*' AS cstate, family, sum(customers) AS customers,
         any_value(t.cell_customers) AS cell_customers, sum(lines) AS lines, sum(ls) AS ls,
         sum(lss) AS lss, sum(months) AS months, sum(ms) AS ms, sum(mss) AS mss
  FROM lvl0 l JOIN tcnt t USING (ctype) GROUP BY l.ctype, family),
lvl2 AS (
  SELECT '*' AS ctype, '*' AS cstate, family, sum(customers) AS customers,
         (SELECT count(*) FROM cust) AS cell_customers, sum(lines) AS lines, sum(ls) AS ls,
         sum(lss) AS lss, sum(months) AS months, sum(ms) AS ms, sum(mss) AS mss
  FROM lvl0 GROUP BY family),
peers AS (
  SELECT ctype, cstate, family, customers, ls / lines AS mu,
         CASE WHEN lines > 1 THEN sqrt(greatest((lss - ls * ls / lines) / (lines - 1), 0)) ELSE 0 END AS sd,
         ms / months AS mmu,
         CASE WHEN months > 1 THEN sqrt(greatest((mss - ms * ms / months) / (months - 1), 0)) ELSE 0 END AS msd,
         customers / cell_customers AS share
  FROM (SELECT * FROM lvl0 UNION ALL SELECT * FROM lvl1 UNION ALL SELECT * FROM lvl2)),
gdays AS (SELECT customer, family, day, sum(u) AS du FROM x GROUP BY ALL),
gdays2 AS (
  SELECT customer, family, day,
         row_number() OVER w AS nd, lag(day, {r}) OVER w AS back, sum(du) {frame} AS prev_sum,
         max(du) {frame} AS prev_max,
         count(*) OVER w30 AS n30, sum(du) OVER w30 AS u30_full
  FROM gdays
  WINDOW w AS (PARTITION BY customer, family ORDER BY day),
         w30 AS (PARTITION BY customer, family ORDER BY day RANGE BETWEEN 29 PRECEDING AND CURRENT ROW)),
monthly AS (
  SELECT customer, family, m, sum(u) AS tot, count(*) AS cnt, count(DISTINCT day) AS ndays,
         max(u) AS maxl, sum(lu) AS slog, sum(lu * lu) AS slog2
  FROM x GROUP BY ALL),
trail AS (
  SELECT t.customer, t.family, t.m, sum(mo.tot) AS tot12, sum(mo.cnt) AS cnt12,
         sum(mo.ndays) AS ndays12, sum(mo.slog) AS slog12, sum(mo.slog2) AS slog212,
         max(CASE WHEN t.m - mo.m <= 6 THEN mo.maxl END) AS maxl6, max(mo.tot) AS tot_max12,
         coalesce(sum(CASE WHEN t.m - mo.m >= 11 THEN mo.tot END), 0) AS tot_season,
         coalesce(sum(CASE WHEN t.m - mo.m >= 11 THEN mo.ndays END), 0) AS ndays_season
  FROM monthly t JOIN monthly mo ON mo.customer = t.customer AND mo.family = t.family
       AND mo.m BETWEEN t.m - 12 AND t.m - 1
  GROUP BY ALL),
cdays AS (SELECT customer, day, sum(u) AS cdu, sum(cu) AS ccu FROM x GROUP BY ALL),
cdays2 AS (
  SELECT customer, day, cdu, ccu, sum(cdu) OVER cw AS c30_full, sum(ccu) OVER cw AS k30_full,
         count(*) OVER cw AS cn30
  FROM cdays
  WINDOW cw AS (PARTITION BY customer ORDER BY day RANGE BETWEEN 29 PRECEDING AND CURRENT ROW)),
cmon AS (SELECT customer, m, sum(u) AS ctot, sum(cu) AS cctl FROM x GROUP BY ALL),
ctrail AS (
  SELECT t.customer, t.m, sum(mo.ctot) AS ctot12, sum(mo.cctl) AS cctl12
  FROM cmon t JOIN cmon mo ON mo.customer = t.customer AND mo.m BETWEEN t.m - 12 AND t.m - 1
  GROUP BY ALL),
gfirst AS (SELECT customer, family, min(m) AS first_m, min(day) AS gfirst FROM x GROUP BY ALL),
cfam AS (
  SELECT t.customer, t.family, t.m, sum(mo.ctot) AS cfam12
  FROM monthly t JOIN gfirst g USING (customer, family)
       JOIN cmon mo ON mo.customer = t.customer AND mo.m BETWEEN greatest(t.m - 12, g.first_m) AND t.m - 1
  GROUP BY ALL),
lines AS (
  SELECT x.*,
         sum(u) OVER (PARTITION BY customer, family, m ORDER BY day, _row ROWS UNBOUNDED PRECEDING) AS mtd,
         sum(u) OVER (PARTITION BY customer, family, day ORDER BY _row ROWS UNBOUNDED PRECEDING) AS gdtd,
         sum(u) OVER (PARTITION BY customer, family, day) AS gday,
         sum(u) OVER (PARTITION BY customer, day ORDER BY _row ROWS UNBOUNDED PRECEDING) AS cdtd,
         sum(cu) OVER (PARTITION BY customer, day ORDER BY _row ROWS UNBOUNDED PRECEDING) AS kdtd
  FROM x),
j AS (
  SELECT l._row, l.family, l.u, l.lu, l.m, l.day, l.controlled, l.mtd, l.gdtd, l.cfirst, l.cfirst_m,
         g.first_m, g.gfirst, d.nd, d.back, d.n30, d.prev_sum, d.prev_max, cd.cn30,
         d.u30_full - l.gday + l.gdtd AS u30, cd.c30_full - cd.cdu + l.cdtd AS c30,
         cd.k30_full - cd.ccu + l.kdtd AS k30,
         CAST(least(12, l.m - g.first_m) AS DOUBLE) AS nhist,
         coalesce(t.tot12, 0) AS tot12, coalesce(t.cnt12, 0) AS cnt12,
         coalesce(t.ndays12, 0) AS ndays12, coalesce(t.slog12, 0) AS slog12,
         coalesce(t.slog212, 0) AS slog212, coalesce(t.maxl6, 0) AS maxl6,
         coalesce(t.tot_max12, 0) AS tot_max12, coalesce(ct.ctot12, 0) AS ctot12,
         coalesce(t.tot_season, 0) AS tot_season, coalesce(t.ndays_season, 0) AS ndays_season,
         coalesce(ct.cctl12, 0) AS cctl12, coalesce(cf.cfam12, 0) AS cfam12,
         CASE WHEN coalesce(p0.customers, 0) >= {c.min_peer_customers} THEN 0
              WHEN coalesce(p1.customers, 0) >= {c.min_peer_customers} THEN 1
              WHEN coalesce(p2.customers, 0) >= {c.min_peer_customers} THEN 2 END AS plevel,
         CASE plevel WHEN 0 THEN p0.mu WHEN 1 THEN p1.mu WHEN 2 THEN p2.mu END AS p_mu,
         CASE plevel WHEN 0 THEN p0.sd WHEN 1 THEN p1.sd WHEN 2 THEN p2.sd END AS p_sd,
         CASE plevel WHEN 0 THEN p0.mmu WHEN 1 THEN p1.mmu WHEN 2 THEN p2.mmu END AS p_mmu,
         CASE plevel WHEN 0 THEN p0.msd WHEN 1 THEN p1.msd WHEN 2 THEN p2.msd END AS p_msd,
         CASE plevel WHEN 0 THEN p0.share WHEN 1 THEN p1.share WHEN 2 THEN p2.share END AS p_share,
         plevel IS NOT NULL AS has_peer
  FROM lines l
       JOIN gfirst g USING (customer, family)
       JOIN gdays2 d USING (customer, family, day)
       JOIN cdays2 cd USING (customer, day)
       LEFT JOIN trail t USING (customer, family, m)
       LEFT JOIN ctrail ct USING (customer, m)
       LEFT JOIN cfam cf USING (customer, family, m)
       LEFT JOIN peers p0 ON p0.ctype = l.ctype AND p0.cstate = l.cstate AND p0.family = l.family
       LEFT JOIN peers p1 ON p1.ctype = l.ctype AND p1.cstate = '*' AND p1.family = l.family
       LEFT JOIN peers p2 ON p2.ctype = '*' AND p2.cstate = '*' AND p2.family = l.family),
k AS (
  SELECT *,
    nhist >= {c.min_history_months} AS history,
    nhist >= {c.min_history_months} AND cnt12 >= {c.min_history_lines} AND cnt12 > 0 AS size_ok,
    CASE WHEN cnt12 > 0 THEN tot12 / cnt12 END AS mean12,
    CASE WHEN cnt12 > 0 THEN slog12 / cnt12 END AS mu,
    greatest(sqrt(greatest(CASE WHEN cnt12 > 1 THEN (slog212 - slog12 * slog12 / cnt12) / (cnt12 - 1) ELSE 0 END, 0)), {c.control_sd_floor}) AS sd,
    CASE WHEN nhist > 0 THEN tot12 / nhist END AS avg12,
    greatest(p_sd, {c.control_sd_floor}) AS psd,
    greatest(p_msd, {c.control_sd_floor}) AS msd,
    nhist >= {c.min_history_months} AND ndays12 > 0 AS freq_ok,
    CASE WHEN nhist > 0 THEN ndays12 / nhist END AS usual,
    (day - back) / {r} AS recent,
    CASE WHEN ndays12 > 0 THEN {K.DAYS_PER_MONTH} * nhist / ndays12 END AS usual_gap,
    (gfirst - cfirst) >= {c.new_family_tenure_days} AND (day - gfirst) < {c.new_family_window_days} AS new_fam,
    (m - cfirst_m) >= {c.min_history_months} AS cust_hist,
    (prev_sum + gdtd - greatest(prev_max, gdtd)) / {s - 1} AS recent_day,
    CASE WHEN nhist >= 12 AND ndays_season > 0
         THEN greatest(tot12 / ndays12, tot_season / ndays_season)
         WHEN ndays12 > 0 THEN tot12 / ndays12 END AS usual_day
  FROM j),
f AS (
  SELECT _row, family, u, lu, mtd, controlled, p_mu, avg12, gdtd AS mtd_day,
    CASE WHEN size_ok AND mean12 > 0 THEN u / mean12 END AS size_ratio,
    CASE WHEN size_ok AND maxl6 > 0 THEN u / maxl6 END AS max6_ratio,
    CASE WHEN size_ok THEN (lu - mu) / sd END AS control_z,
    CASE WHEN history AND tot12 > 0 AND cnt12 >= {c.min_history_lines} AND u * cnt12 >= tot12 THEN mtd / avg12 END AS month_ratio,
    CASE WHEN has_peer THEN (lu - p_mu) / psd END AS peer_z,
    CASE WHEN has_peer THEN (ln(1 + mtd) - p_mmu) / msd END AS peer_month_z,
    CASE WHEN freq_ok AND n30 >= {c.min_orders_30d} THEN n30 / greatest(usual, 1.0) END AS frequency_ratio,
    CASE WHEN freq_ok AND nd - 1 >= {r} THEN usual_gap / greatest(recent, 1.0) END AS interval_ratio,
    CASE WHEN new_fam THEN CASE WHEN has_peer THEN p_share ELSE 0.0 END END AS new_family_share,
    CASE WHEN history AND cfam12 > 0 AND c30 > 0 AND cn30 >= {c.min_mix_days} AND u30 >= {c.min_mix_units}
         THEN {_odds('u30 / c30')} / {_odds('tot12 / cfam12')} END AS mix_odds_ratio,
    CASE WHEN cust_hist AND controlled AND ctot12 > 0 AND c30 > 0 AND cn30 >= {c.min_mix_days}
         THEN {_odds('k30 / c30')} / {_odds('cctl12 / ctot12')} END AS controlled_odds_ratio,
    CASE WHEN history AND mtd >= {c.cap_over_usual} * tot_max12 THEN mtd / {c.monthly_cap} END AS cap_ratio,
    CASE WHEN history AND ndays12 > 0 AND nd >= {s} AND usual_day > 0 THEN recent_day / usual_day END AS sustained_ratio,
    u AS units,
    CASE WHEN size_ok THEN mean12 END AS mean_line_12m,
    CASE WHEN size_ok AND maxl6 > 0 THEN maxl6 END AS max_line_6m,
    CASE WHEN size_ok THEN exp(mu + {c.control_z} * sd) - 1 END AS control_limit,
    mtd AS month_to_date,
    CASE WHEN history AND tot12 > 0 AND cnt12 >= {c.min_history_lines} AND u * cnt12 >= tot12 THEN avg12 END AS monthly_avg_12m,
    CASE WHEN has_peer THEN exp(p_mu) - 1 END AS peer_line_typical,
    CASE WHEN has_peer THEN exp(p_mu + {c.peer_z} * psd) - 1 END AS peer_line_limit,
    CASE WHEN has_peer THEN exp(p_mmu) - 1 END AS peer_month_typical,
    CASE WHEN has_peer THEN exp(p_mmu + {c.peer_month_z} * msd) - 1 END AS peer_month_limit,
    CAST(n30 AS DOUBLE) AS orders_30d,
    CASE WHEN freq_ok THEN usual END AS usual_orders_month,
    CASE WHEN freq_ok AND nd - 1 >= {r} THEN recent END AS recent_interval,
    CASE WHEN freq_ok AND nd - 1 >= {r} THEN usual_gap END AS usual_interval,
    CAST(day - cfirst AS DOUBLE) AS tenure_days,
    CASE WHEN history AND cfam12 > 0 AND c30 > 0 AND cn30 >= {c.min_mix_days} THEN u30 / c30 END AS share_30d,
    CASE WHEN history AND cfam12 > 0 AND c30 > 0 AND cn30 >= {c.min_mix_days} THEN tot12 / cfam12 END AS share_12m,
    CASE WHEN cust_hist AND controlled AND ctot12 > 0 AND c30 > 0 AND cn30 >= {c.min_mix_days} THEN k30 / c30 END AS controlled_30d,
    CASE WHEN cust_hist AND controlled AND ctot12 > 0 AND c30 > 0 AND cn30 >= {c.min_mix_days} THEN cctl12 / ctot12 END AS controlled_12m,
    nhist AS months_history,
    CASE WHEN history AND ndays12 > 0 AND nd >= {s} AND usual_day > 0 THEN recent_day END AS recent_day_units,
    CASE WHEN history AND ndays12 > 0 AND nd >= {s} AND usual_day > 0 THEN usual_day END AS usual_day_units,
    CASE WHEN history THEN tot_max12 END AS max_month_12m,
    CAST(cn30 AS DOUBLE) AS customer_days_30d
  FROM k),
v AS (
  SELECT *, {", ".join(f"{e} AS sev_{n}" for n, e in sev.items())}, {cap} AS sev_cap FROM f),
w AS (
  SELECT *,
    CASE WHEN controlled THEN greatest(0.0, {", ".join(f"sev_{n}" for n in sev)}, sev_cap) ELSE 0.0 END AS score,
    CASE WHEN controlled THEN {bits} ELSE 0 END AS findings
  FROM v)
SELECT _row, score, findings <> 0 AS flag, findings, {feature_cols}{reasons_sql}
FROM w
"""


# --- whole commands (each in a fresh process) ------------------------------------------------

_NUMBA_CMD = """
import sys
from gateway.som.score import main
main(sys.argv[1:])
"""

_POLARS_CMD = """
import sys
import polars as pl
from gateway.som import reference
from gateway.som.config import SomConfig
from gateway.som.io import read_orders, write_scored
from gateway.som.score import reasons_frame
src, out = sys.argv[1:]
raw = pl.read_parquet(src)
f = reference.features(read_orders(raw))
flagged = f.filter(pl.col("flag")).with_row_index("_i")
idx = f.with_row_index("_i").filter(pl.col("flag"))["_i"]
cols = list(reference.K.FEATURES)
fam = read_orders(raw)["family"].gather(idx)
text = reasons_frame(flagged["findings"].to_numpy(), flagged.select(cols).to_numpy(), fam,
                     pl.Series(["peers"] * flagged.height), SomConfig().monthly_cap)
reasons = pl.Series("reasons", [""] * f.height, pl.String).scatter(idx, text)
raw.with_columns(f["score"], f["flag"], reasons).write_parquet(out, compression="lz4", statistics=False)
"""

_DUCKDB_CMD = """
import sys
import duckdb
from benchmarks.som_batch import features_sql
src, out = sys.argv[1:3]
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
con.execute(f"SET memory_limit = '{sys.argv[3]}'")
con.execute(f"SET temp_directory = '{sys.argv[4]}'")
cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{src}')").fetchall()]
con.execute(f"CREATE VIEW src AS SELECT row_number() OVER () - 1 AS _row, * FROM read_parquet('{src}')")
q = features_sql("src", columns=cols, reasons=True)
con.execute(f"COPY (SELECT s.* EXCLUDE (_row), r.score, r.flag, r.reasons FROM src s JOIN ({q}) r USING (_row) ORDER BY _row) TO '{out}' (FORMAT parquet)")
"""


_PARTITION_CMD = """
import signal
import sys
from gateway.som.partition import score_file
if __name__ == "__main__":
    # SIGTERM (run_command's stop) unwinds, as in `gateway som score`: the runner stops its
    # workers and the parts directory is removed, instead of workers left to notice on their own
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    src, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    score_file(src, out, workers=workers, partitions=1 if workers == 1 else None)
"""


def run_command(code: str, args: list[str], name: str = "command") -> dict:
    """Run a Python snippet in a fresh process: wall time, and its peak RSS with its child
    processes' sampled every 10 ms (ru_maxrss of a forked child would include the parent's memory). The process is stopped if
    the wait is interrupted (Ctrl-C, SIGTERM, an error here): nothing is left running."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=Path(__file__).parent.parent)
    peak = 0
    try:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:  # the process and its workers (a partitioned run spawns its own)
                rss = ps.memory_info().rss
                for child in ps.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.01)
    finally:
        stop_process(proc, 10)  # exited already, or interrupted here: nothing left running
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchmarkError(f"{name} failed (exit status {proc.returncode})", code="command_failed")
    return {"seconds": wall, "peak_rss_mb": peak / 2**20}


# --- the benchmark -------------------------------------------------------------------------------


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) != len(b):
        return 0.0
    return float(np.mean(np.isclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True)))


def _agree_lines(expected: pl.DataFrame, got: pl.DataFrame) -> float:
    """Share of lines where `got` has the expected score and flag (0 when the line counts differ)."""
    if expected.height != got.height:
        return 0.0
    scores = _agree(expected["score"].to_numpy(), got["score"].cast(pl.Float64).fill_null(np.nan).to_numpy())
    flags = float((expected["flag"] == got["flag"]).fill_null(False).mean() or 0.0) if expected.height else 1.0
    return min(scores, flags)


KEYS = ["order_id", "line"]  # one line of a synthetic history; a partitioned run writes lines in another order


def _agree_file(path: Path, expected: pl.DataFrame, by: list[str] | None = None) -> float:
    """As _agree_lines for an output file: line by line in order, or matched by the columns `by`
    (an output written in another order), KEYS by default when `expected` carries them."""
    keys = [k for k in KEYS if k in expected.columns] if by is None else by
    got = pl.read_parquet(path, columns=[*keys, "score", "flag"])
    if keys:
        expected, got = expected.sort([*keys, "score"]), got.sort([*keys, "score"])
    return _agree_lines(expected, got)


def _first_customers(df: pl.DataFrame, lines: int) -> pl.DataFrame:
    """The lines of the first customers (in order of appearance) up to about `lines` lines."""
    counts = df.group_by("customer", maintain_order=True).len()
    keep = counts.filter(pl.col("len").cum_sum() <= lines)["customer"]
    return df.filter(pl.col("customer").is_in(keep.implode()))


def stages(df: pl.DataFrame, repeat: int, stat=min) -> dict[str, float]:
    """Seconds of each stage of score_orders (`stat` of `repeat` runs, the best by default):
    checking the loaded table, coding and ordering the lines, the peer reference, the kernel,
    reasons and the output table."""
    from gateway.som import peers as peers_mod
    from gateway.som.io import read_orders
    from gateway.som.score import assemble, score_prepared

    cfg = SomConfig()
    out: dict[str, list[float]] = {}

    def lap(name: str, t: float) -> float:
        now = time.perf_counter()
        out.setdefault(name, []).append(now - t)
        return now

    for _ in range(repeat):
        t = time.perf_counter()
        d = read_orders(df)
        t = lap("check input", t)
        p = peers_mod.prepare(d)
        t = lap("codes and order", t)
        ref = peers_mod.peer_reference_prepared(p)
        t = lap("peer reference", t)
        r = score_prepared(p, cfg, ref)
        t = lap("kernel", t)
        assemble(d, r, cfg)
        lap("reasons and output table", t)
        del p, r
    return {k: stat(v) for k, v in out.items()}


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=positive(int), default=10_000_000, help="about this many order lines")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--repeat", type=positive(int), default=2)
    ap.add_argument("--skip-polars", action="store_true")
    ap.add_argument("--skip-duckdb", action="store_true")
    ap.add_argument("--data", help="reuse this synthetic Parquet file (written when absent)")
    ap.add_argument("--stages-only", action="store_true",
                    help="only the in-memory Numba figure and its stages (best and median of "
                         "--repeat runs each), printed, no results file: for trying changes")
    ap.add_argument("--duckdb-memory", default="8GB", help="DuckDB memory_limit (it spills beyond)")
    ap.add_argument("--polars-lines", type=positive(int), default=2_000_000,
                    help="the Polars reference needs ~1.6 GB per million lines: it runs on the "
                         "first customers up to this many lines, beside Numba on the same lines")
    add_results_option(ap)
    args = ap.parse_args(argv)
    if args.data and not Path(args.data).exists() and not Path(args.data).parent.is_dir():
        raise BenchmarkError(f"--data {args.data}: no directory {Path(args.data).parent} to write it in",
                             code="som_file_not_found")
    with scratch("som") as work:
        return _run(args, work, argv)


def _run(args: argparse.Namespace, work: Path, argv: list[str] | None) -> int:

    import duckdb

    from gateway.som import partition
    from gateway.som.incremental import SomState
    from gateway.som.io import read_orders
    from gateway.som.peers import peer_reference
    from gateway.som.score import score_orders
    from gateway.som.synth import synthesize

    # absolute: the whole commands run in the repository root, wherever this was started
    data = Path(args.data).resolve() if args.data else work / "orders.parquet"
    synthesized = not data.exists()
    if synthesized:
        customers = max(50, round(args.lines / 635))  # synth: about 635 lines per customer in 2 years
        t = time.perf_counter()
        partial = data.with_name(f".{data.name}.partial")
        try:  # a run cut short leaves no half-written FILE for the next run to trust
            synthesize(customers=customers, days=730, seed=args.seed).write_parquet(partial)
            partial.replace(data)
        finally:
            partial.unlink(missing_ok=True)
        print(f"synthetic history: {time.perf_counter() - t:.1f} s", flush=True)
    try:
        raw = pl.read_parquet(data)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise BenchmarkError(f"{data}: not a readable Parquet file ({exc}); remove it and the benchmark "
                             "writes a synthetic history there", code="som_unreadable") from None
    df = read_orders(raw)
    n = df.height
    print(f"{n:,} lines, {df['customer'].n_unique():,} customers", flush=True)
    results: dict = {"lines": n, "data": str(data), "data_written_by_this_run": synthesized,
                     "seed": args.seed if synthesized else None, "repeat": args.repeat,
                     "config": SomConfig().as_dict(), "in_memory": {}, "command": {}, "agreement": {}}
    agreement = results["agreement"]

    # ---- in memory ----
    score_orders(df.head(200_000))  # compile / load the cached kernels outside the measurement
    if args.stages_only:
        times = [best(lambda: score_orders(df), 1)[0] for _ in range(args.repeat)]
        print(f"numba in memory: best {min(times):.3f} s ({n / min(times) / 1e6:.2f}M lines/s), "
              f"median {float(np.median(times)):.3f} s of {args.repeat}")
        for name, stat in (("best", min), ("median", lambda v: float(np.median(v)))):
            print(f"  stages, {name}: " + ", ".join(
                f"{k} {v:.3f} s" for k, v in stages(df, args.repeat, stat).items()), flush=True)
        return 0
    t_numba, scored = best(lambda: score_orders(df), args.repeat)
    results["in_memory"]["numba"] = {"seconds": t_numba, "lines_per_s": n / t_numba,
                                     "flagged": int(scored["flag"].sum())}
    print(f"numba in memory: {t_numba:.2f} s", flush=True)
    results["in_memory"]["numba"]["stages"] = stages(df, args.repeat)
    print("  stages: " + ", ".join(f"{k} {v:.2f} s"
                                   for k, v in results["in_memory"]["numba"]["stages"].items()),
          flush=True)
    ref_score = scored["score"].to_numpy()
    # What every other result must reproduce, line by line (KEYS too, for outputs in another order).
    expected = pl.DataFrame([*(raw[k] for k in KEYS if k in raw.columns), scored["score"], scored["flag"]])
    if not args.skip_duckdb:
        con = duckdb.connect()
        con.execute("SET enable_progress_bar = false")
        con.execute(f"SET memory_limit = '{args.duckdb_memory}'")
        con.execute(f"SET temp_directory = '{work}'")
        con.register("src", df.with_row_index("_row").to_arrow())
        q = features_sql("src", columns=df.columns + ["_row"])
        t_duck, duck = best(lambda: con.sql(q).to_arrow_table(), 1)
        duck = pl.from_arrow(duck).sort("_row")
        results["in_memory"]["duckdb"] = {
            "seconds": t_duck, "lines_per_s": n / t_duck,
            "score_agreement": _agree(ref_score, duck["score"].fill_null(np.nan).to_numpy())}
        agreement["in memory: duckdb"] = _agree_lines(scored, duck)
        print(f"duckdb in memory: {t_duck:.2f} s", flush=True)
        del duck, con
    if not args.skip_polars:
        from gateway.som import reference

        sub = _first_customers(df, args.polars_lines)
        sub.write_parquet(work / "polars_subset.parquet")
        t_sub, sub_scored = best(lambda: score_orders(sub), args.repeat)
        t_pl, pol = best(lambda: reference.features(sub), 1)
        results["in_memory"]["polars"] = {
            "lines": sub.height, "seconds": t_pl, "lines_per_s": sub.height / t_pl,
            "numba_seconds_same_lines": t_sub,
            "score_agreement": _agree(sub_scored["score"].to_numpy(), pol["score"].to_numpy())}
        agreement["in memory: polars"] = _agree_lines(sub_scored, pol)
        expected_sub = sub_scored.select("score", "flag")
        print(f"polars in memory ({sub.height:,} lines): {t_pl:.2f} s; numba {t_sub:.2f} s",
              flush=True)
        del pol, sub_scored
    del scored

    # ---- whole commands ----
    out = work / "scored.parquet"
    engines = [("numba", _NUMBA_CMD)]
    if not args.skip_duckdb:
        engines.append(("duckdb", _DUCKDB_CMD))
    if not args.skip_polars:
        engines.append(("polars", _POLARS_CMD))
    for name, code in engines:
        src = work / "polars_subset.parquet" if name == "polars" else data
        extra = [args.duckdb_memory, str(work)] if name == "duckdb" else []
        out.unlink(missing_ok=True)
        results["command"][name] = run_command(code, [str(src), str(out), *extra], f"the {name} command")
        results["command"][name]["lines"] = pl.scan_parquet(src).select(pl.len()).collect().item()
        kept = pl.read_parquet_schema(out)
        if list(kept)[:len(pl.read_parquet_schema(src))] != list(pl.read_parquet_schema(src)):
            raise BenchmarkError(f"the {name} command did not keep the input columns", code="command_failed")
        agreement[f"command: {name}"] = _agree_file(out, expected_sub if name == "polars" else expected)
        print(f"{name} command: {results['command'][name]['seconds']:.2f} s", flush=True)
    if "polars" in results["command"]:  # numba's whole command on the same lines as Polars'
        out.unlink(missing_ok=True)
        r = run_command(_NUMBA_CMD, [str(work / "polars_subset.parquet"), str(out)], "the numba command")
        results["command"]["numba_polars_lines"] = {**r, "lines": results["command"]["polars"]["lines"]}
        agreement["command: numba_polars_lines"] = _agree_file(out, expected_sub)

    # ---- 1 vs 2 workers (partitioned runner), each a whole command in a fresh process ----
    results["workers"] = {}
    for workers in (1, 2):
        out.unlink(missing_ok=True)
        r = run_command(_PARTITION_CMD, [str(data), str(out), str(workers)], f"the {workers}-worker run")
        results["workers"][str(workers)] = {
            **r, "partitions": 1 if workers == 1 else partition.default_partitions(data, workers)}
        if all(k in raw.columns for k in KEYS):
            agreement[f"partitioned, {workers} worker(s)"] = _agree_file(out, expected)
        else:  # no line key: matched by every input column (the lines come back in another order)
            agreement[f"partitioned, {workers} worker(s)"] = _agree_file(
                out, raw.with_columns(expected["score"], expected["flag"]), by=raw.columns)
    # ---- incremental latency ----
    customers = df["customer"].unique(maintain_order=True).head(2000)
    sub = df.filter(pl.col("customer").is_in(customers.implode())).sort("date", maintain_order=True)
    state = SomState(peers=peer_reference(df))
    rows = sub.select("customer", "customer_type", "state", "family", "date", "dosage_units",
                      "controlled").to_dicts()
    lat = np.empty(len(rows))
    for i, row in enumerate(rows):
        t = time.perf_counter_ns()
        state.update(row)
        lat[i] = time.perf_counter_ns() - t
    lat = lat[1000:] / 1000.0
    results["incremental"] = {"updates": int(lat.size), "p50_us": float(np.percentile(lat, 50)),
                              "p99_us": float(np.percentile(lat, 99)), "max_us": float(lat.max()),
                              "state_bytes_per_group": K.G_SIZE * 8}

    # ---- report ----
    im, cm = results["in_memory"], results["command"]
    rows_out = []
    for name, r in im.items():
        lines = r.get("lines", n)
        base = (im["numba"]["seconds"] if name != "polars" else r["numba_seconds_same_lines"])
        rows_out.append({"what": f"in memory: {name}", "lines": lines, "seconds": r["seconds"],
                         "Mlines/s": lines / r["seconds"] / 1e6,
                         "numba faster": r["seconds"] / base,
                         "agreement": r.get("score_agreement", 1.0)})
    for name, r in cm.items():
        lines = r["lines"]
        base = cm["numba_polars_lines"] if name in ("polars", "numba_polars_lines") else cm["numba"]
        rows_out.append({"what": f"command: {name}", "lines": lines, "seconds": r["seconds"],
                         "Mlines/s": lines / r["seconds"] / 1e6,
                         "numba faster": r["seconds"] / base["seconds"],
                         "peak MB": r["peak_rss_mb"]})
    for w, r in results["workers"].items():
        rows_out.append({"what": f"command: partitioned, {w} worker(s)", "lines": n, "seconds": r["seconds"],
                         "Mlines/s": n / r["seconds"] / 1e6, "peak MB": r["peak_rss_mb"]})
    for row in rows_out:
        name = row["what"].replace("command: partitioned", "partitioned")
        row["agreement"] = agreement.get(name, row.get("agreement"))
    print(table(rows_out, ["what", "lines", "seconds", "Mlines/s", "numba faster", "agreement",
                           "peak MB"]))
    inc = results["incremental"]
    print(f"incremental update: p50 {inc['p50_us']:.1f} us, p99 {inc['p99_us']:.1f} us, "
          f"max {inc['max_us']:.0f} us over {inc['updates']:,} updates")
    results["ratios"] = {}
    if "duckdb" in im:
        results["ratios"]["in_memory_vs_duckdb"] = im["duckdb"]["seconds"] / im["numba"]["seconds"]
        results["ratios"]["command_vs_duckdb"] = cm["duckdb"]["seconds"] / cm["numba"]["seconds"]
    if "polars" in im:
        results["ratios"]["in_memory_vs_polars"] = (im["polars"]["seconds"]
                                                    / im["polars"]["numba_seconds_same_lines"])
        results["ratios"]["command_vs_polars"] = (cm["polars"]["seconds"]
                                                  / cm["numba_polars_lines"]["seconds"])
    results["rows"] = rows_out
    disagree = {k: v for k, v in agreement.items() if v < 1.0}
    results["agreed"] = not disagree
    path = write_results("som_batch", results, directory=args.results_dir, argv=argv)
    print(f"written {path}")
    if disagree:
        print("error [results_disagree]: not the in-memory Numba scores and flags on every line: "
              + ", ".join(f"{k} {v:.6f}" for k, v in disagree.items()), file=sys.stderr)
        return 1
    print(f"every result agrees with the in-memory Numba scores and flags, line by line ({len(agreement)} checked)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
