"""Reading order histories (Parquet or CSV; the native shape or the ARCOS shape) and writing scores.

Native columns: order_id, line, customer, customer_type, state, family, ndc, date, dosage_units,
controlled (customer_type, state, ndc, controlled optional). ARCOS (the public DEA transaction
data as released by the Washington Post) is recognised by BUYER_DEA_NO (when the native columns
are not all there) and renamed to the native names; columns neither shape knows are kept as they
are. Native names in another case (CUSTOMER, DATE) are read as the native ones and given back as
written (native_case). A CSV file (UTF-8, with or without a BOM; separated by commas, or by
semicolons when its header has no comma; blank lines skipped) is read as text, and only the
columns scoring uses are parsed: dates as YYYY-MM-DD (a day/month date or a spreadsheet's day
number is refused, never guessed), units as numbers (1,200 with thousands separators; a
decimal comma is refused), yes/no flags as spelled in TRUE_WORDS/FALSE_WORDS; the output gives
them back as text. Negative units (returns) are refused: a return is not an order.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import os
import re
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from gateway.som import scratch
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


NATIVE_NAMES = (*REQUIRED, *OPTIONAL_TEXT, "line", "controlled")


def native_case(columns: list[str]) -> dict[str, str]:
    """The columns named as native columns in another case (CUSTOMER, Dosage_Units: what many
    databases and spreadsheets export) -> their native name, when only those names make the
    native shape; {} otherwise (a file with the native names as they are is read as it is).
    Two columns that differ only in case (Date and DATE) are som_duplicate_column: which one is
    the order date is not guessed."""
    present = set(columns)
    if set(REQUIRED) <= present:
        return {}
    folded: dict[str, list[str]] = {}
    for c in columns:
        if c.lower() in NATIVE_NAMES and c.lower() not in present:
            folded.setdefault(c.lower(), []).append(c)
    if not set(REQUIRED) <= present | set(folded):
        return {}
    twice = sorted(c for names in folded.values() if len(names) > 1 for c in names)
    if twice:
        raise SomInputError("som_duplicate_column", f"columns named twice (in another case): {', '.join(twice)}")
    return {names[0]: native for native, names in folded.items()}


def detect_shape(columns: list[str]) -> str:
    """'native' or 'arcos' from the column names."""
    cols = set(columns)
    if set(REQUIRED) <= cols:  # a native file may carry ARCOS columns of its own
        return "native"
    if "BUYER_DEA_NO" in cols:
        return "arcos"
    found = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
    raise SomInputError("som_unknown_format",
                        "neither the native SOM columns (customer, family, date, dosage_units) "
                        "nor the ARCOS columns (BUYER_DEA_NO, DRUG_NAME, TRANSACTION_DATE, "
                        f"DOSAGE_UNIT) are present; found: {found or 'no columns'}")


def _scan(path: Path) -> pl.LazyFrame:
    suffix = path.suffix.lower()
    if not path.exists():
        raise SomInputError("som_file_not_found", f"{path}: no such file")
    if suffix in (".parquet", ".pq"):
        return pl.scan_parquet(path)
    if suffix in (".csv", ".txt", ".tsv"):
        sep = _separator(path, suffix)
        _check_csv_header(path, sep)
        # Every column as text: a type guessed from the first rows refuses a valid file (2.5
        # units on line 1,500) or changes values it does not use (ZIP 02134 -> 2134). The
        # columns the scorer uses are parsed by _coerce, with an error that names the values.
        # A line without any value (a blank line, the empty lines a spreadsheet leaves at the
        # end, or one of separators only) is no order line: read as one, it would be refused as
        # a line without a date.
        return (pl.scan_csv(path, separator=sep, infer_schema=False)
                .filter(~pl.all_horizontal(pl.all().is_null())))
    raise SomInputError("som_unknown_format", f"{path}: expected .parquet or .csv")


def _check_csv_header(path: Path, sep: str) -> None:
    """A CSV file must have a header line of distinct names (Polars would rename a second
    `dosage_units` to `dosage_units_duplicated_0` and carry on)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        header = next(csv.reader(fh, delimiter=sep), None)
    if not header or header == [""]:
        raise SomInputError("som_empty_input", f"{path}: no header line")
    _check_distinct(header)


