"""How well a scorer finds the labelled anomalies of a history: precision, recall and ROC AUC,
overall and by anomaly kind, with the litigation rule sets (domain.md §6) measured on the same
lines for comparison.

Definitions (one line is one unit):
- overall: positives are the labelled lines, negatives the others; precision = flagged positives /
  flagged lines; recall = flagged positives / positives; ROC AUC of the score.
- by kind: positives are the lines of that kind, negatives the unlabelled lines (lines of other
  kinds are left out), so precision for a kind = its flagged lines / (those + flagged negatives).
- benign events (when `anomaly_detail` names them, as the synthetic history does): the share of
  their lines flagged, i.e. the false-positive rate on events a naive rule mistakes for anomalies.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import polars as pl

from gateway.som import io as som_io
from gateway.som.errors import SomError

# What the rule sets read, in either shape: a customer's units per family and date.
RULE_SET_COLUMNS = som_io.columns_for("customer", "family", "date", "dosage_units")

__all__ = ["EvaluationError", "Metrics", "MethodResult", "EvaluationReport", "roc_auc", "metrics",
           "evaluate"]

SCORER = "scorer"
BENIGN_EVENTS = ("restock", "benign_new_family")


class EvaluationError(SomError):
    """The table cannot be evaluated (no labels, no score); `code` says why."""


def _clean(scores: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(scores), -np.inf, scores)


def _auc(negatives_sorted: np.ndarray, positives: np.ndarray) -> float | None:
    """Mann-Whitney U / (P N): for each positive, the negatives below it, ties counting half.
    None without positives or negatives, and when no line has a score (all missing, ranked
    -inf): every pair would tie, and 0.5 would report a ranking nobody made."""
    if positives.size == 0 or negatives_sorted.size == 0:
        return None
    if negatives_sorted[-1] == -np.inf and not (positives > -np.inf).any():
        return None
    below = np.searchsorted(negatives_sorted, positives, side="left")
    up_to = np.searchsorted(negatives_sorted, positives, side="right")
    twice_u = int((2 * below + (up_to - below)).sum())  # integers: exact on any size
    return twice_u / (2.0 * positives.size * negatives_sorted.size)


def roc_auc(scores: Any, labels: Any) -> float | None:
    """Area under the ROC curve by ranks (Mann-Whitney U), ties counted as half.

    Missing scores (NaN) rank lowest. None when there are no positives or no negatives, or no
    score at all.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError("scores and labels differ in length")
    s = _clean(s)
    return _auc(np.sort(s[~y]), s[y])


@dataclass(frozen=True)
class Metrics:
    """Detection figures for one set of positives against the negatives."""

    name: str  # "overall", an anomaly kind, or "kind/variant"
    positives: int
    negatives: int
    true_positives: int  # flagged positives
    false_positives: int  # flagged negatives
    precision: float | None  # None when nothing is flagged
    recall: float | None  # None without positives
    roc_auc: float | None


def metrics(name: str, score: np.ndarray, flag: np.ndarray, positive: np.ndarray,
            negative: np.ndarray, negatives_sorted: np.ndarray | None = None) -> Metrics:
    """Figures for the lines where `positive` or `negative` holds (disjoint masks).
    `negatives_sorted`: the negatives' scores, NaN as -inf, sorted (to share one sort)."""
    tp = int((flag & positive).sum())
    fp = int((flag & negative).sum())
    n_pos = int(positive.sum())
    if negatives_sorted is None:
        negatives_sorted = np.sort(_clean(score[negative]))
    return Metrics(
        name=name,
        positives=n_pos,
        negatives=int(negative.sum()),
        true_positives=tp,
        false_positives=fp,
        precision=tp / (tp + fp) if tp + fp else None,
        recall=tp / n_pos if n_pos else None,
        roc_auc=_auc(negatives_sorted, _clean(score[positive])),
    )


@dataclass(frozen=True)
class MethodResult:
    """One method (the scorer or a rule set) on the history."""

    method: str
    flagged: int
    overall: Metrics
    by_kind: tuple[Metrics, ...]
    by_variant: tuple[Metrics, ...] = ()  # pattern variants, when anomaly_detail names them
    benign_flag_rate: dict[str, float] = field(default_factory=dict)

    def kind(self, name: str) -> Metrics:
        for m in (self.overall, *self.by_kind, *self.by_variant):
            if m.name == name:
                return m
        raise KeyError(name)


