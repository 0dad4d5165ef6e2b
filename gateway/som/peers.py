"""Peer reference: robust statistics per (class of trade, state, drug family).

A fixed table built in a first pass over the whole history. Batch, partitioned and incremental
scoring all read the same table, which is what lets them agree. Statistics are on log1p(units),
so one very large order moves them little. Three levels: the (class of trade, state) cell, the
class of trade across states (`state` = "*"), the family across everyone (both "*"); a cell with
fewer than `min_peer_customers` customers falls back to the next level.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import polars as pl

from gateway.som import kernels

ALL = "*"
SUM_COLUMNS = ("customers", "cell_customers", "lines", "line_log_sum", "line_log_sumsq", "months",
               "month_log_sum", "month_log_sumsq")
COUNT_COLUMNS = ("customers", "cell_customers", "lines", "months")
# The four sums of logs, also kept exact (kernels.peer_sums' fixed point) as a whole part and a
# fraction in units of 2**-kernels.PEER_FRAC_BITS: merging and the coarser levels add these, so
# the result does not depend on the order of the terms (nor on how customers were partitioned).
LOG_SUMS = ("line_log_sum", "line_log_sumsq", "month_log_sum", "month_log_sumsq")
EXACT_COLUMNS = tuple(f"{c}_{part}" for c in LOG_SUMS for part in ("whole", "frac"))


@dataclass(frozen=True)
class Prepared:
    """Order lines as arrays the kernels read, with their codes and time order."""

    n: int
    ccode: np.ndarray  # int32 customer code per line
    ncust: int
    fcode: np.ndarray  # int32 family code per line
    families: list[str]  # family name per code
    day: np.ndarray  # int32 days since 1970-01-01
    units: np.ndarray  # float64
    controlled: np.ndarray  # bool
    cust_ts: np.ndarray  # int64 (class of trade, state) cell per customer code
    cells: list[tuple[str, str]]  # (class of trade, state) per cell code
    perm: np.ndarray  # int64: lines in (customer, date, input position) order
    sorted: tuple[np.ndarray, ...]  # customer, family, day, units, controlled, log1p(units)
    # in that order
    chunks: list[tuple[int, int]]  # ranges of sorted lines made of whole customers, one a thread


def threads() -> int:
    """Threads for the kernels (they release the GIL): the cores this process may use."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(int(os.environ.get("GATEWAY_SOM_THREADS", n or 1)), 16))


def run_threads(fn: Callable[..., Any], tasks: list[tuple]) -> list[Any]:
    """Run the tasks on at most threads() threads; results in task order."""
    if len(tasks) == 1:
        return [fn(*tasks[0])]
    with ThreadPoolExecutor(min(len(tasks), threads())) as pool:
        return list(pool.map(lambda t: fn(*t), tasks))


@functools.lru_cache(maxsize=1)
def log1p_table() -> np.ndarray:
    """kernels.log1p_table, made once per process."""
    return kernels.log1p_table(kernels.LOG1P_TABLE)


# Sorted lines are cut into this many runs of whole customers, whatever the number of threads
# (16 runs on a few threads let one slowed down by another process leave the rest to the others).
# The peer sums of the runs are exact (kernels.peer_sums), so the cut does not change their bits.
CHUNKS = 16


