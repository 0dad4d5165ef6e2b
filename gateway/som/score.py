"""Batch scoring of order lines (21 CFR 1301.74(b): orders of unusual size, orders deviating
substantially from a normal pattern, orders of unusual frequency).

`score_orders` keeps the input columns in their order and adds `score` (the largest severity:
a feature divided by its threshold; higher is more suspicious), `flag` (some severity reached 1)
and `reasons` (one clause per finding, with its numbers; empty when not flagged). Reasons are
built only for flagged lines, by a Numba renderer of the templates.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import polars as pl

from gateway.som import kernels, peers as peers_mod
from gateway.som.config import SomConfig
from gateway.som.io import read_orders

K = kernels


def config_vector(config: SomConfig) -> np.ndarray:
    return np.array([float(getattr(config, name)) for name in K.CONFIG_FIELDS], np.float64)


@dataclass(frozen=True)
class LineScore:
    """The verdict on one line."""

    score: float  # largest severity; >= 1 means flagged
    flag: bool
    reasons: str  # "; "-separated clauses with their numbers, empty when not flagged
    findings: tuple[str, ...]  # names of the findings (keys of kernels.REASON_BITS)
    features: dict[str, float]  # the feature values (NaN where not judged)


# --- reasons -----------------------------------------------------------------------------------
# One template per finding. Numbers: "i" integer with thousands separators, "r" one decimal,
# "p" percent. The Python and the Numba renderings are kept identical (tests check it).

TEMPLATES: tuple[tuple[int, tuple], ...] = (
    (K.R_CAP, ("{fam}: ", ("i", K.F_MTD), " units this month exceed the monthly cap of ",
               ("cap",), " (largest month of the trailing 12: ", ("i", K.F_MAXM12), ")")),
    (K.R_SIZE, ("{fam}: ", ("i", K.F_UNITS), " units = ", ("r", K.F_SIZE),
                "x the trailing 12-month average order of ", ("i", K.F_MEAN12), "")),
    (K.R_MAX6, ("{fam}: ", ("i", K.F_UNITS), " units = ", ("r", K.F_MAX6),
                "x the largest order of the trailing 6 months (", ("i", K.F_MAX6L), ")")),
    (K.R_CONTROL, ("{fam}: ", ("i", K.F_UNITS), " units above the customer's control limit of ",
                   ("i", K.F_CLIMIT), " (", ("r", K.F_CZ), " sd)")),
    (K.R_MONTH, ("{fam}: ", ("i", K.F_MTD), " units this month = ", ("r", K.F_MONTH),
                 "x the trailing 12-month monthly average of ", ("i", K.F_AVG12), "")),
    (K.R_PEER, ("{fam}: ", ("i", K.F_UNITS), " units above the peer limit of ",
                ("i", K.F_PEER_LIM), " ({peer}; typical order ", ("i", K.F_PEER_TYP), ")")),
    (K.R_PEER_MONTH, ("{fam}: ", ("i", K.F_MTD), " units this month above the peer limit of ",
                      ("i", K.F_PEER_MLIM), " ({peer}; typical month ", ("i", K.F_PEER_MTYP),
                      ")")),
    (K.R_FREQ, ("{fam}: ", ("i", K.F_N30), " order days in the last 30 days = ",
                ("r", K.F_FREQ), "x the usual ", ("r", K.F_USUAL_N),
                # the ratio divides by at least 1 (4 days against a usual 0.5 is 4.0x, not 8.0x)
                " a month (counted as 1 when fewer)")),
    (K.R_INTERVAL, ("{fam}: interval between orders shrank to ", ("r", K.F_RECENT_GAP),
                    " days from a usual ", ("r", K.F_USUAL_GAP), "")),
    (K.R_NEW_FAMILY, ("{fam}: new family after ", ("i", K.F_TENURE),
                      " days as a customer, ordered by ", ("p", K.F_NEWFAM), " of peers")),
    (K.R_MIX, ("{fam}: ", ("p", K.F_SHARE30), " of the customer's units in the last 30 days against ",
               ("p", K.F_SHARE12), " over the trailing months")),
    (K.R_SUSTAINED, ("{fam}: the last order days average ", ("i", K.F_RECENT_DAY),
                     " units (the largest left out) = ", ("r", K.F_SUST),
                     "x the usual order day of ", ("i", K.F_USUAL_DAY), "")),
    (K.R_CONTROLLED, ("controlled share of the customer's units ", ("p", K.F_CTRL30),
                      " in the last 30 days against ", ("p", K.F_CTRL12),
                      " over the trailing 12 months")),
)


def _r_int(x: float) -> int:
    return int(math.floor(x + 0.5))


def _scaled(x: float, scale: int) -> int | str:
    """x * scale rounded half up to an integer, as `_r_int(x * scale)`; a number that is not
    finite comes back as its text ("inf", "-inf", "nan"), and a finite x whose product overflows
    a float is rounded exactly instead. The Numba renderer (kernels.render_reasons) leaves every
    such line to this one."""
    x = float(x)  # a Python float: an overflowing product is inf, without NumPy's warning
    y = x * scale
    if math.isfinite(y):
        return _r_int(y)
    if math.isfinite(x):
        return math.floor(Fraction(x) * scale + Fraction(1, 2))
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _fmt(kind: str, x: float, cap: float) -> str:
    if kind == "i" or kind == "cap":
        x = float(cap if kind == "cap" else x)
        # Under half a unit gets its decimal rather than 0: fractional dosage units (0.4 a
        # line) were quoted as "2 units = 6.0x the trailing 12-month average order of 0".
        if 0.0 < x < 0.5:
            kind = "r"
        else:
            t = _scaled(x, 1)
            return t if isinstance(t, str) else f"{t:,}"
    if kind == "r":
        t = _scaled(x, 10)
        if isinstance(t, str):
            return t
        sign = "-" if t < 0 else ""
        t = abs(t)
        return f"{sign}{t // 10:,}.{t % 10}"
    t = _scaled(x, 100)  # "p"
    return f"{t}%"


def _peer_label(ctype: str, state: str) -> str:
    parts = [p for p in (ctype, state) if p and p != peers_mod.ALL]
    return "peers: " + (", ".join(parts) if parts else "all customers")


def reasons_text(bits: int, feat: np.ndarray, family: str, peer: tuple[str, str],
                 cap: float) -> str:
    """Reasons of one line (the Python rendering, for the incremental scorer)."""
    return _reasons_text(bits, feat, family, _peer_label(*peer), cap)


_PLACEHOLDER = re.compile(r"\{(?:fam|peer)\}")


def _reasons_text(bits: int, feat: np.ndarray, family: str, label: str, cap: float) -> str:
    out = []
    values = {"{fam}": family, "{peer}": label}
    for bit, parts in TEMPLATES:
        if not bits & bit:
            continue
        s = []
        for part in parts:
            if isinstance(part, str):
                # one pass over the template: a family name or label holding "{peer}" or "{fam}"
                # is put in as it is, never scanned again (as kernels.render_reasons does)
                s.append(_PLACEHOLDER.sub(lambda m: values[m.group(0)], part))
            else:
                s.append(_fmt(part[0], feat[part[1]] if len(part) > 1 else 0.0, cap))
        out.append("".join(s))
    return "; ".join(out)


@functools.lru_cache(maxsize=8)
def _program(cap: float) -> tuple[np.ndarray, ...]:
    """TEMPLATES as the program kernels.render_reasons runs: each template's bit, where its ops
    start, the ops and their arguments, and the literal texts (UTF-8) with their offsets. The
    cap, a constant, becomes a literal."""
    literals: list[bytes] = []
    tbit, tstart, ops, args = [], [0], [], []

    def text(t: str) -> None:
        if t:
            ops.append(K.OP_TEXT)
            args.append(len(literals))
            literals.append(t.encode())

    kinds = {"i": K.OP_INT, "r": K.OP_ONE, "p": K.OP_PCT}
    for bit, parts in TEMPLATES:
        for part in parts:
            if isinstance(part, str):
                for j, chunk in enumerate(part.split("{fam}")):
                    if j:
                        ops.append(K.OP_FAM)
                        args.append(0)
                    for m, sub in enumerate(chunk.split("{peer}")):
                        if m:
                            ops.append(K.OP_PEER)
                            args.append(0)
                        text(sub)
            elif part[0] == "cap":
                text(_fmt("cap", 0.0, cap))
            else:
                ops.append(kinds[part[0]])
                args.append(part[1])
        tbit.append(bit)
        tstart.append(len(ops))
    lit_text, lit_off = _texts(literals)
    return (np.array(tbit, np.int64), np.array(tstart, np.int64), np.array(ops, np.int64),
            np.array(args, np.int64), lit_text, lit_off)


def _texts(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings as one uint8 array and the offsets that cut it."""
    off = np.zeros(len(items) + 1, np.int64)
    np.cumsum([len(t) for t in items], out=off[1:])
    return np.frombuffer(b"".join(items), np.uint8).copy(), off


