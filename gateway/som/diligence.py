"""A due-diligence page for one order line: what a compliance analyst needs before deciding whether
a held order may ship (Masters Pharmaceutical v. DEA, 2017: a held order ships only after due
diligence dispels the suspicion; 21 CFR 1301.74(b)).

The page is one self-contained HTML file (inline CSS and SVG, no script, no external asset):
the line and its reasons; a chart of the customer's monthly units in the family, with the
litigation thresholds of each month (2x and 3x the trailing 12-month average, the trailing 6-month
maximum), a control limit (trailing 12-month mean + 3 sd of the monthly units), the peers' range
(10th-90th percentile of the monthly units of customers of the same class of trade and state, or
class of trade when the state has fewer than MIN_PEERS) and the flagged order's month highlighted;
then the figures of the flagged month and the customer's recent lines in the family. All text from
the data is escaped.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from dataclasses import dataclass

import numpy as np
import polars as pl

from gateway.som.errors import SomError
from gateway.som.io import flag_values, native_view, read_orders

__all__ = ["DiligenceError", "MonthPoint", "Diligence", "diligence_data", "render_html", "diligence_page"]

MIN_PEERS = 5
RECENT_LINES = 12


class DiligenceError(SomError):
    """The line cannot be found or the table is not a scored history; `code` says which."""


@dataclass(frozen=True)
class MonthPoint:
    """One calendar month of the customer's history in the family, with its thresholds."""

    month: dt.date  # first day of the month
    units: float  # the customer's units in the family that month
    avg12: float | None  # trailing 12-month monthly average (months before this one)
    max6: float | None  # largest month of the trailing 6 months
    control_limit: float | None  # trailing 12-month mean + 3 sd
    peer_low: float | None  # peers' 10th percentile that month
    peer_median: float | None
    peer_high: float | None  # peers' 90th percentile


@dataclass(frozen=True)
class Diligence:
    """Everything the page shows."""

    line: dict  # the scored line, every column
    months: tuple[MonthPoint, ...]
    flagged_month: dt.date
    month_to_date: float  # the family's units in the line's month up to and including the line
    peer_group: str  # e.g. "RETAIL PHARMACY, WV (14 customers)"
    recent: tuple[dict, ...]  # the customer's last lines in the family up to the line

    @property
    def flagged_point(self) -> MonthPoint:
        return next(p for p in self.months if p.month == self.flagged_month)


def _month_start(d: dt.date) -> dt.date:
    return d.replace(day=1)


def _trailing(units: np.ndarray) -> tuple[list, list, list]:
    """avg12, max6 and control limit for each month from the months before it."""
    avg12, max6, ctrl = [], [], []
    for i in range(units.size):  # one customer's months: a few dozen at most
        prev12 = units[max(0, i - 12):i]
        prev6 = units[max(0, i - 6):i]
        avg12.append(float(prev12.mean()) if prev12.size else None)
        max6.append(float(prev6.max()) if prev6.size else None)
        ctrl.append(float(prev12.mean() + 3 * prev12.std(ddof=1)) if prev12.size >= 3 else None)
    return avg12, max6, ctrl


def _checked(lines: pl.DataFrame) -> pl.DataFrame:
    """The lines a page is drawn from, read as the scorer reads them (io.read_orders: dates,
    units, customer and family checked, with its codes; a CSV's text parsed) and `flag` as
    true/false, `score` as a number: a page must not draw a null, NaN or negative month, nor
    call a line written `false` held."""
    lines = read_orders(lines)
    if "flag" in lines.columns and lines.schema["flag"] != pl.Null:
        lines = lines.with_columns(flag_values(lines["flag"]))
    if "score" in lines.columns and lines.schema["score"] == pl.String:  # a scored CSV's text
        text = lines["score"].str.strip_chars()
        score = text.cast(pl.Float64, strict=False)
        bad = score.is_null() & text.is_not_null() & (text != "")
        if bad.any():
            raise DiligenceError("som_invalid_value", f"score: {int(bad.sum())} values that are not "
                                                      f"numbers (such as {lines['score'].filter(bad)[0]!r})")
        lines = lines.with_columns(score)
    return lines


