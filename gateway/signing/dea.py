"""DEA certificate extensions (CSOS and EPCS signing certificates).

A CSOS signing certificate carries, besides the subscriber's name, the registrant's name and
address, a hash of the DEA registration number and the schedules the registrant may order
(21 CFR 1311.30, 1311.50; DEA CSOS Certificate and CRL Profile). The supplier checks the DEA
number in the order against the hash and every ordered item's schedule against the schedules
(21 CFR 1305.22(c), 1311.55(c)). The extensions live under the arc 2.16.840.1.101.3.5:

    OID                     content               ASN.1 type (this project)
    2.16.840.1.101.3.5.1    CSOS version          UTF8String, e.g. "2.0"
    2.16.840.1.101.3.5.2    registrant name       UTF8String
    2.16.840.1.101.3.5.3    hashed DEA number     OCTET STRING (20 bytes, SHA-1)
    2.16.840.1.101.3.5.4    authorised schedules  BIT STRING, named bits, DER (trailing zero
                                                  bits dropped): first byte II=0x40, IIN=0x20,
                                                  III=0x10, IIIN=0x08, IV=0x04, V=0x02
    2.16.840.1.101.3.5.5    business activity     UTF8String, e.g. "Retail Pharmacy"
    2.16.840.1.101.3.5.6    postal address        SEQUENCE SIZE (1..6) OF UTF8String (lines)

All are non-critical, so that generic tools (openssl, xmlsec1) accept the certificates.

The hashed DEA number recipe (one place: `hashed_dea_number`):

    SHA-1( ASCII( upper(DEA registration number) || upper(subject DN serialNumber) ) )

where the DEA registration number is the nine characters without any institutional suffix
(``AP5836727`` for ``AP5836727-01``), the serialNumber is the subject DN attribute
2.5.4.5 (empty when the subject has none), both stripped of surrounding blanks, concatenated
with no separator. DEA's profile, which defines the production recipe and types, is not public
here: this recipe is what the project's test PKI issues and what its verifier checks.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from asn1crypto import core
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.identifiers import dea_registration

DEA_ARC = "2.16.840.1.101.3.5"
OID_CSOS_VERSION = x509.ObjectIdentifier(DEA_ARC + ".1")
OID_REGISTRANT_NAME = x509.ObjectIdentifier(DEA_ARC + ".2")
OID_HASHED_DEA_NUMBER = x509.ObjectIdentifier(DEA_ARC + ".3")
OID_SCHEDULES = x509.ObjectIdentifier(DEA_ARC + ".4")
OID_BUSINESS_ACTIVITY = x509.ObjectIdentifier(DEA_ARC + ".5")
OID_POSTAL_ADDRESS = x509.ObjectIdentifier(DEA_ARC + ".6")
DEA_OIDS = frozenset(
    {OID_CSOS_VERSION, OID_REGISTRANT_NAME, OID_HASHED_DEA_NUMBER, OID_SCHEDULES,
     OID_BUSINESS_ACTIVITY, OID_POSTAL_ADDRESS}
)

# Schedules a CSOS certificate can authorise, in bit order; N = non-narcotic.
SCHEDULES = ("II", "IIN", "III", "IIIN", "IV", "V")
# The bit of each schedule in the first byte of the BIT STRING.
SCHEDULE_BITS = {"II": 0x40, "IIN": 0x20, "III": 0x10, "IIIN": 0x08, "IV": 0x04, "V": 0x02}

DEFAULT_CSOS_VERSION = "2.0"


class DeaExtensionError(ValueError):
    """A DEA extension whose content is not what the profile says. code: `dea_extension_malformed`
    (bad DER) or `unknown_schedule` (a schedule name that is not one of SCHEDULES)."""

    def __init__(self, message: str, code: str = "dea_extension_malformed") -> None:
        super().__init__(message)
        self.code = code


class _Schedules(core.BitString):
    # Bit n of a BIT STRING is the (0x80 >> n) bit of its first byte.
    _map = {1: "II", 2: "IIN", 3: "III", 4: "IIIN", 5: "IV", 6: "V"}


class _AddressLines(core.SequenceOf):
    _child_spec = core.UTF8String


@dataclass(frozen=True)
class DeaCertificateInfo:
    """What the DEA extensions of one certificate say (None / empty: extension absent)."""

    registrant_name: str | None = None
    hashed_dea_number: bytes | None = None  # 20 bytes, see `hashed_dea_number`
    schedules: frozenset[str] = field(default_factory=frozenset)  # subset of SCHEDULES
    business_activity: str | None = None
    address: tuple[str, ...] = ()  # postal address lines
    csos_version: str | None = None


# --- the one hash recipe ------------------------------------------------------------------------

def hashed_dea_number(dea_number: str, subject_serial_number: str) -> bytes:
    """SHA-1 over upper(DEA registration, no suffix) || upper(subject serialNumber), ASCII."""
    text = dea_registration(dea_number) + (subject_serial_number or "").strip().upper()
    return hashlib.sha1(text.encode("ascii"), usedforsecurity=False).digest()


def subject_serial_number(cert: x509.Certificate) -> str:
    """The subject DN serialNumber (2.5.4.5) of a certificate, "" when absent."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    return str(attrs[0].value) if attrs else ""


