"""The product catalog: the supplier's source of every item's schedule (never the order)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.catalog import (
    COLUMNS, CatalogError, demo_catalog, import_catalog, load_catalog, parse_catalog, render_catalog,
)

HEADER = ",".join(COLUMNS) + "\n"


def test_rows_are_normalised() -> None:
    catalog = parse_catalog(HEADER
                            + "0406-0552-01,Oxycodone HCl tablets,5 mg,ii,Oxycodone,100\n"
                            + "00093-7155-98,Atorvastatin calcium tablets,20 mg,,atorvastatin,90\n")
    oxy = catalog["00406-0552-01"]  # 4-4-2 padded to the 11-digit 5-4-2 form
    assert (oxy.schedule, oxy.family, oxy.units_per_package, oxy.controlled) == ("II", "oxycodone", 100, True)
    assert catalog["00093-7155-98"].schedule is None and not catalog["00093-7155-98"].controlled


@pytest.mark.parametrize(("body", "line", "words"), [
    ("59011-0410-10,Oxycodone,10 mg,I,oxycodone,100\n", 2, "schedule must be one of"),
    ("59011-0410-10,Oxycodone,10 mg,II,oxycodone,0\n", 2, "positive"),
    ("59011-0410-10,Oxycodone,10 mg,II,oxycodone,lots\n", 2, "whole number"),
    ("5901104101,Oxycodone,10 mg,II,oxycodone,100\n", 2, "ambiguous"),
    ("59011-0410-10,,10 mg,II,oxycodone,100\n", 2, "missing name"),
    ("59011-0410-10,A,1,II,a,1\n59011-0410-10,B,1,II,b,1\n", 3, "listed twice"),
    ('59011-0410-10,"Oxy\nER",10 mg,II,oxycodone,100\n59011-0410-1x,B,1,II,b,1\n', 4, "bad NDC"),
])
def test_bad_rows_name_their_line(body: str, line: int, words: str) -> None:
    with pytest.raises(CatalogError) as err:
        parse_catalog(HEADER + body)
    assert err.value.code == "catalog_invalid" and err.value.line == line
    assert words in str(err.value)


@pytest.mark.parametrize("text", ["ndc,name\n1,2\n", "", HEADER, HEADER + '"unterminated\0,x\n'])
def test_unusable_files_are_catalog_errors(text: str) -> None:
    with pytest.raises(CatalogError):
        parse_catalog(text)


def test_import_is_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "catalog.csv"
    import_catalog(_write(tmp_path / "good.csv", render_catalog(demo_catalog())), target)
    before = target.read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_bytes(HEADER.encode() + b"59011-0410-10,Oxy\xff,10 mg,II,oxycodone,100\n")  # not UTF-8
    with pytest.raises(CatalogError, match="UTF-8"):
        import_catalog(bad, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".catalog-")] == []
    assert load_catalog(target) == demo_catalog()


def test_cli_import_refuses_with_a_code(tmp_path: Path) -> None:
    home = tmp_path / "home"
    bad = _write(tmp_path / "bad.csv", HEADER + "59011-0410-10,Oxycodone,10 mg,VI,oxycodone,100\n")
    proc = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "catalog", "import", str(bad)],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert proc.returncode == 2
    assert json.loads(proc.stderr)["error"]["code"] == "catalog_invalid"
    good = _write(tmp_path / "good.csv", render_catalog(demo_catalog()))
    proc = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "catalog", "import", str(good)],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert load_catalog(home / "catalog.csv") == demo_catalog()
    # both attempts are in the audit trail (21 CFR 1311.150): the catalog says what is controlled
    refused, replaced = [(r.event_type, r.outcome, r.details) for r in _audit_records(home)]
    assert refused[:2] == ("catalog.imported", "failure") and refused[2]["code"] == "catalog_invalid"
    assert refused[2]["source"] == str(bad) and refused[2]["previous_sha256"] is None
    assert replaced[:2] == ("catalog.imported", "success")
    assert replaced[2]["sha256"] == hashlib.sha256((home / "catalog.csv").read_bytes()).hexdigest()
    assert (replaced[2]["products"], replaced[2]["controlled"]) == (
        len(demo_catalog()), sum(p.controlled for p in demo_catalog().values()))


def _audit_records(home: Path) -> list:
    from gateway.config import load_settings
    from gateway.storage import open_storage

    async def read() -> list:
        async with open_storage(load_settings(str(home))) as storage:
            return await storage.audit_records(0, 100)

    return asyncio.run(read())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