def reasons_coded(bits: np.ndarray, feats: np.ndarray, family: np.ndarray, families: list[str],
                  peer: np.ndarray, peer_labels: list[str], cap: float) -> pl.Series:
    """Reasons of many flagged lines at once: family and peer label given as codes into
    `families` and `peer_labels`. Rendered by kernels.render_reasons (same text as
    `reasons_text`, which renders the rare line with a number it cannot)."""
    fam_text, fam_off = _texts([f.encode() for f in families] or [b""])
    peer_text, peer_off = _texts([p.encode() for p in peer_labels] or [b""])
    out, off, odd = K.render_reasons(
        np.asarray(bits, np.int64), np.ascontiguousarray(feats, np.float64),
        np.asarray(family, np.int64), fam_text, fam_off, np.asarray(peer, np.int64), peer_text,
        peer_off, *_program(float(cap)))
    import pyarrow as pa  # the texts go to Polars as one Arrow array, without Python strings

    arr = pa.LargeStringArray.from_buffers(len(off) - 1, pa.py_buffer(off), pa.py_buffer(out))
    text = pl.Series("reasons", arr, pl.String)
    for j in np.flatnonzero(odd):
        text[int(j)] = _reasons_text(int(bits[j]), feats[j], families[family[j]],
                                     peer_labels[peer[j]], cap)
    return text


