"""Identifiers of the controlled-substance world: DEA registration numbers and NDCs.

Plain functions over strings. Bad input raises an `IdentifierError` subclass whose `code` is a
stable string a caller can branch on (and an HTTP layer can return as is).

DEA registration number (21 CFR 1301.11 ff.; format as published by DEA):
    two characters and seven digits, e.g. ``AP5836727``:
    - the first letter is the registrant type (A/B/F/G practitioners and institutions, M mid-level
      practitioners, P/R manufacturers, distributors, researchers and the like, X the historic
      DATA-waiver number);
    - the second is the initial of the registrant's last name, or ``9`` for a business;
    - the seventh digit is a check digit: (d1 + d3 + d5) + 2 * (d2 + d4 + d6), last digit;
    - an institutional practitioner may append a suffix that names the individual
      (``F91234563-001AB``); the suffix is not part of the registration number.

National Drug Code (21 CFR 207.33): ten digits in three segments, labeler-product-package, as
4-4-2, 5-3-2 or 5-4-1. HIPAA transactions use the 11-digit 5-4-2 form, made by padding the short
segment with a leading zero, so an 11-digit NDC none of whose segments starts with 0 is refused.
Ten digits without hyphens are ambiguous (the segment to pad is unknown) and are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class IdentifierError(ValueError):
    """A malformed identifier. `code` is stable; the message is for people."""

    code = "invalid_identifier"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class DeaNumberError(IdentifierError):
    """A DEA number that is not well formed. Codes: `dea_number_format`,
    `dea_number_registrant_type`, `dea_number_check_digit`, `dea_number_suffix`."""

    code = "dea_number_format"


class NdcError(IdentifierError):
    """An NDC that cannot be normalised. Codes: `ndc_format`, `ndc_ambiguous`."""

    code = "ndc_format"


# --- DEA numbers -------------------------------------------------------------------------------

# Registrant type letter -> kind (first character of the number).
REGISTRANT_TYPES: dict[str, str] = {
    "A": "practitioner",
    "B": "practitioner",
    "F": "practitioner",
    "G": "practitioner",
    "M": "mid_level_practitioner",
    "P": "manufacturer_distributor_researcher",
    "R": "manufacturer_distributor_researcher",
    "X": "data_waiver_practitioner",
}

# Types whose holders can be institutional practitioners using a suffix.
_SUFFIX_TYPES = frozenset("ABFGMX")

# ASCII only: `\d` and str.isdigit() also take other scripts' digits ("٧", "²"), which would make
# a second spelling of a number that compares unequal to the first and cannot be hashed as ASCII.
_DEA_RE = re.compile(r"([A-Z])([A-Z9])([0-9]{7})(?:-([A-Z0-9]{1,10}))?")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class DeaNumber:
    """A parsed, valid DEA registration number."""

    registration: str  # the nine characters, e.g. "AP5836727"
    suffix: str  # institutional suffix without the hyphen, "" when absent
    registrant_type: str  # first letter
    registrant_kind: str  # see REGISTRANT_TYPES

    @property
    def text(self) -> str:
        """The number as written, with its suffix when there is one."""
        return f"{self.registration}-{self.suffix}" if self.suffix else self.registration

    @property
    def is_business(self) -> bool:
        return self.registration[1] == "9"


def dea_check_digit(digits: str) -> int:
    """The check digit for the first six digits: (d1+d3+d5) + 2*(d2+d4+d6), last digit."""
    if len(digits) < 6 or not _DIGITS.fullmatch(digits[:6]):
        raise DeaNumberError(f"need six digits, got {digits!r}", "dea_number_format")
    d = [int(c) for c in digits[:6]]
    return ((d[0] + d[2] + d[4]) + 2 * (d[1] + d[3] + d[5])) % 10


def parse_dea_number(value: str) -> DeaNumber:
    """Parse and check a DEA number (case and surrounding blanks are forgiven).

    Raises DeaNumberError with the code of the first rule broken.
    """
    if not isinstance(value, str):
        raise DeaNumberError("DEA number must be text", "dea_number_format")
    # ASCII before case folding: "ı".upper() is "I" and "ﬀ".upper() is "FF", second spellings.
    text = value.strip().upper() if value.isascii() else ""
    match = _DEA_RE.fullmatch(text)
    if match is None:
        raise DeaNumberError(
            f"DEA number {value!r} is not two letters and seven digits (optional -SUFFIX)",
            "dea_number_format",
        )
    letter, second, digits, suffix = match.groups()
    if letter not in REGISTRANT_TYPES:
        raise DeaNumberError(
            f"DEA number {value!r}: {letter!r} is not a registrant type letter",
            "dea_number_registrant_type",
        )
    expected = dea_check_digit(digits)
    if int(digits[6]) != expected:
        raise DeaNumberError(
            f"DEA number {value!r}: check digit is {digits[6]}, expected {expected}",
            "dea_number_check_digit",
        )
    if suffix and letter not in _SUFFIX_TYPES:
        raise DeaNumberError(
            f"DEA number {value!r}: only practitioners carry an institutional suffix",
            "dea_number_suffix",
        )
    return DeaNumber(
        registration=f"{letter}{second}{digits}",
        suffix=suffix or "",
        registrant_type=letter,
        registrant_kind=REGISTRANT_TYPES[letter],
    )


def validate_dea_number(value: str) -> str:
    """Return the canonical text of a valid DEA number (upper case, suffix kept) or raise."""
    return parse_dea_number(value).text


def is_valid_dea_number(value: str) -> bool:
    try:
        parse_dea_number(value)
    except DeaNumberError:
        return False
    return True


def dea_registration(value: str) -> str:
    """The nine-character registration of a DEA number, without suffix. Does not check the
    check digit: used where a number is compared, not accepted (e.g. against a certificate)."""
    if not value.isascii():  # see parse_dea_number: no second spelling through case folding
        raise DeaNumberError(f"DEA number {value!r} is not ASCII", "dea_number_format")
    text = value.strip().upper()
    return text.split("-", 1)[0]


def make_dea_number(prefix: str, six_digits: str) -> str:
    """Complete a DEA number from its two letters and first six digits (test and demo data)."""
    prefix = prefix.upper()
    number = f"{prefix}{six_digits}{dea_check_digit(six_digits)}"
    parse_dea_number(number)
    return number


# --- NDCs --------------------------------------------------------------------------------------

_NDC_SHAPES = {(4, 4, 2): 0, (5, 3, 2): 1, (5, 4, 1): 2}  # segment to pad


def normalize_ndc(value: str) -> str:
    """The 11-digit HIPAA form `LLLLL-PPPP-KK` of an NDC.

    Accepts 4-4-2, 5-3-2, 5-4-1 (hyphenated 10-digit), 5-4-2 (hyphenated) and 11 bare digits;
    the 11-digit forms only when one segment starts with the padding 0.
    Raises NdcError: `ndc_ambiguous` for 10 bare digits, `ndc_format` for anything else.
    """
    if not isinstance(value, str):
        raise NdcError("NDC must be text", "ndc_format")
    text = value.strip()
    if re.fullmatch(r"[0-9]{11}", text):
        return _padded(value, f"{text[:5]}-{text[5:9]}-{text[9:]}")
    if re.fullmatch(r"[0-9]{10}", text):
        raise NdcError(
            f"NDC {value!r}: ten digits without hyphens are ambiguous (4-4-2, 5-3-2 or 5-4-1?)",
            "ndc_ambiguous",
        )
    parts = text.split("-")
    if len(parts) != 3 or not all(_DIGITS.fullmatch(p) for p in parts):
        raise NdcError(f"NDC {value!r} is not three hyphenated digit groups", "ndc_format")
    shape = tuple(len(p) for p in parts)
    if shape == (5, 4, 2):
        return _padded(value, text)
    if shape not in _NDC_SHAPES:
        raise NdcError(
            f"NDC {value!r}: segments {'-'.join(map(str, shape))} are not 4-4-2, 5-3-2, 5-4-1 or 5-4-2",
            "ndc_format",
        )
    pad = _NDC_SHAPES[shape]
    parts[pad] = "0" + parts[pad]
    return "-".join(parts)


def _padded(value: str, ndc11: str) -> str:
    """`ndc11` (5-4-2) when it is the padded form of some 10-digit NDC, else NdcError.

    The 11-digit form is made by a leading zero on the 4-digit labeler, the 3-digit product or
    the 1-digit package code, so one of the three segments starts with 0. "59011-4100-10" has
    none: no 10-digit NDC pads to it (a typo, e.g. a dropped or moved zero), and accepting it
    would list or order a product that does not exist."""
    if not any(segment.startswith("0") for segment in ndc11.split("-")):
        raise NdcError(
            f"NDC {value!r}: no segment starts with the padding 0, so it is not the 11-digit form "
            "of any 10-digit NDC (4-4-2, 5-3-2 or 5-4-1)",
            "ndc_format",
        )
    return ndc11


def ndc11_digits(value: str) -> str:
    """The 11 digits of an NDC, no hyphens (for joins against ARCOS `NDC_NO`)."""
    return normalize_ndc(value).replace("-", "")


def is_valid_ndc(value: str) -> bool:
    try:
        normalize_ndc(value)
    except NdcError:
        return False
    return True
