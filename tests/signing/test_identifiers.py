"""DEA numbers and NDCs (domain.md §5)."""

from __future__ import annotations

import pytest

from gateway.identifiers import (
    DeaNumberError,
    NdcError,
    dea_check_digit,
    dea_registration,
    is_valid_dea_number,
    is_valid_ndc,
    make_dea_number,
    ndc11_digits,
    normalize_ndc,
    parse_dea_number,
    validate_dea_number,
)


def test_check_digit_of_the_documented_example():
    # (5+3+7) + 2*(8+6+2) = 47 -> 7
    assert dea_check_digit("583672") == 7
    number = parse_dea_number("AP5836727")
    assert number.registration == "AP5836727"
    assert number.registrant_type == "A"
    assert number.registrant_kind == "practitioner"
    assert number.suffix == ""
    assert not number.is_business


def test_case_and_blanks_are_forgiven():
    assert validate_dea_number("  ap5836727 ") == "AP5836727"


@pytest.mark.parametrize("wrong_last", "012345689")
def test_every_other_check_digit_is_refused(wrong_last):
    with pytest.raises(DeaNumberError) as info:
        parse_dea_number("AP583672" + wrong_last)
    assert info.value.code == "dea_number_check_digit"


@pytest.mark.parametrize("value", ["", "A5836727", "AP583672", "AP58367270", "1P5836727",
                                   "APX836727", "AP5836727-", "AP5836727-TOOLONGSUFFIX", "A-5836727",
                                   # other scripts' digits are digits to `\\d`, not to DEA
                                   "AP583672\u0667", "AP\u0665\u0668\u0663\u0666\u0667\u0662\u0667",
                                   "AP58367\uff12\uff17",
                                   # letters that case-fold into ASCII ones: "ı" -> "I", "ﬀ" -> "FF"
                                   "A\u01311234563", "A\u017f1234563", "\ufb001234563"])
def test_malformed_numbers(value):
    with pytest.raises(DeaNumberError) as info:
        parse_dea_number(value)
    assert info.value.code == "dea_number_format"
    assert not is_valid_dea_number(value)


def test_unknown_registrant_type_letter():
    number = make_dea_number("AP", "583672")[2:]
    with pytest.raises(DeaNumberError) as info:
        parse_dea_number("Z" + "P" + number)
    assert info.value.code == "dea_number_registrant_type"


def test_business_and_registrant_kinds():
    supplier = parse_dea_number(make_dea_number("R9", "765432"))
    assert supplier.is_business
    assert supplier.registrant_kind == "manufacturer_distributor_researcher"
    assert parse_dea_number(make_dea_number("MJ", "111111")).registrant_kind == "mid_level_practitioner"
    assert parse_dea_number(make_dea_number("XB", "222222")).registrant_kind == "data_waiver_practitioner"


def test_institutional_suffix():
    number = parse_dea_number("F91234563-001AB")
    assert number.registration == "F91234563"
    assert number.suffix == "001AB"
    assert number.text == "F91234563-001AB"
    assert dea_registration("f91234563-001ab") == "F91234563"
    # Distributors do not practise under a hospital's registration.
    with pytest.raises(DeaNumberError) as info:
        parse_dea_number(make_dea_number("R9", "765432") + "-01")
    assert info.value.code == "dea_number_suffix"


def test_make_dea_number_produces_valid_numbers():
    for prefix, digits in [("FD", "123456"), ("RD", "765432"), ("BD", "246810"), ("AP", "583672")]:
        number = make_dea_number(prefix, digits)
        assert is_valid_dea_number(number)
    assert make_dea_number("AP", "583672") == "AP5836727"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("1234-5678-90", "01234-5678-90"),  # 4-4-2
        ("12345-678-90", "12345-0678-90"),  # 5-3-2
        ("12345-6789-0", "12345-6789-00"),  # 5-4-1
        ("12345-6789-01", "12345-6789-01"),  # already 5-4-2
        ("12345678901", "12345-6789-01"),  # 11 bare digits are unambiguous
        (" 0777-3105-02 ", "00777-3105-02"),
    ],
)
def test_ndc_forms(given, expected):
    assert normalize_ndc(given) == expected
    assert ndc11_digits(given) == expected.replace("-", "")
    assert is_valid_ndc(given)


def test_ten_bare_digits_are_ambiguous():
    with pytest.raises(NdcError) as info:
        normalize_ndc("1234567890")
    assert info.value.code == "ndc_ambiguous"


@pytest.mark.parametrize("value", ["", "1234-567-89", "123-4567-89", "12345-67890-1", "ABCDE-1234-56",
                                   "12345_6789_01", "123456789", "1234-5678-90-1", "123456789012",
                                   "59011-0410-1\u00b2", "\u0665" * 11, "59011-0410-\u0661\u0660",
                                   "\u0665" * 10])
def test_malformed_ndcs(value):
    with pytest.raises(NdcError) as info:
        normalize_ndc(value)
    assert info.value.code == "ndc_format"
    assert not is_valid_ndc(value)