def _check_distinct(names: list[str]) -> None:
    seen: set[str] = set()
    # unnamed columns (a spreadsheet's trailing commas) are not names a user gave twice
    twice = sorted({n for n in names if n.strip() and (n in seen or seen.add(n))})
    if twice:
        raise SomInputError("som_duplicate_column", f"columns named twice: {', '.join(twice)}")


def scan_schema(path: Path) -> tuple[pl.LazyFrame, dict[str, pl.DataType]]:
    """The scan of an input file and its column types, with a code for a file that is not
    what its name says (a truncated or foreign Parquet file, a CSV without data)."""
    lf = _scan(path)
    try:
        schema = dict(lf.collect_schema())
    except pl.exceptions.DuplicateError as exc:
        raise SomInputError("som_duplicate_column", str(exc)) from None
    except pl.exceptions.NoDataError:
        raise SomInputError("som_empty_input", f"{path}: no data") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise SomInputError("som_unreadable", f"{path}: {exc}") from None
    if path.suffix.lower() in (".parquet", ".pq"):
        _check_distinct(list(schema))
    return lf, schema


def _separator(path: Path, suffix: str) -> str:
    """The CSV separator from the header line: a tab in a .tsv/.txt file that has one; a
    semicolon where the header has no comma but semicolons (what a spreadsheet writes where the
    comma is the decimal mark); else a comma. A UTF-16 file is som_unreadable."""
    with open(path, "rb") as fh:
        header = fh.readline()
    if header.startswith((b"\xff\xfe", b"\xfe\xff")):  # read as UTF-8, the names would be garbled
        raise SomInputError("som_unreadable", f"{path}: UTF-16 text (a spreadsheet's \"Unicode "
                                              f"text\"); save it as CSV UTF-8")
    if suffix in (".tsv", ".txt") and b"\t" in header:
        return "\t"
    if b";" in header and b"," not in header:
        return ";"
    return ","


def _to_native(lf: pl.LazyFrame, columns: list[str]) -> tuple[pl.LazyFrame, list[str]]:
    case = native_case(columns)
    if case:  # the output gives the names back as written (to_input_shape)
        lf = lf.rename(case)
        columns = [case.get(c, c) for c in columns]
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
        taken = sorted({*names.values(), "date"} & set(columns))
        if taken:  # renaming would overwrite (or clash with) a column of the file
            raise SomInputError("som_column_conflict",
                                f"ARCOS input that also has the native columns {', '.join(taken)}")
        out = lf.rename(names)
        schema_cols = [names.get(c, c) for c in columns]
        # MMDDYYYY, possibly read as a number that lost its leading zero. TRANSACTION_DATE itself
        # stays as it was written, for the output (to_input_shape).
        out = out.with_columns(_arcos_date(lf.collect_schema()["TRANSACTION_DATE"]).alias("date"))
        schema_cols.append("date")
        if "line" not in schema_cols:
            out = out.with_columns(pl.lit(1, pl.Int32).alias("line"))
            schema_cols.append("line")
    return out, schema_cols


def _arcos_date(dtype: pl.DataType) -> pl.Expr:
    """TRANSACTION_DATE as a Date: MMDDYYYY text or whole number (a number has lost its leading
    zero; a float column is what pandas makes of one with a gap), or a date a converter already
    typed. Anything else is null, refused by _coerce with a sample of what was written."""
    col = pl.col("TRANSACTION_DATE")
    if dtype == pl.Date:
        return col
    if isinstance(dtype, pl.Datetime):
        return col.dt.date()
    if dtype.is_float():  # 1022024.0 is 01022024; 1022024.5 is no date
        col = pl.when(col == col.floor()).then(col.cast(pl.Int64, strict=False))
    return (col.cast(pl.String).str.strip_chars().str.zfill(8)
            .str.strptime(pl.Date, "%m%d%Y", strict=False))


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
    native shape is its own, with the names as the input wrote them (native_case)."""
    case = native_case(input_columns) if input_columns else {}
    if case:
        return scored.rename({native: written for written, native in case.items() if native in scored.columns})
    if not input_columns or detect_shape(input_columns) != "arcos":
        return scored
    back = {native: arcos for arcos, native in _arcos_renames(input_columns).items()}
    out = scored.rename({k: v for k, v in back.items() if k in scored.columns})
    added = [c for c in out.columns
             if c not in input_columns and c != "date" and not (c == "line" and "line" not in input_columns)]
    return out.select(*input_columns, *added)


DATE_RANGE = (dt.date(1970, 1, 1), dt.date(2099, 12, 31))
"""Order dates read_orders takes. A line dated in year 1 or 9999 is a data error; scored, it
would also change the verdicts on the customer's real lines (its tenure, its trailing months)."""