# --- schedules ----------------------------------------------------------------------------------

_SCHEDULE_ALIASES = {
    "2": "II", "2N": "IIN", "3": "III", "3N": "IIIN", "4": "IV", "5": "V",
}


def normalize_schedule(name: str) -> str:
    """The canonical name (one of SCHEDULES) of "II", "C-II", "CII", "2", "2N", "IIN"...;
    raises DeaExtensionError(code="unknown_schedule")."""
    if not str(name).isascii():  # "ıı".upper() is "II": no second spelling of a schedule
        raise DeaExtensionError(f"unknown schedule {name!r}", code="unknown_schedule")
    text = str(name).strip().upper().replace(" ", "")
    if text.startswith("C-"):
        text = text[2:]
    elif text.startswith("C") and text[1:2] in {"I", "V", "2", "3", "4", "5"}:
        text = text[1:]  # "CII", and "C2", "C3N" as "C-2", "C-3N" are
    text = _SCHEDULE_ALIASES.get(text, text)
    if text not in SCHEDULE_BITS:
        raise DeaExtensionError(f"unknown schedule {name!r}", code="unknown_schedule")
    return text


def schedules_byte(schedules: Iterable[str]) -> int:
    """The first byte of the schedules BIT STRING (documentation and tests)."""
    value = 0
    for name in schedules:
        value |= SCHEDULE_BITS[normalize_schedule(name)]
    return value


def schedule_authorized(info: DeaCertificateInfo | None, schedule: str) -> bool:
    """Whether the certificate authorises ordering/prescribing `schedule` (21 CFR 1311.55(c)).

    An unknown schedule name raises DeaExtensionError(code="unknown_schedule")."""
    canonical = normalize_schedule(schedule)
    return info is not None and canonical in info.schedules


# --- addresses ----------------------------------------------------------------------------------

def address_lines(address: Mapping[str, str] | Iterable[str] | str) -> tuple[str, ...]:
    """Postal address lines from the order-XML shape {Line1, Line2?, City, State, PostalCode}
    (or from lines already; one string is its lines, not one line per character)."""
    if isinstance(address, str):
        address = address.splitlines()
    if isinstance(address, Mapping):
        lines = [address.get("Line1", ""), address.get("Line2", "")]
        city = address.get("City", "")
        state = address.get("State", "")
        postal = address.get("PostalCode", "")
        last = f"{city}, {state} {postal}".strip(" ,") if (state or postal) else city
        lines.append(last)
        return tuple(line for line in lines if line)
    return tuple(str(line) for line in address if str(line))


# --- encode -------------------------------------------------------------------------------------

def dea_info_for(
    *,
    dea_number: str,
    subject_serial_number: str,
    registrant_name: str | None = None,
    schedules: Iterable[str] = (),
    business_activity: str | None = None,
    address: Mapping[str, str] | Iterable[str] = (),
    csos_version: str | None = DEFAULT_CSOS_VERSION,
) -> DeaCertificateInfo:
    """The DEA extension content for a registrant, with the DEA number hashed."""
    return DeaCertificateInfo(
        registrant_name=registrant_name,
        hashed_dea_number=hashed_dea_number(dea_number, subject_serial_number),
        schedules=frozenset(normalize_schedule(s) for s in schedules),
        business_activity=business_activity,
        address=address_lines(address),
        csos_version=csos_version,
    )


def dea_extensions(info: DeaCertificateInfo) -> list[x509.UnrecognizedExtension]:
    """DER-encoded extensions for `info`; absent fields produce no extension (the schedules
    extension is always present when a DEA number hash is, possibly with no bit set)."""
    for label, value in (("CSOS version", info.csos_version), ("registrant name", info.registrant_name),
                         ("business activity", info.business_activity), *(("address", a) for a in info.address)):
        if value is not None and not _utf8_encodable(value):
            raise DeaExtensionError(f"{label} is not valid text (it cannot be encoded as UTF-8)")
    out: list[x509.UnrecognizedExtension] = []
    if info.csos_version is not None:
        out.append(x509.UnrecognizedExtension(
            OID_CSOS_VERSION, core.UTF8String(info.csos_version).dump()))
    if info.registrant_name is not None:
        out.append(x509.UnrecognizedExtension(
            OID_REGISTRANT_NAME, core.UTF8String(info.registrant_name).dump()))
    if info.hashed_dea_number is not None:
        if len(info.hashed_dea_number) != 20:
            raise DeaExtensionError("hashed DEA number must be 20 bytes (SHA-1)")
        out.append(x509.UnrecognizedExtension(
            OID_HASHED_DEA_NUMBER, core.OctetString(info.hashed_dea_number).dump()))
    if info.schedules or info.hashed_dea_number is not None:
        names = {normalize_schedule(s) for s in info.schedules}
        out.append(x509.UnrecognizedExtension(OID_SCHEDULES, _Schedules(names).dump()))
    if info.business_activity is not None:
        out.append(x509.UnrecognizedExtension(
            OID_BUSINESS_ACTIVITY, core.UTF8String(info.business_activity).dump()))
    if info.address:
        if len(info.address) > 6:
            raise DeaExtensionError("postal address has at most 6 lines")
        out.append(x509.UnrecognizedExtension(
            OID_POSTAL_ADDRESS, _AddressLines(list(info.address)).dump()))
    return out


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. an undecodable byte of a command line
        return False
    return True