def reasons_frame(bits: np.ndarray, feats: np.ndarray, family: pl.Series, peer_label: pl.Series,
                  cap: float) -> pl.Series:
    """Reasons of many flagged lines at once (the vectorised rendering): family and peer label
    per line as text Series."""
    fam, families = _coded(family)
    peer, labels = _coded(peer_label)
    return reasons_coded(bits, feats, fam, families, peer, labels, cap)


def _coded(s: pl.Series) -> tuple[np.ndarray, list[str]]:
    """Codes of a text Series into its distinct values (in order of first appearance)."""
    if not len(s):
        return np.zeros(0, np.int64), []
    codes, first = K.dense_codes(s.cast(pl.String).hash(seed=0).to_numpy())
    return codes, s.cast(pl.String).gather(first).to_list()


# --- scoring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    score: np.ndarray
    flag: np.ndarray
    bits: np.ndarray
    features: np.ndarray  # n x NF, or 0 x NF
    flagged: np.ndarray  # positions of flagged lines
    flagged_features: np.ndarray
    prepared: peers_mod.Prepared
    peer_matrix: np.ndarray
    peer_labels: list[tuple[str, str]]


def score_arrays(df: pl.DataFrame, config: SomConfig = SomConfig(),
                 peers: pl.DataFrame | None = None, *, keep_features: bool = False
                 ) -> BatchResult:
    """The numeric part of scoring (no text): for benchmarks and for callers that want arrays."""
    return score_prepared(peers_mod.prepare(df), config, peers, keep_features=keep_features)