def _chunks(start: np.ndarray, n: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, n) at customer boundaries (`start`: offsets of customers) into about equal parts."""
    if n < 200_000 or parts == 1:
        return [(0, n)]
    cuts = np.searchsorted(start, [n * k // parts for k in range(1, parts)])
    bounds = [0, *sorted(set(int(start[c]) for c in cuts)), n]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _keys(s: pl.Series) -> np.ndarray:
    """uint64 keys of a text column, equal for equal values (Categorical: its physical codes)."""
    if isinstance(s.dtype, (pl.Categorical, pl.Enum)):
        return s.to_physical().cast(pl.UInt64).to_numpy()
    return s.hash(seed=0).to_numpy()


def _text(s: pl.Series) -> list[str]:
    return s.cast(pl.String).fill_null("").to_list()


def _order(ccode: np.ndarray, ncust: int, fcode: np.ndarray, day: np.ndarray,
           units: np.ndarray, controlled: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """Lines in (customer code, day, input position) order: a counting sort by customer whose
    placing pass carries the columns along (in parallel over parts of the input, each part placed
    into its own slots), then a sort by day of the customers not already in time order."""
    n = ccode.shape[0]
    t = threads() if n >= 200_000 else 1
    bounds = [n * k // t for k in range(t + 1)]
    counts = run_threads(kernels.count_customers,
                         [(ccode, a, b, ncust) for a, b in zip(bounds, bounds[1:])])
    start = np.zeros(ncust + 1, np.int64)
    np.cumsum(np.sum(counts, axis=0), out=start[1:])
    perm = np.empty(n, np.int64)
    s_c = np.empty(n, np.int32)
    s_f = np.empty(n, np.int32)
    s_day = np.empty(n, np.int32)
    s_u = np.empty(n, np.float64)
    s_ctl = np.empty(n, np.bool_)
    s_lu = np.empty(n, np.float64)
    pos = start[:-1].copy()
    tasks = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        tasks.append((a, b, pos.copy(), ccode, fcode, day, units, controlled, perm, s_c, s_f,
                      s_day, s_u, s_ctl, s_lu, log1p_table()))
        pos += counts[k]
    run_threads(kernels.scatter_by_customer, tasks)
    cuts = [0, *(int(x) for x in np.searchsorted(start, bounds[1:-1])), ncust]
    run_threads(kernels.sort_days, [(start, a, b, perm, s_f, s_day, s_u, s_ctl, s_lu)
                                    for a, b in zip(cuts, cuts[1:]) if b > a] or [
        (start, 0, 0, perm, s_f, s_day, s_u, s_ctl, s_lu)])
    return perm, start, (s_c, s_f, s_day, s_u, s_ctl, s_lu)


def dense_codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """kernels.dense_codes (codes in order of first appearance, first index of each), in
    threads over parts of the keys: each part is coded on its own, then the parts' distinct keys,
    taken part after part in their order of first appearance, are coded once more, which is the
    order of first appearance in the whole; each part's codes are then translated."""
    n = keys.shape[0]
    t = threads() if n >= 200_000 else 1
    if t == 1:
        return kernels.dense_codes(keys)
    bounds = [n * k // t for k in range(t + 1)]
    parts = run_threads(kernels.dense_codes, [(keys[a:b],) for a, b in zip(bounds, bounds[1:])])
    firsts = np.concatenate([first + a for (_, first), a in zip(parts, bounds)])
    table, which = kernels.dense_codes(keys[firsts])
    codes = np.empty(n, np.int32)
    offsets = np.cumsum([0] + [len(first) for _, first in parts])
    run_threads(kernels.recode, [(local, table[o:], codes[a:b]) for (local, _), o, a, b in
                                 zip(parts, offsets, bounds, bounds[1:])])
    return codes, firsts[which]


def prepare(df: pl.DataFrame) -> Prepared:
    n = df.height
    ccode, cfirst = dense_codes(_keys(df["customer"]))
    fcode, ffirst = dense_codes(_keys(df["family"]))
    families = _text(df["family"].gather(ffirst))
    day = df["date"].to_physical().to_numpy()
    if day.dtype != np.int32:
        day = day.astype(np.int32)
    units = df["dosage_units"].to_numpy()
    if "controlled" in df.columns:
        controlled = df["controlled"].fill_null(True).to_numpy()
    else:
        controlled = np.ones(n, np.bool_)
    perm, start, sorted_ = _order(ccode, len(cfirst), fcode, day, units, controlled)
    # Class of trade and state are the customer's: those of its earliest line (same-day lines in
    # input order), as SomState.update sees a customer first. Its first line in the file would
    # make the peer cell, so the scores, depend on the order of the rows.
    idx = pl.Series(perm[start[:-1]])
    ctype = (df["customer_type"].gather(idx).cast(pl.String).fill_null("")
             if "customer_type" in df.columns else pl.Series([""] * len(cfirst)))
    cstate = (df["state"].gather(idx).cast(pl.String).fill_null("")
              if "state" in df.columns else pl.Series([""] * len(cfirst)))
    cell_keys = ctype.hash(seed=0).to_numpy() * np.uint64(1000003) ^ cstate.hash(seed=1).to_numpy()
    cust_ts, tfirst = kernels.dense_codes(cell_keys)
    cells = list(zip(ctype.gather(tfirst).to_list(), cstate.gather(tfirst).to_list()))
    return Prepared(n, ccode, len(cfirst), fcode, families, day, units, controlled,
                    cust_ts.astype(np.int64), cells, perm, sorted_, _chunks(start, n, CHUNKS))


def _finish(sums: pl.DataFrame) -> pl.DataFrame:
    """Means, spreads and shares from the summed moments."""
    def sd(s: str, ss: str, k: str) -> pl.Expr:
        var = (pl.col(ss) - pl.col(s) ** 2 / pl.col(k)) / (pl.col(k) - 1)
        return pl.when(pl.col(k) > 1).then(var.clip(lower_bound=0).sqrt()).otherwise(0.0)

    return sums.with_columns(
        (pl.col("line_log_sum") / pl.col("lines")).alias("line_log_mean"),
        sd("line_log_sum", "line_log_sumsq", "lines").alias("line_log_sd"),
        (pl.col("month_log_sum") / pl.col("months")).alias("month_log_mean"),
        sd("month_log_sum", "month_log_sumsq", "months").alias("month_log_sd"),
        (pl.col("customers") / pl.col("cell_customers")).alias("share"),
    ).with_columns(
        (pl.col("line_log_mean").exp() - 1).alias("typical_line"),
        (pl.col("month_log_mean").exp() - 1).alias("typical_month"),
    ).sort("level", "customer_type", "state", "family")


def peer_reference_prepared(p: Prepared) -> pl.DataFrame:
    nts = len(p.cells)
    nfam = len(p.families)
    s_c, s_f, s_day, s_u, _, s_lu = p.sorted
    parts = run_threads(kernels.peer_sums, [(s_c, s_f, s_day, s_u, s_lu, lo, hi, max(nfam, 1),
                                             p.cust_ts, max(nts, 1), log1p_table())
                                            for lo, hi in p.chunks])
    acc = np.sum(parts, axis=0) if len(parts) > 1 else parts[0]  # integers: any order, same sum
    cell_customers = np.bincount(p.cust_ts, minlength=nts).astype(np.float64)
    ts_idx, f_idx = np.nonzero(acc[:, :, kernels.PS_CUSTOMERS] > 0)
    sums = acc[ts_idx, f_idx]
    columns = {
        "customer_type": [p.cells[t][0] for t in ts_idx],
        "state": [p.cells[t][1] for t in ts_idx],
        "family": [p.families[f] for f in f_idx],
        "customers": sums[:, kernels.PS_CUSTOMERS].astype(np.float64),
        "cell_customers": cell_customers[ts_idx],
        "lines": sums[:, kernels.PS_LINES].astype(np.float64),
        "months": sums[:, kernels.PS_MONTHS].astype(np.float64),
    }
    for k, name in enumerate(LOG_SUMS):
        columns[f"{name}_whole"] = sums[:, kernels.PS_WHOLE + k]
        columns[f"{name}_frac"] = sums[:, kernels.PS_FRAC + k]
    cell = pl.DataFrame(columns, schema_overrides={
        "customer_type": pl.String, "state": pl.String, "family": pl.String,
        **{c: pl.Int64 for c in EXACT_COLUMNS}})
    return _levels(cell)


def run_starts(codes: np.ndarray) -> np.ndarray:
    """Positions where a sorted array takes a new value (the first is 0): where each run of
    equal values starts."""
    return np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])


