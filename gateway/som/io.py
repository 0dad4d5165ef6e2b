"""Reading order histories (Parquet or CSV; the native shape or the ARCOS shape) and writing scores.

Native columns: order_id, line, customer, customer_type, state, family, ndc, date, dosage_units,
controlled (customer_type, state, ndc, controlled optional). ARCOS (the public DEA transaction
data as released by the Washington Post) is recognised by BUYER_DEA_NO and renamed to the native
names; columns neither shape knows are kept as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from gateway.som.errors import SomError

REQUIRED = ("customer", "family", "date", "dosage_units")
OPTIONAL_TEXT = ("customer_type", "state", "ndc", "order_id")

ARCOS_NAMES = {
    "BUYER_DEA_NO": "customer",
    "BUYER_BUS_ACT": "customer_type",
    "BUYER_STATE": "state",
    "NDC_NO": "ndc",
    "DOSAGE_UNIT": "dosage_units",
    "TRANSACTION_DATE": "date",
    "TRANSACTION_ID": "order_id",
}


MAX_DOSAGE_UNITS = 1e12
"""The most dosage units one order line may carry: a line above it (a trillion tablets) is a
data error, not an order, and read_orders refuses it like a negative number of units. The bound
also keeps every sum the scorer makes finite: month-to-date and trailing totals of lines of at
most 1e12 units cannot overflow a float, where two lines of 1e308 in one month could (an
infinite total has no meaning to score or to quote in a reason)."""


class SomInputError(SomError):
    """An order history the scorer cannot use; `code` says why."""


def detect_shape(columns: list[str]) -> str:
    """'native' or 'arcos' from the column names."""
    cols = set(columns)
    if "BUYER_DEA_NO" in cols:
        return "arcos"
    if {"customer", "family", "date", "dosage_units"} <= cols:
        return "native"
    raise SomInputError("som_unknown_format",
                        "neither the native SOM columns (customer, family, date, dosage_units) "
                        "nor the ARCOS columns (BUYER_DEA_NO, DRUG_NAME, TRANSACTION_DATE, "
                        "DOSAGE_UNIT) are present")


def _scan(path: Path) -> pl.LazyFrame:
    suffix = path.suffix.lower()
    if not path.exists():
        raise SomInputError("som_file_not_found", f"{path}: no such file")
    if suffix in (".parquet", ".pq"):
        return pl.scan_parquet(path)
    if suffix in (".csv", ".txt", ".tsv"):
        sep = "\t" if suffix in (".tsv", ".txt") and _looks_tab(path) else ","
        # ARCOS dates (MMDDYYYY) and identifiers must stay text: no inference for those columns.
        overrides = {"TRANSACTION_DATE": pl.String, "NDC_NO": pl.String,
                     "TRANSACTION_ID": pl.String, "order_id": pl.String, "ndc": pl.String,
                     "customer": pl.String, "BUYER_DEA_NO": pl.String}
        head = pl.read_csv(path, separator=sep, n_rows=0)
        return pl.scan_csv(path, separator=sep,
                           schema_overrides={k: v for k, v in overrides.items() if k in head.columns})
    raise SomInputError("som_unknown_format", f"{path}: expected .parquet or .csv")


def _looks_tab(path: Path) -> bool:
    with open(path, "rb") as fh:
        return b"\t" in fh.readline()


def _to_native(lf: pl.LazyFrame, columns: list[str]) -> tuple[pl.LazyFrame, list[str]]:
    shape = detect_shape(columns)
    if shape == "native":
        out = lf
        schema_cols = columns
    else:
        family = "DRUG_NAME" if "DRUG_NAME" in columns else "DRUG_CODE"
        if family not in columns:
            raise SomInputError("som_missing_column", "ARCOS input without DRUG_NAME or DRUG_CODE")
        for col in ("DOSAGE_UNIT", "TRANSACTION_DATE"):
            if col not in columns:
                raise SomInputError("som_missing_column", f"ARCOS input without {col}")
        names = _arcos_renames(columns)
        out = lf.rename(names)
        schema_cols = [names.get(c, c) for c in columns]
        # MMDDYYYY, possibly read as a number that lost its leading zero. TRANSACTION_DATE itself
        # stays as it was written, for the output (to_input_shape).
        out = out.with_columns(
            pl.col("TRANSACTION_DATE").cast(pl.String).str.zfill(8)
            .str.strptime(pl.Date, "%m%d%Y", strict=False).alias("date"))
        schema_cols.append("date")
        if "line" not in schema_cols:
            out = out.with_columns(pl.lit(1, pl.Int32).alias("line"))
            schema_cols.append("line")
    return out, schema_cols


# ARCOS has two columns a family can come from (DRUG_NAME, else DRUG_CODE).
_ARCOS_SOURCES = {**{native: (arcos,) for arcos, native in ARCOS_NAMES.items()},
                  "family": ("DRUG_NAME", "DRUG_CODE")}


def columns_for(*native: str) -> tuple[str, ...]:
    """The columns to read, in either shape, for a use of these native columns: each native name
    and the ARCOS columns it comes from (a projection that serves both shapes)."""
    return tuple(dict.fromkeys(c for name in native for c in (name, *_ARCOS_SOURCES.get(name, ()))))


def _arcos_renames(columns: list[str]) -> dict[str, str]:
    """ARCOS column -> native column, for the columns present (TRANSACTION_DATE is parsed into
    `date` instead, and kept)."""
    names = {k: v for k, v in ARCOS_NAMES.items() if k in columns and k != "TRANSACTION_DATE"}
    names["DRUG_NAME" if "DRUG_NAME" in columns else "DRUG_CODE"] = "family"
    return names


def native_view(lf: pl.LazyFrame) -> pl.LazyFrame:
    """A table in either shape (a scored output included) with the native column names."""
    return _to_native(lf, lf.collect_schema().names())[0]


def to_input_shape(scored: pl.DataFrame, input_columns: list[str]) -> pl.DataFrame:
    """A scored table in the shape of its input: for ARCOS input, the input's own columns (names,
    TRANSACTION_DATE as written, no added `line`) in their order, then what scoring added; the
    native shape is already its own."""
    if not input_columns or detect_shape(input_columns) != "arcos":
        return scored
    back = {native: arcos for arcos, native in _arcos_renames(input_columns).items()}
    out = scored.rename({k: v for k, v in back.items() if k in scored.columns})
    added = [c for c in out.columns
             if c not in input_columns and c != "date" and not (c == "line" and "line" not in input_columns)]
    return out.select(*input_columns, *added)


def _coerce(df: pl.DataFrame) -> pl.DataFrame:
    """Check and cast the native columns; raise SomInputError with a code on bad input."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SomInputError("som_missing_column", f"missing columns: {', '.join(missing)}")
    exprs = []
    dt = df.schema["date"]
    if dt == pl.String:
        exprs.append(pl.col("date").str.to_date(strict=False))
    elif dt == pl.Datetime or isinstance(dt, pl.Datetime):
        exprs.append(pl.col("date").dt.date())
    elif dt != pl.Date:
        raise SomInputError("som_invalid_date", f"date column of type {dt}, expected a date")
    if df.schema["dosage_units"] != pl.Float64:
        exprs.append(pl.col("dosage_units").cast(pl.Float64, strict=False))
    for col in ("customer", "family"):
        if df.schema[col] not in (pl.String, pl.Categorical) and not isinstance(
                df.schema[col], (pl.Categorical, pl.Enum)):
            exprs.append(pl.col(col).cast(pl.String))
    if "controlled" in df.columns and df.schema["controlled"] != pl.Boolean:
        exprs.append(pl.col("controlled").cast(pl.Boolean, strict=False))
    if exprs:
        try:
            df = df.with_columns(exprs)
        except pl.exceptions.PolarsError as exc:
            raise SomInputError("som_invalid_value", str(exc)) from None
    bad = df.select(
        pl.col("date").null_count().alias("date"),
        pl.col("dosage_units").is_null().sum().alias("units_null"),
        (pl.col("dosage_units") < 0).sum().alias("units_negative"),
        pl.col("dosage_units").is_nan().sum().alias("units_nan"),
        pl.col("dosage_units").is_infinite().sum().alias("units_infinite"),
        (pl.col("dosage_units").is_finite() & (pl.col("dosage_units") > MAX_DOSAGE_UNITS))
        .sum().alias("units_too_large"),
        pl.col("customer").null_count().alias("customer"),
        pl.col("family").null_count().alias("family"),
    ).row(0, named=True)
    if bad["date"]:
        raise SomInputError("som_invalid_date", f"{bad['date']} lines without a valid date")
    if bad["units_null"] or bad["units_nan"]:
        raise SomInputError("som_invalid_units", "lines without a number of dosage units")
    if bad["units_negative"]:
        raise SomInputError("som_invalid_units",
                            f"{bad['units_negative']} lines with negative dosage units")
    if bad["units_infinite"]:
        raise SomInputError("som_invalid_units",
                            f"{bad['units_infinite']} lines with infinite dosage_units")
    if bad["units_too_large"]:
        raise SomInputError("som_invalid_units",
                            f"{bad['units_too_large']} lines with dosage_units above "
                            f"{MAX_DOSAGE_UNITS:,.0f} (MAX_DOSAGE_UNITS)")
    if bad["customer"] or bad["family"]:
        raise SomInputError("som_missing_value", "lines without a customer or a family")
    return df


