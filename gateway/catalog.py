"""The supplier's product catalog: NDC -> product, schedule, drug family, package size.

The schedule of an ordered item comes from this catalog, never from the order (the purchaser
cannot declare its own schedule). CSV columns: `ndc,name,strength,schedule,family,units_per_package`;
`ndc` in the 11-digit 5-4-2 form with hyphens (10-digit hyphenated forms are normalised);
`schedule` one of II IIN III IIIN IV V, empty for a non-controlled product.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.identifiers import IdentifierError, normalize_ndc

SCHEDULES = ("II", "IIN", "III", "IIIN", "IV", "V")
COLUMNS = ("ndc", "name", "strength", "schedule", "family", "units_per_package")


class CatalogError(ValueError):
    """A catalog file that cannot be used; `line` is the 1-based CSV line, when known."""

    code = "catalog_invalid"

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


@dataclass(frozen=True)
class Product:
    ndc: str  # 5-4-2 with hyphens
    name: str
    strength: str
    schedule: str | None  # None: not controlled
    family: str
    units_per_package: int

    @property
    def controlled(self) -> bool:
        return self.schedule is not None


Catalog = dict[str, Product]

# A small demo catalog: common Schedule II-V products and a non-controlled one.
DEMO_ROWS: tuple[tuple[str, str, str, str, str, int], ...] = (
    ("59011-0410-10", "Oxycodone HCl ER tablets", "10 mg", "II", "oxycodone", 100),
    ("00406-0552-01", "Oxycodone HCl tablets", "5 mg", "II", "oxycodone", 100),
    ("00406-0123-01", "Hydrocodone bitartrate and acetaminophen tablets", "5 mg/325 mg", "II", "hydrocodone", 100),
    ("00054-0417-25", "Morphine sulfate ER tablets", "15 mg", "II", "morphine", 100),
    ("00406-8960-01", "Fentanyl transdermal system", "25 mcg/h", "II", "fentanyl", 5),
    # Amphetamine is a Schedule II stimulant, not a narcotic (21 CFR 1308.12(d)): 2N.
    ("00555-0971-02", "Amphetamine mixed salts tablets", "20 mg", "IIN", "amphetamine", 100),
    ("00093-0150-01", "Acetaminophen and codeine tablets", "300 mg/30 mg", "III", "codeine", 100),
    ("00591-5553-01", "Buprenorphine and naloxone sublingual tablets", "8 mg/2 mg", "III", "buprenorphine", 30),
    ("00093-3109-01", "Testosterone cypionate injection", "200 mg/mL", "IIIN", "testosterone", 1),
    ("00378-2085-01", "Alprazolam tablets", "1 mg", "IV", "alprazolam", 100),
    ("00093-0058-01", "Tramadol HCl tablets", "50 mg", "IV", "tramadol", 100),
    ("00591-3733-01", "Pregabalin capsules", "75 mg", "V", "pregabalin", 90),
    ("00093-7155-98", "Atorvastatin calcium tablets", "20 mg", "", "atorvastatin", 90),
)


def _product(row: dict[str, str], line: int) -> Product:
    missing = [c for c in ("ndc", "name", "family", "units_per_package") if not (row.get(c) or "").strip()]
    if missing:
        raise CatalogError(f"missing {', '.join(missing)}", line)
    # Names and families go into signed order XML and onto terminals: a NUL (which the csv
    # module reads without complaint) cannot be in XML at all, and an escape sequence would
    # rewrite what an operator sees. Line breaks and tabs (a quoted multi-line name) are text.
    unprintable = [c for c in COLUMNS
                   if any(not ch.isprintable() and ch not in "\t\r\n" for ch in row.get(c) or "")]
    if unprintable:
        raise CatalogError(f"control character in {', '.join(unprintable)}", line)
    try:
        ndc = normalize_ndc(row["ndc"].strip())
    except IdentifierError as exc:
        raise CatalogError(f"bad NDC {row['ndc']!r}: {exc}", line) from exc
    schedule = (row.get("schedule") or "").strip().upper() or None
    if schedule is not None and schedule not in SCHEDULES:
        raise CatalogError(f"schedule must be one of {' '.join(SCHEDULES)} or empty, not {schedule!r}", line)
    try:
        units = int(row["units_per_package"])
    except ValueError as exc:
        raise CatalogError(f"units_per_package must be a whole number, not {row['units_per_package']!r}", line) from exc
    if units <= 0:
        raise CatalogError("units_per_package must be positive", line)
    return Product(ndc=ndc, name=_text(row["name"]), strength=_text(row.get("strength") or ""),
                   schedule=schedule, family=_text(row["family"]).lower(), units_per_package=units)


def _text(value: str) -> str:
    # A CR inside a quoted field is written back unquoted by the csv module and read back (as
    # load_catalog reads, universal newlines) as a line end: the written catalog would not load.
    return value.replace("\r\n", "\n").replace("\r", "\n").strip()


def parse_catalog(text: str) -> Catalog:
    """Parse and check a whole catalog; the first bad line raises CatalogError."""
    reader = csv.DictReader(io.StringIO(text))
    catalog: Catalog = {}
    try:
        if reader.fieldnames is None or set(COLUMNS) - {f.strip() for f in reader.fieldnames}:
            raise CatalogError(f"header must be {','.join(COLUMNS)}", 1)
        for row in reader:
            line = reader.line_num  # physical line: quoted fields may span several
            product = _product({k.strip(): v for k, v in row.items() if k}, line)
            if product.ndc in catalog:
                raise CatalogError(f"NDC {product.ndc} listed twice", line)
            catalog[product.ndc] = product
    except csv.Error as exc:  # e.g. a field past the csv module's size limit
        # line_num counts the lines read before the one that failed
        raise CatalogError(f"not a readable CSV file: {exc}", reader.line_num + 1) from exc
    if not catalog:
        raise CatalogError("catalog is empty")
    return catalog


def load_catalog(path: str | os.PathLike[str]) -> Catalog:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is fine
    except UnicodeDecodeError as exc:
        raise CatalogError(f"not UTF-8 text: {exc}") from exc
    return parse_catalog(text)


def render_catalog(catalog: Catalog) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for p in sorted(catalog.values(), key=lambda p: p.ndc):
        writer.writerow([p.ndc, p.name, p.strength, p.schedule or "", p.family, p.units_per_package])
    return out.getvalue()


def import_catalog(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Catalog:
    """Replace the catalog at `target` with `source`, all or nothing (checked, then renamed)."""
    catalog = load_catalog(source)
    write_catalog(catalog, target)
    return catalog


def write_catalog(catalog: Catalog, target: str | os.PathLike[str]) -> None:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".catalog-")
    try:
        # UTF-8 as load_catalog reads it, whatever the locale (in an ASCII locale a "µg" raised
        # UnicodeEncodeError; in a Latin-1 one the catalog written could not be loaded again).
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(render_catalog(catalog))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def demo_catalog() -> Catalog:
    rows = [dict(zip(COLUMNS, (ndc, name, strength, schedule, family, str(units))))
            for ndc, name, strength, schedule, family, units in DEMO_ROWS]
    return {p.ndc: p for p in (_product(r, i) for i, r in enumerate(rows, start=2))}
