"""NDCs, schedule names, DEA extension addresses and the product catalog (domain.md §2, §5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.catalog import (
    CatalogError,
    demo_catalog,
    load_catalog,
    parse_catalog,
    write_catalog,
)
from gateway.identifiers import NdcError, is_valid_ndc, normalize_ndc
from gateway.signing.dea import (
    DeaCertificateInfo,
    DeaExtensionError,
    dea_extensions,
    dea_info_for,
    normalize_schedule,
    schedule_authorized,
)

HEADER = "ndc,name,strength,schedule,family,units_per_package\n"


# --- NDCs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["59011-4100-10", "59011410010", "12345678912", "99999-9999-99"])
def test_an_11_digit_ndc_that_pads_no_10_digit_one_is_refused(value):
    """The 11-digit form pads one segment with a leading 0: with none, it is no NDC at all."""
    with pytest.raises(NdcError) as info:
        normalize_ndc(value)
    assert info.value.code == "ndc_format"
    assert not is_valid_ndc(value)


@pytest.mark.parametrize(("value", "expected"), [
    ("00093-7155-98", "00093-7155-98"),  # from 4-4-2
    ("59011-0410-10", "59011-0410-10"),  # from 5-3-2
    ("12345-6789-01", "12345-6789-01"),  # from 5-4-1
    ("59011041010", "59011-0410-10"),
])
def test_padded_11_digit_ndcs_are_still_accepted(value, expected):
    assert normalize_ndc(value) == expected


def test_a_catalog_row_with_an_unpadded_11_digit_ndc_names_its_line():
    with pytest.raises(CatalogError) as info:
        parse_catalog(HEADER + "59011-0410-10,Oxycodone ER,10 mg,II,oxycodone,100\n"
                               "59011-4100-10,Oxycodone ER,10 mg,II,oxycodone,100\n")
    assert info.value.line == 3


# --- the demo catalog: narcotic (II, III) and non-narcotic (IIN, IIIN) ----------------------------

# 21 CFR 1308.12(b)-(c), 1308.13(e): opiates are narcotics; 1308.12(d) stimulants and 1308.13(f)
# anabolic steroids are not. The CSOS schedule bits tell them apart (II vs IIN, III vs IIIN).
NARCOTIC = {"oxycodone": True, "hydrocodone": True, "morphine": True, "fentanyl": True, "codeine": True,
            "buprenorphine": True, "amphetamine": False, "testosterone": False}


def test_the_demo_catalog_schedules_say_narcotic_or_not_as_dea_does():
    catalog = demo_catalog()
    amphetamine = catalog["00555-0971-02"]
    assert amphetamine.family == "amphetamine"
    assert amphetamine.schedule == "IIN"
    # A purchaser authorised for 2N only may order it; one authorised for 2 only may not.
    assert schedule_authorized(DeaCertificateInfo(schedules=frozenset({"IIN"})), amphetamine.schedule)
    assert not schedule_authorized(DeaCertificateInfo(schedules=frozenset({"II"})), amphetamine.schedule)
    for product in catalog.values():
        if product.schedule in {"II", "IIN", "III", "IIIN"}:
            assert product.schedule.endswith("N") != NARCOTIC[product.family], product


# --- writing the catalog ----------------------------------------------------------------------------

def test_the_catalog_is_written_as_utf8_whatever_the_locale(tmp_path):
    """In an ASCII locale `gateway catalog import` of a "25 µg/h" product died with
    UnicodeEncodeError: the file was written in the locale's encoding but is read as UTF-8."""
    source = tmp_path / "in.csv"
    source.write_text(HEADER + "00406-8960-01,Fentanyl transdermal system,25 µg/h,II,fentanyl,5\n",
                      encoding="utf-8")
    target = tmp_path / "catalog.csv"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = subprocess.run(
        [sys.executable, "-c",
         "import locale, sys; from gateway.catalog import import_catalog; "
         "assert locale.getpreferredencoding(False).lower() not in {'utf-8', 'utf8'}; "
         "import_catalog(sys.argv[1], sys.argv[2])", str(source), str(target)],
        capture_output=True, text=True, env=env, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert load_catalog(target)["00406-8960-01"].strength == "25 µg/h"


def test_a_carriage_return_in_a_name_does_not_break_the_written_catalog(tmp_path):
    catalog = parse_catalog(HEADER + '59011-0410-10,"Oxycodone HCl\rER tablets",10 mg,II,oxycodone,100\n')
    write_catalog(catalog, tmp_path / "catalog.csv")
    back = load_catalog(tmp_path / "catalog.csv")
    assert back == catalog
    assert back["59011-0410-10"].name == "Oxycodone HCl\nER tablets"


# --- schedule names ----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "canonical"), [
    ("C2", "II"), ("C2N", "IIN"), ("c3", "III"), ("c3n", "IIIN"), ("C4", "IV"), ("C5", "V"),
    ("C-2", "II"), ("CII", "II"), ("CIIIN", "IIIN"), ("CV", "V"),
])
def test_c_prefixed_schedule_numbers_read_as_with_a_hyphen(name, canonical):
    assert normalize_schedule(name) == canonical


@pytest.mark.parametrize("name", ["C1", "C6", "C", "CC2", "C2NN"])
def test_other_c_prefixed_names_are_unknown(name):
    with pytest.raises(DeaExtensionError) as info:
        normalize_schedule(name)
    assert info.value.code == "unknown_schedule"


# --- postal address extension ---------------------------------------------------------------------

def _info(address):
    return dea_info_for(dea_number="AP5836727", subject_serial_number="0A1B", address=address)


def test_an_address_given_as_one_string_is_its_lines_not_its_characters():
    assert _info("1 St").address == ("1 St",)
    assert _info("100 Demo Street\nSpringfield, IL 62701").address == (
        "100 Demo Street", "Springfield, IL 62701")
    # Before: one address line per character, or a refusal for "more than 6 lines".
    assert any(e.oid.dotted_string.endswith(".5.6") for e in dea_extensions(_info("PO Box 12345")))
