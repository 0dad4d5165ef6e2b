"""DEA certificate extensions: encoding, decoding, the hashed DEA number, schedules."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess

import pytest
from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.signing.dea import (
    OID_HASHED_DEA_NUMBER,
    OID_SCHEDULES,
    SCHEDULES,
    DeaCertificateInfo,
    DeaExtensionError,
    add_dea_extensions,
    address_lines,
    dea_extensions,
    dea_info_for,
    dea_number_matches,
    hashed_dea_number,
    normalize_schedule,
    read_dea_info,
    schedule_authorized,
    schedules_byte,
    subject_serial_number,
)

DEA = "AP5836727"
SERIAL = "0A1B2C3D4E5F"
ADDRESS = {"Line1": "100 Demo Street", "Line2": "Suite 2", "City": "Springfield", "State": "IL",
           "PostalCode": "62701"}


@pytest.fixture(scope="module")
def key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(key, *, info: DeaCertificateInfo | None = None, serial_number: str | None = SERIAL,
          raw: list[x509.UnrecognizedExtension] = ()) -> x509.Certificate:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, "Demo Subscriber")]
    if serial_number is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
    name = x509.Name(attrs)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
    if info is not None:
        builder = add_dea_extensions(builder, info)
    for ext in raw:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256())


def _info(**overrides) -> DeaCertificateInfo:
    args = dict(dea_number=DEA, subject_serial_number=SERIAL, registrant_name="Demo Purchaser Pharmacy",
                schedules=["II", "IIN", "IV"], business_activity="Retail Pharmacy", address=ADDRESS)
    args.update(overrides)
    return dea_info_for(**args)


def test_round_trip(key):
    info = _info()
    cert = _cert(key, info=info)
    back = read_dea_info(cert)
    assert back == info
    assert back.registrant_name == "Demo Purchaser Pharmacy"
    assert back.schedules == frozenset({"II", "IIN", "IV"})
    assert back.business_activity == "Retail Pharmacy"
    assert back.address == ("100 Demo Street", "Suite 2", "Springfield, IL 62701")
    assert back.csos_version == "2.0"
    assert back.hashed_dea_number == hashed_dea_number(DEA, SERIAL)
    # Generic tools must not choke on them: non-critical.
    for ext in cert.extensions:
        if ext.oid.dotted_string.startswith("2.16.840.1.101.3.5."):
            assert not ext.critical


def test_hash_recipe_is_the_documented_one():
    expected = hashlib.sha1(b"AP5836727" + b"0A1B2C3D4E5F").digest()
    assert hashed_dea_number(DEA, SERIAL) == expected
    # Upper-cased, stripped, suffix dropped: all the same registration.
    assert hashed_dea_number(" ap5836727-01 ", "0a1b2c3d4e5f ") == expected
    assert hashed_dea_number(DEA, "") == hashlib.sha1(b"AP5836727").digest()


def test_dea_number_matches_and_mismatches(key):
    cert = _cert(key, info=_info())
    assert subject_serial_number(cert) == SERIAL
    assert dea_number_matches(cert, DEA)
    assert dea_number_matches(cert, "ap5836727")
    assert not dea_number_matches(cert, "AP5836715")  # another valid number
    assert not dea_number_matches(cert, "FD1234563")
    assert not dea_number_matches(cert, "")
    # The subject serialNumber salts the hash: same extensions, other subject -> no match.
    moved = _cert(key, info=_info(), serial_number="FFFF")
    assert not dea_number_matches(moved, DEA)


def test_certificate_without_dea_extensions(key):
    cert = _cert(key)
    assert read_dea_info(cert) is None
    assert not dea_number_matches(cert, DEA)
    assert not schedule_authorized(None, "II")
    assert subject_serial_number(_cert(key, serial_number=None)) == ""


@pytest.mark.parametrize(
    ("schedules", "first_byte", "der"),
    [
        (["II"], 0x40, "03020640"),
        (["IIN"], 0x20, "03020520"),
        (["III"], 0x10, "03020410"),
        (["IIIN"], 0x08, "03020308"),
        (["IV"], 0x04, "03020204"),
        (["V"], 0x02, "03020102"),
        (list(SCHEDULES), 0x7E, "0302017e"),
        (["II", "IV"], 0x44, "03020244"),
        ([], 0x00, "030100"),
    ],
)
def test_schedule_bits(key, schedules, first_byte, der):
    assert schedules_byte(schedules) == first_byte
    info = _info(schedules=schedules)
    ext = {e.oid: e for e in dea_extensions(info)}[OID_SCHEDULES]
    assert ext.value.hex() == der  # DER named-bit list: trailing zero bits dropped
    back = read_dea_info(_cert(key, info=info))
    assert back.schedules == frozenset(schedules)
    for name in SCHEDULES:
        assert schedule_authorized(back, name) == (name in schedules)


def test_schedule_names_and_aliases():
    assert normalize_schedule("C-II") == "II"
    assert normalize_schedule("CII") == "II"
    assert normalize_schedule("2N") == "IIN"
    assert normalize_schedule("iiin") == "IIIN"
    assert normalize_schedule("5") == "V"
    info = DeaCertificateInfo(schedules=frozenset({"III"}))
    assert schedule_authorized(info, "C-III")
    assert not schedule_authorized(info, "C-II")
    for bad in ("I", "VI", "C-I", ""):
        with pytest.raises(DeaExtensionError) as error:
            schedule_authorized(info, bad)
        assert error.value.code == "unknown_schedule"


def test_unknown_bits_authorise_nothing(key):
    # A schedule-I bit (0x80), which no profile here defines, plus II.
    raw = x509.UnrecognizedExtension(OID_SCHEDULES, bytes.fromhex("030201c0"))
    back = read_dea_info(_cert(key, raw=[raw]))
    assert back.schedules == frozenset({"II"})


@pytest.mark.parametrize(
    ("oid", "value"),
    [
        (OID_HASHED_DEA_NUMBER, b"\x04\x03abc"),  # not 20 bytes
        (OID_HASHED_DEA_NUMBER, b"\x0c\x03abc"),  # UTF8String, not OCTET STRING
        (OID_SCHEDULES, b"\x03\x05\x00"),  # truncated
    ],
)
def test_malformed_extensions(key, oid, value):
    cert = _cert(key, raw=[x509.UnrecognizedExtension(oid, value)])
    with pytest.raises(DeaExtensionError) as error:
        read_dea_info(cert)
    assert error.value.code == "dea_extension_malformed"
    assert not dea_number_matches(cert, DEA)


def test_address_lines():
    assert address_lines({"Line1": "1 A St", "City": "Town", "State": "TX", "PostalCode": "75001"}) == (
        "1 A St", "Town, TX 75001")
    assert address_lines(["a", "", "b"]) == ("a", "b")
    with pytest.raises(DeaExtensionError):
        dea_extensions(DeaCertificateInfo(address=tuple("1234567")))


def test_extension_asn1_types():
    exts = {e.oid.dotted_string: e.value for e in dea_extensions(_info())}
    assert core.UTF8String.load(exts["2.16.840.1.101.3.5.1"]).native == "2.0"
    assert core.UTF8String.load(exts["2.16.840.1.101.3.5.2"]).native == "Demo Purchaser Pharmacy"
    assert core.OctetString.load(exts["2.16.840.1.101.3.5.3"]).native == hashed_dea_number(DEA, SERIAL)
    assert core.UTF8String.load(exts["2.16.840.1.101.3.5.5"]).native == "Retail Pharmacy"
    assert core.Sequence.load(exts["2.16.840.1.101.3.5.6"]).tag == 16


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_parses_the_certificate(key, tmp_path):
    path = tmp_path / "c.pem"
    path.write_bytes(_cert(key, info=_info()).public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-text"],
                         capture_output=True, text=True, check=True).stdout
    for n in range(1, 7):
        assert f"2.16.840.1.101.3.5.{n}:" in out
    assert "Demo Purchaser Pharmacy" in out
    # And its ASN.1 parser walks the DER of each extension value.
    der = tmp_path / "c.der"
    der.write_bytes(_cert(key, info=_info()).public_bytes(serialization.Encoding.DER))
    parsed = subprocess.run(["openssl", "asn1parse", "-inform", "DER", "-in", str(der)],
                            capture_output=True, text=True, check=True).stdout
    assert "2.16.840.1.101.3.5.4" in parsed


def test_an_empty_schedules_bit_string_is_malformed_not_a_crash(key):
    """`03 00` made asn1crypto raise IndexError, which escaped read_dea_info."""
    info = _info()
    hashed = [e for e in dea_extensions(info) if e.oid == OID_HASHED_DEA_NUMBER]
    cert = _cert(key, raw=[*hashed, x509.UnrecognizedExtension(OID_SCHEDULES, b"\x03\x00")])
    with pytest.raises(DeaExtensionError) as error:
        read_dea_info(cert)
    assert error.value.code == "dea_extension_malformed"
    assert not dea_number_matches(cert, DEA)


def test_a_number_spelled_with_letters_that_fold_into_ascii_does_not_match(key):
    cert = _cert(key, info=_info(dea_number="AI1234563"))
    assert dea_number_matches(cert, "AI1234563")
    assert not dea_number_matches(cert, "A\u01311234563")  # dotless i upper-cases to I
    with pytest.raises(ValueError):  # never hashed as an empty registration
        hashed_dea_number("A\u01311234563", SERIAL)
    with pytest.raises(DeaExtensionError) as error:
        normalize_schedule("\u0131\u0131")
    assert error.value.code == "unknown_schedule"


@pytest.mark.parametrize("field", ["registrant_name", "business_activity"])
def test_text_that_cannot_be_utf8_is_refused_when_writing(field):
    with pytest.raises(DeaExtensionError) as error:
        dea_extensions(_info(**{field: "Pharm\udcff"}))  # an undecodable byte of a command line
    assert error.value.code == "dea_extension_malformed"