_DAY_MONTH = re.compile(r"\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}")


def parse_dates(s: pl.Series) -> pl.Series:
    """Text dates as Dates: ISO 8601 only (YYYY-MM-DD, possibly followed by a time, which is
    dropped). 01/05/2024 is 5 January to one writer and 1 May to another, and a guess would
    move orders by months without a word, so such dates are refused (som_ambiguous_date), as is
    any other text (som_invalid_date); both errors quote a value."""
    text = s.str.strip_chars()
    head = pl.DataFrame({"t": text}).select(
        pl.when(pl.col("t").str.len_chars().eq(10) | pl.col("t").str.slice(10, 1).is_in(["T", " "]))
        .then(pl.col("t").str.slice(0, 10))
        .str.strptime(pl.Date, "%Y-%m-%d", strict=False).alias(s.name)).to_series()
    bad = head.is_null() & s.is_not_null()
    if bad.any():
        count = int(bad.sum())
        sample = str(s.filter(bad)[0])
        if _DAY_MONTH.fullmatch(sample.strip()):
            raise SomInputError("som_ambiguous_date",
                                f"{count} lines with dates such as {sample!r}: the order of day "
                                f"and month is never guessed; write dates as YYYY-MM-DD")
        hint = ""
        if re.fullmatch(r"\d{1,5}(\.\d+)?", sample.strip()):
            # Excel counts days from 1900 or from 1904 by a workbook setting: never guessed
            hint = (": a spreadsheet's day number? format the column as a date before "
                    "exporting")
        raise SomInputError("som_invalid_date",
                            f"{count} lines without a valid date (such as {sample!r}); dates "
                            f"are written YYYY-MM-DD{hint}")
    return head


_GROUPED = r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$"
"""A number with commas between groups of three digits: 1,200 or 12,500.5, as a spreadsheet
formats dosage units."""


def _parse_units(s: pl.Series) -> pl.Series:
    """Dosage units written as text, as numbers; text that is not a number is refused with a
    sample (empty cells stay null, refused later as lines without units). Commas between groups
    of three digits are thousands separators (1,200 is 1200; no count of tablets has three
    decimals); any other comma (12,5: a decimal comma?) is refused, never guessed."""
    text = s.str.strip_chars()
    if text.str.contains(",", literal=True).any():  # only a file that has them pays for this
        text = pl.DataFrame({"t": text}).select(
            pl.when(pl.col("t").str.contains(_GROUPED)).then(pl.col("t").str.replace_all(",", ""))
            .otherwise(pl.col("t")).alias(s.name)).to_series()
    units = text.cast(pl.Float64, strict=False)
    bad = units.is_null() & s.is_not_null() & (s.str.strip_chars() != "")
    if bad.any():
        sample = s.filter(bad)[0]
        hint = ("; commas are read only between groups of three digits (1,200): write decimals "
                "with a point (12.5)" if "," in sample else "")
        raise SomInputError("som_invalid_units",
                            f"{int(bad.sum())} lines whose dosage_units is not a number (such as "
                            f"{sample!r}){hint}")
    return units


TRUE_WORDS = ("true", "t", "yes", "y", "1")
FALSE_WORDS = ("false", "f", "no", "n", "0")