def diligence_data(scored: pl.DataFrame | pl.LazyFrame, order_id: str, line: int) -> Diligence:
    """Collect the figures for one line of a scored history. A LazyFrame (a scan of a large file)
    is read twice with filters: for the line, then for the lines of its family."""
    lf = scored.lazy()
    if "BUYER_DEA_NO" in lf.collect_schema().names():  # scored ARCOS input keeps its columns
        lf = native_view(lf)
    schema = lf.collect_schema()
    needed = {"order_id", "line", "customer", "family", "date", "dosage_units"}
    missing = needed - set(schema.names())
    if missing:
        raise DiligenceError("som_missing_column", f"missing columns: {', '.join(sorted(missing))}")
    lf = lf.with_row_index("_row")
    hit = lf.filter((pl.col("order_id").cast(pl.String) == str(order_id)) & (pl.col("line") == line)).collect()
    if hit.height == 0:
        raise DiligenceError("som_line_not_found", f"no line {line} in order {order_id}")
    if hit.height > 1:  # a page for one of them would be a page for a line nobody can name
        raise DiligenceError("som_duplicate_line", f"{hit.height} lines numbered {line} in order "
                                                   f"{order_id}: the page is for one line")
    row = _checked(hit).row(0, named=True)
    customer, family, date = row["customer"], row["family"], row["date"]
    # the customer's and its peers' lines
    scored = _checked(lf.filter(pl.col("family").cast(pl.String) == family).collect())

    history = scored.filter(pl.col("customer") == customer)
    month = pl.col("date").dt.truncate("1mo")
    # Months of this customer from its first order in the family to the line's month (zeros kept).
    first = _month_start(history["date"].min())
    last = _month_start(date)
    calendar = pl.DataFrame({"month": pl.date_range(first, last, "1mo", eager=True)})
    own = history.filter(month <= last).group_by(month.alias("month")).agg(pl.col("dosage_units").sum().alias("units"))
    own = calendar.join(own, on="month", how="left").with_columns(pl.col("units").fill_null(0.0).cast(pl.Float64))
    units = own["units"].to_numpy()
    avg12, max6, ctrl = _trailing(units)

    # Peers: same class of trade and state (else class of trade), other customers, same family.
    ctype = row.get("customer_type")
    state = row.get("state")
    others = scored.filter((pl.col("family") == family) & (pl.col("customer") != customer))
    group = "all customers"
    if ctype is not None and "customer_type" in scored.columns:
        same_type = others.filter(pl.col("customer_type") == ctype)
        group = str(ctype)
        if state is not None and "state" in scored.columns:
            same_state = same_type.filter(pl.col("state") == state)
            if same_state["customer"].n_unique() >= MIN_PEERS:
                same_type, group = same_state, f"{ctype}, {state}"
        others = same_type
    n_peers = others["customer"].n_unique()
    peer_months = (others.filter((month >= first) & (month <= last))
                   .group_by("customer", month.alias("month")).agg(pl.col("dosage_units").sum().alias("u"))
                   .group_by("month").agg(lo=pl.col("u").quantile(0.1, "linear"),
                                          mid=pl.col("u").median(),
                                          hi=pl.col("u").quantile(0.9, "linear")))
    own = own.join(peer_months, on="month", how="left").sort("month")

    months = tuple(
        MonthPoint(m, float(u), a, x, c, lo, mid, hi)
        for (m, u, lo, mid, hi), a, x, c in zip(own.select("month", "units", "lo", "mid", "hi").iter_rows(),
                                              avg12, max6, ctrl)
    )
    upto = history.filter((pl.col("date") < date) | ((pl.col("date") == date) & (pl.col("_row") <= row["_row"])))
    mtd = float(upto.filter(month == last)["dosage_units"].sum())
    recent = upto.sort("date", "_row").tail(RECENT_LINES).drop("_row")
    line_data = {k: v for k, v in row.items() if k != "_row"}
    return Diligence(line_data, months, last, mtd, f"{group} ({n_peers} customers)",
                     tuple(recent.iter_rows(named=True)))


# --- rendering ---------------------------------------------------------------------------------

# Characters that are not text to show: C0/C1 controls (a NUL is an HTML parse error) and the
# Unicode bidirectional controls, which reorder what follows them on screen (a customer id with a
# right-to-left override reads as another id, "Trojan Source"). Shown as their code point.
_HIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f"
                     "\u202a-\u202e\u2066-\u2069]")


def _e(value: object) -> str:
    text = html.escape("" if value is None else str(value), quote=True)
    return _HIDDEN.sub(lambda m: f"[U+{ord(m.group(0)):04X}]", text)


def _n(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:,.0f}"