def read_orders(source: str | Path | pl.DataFrame, *, columns: list[str] | None = None
                ) -> pl.DataFrame:
    """An order history as a native DataFrame: from a Parquet/CSV path or a DataFrame, in the
    native or the ARCOS shape (detected). `columns` restricts what is read (projection)."""
    if isinstance(source, pl.DataFrame):
        lf = source.lazy()
        names = source.columns
    else:
        lf = _scan(Path(source))
        names = lf.collect_schema().names()
    lf, native_names = _to_native(lf, names)
    if columns is not None:
        keep = [c for c in native_names if c in set(columns) | set(REQUIRED)]
        lf = lf.select(keep)
    try:
        df = lf.collect()
    except pl.exceptions.PolarsError as exc:
        raise SomInputError("som_unreadable", str(exc)) from None
    return _coerce(df)


def source_schema(path: str | Path) -> dict[str, pl.DataType]:
    """The column types of an input file as it is (before `read_orders` casts for scoring)."""
    try:
        return dict(_scan(Path(path)).collect_schema())  # read as read_orders reads it
    except (OSError, SomInputError, pl.exceptions.PolarsError):
        return {}


def input_type_casts(columns: dict[str, pl.DataType], schema: dict[str, pl.DataType]) -> list[pl.Expr]:
    """Casts that give the output back the input's whole-number columns (`dosage_units` is
    scored as Float64): "the input columns kept" means their types too."""
    return [pl.col(name).cast(dtype, strict=False) for name, dtype in schema.items()
            if name in columns and columns[name] != dtype and dtype.is_integer() and columns[name].is_float()]


def write_like_input(scored: pl.DataFrame, source: str | Path, path: str | Path) -> Path:
    """Write a scored table in its input's shape (to_input_shape) and column types
    (input_type_casts), all or nothing."""
    schema = source_schema(source)
    out = to_input_shape(scored, list(schema))
    casts = input_type_casts(dict(out.schema), schema)
    return write_scored(out.with_columns(casts) if casts else out, path)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; renamed to `path` when the block succeeds, removed
    when it fails, so that a failure leaves nothing half-written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_scored(df: pl.DataFrame, path: str | Path) -> Path:
    """Write a scored table (Parquet, or CSV by suffix), all or nothing."""
    path = Path(path)
    with atomic_output(path) as tmp:
        if path.suffix.lower() == ".csv":
            df.write_csv(tmp)
        else:
            df.write_parquet(tmp, compression="lz4", statistics=False)
    return path