def flag_values(s: pl.Series, code: str = "som_invalid_value") -> pl.Series:
    """A yes/no column as Boolean: Boolean as it is, whole numbers 1/0, or text spelled as in
    TRUE_WORDS/FALSE_WORDS (any case, surrounding spaces ignored); nulls stay null. Anything
    else raises SomInputError(`code`) naming some of the values it did not recognise."""
    if s.dtype == pl.Boolean:
        return s
    if s.dtype.is_integer():
        text = s.cast(pl.String)
    elif s.dtype.is_float():  # 1.0 / 0.0, as a spreadsheet or pandas writes a flag
        text = pl.DataFrame({"v": s}).select(
            pl.when(pl.col("v") == 1.0).then(pl.lit("1")).when(pl.col("v") == 0.0).then(pl.lit("0"))
            .otherwise(pl.col("v").cast(pl.String))).to_series()
    elif s.dtype == pl.String or isinstance(s.dtype, (pl.Categorical, pl.Enum)):
        text = s.cast(pl.String).str.strip_chars().str.to_lowercase()
    else:
        raise SomInputError(code, f"{s.name}: a column of type {s.dtype}, expected true/false")
    frame = pl.DataFrame({"t": text})
    out = frame.select(pl.when(pl.col("t").is_in(TRUE_WORDS)).then(True)
                       .when(pl.col("t").is_in(FALSE_WORDS)).then(False)
                       .otherwise(None).alias(s.name)).to_series()
    unknown = s.filter(out.is_null() & s.is_not_null()).unique(maintain_order=True)
    if len(unknown):
        shown = ", ".join(repr(v) for v in unknown.head(5).cast(pl.String).to_list())
        raise SomInputError(code, f"{s.name}: {len(unknown)} values that are not true/false "
                                  f"({shown}); expected one of {TRUE_WORDS + FALSE_WORDS}")
    return out