def score_prepared(p: peers_mod.Prepared, config: SomConfig = SomConfig(),
                   peers: pl.DataFrame | None = None, *, keep_features: bool = False
                   ) -> BatchResult:
    """`score_arrays` from lines already coded and ordered (`peers.prepare`)."""
    if peers is None:
        peers = peers_mod.peer_reference_prepared(p)
    matrix, vectors, labels = peers_mod.peer_matrix(peers, p.cells, p.families,
                                                    config.min_peer_customers)
    cfg = config_vector(config)
    n = p.n
    score = np.empty(n)
    bits = np.empty(n, np.int32)
    feats = np.empty((n if keep_features else 0, K.NF))
    s_c, s_f, s_day, s_u, s_ctl, s_lu = p.sorted
    parts = peers_mod.run_threads(K.score_range, [
        (s_c, s_f, s_day, s_u, s_ctl, s_lu, lo, hi, p.perm, max(len(p.families), 1), p.cust_ts,
         matrix, vectors, cfg, keep_features, score, bits, feats, peers_mod.log1p_table(),
         max(1024, (hi - lo) // 32))
        for lo, hi in p.chunks])  # room for ~3% flagged lines (about 1% usually are)
    if len(parts) == 1:
        fpos, ffeat = parts[0]
    else:
        fpos = np.concatenate([q[0] for q in parts])
        ffeat = np.concatenate([q[1] for q in parts])
    return BatchResult(score, bits != 0, bits, feats, fpos, ffeat, p, matrix, labels)


def score_orders(df: pl.DataFrame, config: SomConfig = SomConfig(),
                 peers: pl.DataFrame | None = None, *, keep_features: bool = False
                 ) -> pl.DataFrame:
    """Score order lines (native or ARCOS shape). `peers`: a fixed peer reference (from
    `peer_reference`), else one is built from `df`. Returns the input columns, then score, flag,
    reasons and, with keep_features, one column per feature of kernels.FEATURES."""
    df = read_orders(df)
    return assemble(df, score_arrays(df, config, peers, keep_features=keep_features), config,
                    keep_features=keep_features)


def assemble(df: pl.DataFrame, r: BatchResult, config: SomConfig = SomConfig(), *,
             keep_features: bool = False) -> pl.DataFrame:
    """The output table of `score_orders`: `df`'s columns, score, flag, reasons (built for the
    flagged lines only), and with keep_features the features."""
    n = df.height
    reasons = pl.Series("reasons", [""], pl.String).new_from_index(0, n) if n else pl.Series(
        "reasons", [], pl.String)
    if len(r.flagged):
        p = r.prepared
        fam = p.fcode[r.flagged]
        rows = r.peer_matrix[p.cust_ts[p.ccode[r.flagged]], fam]
        labels = [_peer_label(*lab) for lab in r.peer_labels] or [""]
        text = reasons_coded(r.bits[r.flagged], r.flagged_features, fam, p.families,
                             np.maximum(rows, 0), labels, config.monthly_cap)
        reasons = reasons.scatter(r.flagged, text)
    out = df.with_columns(pl.Series("score", r.score), pl.Series("flag", r.flag), reasons)
    if keep_features:
        out = out.with_columns(pl.Series(name, r.features[:, k])
                               for k, name in enumerate(K.FEATURES))
        out = out.with_columns(pl.Series("findings", r.bits))
    return out


def findings_of(bits: int) -> tuple[str, ...]:
    return tuple(name for name, bit in K.REASON_BITS.items() if bits & bit)


def kinds_of(bits: int) -> tuple[str, ...]:
    """The anomaly kinds (size, frequency, pattern, cap) behind a set of findings."""
    return tuple(kind for kind, mask in K.KIND_BITS.items() if bits & mask)


def score_file(source: str, output: str, config: SomConfig = SomConfig()) -> int:
    """Parquet/CSV in, Parquet/CSV out with the input columns kept; returns flagged lines."""
    from gateway.som.io import read_table, write_like_input

    raw = read_table(source)
    scored = score_orders(raw, config)
    write_like_input(scored, raw, output)
    return int(scored["flag"].sum())


def main(argv: list[str] | None = None) -> int:
    """The lean whole command, IN OUT (the `gateway som score` CLI adds a progress bar)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: IN OUT", file=sys.stderr)
        return 2
    score_file(args[0], args[1])
    return 0