_COLORS = {
    "bar": "#8aa4c8", "flag": "#c0392b", "avg2": "#e67e22", "avg3": "#8e44ad", "max6": "#16a085",
    "ctrl": "#2c3e50", "peer": "#95a5a6", "line": "#7b241c",
}


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least `raw` (axis ticks people read at a glance)."""
    power = 10 ** np.floor(np.log10(max(raw, 1e-9)))
    for m in (1, 2, 5, 10):
        if m * power >= raw:
            return float(m * power)
    return float(10 * power)


def _chart(d: Diligence, width: int = 860, height: int = 340) -> str:
    """Inline SVG: monthly bars, threshold step lines, the peers' band, the flagged month."""
    left, right, top, bottom = 70, 150, 20, 40
    pw, ph = width - left - right, height - top - bottom
    pts = d.months
    n = len(pts)
    series = {
        "avg2": [None if p.avg12 is None else 2 * p.avg12 for p in pts],
        "avg3": [None if p.avg12 is None else 3 * p.avg12 for p in pts],
        "max6": [p.max6 for p in pts],
        "ctrl": [p.control_limit for p in pts],
    }
    values = [p.units for p in pts] + [v for s in series.values() for v in s if v is not None]
    values += [p.peer_high for p in pts if p.peer_high is not None]
    tick = _nice_step(max(values + [1.0]) / 5)
    top_value = max(max(values + [1.0]) * 1.05, tick)
    step = pw / max(n, 1)

    def x(i: float) -> float:
        return left + i * step

    def y(v: float) -> float:
        return top + ph - v / top_value * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="monthly units and thresholds">']
    # Axis and grid.
    for k in range(int(top_value // tick) + 1):
        v = k * tick
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + pw}" y2="{y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11">{_n(v)}</text>')
    # Peers' band (10th-90th percentile) and median.
    band = [(i, p) for i, p in enumerate(pts) if p.peer_low is not None and p.peer_high is not None]
    if band:
        upper = " ".join(f"{x(i):.1f},{y(p.peer_high):.1f} {x(i + 1):.1f},{y(p.peer_high):.1f}" for i, p in band)
        lower = " ".join(f"{x(i + 1):.1f},{y(p.peer_low):.1f} {x(i):.1f},{y(p.peer_low):.1f}"
                         for i, p in reversed(band))
        out.append(f'<polygon points="{upper} {lower}" fill="{_COLORS["peer"]}" fill-opacity="0.25" stroke="none"/>')
    # Bars.
    for i, p in enumerate(pts):
        flagged = p.month == d.flagged_month
        color = _COLORS["flag"] if flagged else _COLORS["bar"]
        h = p.units / top_value * ph
        out.append(f'<rect x="{x(i) + step * 0.15:.1f}" y="{y(p.units):.1f}" width="{step * 0.7:.1f}" '
                   f'height="{h:.1f}" fill="{color}"><title>{_e(p.month.strftime("%Y-%m"))}: '
                   f'{_n(p.units)} units</title></rect>')
        if flagged:
            # The flagged line's own units, as a darker cap on its month's bar.
            own = float(d.line.get("dosage_units") or 0.0)
            mtd_top = y(d.month_to_date)
            out.append(f'<rect x="{x(i) + step * 0.15:.1f}" y="{mtd_top:.1f}" width="{step * 0.7:.1f}" '
                       f'height="{own / top_value * ph:.1f}" fill="{_COLORS["line"]}"><title>this line: '
                       f'{_n(own)} units</title></rect>')
    # Threshold step lines.
    for key, vals in series.items():
        segs = [f"M{x(i):.1f},{y(v):.1f} H{x(i + 1):.1f}" for i, v in enumerate(vals) if v is not None]
        if segs:
            dash = ' stroke-dasharray="5,3"' if key in ("max6", "ctrl") else ""
            out.append(f'<path d="{" ".join(segs)}" fill="none" stroke="{_COLORS[key]}" stroke-width="2"{dash}/>')
    # Month labels: about a dozen.
    every = max(1, n // 12)
    for i, p in enumerate(pts):
        if i % every == 0 or p.month == d.flagged_month:
            out.append(f'<text x="{x(i + 0.5):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="10">'
                       f'{_e(p.month.strftime("%Y-%m"))}</text>')
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>')
    # Legend.
    legend = [("bar", "monthly units"), ("flag", "flagged month"), ("line", "the line"), ("avg2", "2x 12-month average"),
              ("avg3", "3x 12-month average"), ("max6", "6-month maximum"), ("ctrl", "control limit"),
              ("peer", "peers 10th-90th pct")]
    for k, (key, text) in enumerate(legend):
        ly = top + 10 + 18 * k
        out.append(f'<rect x="{left + pw + 12}" y="{ly - 9}" width="12" height="10" fill="{_COLORS[key]}"/>')
        out.append(f'<text x="{left + pw + 30}" y="{ly}" font-size="11">{_e(text)}</text>')
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1000px}
h1{font-size:20px;margin-bottom:4px} h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.flag{color:#c0392b;font-weight:600} .ok{color:#1e8449} .reasons li{margin:4px 0}
.note{color:#666;font-size:12px}
"""


def render_html(d: Diligence) -> str:
    """The page as a string (UTF-8 HTML5)."""
    ln = d.line
    p = d.flagged_point
    flag = bool(ln.get("flag"))
    reasons = [r.strip() for r in str(ln.get("reasons") or "").split(";") if r.strip()]
    score = ln.get("score")
    fields = [("Order", ln.get("order_id")), ("Line", ln.get("line")), ("Date", ln.get("date")),
              ("Customer (DEA)", ln.get("customer")), ("Class of trade", ln.get("customer_type")),
              ("State", ln.get("state")), ("Family", ln.get("family")), ("NDC", ln.get("ndc")),
              ("Dosage units", _n(float(ln["dosage_units"]))),
              ("Score", "-" if score is None else f"{float(score):.2f}"),
              ("Flag", "held: suspicious" if flag else "not flagged")]
    avg = p.avg12
    thresholds = [
        ("Units this month, to this line", d.month_to_date, None),
        ("Trailing 12-month average", avg, None),
        ("2x the average (method 2)", None if avg is None else 2 * avg, "avg2"),
        ("3x the average (method 3)", None if avg is None else 3 * avg, "avg3"),
        ("Trailing 6-month maximum (method 1)", p.max6, "max6"),
        ("Control limit (12-month mean + 3 sd)", p.control_limit, "ctrl"),
        ("Monthly cap (method 4)", 8000.0, "cap"),
        ("Peers: 10th percentile", p.peer_low, None),
        ("Peers: median", p.peer_median, None),
        ("Peers: 90th percentile", p.peer_high, None),
    ]
    rows = []
    for name, value, _key in thresholds:
        over = value is not None and _key is not None and d.month_to_date > value
        mark = ' <span class="flag">exceeded</span>' if over else ""
        rows.append(f"<tr><th>{_e(name)}</th><td class=\"num\">{_n(value)}</td><td>{mark}</td></tr>")
    recent_cols = [c for c in ("date", "order_id", "line", "ndc", "dosage_units", "score", "flag")
                   if d.recent and c in d.recent[0]]
    recent_rows = []
    for r in d.recent:
        cells = []
        for c in recent_cols:
            v = r[c]
            if c == "dosage_units":
                cells.append(f'<td class="num">{_n(float(v))}</td>')
            elif c == "score" and v is not None:
                cells.append(f'<td class="num">{float(v):.2f}</td>')
            else:
                cells.append(f"<td>{_e(v)}</td>")
        recent_rows.append("<tr>" + "".join(cells) + "</tr>")
    title = f"Due diligence: order {ln.get('order_id')} line {ln.get('line')}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="{"flag" if flag else "ok"}">{_e(ln.get("family"))} for {_e(ln.get("customer"))}: '
        f'{"held as suspicious (21 CFR 1301.74(b))" if flag else "not flagged"}</p>',
        "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in fields) + "</table>",
        "<h2>Reasons</h2>",
        ('<ul class="reasons">' + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>") if reasons
        else "<p>No finding.</p>",
        f"<h2>Monthly units of {_e(ln.get('family'))} ({_e(d.months[0].month.strftime('%Y-%m'))} to "
        f"{_e(d.flagged_month.strftime('%Y-%m'))})</h2>",
        _chart(d),
        f'<p class="note">Peers: {_e(d.peer_group)}. Thresholds of a month come from the months before it.</p>',
        f"<h2>The month of the line ({_e(d.flagged_month.strftime('%Y-%m'))})</h2>",
        "<table>" + "".join(rows) + "</table>",
        f"<h2>Recent lines of {_e(ln.get('family'))}</h2>",
        "<table><tr>" + "".join(f"<th>{_e(c)}</th>" for c in recent_cols) + "</tr>" + "".join(recent_rows) + "</table>",
        '<p class="note">A held order may ship only once due diligence dispels the suspicion; otherwise '
        "decline it and report it to DEA.</p>",
        "</body></html>",
    ])


def diligence_page(scored: pl.DataFrame, order_id: str, line: int) -> str:
    """The due-diligence page for one line of a scored history."""
    return render_html(diligence_data(scored, order_id, line))