def add_dea_extensions(builder: x509.CertificateBuilder, info: DeaCertificateInfo) -> x509.CertificateBuilder:
    for ext in dea_extensions(info):
        builder = builder.add_extension(ext, critical=False)
    return builder


# --- decode -------------------------------------------------------------------------------------

def _load(spec: type[core.Asn1Value], der: bytes, what: str) -> core.Asn1Value:
    try:
        value = spec.load(der, strict=True)
        value.native  # parse the contents now, so that errors surface here
    except Exception as exc:  # noqa: BLE001 - asn1crypto raises IndexError, ValueError, TypeError...
        raise DeaExtensionError(f"{what}: malformed DER ({type(exc).__name__}: {exc})") from exc
    # BER forms (a schedules bit string that keeps trailing zero bits, long-form lengths) are read
    # as their value: the CA signed them, and strict DER would refuse encoders seen in practice.
    return value


def read_dea_info(cert: x509.Certificate) -> DeaCertificateInfo | None:
    """Parse the DEA extensions of `cert`; None when it carries none of them.

    Raises DeaExtensionError when one is present but malformed."""
    raw: dict[x509.ObjectIdentifier, bytes] = {}
    try:
        extensions = list(cert.extensions)
    except Exception as exc:  # noqa: BLE001 - DuplicateExtension and other unreadable ones
        raise DeaExtensionError(f"the certificate's extensions cannot be read ({type(exc).__name__}: {exc})") from exc
    for ext in extensions:
        if ext.oid in DEA_OIDS and isinstance(ext.value, x509.UnrecognizedExtension):
            raw[ext.oid] = ext.value.value
    if not raw:
        return None

    def text(oid: x509.ObjectIdentifier, what: str) -> str | None:
        if oid not in raw:
            return None
        return _load(core.UTF8String, raw[oid], what).native

    hashed = None
    if OID_HASHED_DEA_NUMBER in raw:
        hashed = _load(core.OctetString, raw[OID_HASHED_DEA_NUMBER], "hashed DEA number").native
        if len(hashed) != 20:
            raise DeaExtensionError("hashed DEA number is not 20 bytes")
    schedules: frozenset[str] = frozenset()
    if OID_SCHEDULES in raw:
        bits = _load(_Schedules, raw[OID_SCHEDULES], "schedules").native
        # Bits outside the named ones (e.g. a future schedule I bit) authorise nothing here.
        schedules = frozenset(b for b in bits if isinstance(b, str))
    address: tuple[str, ...] = ()
    if OID_POSTAL_ADDRESS in raw:
        address = tuple(_load(_AddressLines, raw[OID_POSTAL_ADDRESS], "postal address").native)
        if not 1 <= len(address) <= 6:  # SIZE (1..6), as dea_extensions writes it
            raise DeaExtensionError(f"postal address: {len(address)} lines, 1 to 6 expected")
    return DeaCertificateInfo(
        registrant_name=text(OID_REGISTRANT_NAME, "registrant name"),
        hashed_dea_number=hashed,
        schedules=schedules,
        business_activity=text(OID_BUSINESS_ACTIVITY, "business activity"),
        address=address,
        csos_version=text(OID_CSOS_VERSION, "CSOS version"),
    )


def dea_number_matches(cert: x509.Certificate, dea_number: str) -> bool:
    """Whether `dea_number` (as written in an order or prescription) is the one whose hash the
    certificate carries (21 CFR 1305.22(c)). False when the certificate has no hash or the
    extension is malformed."""
    try:
        info = read_dea_info(cert)
    except DeaExtensionError:
        return False
    if info is None or info.hashed_dea_number is None or not isinstance(dea_number, str):
        return False
    if not dea_number.isascii():  # "Aı1234563" must not fold into AI1234563
        return False
    try:
        expected = hashed_dea_number(dea_number, subject_serial_number(cert))
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected, info.hashed_dea_number)