def sum_by(frame: pl.DataFrame, keys: list[str], columns: list[str]) -> pl.DataFrame:
    """Sums of `columns` per distinct `keys`, added in one fixed order (rows sorted by the keys,
    ties in their given order): the same rows give the same bits in every run. Polars'
    group_by adds in an order that varies from run to run, and peer statistics quoted as
    evidence must be reproducible."""
    frame = frame.sort(keys, maintain_order=True)
    if not frame.height:
        return frame.select(*keys, *columns)
    starts = run_starts(frame.select(pl.struct(keys).rle_id()).to_series().to_numpy())
    return frame.select(keys)[starts].with_columns(
        pl.Series(c, np.add.reduceat(frame[c].to_numpy() if frame[c].dtype == pl.Int64
                                     else frame[c].cast(pl.Float64).to_numpy(), starts))
        for c in columns)


def _carry(frame: pl.DataFrame) -> pl.DataFrame:
    """Exact sums with each fraction back below 2**PEER_FRAC_BITS (the excess in the whole part),
    and the float sums they make: whole + fraction is rounded once, so equal exact sums give
    equal floats."""
    one = 1 << kernels.PEER_FRAC_BITS
    frame = frame.with_columns(
        e for c in LOG_SUMS for e in (
            (pl.col(f"{c}_whole") + pl.col(f"{c}_frac") // one).alias(f"{c}_whole"),
            (pl.col(f"{c}_frac") % one).alias(f"{c}_frac")))
    return frame.with_columns(
        (pl.col(f"{c}_whole").cast(pl.Float64)
         + pl.col(f"{c}_frac").cast(pl.Float64) / kernels.PEER_SCALE).alias(c) for c in LOG_SUMS)


def exact_from_float(frame: pl.DataFrame) -> pl.DataFrame:
    """EXACT_COLUMNS for float sums of logs (>= 0) computed some other way (reference.py): each
    rounded to the nearest multiple of 2**-PEER_FRAC_BITS."""
    return frame.with_columns(
        e for c in LOG_SUMS for e in (
            pl.col(c).floor().cast(pl.Int64).alias(f"{c}_whole"),
            ((pl.col(c) - pl.col(c).floor()) * kernels.PEER_SCALE).round().cast(pl.Int64)
            .alias(f"{c}_frac")))


def _levels(cell: pl.DataFrame) -> pl.DataFrame:
    """The three levels from the (class of trade, state, family) counts and exact sums."""
    cell = _carry(cell.select("customer_type", "state", "family", *COUNT_COLUMNS, *EXACT_COLUMNS))
    cells = cell.group_by("customer_type", "state").agg(pl.col("cell_customers").first())
    by_type = sum_by(cells, ["customer_type"], ["cell_customers"])
    everyone = float(cells["cell_customers"].sum()) if cells.height else 0.0  # whole numbers
    summed = [c for c in COUNT_COLUMNS if c != "cell_customers"] + list(EXACT_COLUMNS)
    t = _carry(sum_by(cell, ["customer_type", "family"], summed)
               .join(by_type, on="customer_type").with_columns(pl.lit(ALL).alias("state")))
    f = _carry(sum_by(cell, ["family"], summed)
               .with_columns(pl.lit(ALL).alias("customer_type"), pl.lit(ALL).alias("state"),
                             pl.lit(everyone).alias("cell_customers")))
    cols = ["customer_type", "state", "family", *SUM_COLUMNS, *EXACT_COLUMNS]
    out = pl.concat([
        cell.select(cols).with_columns(pl.lit("type_state").alias("level")),
        t.select(cols).with_columns(pl.lit("type").alias("level")),
        f.select(cols).with_columns(pl.lit("family").alias("level")),
    ]).with_columns(*(pl.col(c).cast(pl.Float64) for c in SUM_COLUMNS),
                    *(pl.col(c).cast(pl.Int64) for c in EXACT_COLUMNS))
    return _finish(out)


def merge_peer_references(tables: list[pl.DataFrame]) -> pl.DataFrame:
    """One reference from references of disjoint sets of customers (e.g. partitions).

    A table has a (class of trade, state, family) row only for the families its customers in
    that cell order, yet every row carries the cell's customer count, which the merge sums per
    family. So each table's cells are first given a row for every family (zero sums, the
    table's cell count); rows nobody orders are dropped after the merge.
    """
    summed = [*COUNT_COLUMNS, *EXACT_COLUMNS]  # exact: the merge adds in any order alike
    keep = ["customer_type", "state", "family", *summed]
    cells = [t.filter(pl.col("level") == "type_state").select(keep) for t in tables]
    families = pl.concat([c.select("family") for c in cells]).unique()
    padded = []
    for c in cells:
        counts = c.group_by("customer_type", "state").agg(pl.col("cell_customers").first())
        grid = counts.join(families, how="cross").join(
            c.select("customer_type", "state", "family"), on=["customer_type", "state", "family"], how="anti")
        zeros = grid.with_columns(*[pl.lit(0).alias(k) for k in summed if k != "cell_customers"])
        padded.append(pl.concat([c, zeros.select(c.columns).cast(c.schema)], how="vertical"))
    cell = sum_by(pl.concat(padded), ["customer_type", "state", "family"], summed)
    return _levels(cell).filter(pl.col("customers") > 0)


def peer_reference(df: pl.DataFrame) -> pl.DataFrame:
    """Peer statistics per (customer_type, state, family) and the two coarser levels: customers,
    lines, line_log_mean/sd (log1p of line units), month_log_mean/sd (log1p of a customer's
    monthly units in the family), share (fraction of the cell's customers ordering the family),
    typical_line, typical_month, and the raw sums, also exact (EXACT_COLUMNS: so that
    references of partitions merge into the very reference of the whole)."""
    from gateway.som.io import read_orders

    return peer_reference_prepared(prepare(read_orders(df)))


def peer_matrix(peers: pl.DataFrame, cells: list[tuple[str, str]], families: list[str],
                min_customers: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """For each (cell, family): the row of the peers to use (falling back to coarser levels when the
    cell has too few customers), as (row index matrix, peer vectors, (class, state) label per row)."""
    rows = peers.select("level", "customer_type", "state", "family", "customers",
                        *kernels.PEER_FIELDS)
    index = {}
    for i, (level, ctype, state, fam, customers) in enumerate(
            rows.select("level", "customer_type", "state", "family", "customers").iter_rows()):
        index[(ctype, state, fam)] = (i, customers)
    matrix = np.full((max(len(cells), 1), max(len(families), 1)), -1, np.int64)
    for t, (ctype, state) in enumerate(cells):
        for f, fam in enumerate(families):
            for key in ((ctype, state, fam), (ctype, ALL, fam), (ALL, ALL, fam)):
                hit = index.get(key)
                if hit is not None and hit[1] >= min_customers:
                    matrix[t, f] = hit[0]
                    break
    vectors = rows.select(kernels.PEER_FIELDS).fill_null(0.0).fill_nan(0.0).to_numpy().astype(
        np.float64)
    if vectors.shape[0] == 0:
        vectors = np.zeros((1, len(kernels.PEER_FIELDS)))
    labels = list(zip(rows["customer_type"].to_list(), rows["state"].to_list()))
    return matrix, np.ascontiguousarray(vectors), labels