def _coerce(df: pl.DataFrame) -> pl.DataFrame:
    """Check and cast the native columns; raise SomInputError with a code on bad input."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SomInputError("som_missing_column", f"missing columns: {', '.join(missing)}")
    exprs = []
    coded = [c for c in ("date", "dosage_units") if isinstance(df.schema[c], (pl.Categorical, pl.Enum))]
    if coded:  # a dictionary-encoded column: its text, parsed as text is
        df = df.with_columns(pl.col(c).cast(pl.String) for c in coded)
    dtype = df.schema["date"]
    if dtype == pl.String:
        df = df.with_columns(parse_dates(df["date"]))
    elif isinstance(dtype, pl.Datetime):
        exprs.append(pl.col("date").dt.date())
    elif dtype != pl.Date:
        raise SomInputError("som_invalid_date", f"date column of type {dtype}, expected a date")
    units_type = df.schema["dosage_units"]
    if not (units_type.is_numeric() or units_type in (pl.String, pl.Null)):
        # a date, a duration or true/false cast to a float is a count nobody wrote
        raise SomInputError("som_invalid_units",
                            f"dosage_units column of type {units_type}, expected numbers")
    if units_type == pl.String:
        df = df.with_columns(_parse_units(df["dosage_units"]))
    elif units_type != pl.Float64:
        exprs.append(pl.col("dosage_units").cast(pl.Float64, strict=False))
    if "line" in df.columns and df.schema["line"] == pl.String:
        value = df["line"].str.strip_chars().cast(pl.Float64, strict=False)  # "1.0" is line 1
        bad = df["line"].is_not_null() & (value.is_null() | (value != value.floor()).fill_null(True))
        if bad.any():
            raise SomInputError("som_invalid_value",
                                f"line: {int(bad.sum())} values that are not whole numbers (such "
                                f"as {df['line'].filter(bad)[0]!r})")
        df = df.with_columns(value.cast(pl.Int64).alias("line"))
    elif "line" in df.columns and df.schema["line"].is_float():  # a Parquet file's 1.0 is line 1
        value = df["line"]
        bad = value.is_not_null() & (value != value.floor()).fill_null(True)
        if bad.any():
            raise SomInputError("som_invalid_value",
                                f"line: {int(bad.sum())} values that are not whole numbers (such "
                                f"as {value.filter(bad)[0]!r})")
    for col in ("customer", "family"):
        if df.schema[col] not in (pl.String, pl.Categorical) and not isinstance(
                df.schema[col], (pl.Categorical, pl.Enum)):
            exprs.append(pl.col(col).cast(pl.String))
    if "controlled" in df.columns and df.schema["controlled"] != pl.Boolean:
        df = df.with_columns(flag_values(df["controlled"]))
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
        written = ""
        if "TRANSACTION_DATE" in df.columns:  # ARCOS: quote what was written, as parse_dates does
            sample = df.filter(pl.col("date").is_null() & pl.col("TRANSACTION_DATE").is_not_null())
            if sample.height:
                written = (f" (such as {str(sample['TRANSACTION_DATE'][0])!r}); ARCOS dates are "
                           f"written MMDDYYYY")
        raise SomInputError("som_invalid_date", f"{bad['date']} lines without a date{written}")
    lo, hi = DATE_RANGE
    outside = df.filter((pl.col("date") < lo) | (pl.col("date") > hi))["date"]
    if len(outside):
        raise SomInputError("som_invalid_date",
                            f"{len(outside)} lines dated outside {lo} .. {hi} (such as "
                            f"{outside[0]}): a date error, not an order")
    if bad["units_null"] or bad["units_nan"]:
        raise SomInputError("som_invalid_units", "lines without a number of dosage units")
    if bad["units_negative"]:
        # 21 CFR 1301.74(b) is about orders received; a return or credit (negative units) is
        # none. Scored as an order it would be nonsense, and netted against the month's orders
        # it would lower the totals that make a real order stand out, so the file is refused.
        first = df.filter(pl.col("dosage_units") < 0).row(0, named=True)
        where = " ".join(f"{k} {first[k]}" for k in ("customer", "date", "order_id", "line")
                         if first.get(k) is not None)
        raise SomInputError("som_invalid_units",
                            f"{bad['units_negative']} lines with negative dosage units (such as "
                            f"{where}: {first['dosage_units']:g}): a return or credit is not an "
                            f"order; remove returns from the history to score")
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
        lf, schema = scan_schema(Path(source))
        names = list(schema)
    lf, native_names = _to_native(lf, names)
    if columns is not None:
        keep = [c for c in native_names if c in set(columns) | set(REQUIRED)]
        lf = lf.select(keep)
    return _coerce(_collect(lf, source))


def _collect(lf: pl.LazyFrame, source: str | Path | pl.DataFrame) -> pl.DataFrame:
    """The lines of an input: som_unreadable if they cannot be read, and for a file,
    som_empty_input if there are none (a DataFrame may be empty: its columns are still checked)."""
    try:
        df = lf.collect()
    except pl.exceptions.PolarsError as exc:
        raise SomInputError("som_unreadable", str(exc)) from None
    if df.height == 0 and not isinstance(source, pl.DataFrame):
        raise SomInputError("som_empty_input", f"{source}: no order lines")
    return df


def read_table(path: str | Path) -> pl.DataFrame:
    """An input file as it is (a CSV as text), before any parsing for scoring; the same codes as
    read_orders for a file it cannot use. `read_orders(read_table(p))` is `read_orders(p)`."""
    return _collect(scan_schema(Path(path))[0], path)


SCORE_COLUMNS = ("score", "flag", "reasons")
"""What scoring writes. An input that has them already (a scored file scored again, with other
thresholds) gets them replaced, never carried over: the output's verdicts are this run's."""


def with_input_columns(scored: pl.DataFrame, raw: pl.DataFrame) -> pl.DataFrame:
    """A scored table in its input's shape with every input column exactly as read (`raw`, in
    the same row order): cells a CSV wrote as `01`, `2000.0` or `Y`, and a timestamp's time of
    day, come back as they were, not as the parsed values scoring used. SCORE_COLUMNS are the
    ones scoring just wrote."""
    out = to_input_shape(scored, raw.columns)
    return out.with_columns(c for c in raw.get_columns() if c.name not in SCORE_COLUMNS)


def write_like_input(scored: pl.DataFrame, raw: pl.DataFrame, path: str | Path) -> Path:
    """Write a scored table with its input's columns as read (`with_input_columns`; `raw` is
    the input as `read_table` gave it), all or nothing."""
    return write_scored(with_input_columns(scored, raw), path)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`, of this run alone; renamed to `path` when the block
    succeeds, removed when it fails, so that a failure leaves nothing half-written and two runs
    writing the same output each leave a whole file (the last one renamed wins)."""
    path = Path(path)
    with scratch.held_file(path) as tmp:  # also removes the temporary files of killed runs
        os.chmod(tmp, 0o666 & ~_UMASK)  # 0600 would make every output private
        yield tmp
        tmp.replace(path)


PARQUET_OUTPUT = {"compression": "lz4", "statistics": False, "row_group_size": 131_072}
"""How every scored Parquet file is written, whole (write_parquet) or streamed from partitions
(sink_parquet): with one row group size, the same lines make the same bytes either way (left to
itself, each writer cuts the row groups elsewhere)."""


def write_scored(df: pl.DataFrame, path: str | Path) -> Path:
    """Write a scored table (Parquet, or CSV by suffix), all or nothing."""
    path = Path(path)
    with atomic_output(path) as tmp:
        if path.suffix.lower() == ".csv":
            df.write_csv(tmp)
        else:
            df.write_parquet(tmp, **PARQUET_OUTPUT)
    return path