@dataclass(frozen=True)
class EvaluationReport:
    lines: int
    labelled: int
    results: tuple[MethodResult, ...]  # the scorer first, then the rule sets

    def method(self, name: str) -> MethodResult:
        for r in self.results:
            if r.method == name:
                return r
        raise KeyError(name)

    @property
    def scorer(self) -> MethodResult:
        return self.results[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """A plain-text table: one row per method and kind. `lines`: positives of the row; `found`:
        flagged positives; `flagged`: flagged lines counted in its precision."""
        head = ("method", "kind", "lines", "found", "flagged", "precision", "recall", "ROC AUC")
        rows = [head]
        for r in self.results:
            for m in (r.overall, *r.by_kind, *r.by_variant):
                flagged = r.flagged if m is r.overall else m.true_positives + m.false_positives
                rows.append((r.method if m is r.overall else "", m.name, f"{m.positives:,}",
                             f"{m.true_positives:,}", f"{flagged:,}", _pct(m.precision), _pct(m.recall),
                             _num(m.roc_auc)))
            for event, rate in r.benign_flag_rate.items():
                rows.append(("", f"benign {event}", "", "", f"{_pct(rate)} of lines", "", "", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [f"{self.lines:,} lines, {self.labelled:,} labelled",
                 "  ".join(h.ljust(w) for h, w in zip(head, widths)),
                 "  ".join("-" * w for w in widths)]
        for row in rows[1:]:
            if row[0] and len(lines) > 3:
                lines.append("")
            lines.append("  ".join(c.rjust(w) if i >= 2 else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


@dataclass(frozen=True)
class _Groups:
    """The line sets every method is measured on, computed once."""

    label: np.ndarray
    kinds: tuple[tuple[str, np.ndarray], ...]  # (kind, its lines)
    variants: tuple[tuple[str, np.ndarray], ...]  # ("kind/variant", its lines)
    benign: tuple[tuple[str, np.ndarray], ...]  # (benign event, its unlabelled lines)


def _yes_no(s: pl.Series) -> pl.Series:
    """A yes/no column (label, flag) as Boolean: as io.flag_values reads one (true/false, 1/0,
    1.0/0.0, yes/no... in text), or all nulls; som_invalid_value else."""
    if s.dtype == pl.Null:
        return s.cast(pl.Boolean)
    return som_io.flag_values(s, "som_invalid_value")


def _text(s: pl.Series) -> pl.Series:
    """A column of names (anomaly kinds, details) as text, "" for none; som_invalid_value for
    one that has no text (a list, a struct)."""
    try:
        return s.cast(pl.String).fill_null("")
    except pl.exceptions.PolarsError:
        raise EvaluationError("som_invalid_value", f"{s.name}: a column of type {s.dtype}, expected "
                                                   "names") from None


def _groups(scored: pl.DataFrame, label_col: str, anomaly_col: str) -> _Groups:
    label_s = _yes_no(scored[label_col]).fill_null(False)
    label = label_s.to_numpy()
    if anomaly_col in scored.columns:
        anomaly = _text(scored[anomaly_col])
    else:
        anomaly = pl.Series([""] * scored.height, dtype=pl.String)
    # Every labelled line has a kind; one without is counted under "unspecified".
    anomaly = pl.select(pl.when(label_s & (anomaly == "")).then(pl.lit("unspecified")).otherwise(anomaly)).to_series()
    detail = _text(scored["anomaly_detail"]) if "anomaly_detail" in scored.columns else None
    kinds, variants, benign = [], [], []
    for k in sorted(set(anomaly.filter(label_s).unique().to_list()) - {""}):
        is_k = (anomaly == k).to_numpy() & label
        kinds.append((k, is_k))
        if detail is not None:
            for v in sorted(set(detail.filter(label_s & (anomaly == k)).unique().to_list()) - {""}):
                variants.append((f"{k}/{v}", is_k & (detail == v).to_numpy()))
    if detail is not None:
        for event in BENIGN_EVENTS:
            mask = (detail == event).to_numpy() & ~label
            if mask.any():
                benign.append((event, mask))
    return _Groups(label, tuple(kinds), tuple(variants), tuple(benign))


def _method(method: str, score: np.ndarray, flag: np.ndarray, g: _Groups) -> MethodResult:
    negative = ~g.label
    neg = np.sort(_clean(score[negative]))  # one sort serves every AUC of the method
    overall = metrics("overall", score, flag, g.label, negative, neg)
    by_kind = tuple(metrics(k, score, flag, mask, negative, neg) for k, mask in g.kinds)
    by_variant = tuple(metrics(v, score, flag, mask, negative, neg) for v, mask in g.variants)
    benign = {event: float(flag[mask].mean()) for event, mask in g.benign}
    return MethodResult(method, int(flag.sum()), overall, by_kind, by_variant, benign)


def _arrays(scored: pl.DataFrame, score_col: str, flag_col: str) -> tuple[np.ndarray, np.ndarray]:
    for col in (score_col, flag_col):
        if col not in scored.columns:
            raise EvaluationError("som_not_scored", f"no {col!r} column: score the history first")
    column = scored[score_col]
    if not (column.dtype.is_numeric() or column.dtype == pl.Null):
        try:  # numbers written as text (a CSV's), strictly: `abc` is not a missing score
            column = column.cast(pl.String).str.strip_chars().cast(pl.Float64)
        except pl.exceptions.PolarsError:
            raise EvaluationError("som_invalid_value", f"{score_col}: a column of type {column.dtype} with "
                                                       "values that are not numbers") from None
    score = column.cast(pl.Float64).fill_null(float("nan")).to_numpy()
    flag = _yes_no(scored[flag_col]).fill_null(False).to_numpy()
    return score, flag


def evaluate(scored: pl.DataFrame, score_col: str = "score", flag_col: str = "flag", *,
             rule_sets: bool | Iterable[str] = True, label_col: str = "label",
             anomaly_col: str = "anomaly") -> EvaluationReport:
    """Evaluate a scored, labelled table; with `rule_sets` (True: all of rules.RULE_SETS, or
    names), also the litigation rule sets on the same lines."""
    if label_col not in scored.columns:
        raise EvaluationError("som_no_labels", f"no {label_col!r} column: nothing to evaluate against")
    groups = _groups(scored, label_col, anomaly_col)
    score, flag = _arrays(scored, score_col, flag_col)
    results = [_method(SCORER, score, flag, groups)]
    if rule_sets:
        from gateway.som import rules

        names = list(rules.RULE_SETS) if rule_sets is True else list(rule_sets)
        # The rule sets read a customer's units per family and date: nothing else is carried.
        native = scored.select([c for c in RULE_SET_COLUMNS if c in scored.columns])
        judged = rules.apply_all(native) if rule_sets is True else {
            name: rules.apply_rule_set(name, native) for name in names}
        for name in names:
            rs, rf = _arrays(judged[name], "score", "flag")
            results.append(_method(name, rs, rf, groups))
    return EvaluationReport(lines=scored.height, labelled=int(groups.label.sum()), results=tuple(results))
