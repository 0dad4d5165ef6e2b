"""Hostile and unusual signatures found in review: each case verified against the real parts
(SoftHSM keys, the test PKI with its CRLs) and, where they have an opinion, xmlsec1 and openssl."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys

import pytest
from asn1crypto import cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from lxml import etree
from pkihelp import (  # noqa: F401 - fixtures
    ec_signer,
    openssl_cms_verify,
    rsa_signer,
    signing_pki,
    trust,
    xmlsec1_verify,
)

from gateway.signing.cms import sign_detached
from gateway.signing.verify import verify_cms, verify_xml
from gateway.signing.xmldsig import DS_NS, der_to_raw_ecdsa, sign_enveloped
from gateway.xmlsafe import XmlError, parse_xml

NS = {"ds": DS_NS}
DSIG11_NS = "http://www.w3.org/2009/xmldsig11#"
ORDER = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
         b'<Order xmlns="urn:csos-gateway:order:1"><OrderNumber>26X000123</OrderNumber></Order>\n')
CONTENT = b"CSOS order 26X000123\r\nline 1: 10 x NDC 12345-6789-01\n"
SIGNING_TIME_OID = "1.2.840.113549.1.9.5"
PLUS_5 = dt.timezone(dt.timedelta(hours=5))


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def with_key_info_child(signed: bytes, xml: str, parent: str = ".//ds:KeyInfo") -> bytes:
    """`xml` inserted first into KeyInfo (or another element of it): KeyInfo is not signed, so
    the signature value stays intact."""
    tree = etree.fromstring(signed)
    tree.find(parent, NS).insert(0, etree.fromstring(xml))
    return etree.tostring(tree)


def rsa_key_value(signer) -> str:
    numbers = signer.public_key.public_numbers()
    modulus = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    exponent = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    return (f'<ds:KeyValue xmlns:ds="{DS_NS}"><ds:RSAKeyValue><ds:Modulus>{b64(modulus)}</ds:Modulus>'
            f"<ds:Exponent>{b64(exponent)}</ds:Exponent></ds:RSAKeyValue></ds:KeyValue>")


def ec_key_value(point: bytes) -> str:
    return (f'<ds:KeyValue xmlns:ds="{DS_NS}"><dsig11:ECKeyValue xmlns:dsig11="{DSIG11_NS}">'
            '<dsig11:NamedCurve URI="urn:oid:1.2.840.10045.3.1.7"/>'
            f"<dsig11:PublicKey>{b64(point)}</dsig11:PublicKey></dsig11:ECKeyValue></ds:KeyValue>")


def failed_check(report) -> tuple[str | None, str | None]:
    failure = report.failure
    return (failure.name, failure.code) if failure else (None, None)


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 128:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def attribute(oid: str, *value_ders: bytes) -> bytes:
    """A CMS Attribute, DER, with the values as given (asn1crypto would refuse to write some)."""
    return _tlv(0x30, core.ObjectIdentifier(oid).dump() + _tlv(0x31, b"".join(value_ders)))


def with_signed_attributes(der: bytes, signer, extra: list[bytes], drop: tuple[str, ...] = ()) -> bytes:
    """The CMS signature `der` with signed attributes `drop` removed and the raw DER attributes
    `extra` added, signed again by the HSM RSA key (its signature has a fixed length, so the
    new one takes the old one's place byte for byte)."""
    info = cms.ContentInfo.load(der)
    signer_info = info["content"]["signer_infos"][0]
    kept = [a for a in signer_info["signed_attrs"] if a["type"].native not in drop]
    # Placeholders of the same length as the raw attributes, swapped for them after encoding.
    placeholders = []
    for i, raw in enumerate(extra):
        placeholder = next(
            p for n in range(max(0, len(raw) - 40), len(raw))  # the placeholder's overhead is small
            if len((p := cms.CMSAttribute({"type": f"1.2.3.4.{i}",
                                           "values": [core.OctetString(b"X" * n)]})).dump()) == len(raw)
        )
        placeholders.append(placeholder)
    signer_info["signed_attrs"] = cms.CMSAttributes(kept + placeholders)
    out = info.dump(force=True)
    for placeholder, raw in zip(placeholders, extra):
        out = out.replace(placeholder.dump(), raw)
    signer_info = cms.ContentInfo.load(out)["content"]["signer_infos"][0]
    to_sign = b"\x31" + signer_info["signed_attrs"].dump()[1:]
    return out.replace(signer_info["signature"].native, signer.sign(to_sign))


# --- XML-DSig: KeyInfo must name one key only ---------------------------------------------------


def test_a_key_value_that_is_not_the_certificates_key_is_refused(ec_signer, rsa_signer, signing_pki,
                                                                  trust, tmp_path):
    # Signed by the EC key, with the RSA key offered first in KeyInfo: xmlsec1 takes that key and
    # fails; a document must not mean one signer to us and another to the next relying party.
    signed = sign_enveloped(ORDER, ec_signer)
    doctored = with_key_info_child(signed, rsa_key_value(rsa_signer))
    report, tree = verify_xml(doctored, trust)
    assert failed_check(report) == ("signer_certificate", "signature_malformed")
    assert "KeyValue" in report.message and tree is None
    assert xmlsec1_verify(write(tmp_path, "doc.xml", doctored), signing_pki).returncode != 0


def test_an_ec_key_value_with_another_point_is_refused(ec_signer, trust):
    signed = sign_enveloped(ORDER, ec_signer)
    point = ec_signer.public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    other = point[:-1] + bytes([point[-1] ^ 1])
    report, _ = verify_xml(with_key_info_child(signed, ec_key_value(other)), trust)
    assert failed_check(report) == ("signer_certificate", "signature_malformed")
    empty = f'<ds:KeyValue xmlns:ds="{DS_NS}"/>'
    assert verify_xml(with_key_info_child(signed, empty), trust)[0].code == "signature_malformed"


def test_a_key_value_that_is_the_certificates_key_is_accepted(ec_signer, rsa_signer, signing_pki,
                                                              trust, tmp_path):
    point = ec_signer.public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    for signer, key_value in ((rsa_signer, rsa_key_value(rsa_signer)), (ec_signer, ec_key_value(point))):
        doc = with_key_info_child(sign_enveloped(ORDER, signer), key_value)
        report, tree = verify_xml(doc, trust)
        assert report.valid, report.to_dict()
        assert tree is not None
        assert xmlsec1_verify(write(tmp_path, "doc.xml", doc), signing_pki).returncode == 0


def test_an_unreadable_x509crl_is_refused_and_a_real_one_accepted(ec_signer, signing_pki, trust, tmp_path):
    signed = sign_enveloped(ORDER, ec_signer)
    junk = with_key_info_child(signed, f'<ds:X509CRL xmlns:ds="{DS_NS}">AAAA</ds:X509CRL>', ".//ds:X509Data")
    report, _ = verify_xml(junk, trust)
    assert failed_check(report) == ("format", "signature_malformed")
    assert "X509CRL" in report.message
    assert xmlsec1_verify(write(tmp_path, "junk.xml", junk), signing_pki).returncode != 0
    crl = x509.load_pem_x509_crl(signing_pki.crl_pem().read_bytes()).public_bytes(Encoding.DER)
    real = with_key_info_child(signed, f'<ds:X509CRL xmlns:ds="{DS_NS}">{b64(crl)}</ds:X509CRL>',
                               ".//ds:X509Data")
    assert verify_xml(real, trust)[0].valid


def resign(tree: etree._Element, signer) -> bytes:
    """SignatureValue made again by the HSM key over SignedInfo as it now stands."""
    signed_info = tree.find(".//ds:SignedInfo", NS)
    raw = signer.sign(etree.tostring(signed_info, method="c14n", exclusive=True))
    if signer.algorithm == "ecdsa-sha256":
        raw = der_to_raw_ecdsa(raw)
    tree.find(".//ds:SignatureValue", NS).text = b64(raw)
    return etree.tostring(tree)


def test_a_digest_value_split_by_a_processing_instruction_is_refused(ec_signer, signing_pki, trust,
                                                                     tmp_path):
    # <DigestValue>digest<?x y?>QUFB</DigestValue>, signed: lxml's .text is the part before the
    # PI, xmlsec1 reads all of it and refuses. One document, one reading.
    tree = etree.fromstring(sign_enveloped(ORDER, ec_signer))
    digest_value = tree.find(".//ds:DigestValue", NS)
    digest_value.append(etree.ProcessingInstruction("x", "y"))
    digest_value[0].tail = "QUFB"
    doc = resign(tree, ec_signer)
    report, _ = verify_xml(doc, trust)
    assert failed_check(report) == ("format", "signature_malformed")
    assert "DigestValue" in report.message
    assert xmlsec1_verify(write(tmp_path, "doc.xml", doc), signing_pki).returncode != 0


def test_a_signature_value_with_child_nodes_is_refused(ec_signer, trust):
    tree = etree.fromstring(sign_enveloped(ORDER, ec_signer))
    value = tree.find(".//ds:SignatureValue", NS)
    whole = value.text
    value.text = whole[:40]
    value.append(etree.ProcessingInstruction("x", "y"))
    value[0].tail = whole[40:]
    report, _ = verify_xml(etree.tostring(tree), trust)
    assert (report.code, report.message) == ("signature_malformed", "SignatureValue holds more than text")


def test_an_ecdsa_key_on_another_curve_is_not_allowed_rather_than_invalid(ec_signer, trust):
    # An outside signer with a P-384 key makes a well-formed ECDSA-SHA256 signature (r||s, 2 x 48
    # bytes): the profile refuses the curve, the signature itself is not broken.
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outside P-384 Signer")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    tree = etree.fromstring(sign_enveloped(ORDER, ec_signer))
    x509_data = tree.find(".//ds:X509Data", NS)
    for old in list(x509_data):
        x509_data.remove(old)
    etree.SubElement(x509_data, f"{{{DS_NS}}}X509Certificate").text = b64(cert.public_bytes(Encoding.DER))
    signed_info = etree.tostring(tree.find(".//ds:SignedInfo", NS), method="c14n", exclusive=True)
    r, s = decode_dss_signature(key.sign(signed_info, ec.ECDSA(hashes.SHA256())))
    tree.find(".//ds:SignatureValue", NS).text = b64(r.to_bytes(48, "big") + s.to_bytes(48, "big"))
    report, _ = verify_xml(etree.tostring(tree), trust)
    assert failed_check(report) == ("signature_value", "algorithm_not_allowed")
    assert report.sub_indication.value == "CRYPTO_CONSTRAINTS_FAILURE"


@pytest.mark.parametrize("element, attribute", [
    ("Reference", "URI"), ("SignatureMethod", "Algorithm"), ("DigestMethod", "Algorithm"),
    ("CanonicalizationMethod", "Algorithm"), ("Transform", "Algorithm"),
])
def test_a_huge_attribute_is_not_echoed_whole_into_the_report(element, attribute, ec_signer, trust):
    tree = etree.fromstring(sign_enveloped(ORDER, ec_signer))
    tree.find(f".//ds:{element}", NS).set(attribute, "urn:x:" + "A" * 200_000)
    report, _ = verify_xml(resign(tree, ec_signer), trust)
    assert report.code in ("signature_malformed", "algorithm_not_allowed")
    assert "urn:x:AAAA" in report.message and len(report.message) < 400
    assert len(json.dumps(report.to_dict())) < 5_000


def test_the_element_limit_holds_in_utf7(trust):
    # UTF-7 writes '<' as "+ADw-": 80,000 elements with no 0x3C byte among them.
    body = b"+ADw-a+AD4-" + b"+ADw-b/+AD4-" * 80_000 + b"+ADw-/a+AD4-"
    data = b'<?xml version="1.0" encoding="UTF-7"?>' + body
    with pytest.raises(XmlError) as caught:
        parse_xml(data)
    assert caught.value.code == "xml_too_large" and "80001 elements" in caught.value.message
    report, _ = verify_xml(data, trust)
    assert failed_check(report) == ("format", "xml_too_large")
    # A small UTF-7 document is still read.
    assert parse_xml(b'<?xml version="1.0" encoding="UTF-7"?>+ADw-a+AD4-x+ADw-/a+AD4-').getroot().text == "x"


# --- CMS --------------------------------------------------------------------------------------


@pytest.mark.parametrize("listed", [["sha1"], []], ids=["sha1-only", "none"])
def test_digest_algorithms_must_list_the_signers_digest(listed, rsa_signer, signing_pki, trust, tmp_path):
    info = cms.ContentInfo.load(sign_detached(CONTENT, rsa_signer))
    info["content"]["digest_algorithms"] = [{"algorithm": name} for name in listed]
    der = info.dump(force=True)
    report = verify_cms(der, CONTENT, trust)
    assert failed_check(report) == ("format", "signature_malformed")
    assert "digestAlgorithms" in report.message
    result = openssl_cms_verify(write(tmp_path, "s.p7s", der), write(tmp_path, "c.bin", CONTENT), signing_pki)
    assert result.returncode != 0


def test_an_unreadable_value_is_not_echoed_whole_into_the_report(rsa_signer, trust):
    der = with_signed_attributes(sign_detached(CONTENT, rsa_signer), rsa_signer,
                                 [attribute(SIGNING_TIME_OID, _tlv(0x18, b"2" * 100_000))],
                                 drop=("signing_time",))
    report = verify_cms(der, CONTENT, trust)
    assert report.code == "signature_malformed"
    assert report.message.startswith("not a readable CMS SignedData") and len(report.message) < 400


# --- times without a UTC form -----------------------------------------------------------------


def test_a_signed_signing_time_before_year_one_in_utc_is_a_report_not_a_crash(rsa_signer, trust):
    # GeneralizedTime 0001-01-01T00:00+05:00 is signed by the key: in UTC it lies before year 1.
    der = sign_detached(CONTENT, rsa_signer)
    early = with_signed_attributes(
        der, rsa_signer, [attribute(SIGNING_TIME_OID, b"\x18\x1300010101000000+0500")], drop=("signing_time",))
    report = verify_cms(early, CONTENT, trust)
    assert report.code == "certificate_not_yet_valid"
    assert report.signing_time_source == "signed-attribute"
    assert report.signing_time == dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    # Past 9999 in UTC is later than now: judged now.
    late = with_signed_attributes(
        der, rsa_signer, [attribute(SIGNING_TIME_OID, b"\x18\x1399991231230000-0500")], drop=("signing_time",))
    assert verify_cms(late, CONTENT, trust).valid


def test_a_caller_or_document_time_without_a_utc_form_is_a_report_not_a_crash(rsa_signer, trust):
    signed = sign_enveloped(ORDER, rsa_signer)
    early = dt.datetime(1, 1, 1, tzinfo=PLUS_5)
    assert verify_xml(signed, trust, early)[0].code == "certificate_not_yet_valid"
    report, _ = verify_xml(signed, trust, lambda tree: early)  # as a document's own date
    assert (report.code, report.signing_time_source) == ("certificate_not_yet_valid", "document")
    late = dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert verify_xml(signed, trust, late)[0].valid
    unattributed = with_signed_attributes(sign_detached(CONTENT, rsa_signer), rsa_signer, [],
                                          drop=("signing_time",))
    assert verify_cms(unattributed, CONTENT, trust, early).code == "certificate_not_yet_valid"


# --- the command line -------------------------------------------------------------------------


def gateway(home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), *args],
                          capture_output=True, timeout=120, env=dict(os.environ))


def test_cli_exit_codes_for_the_review_cases(softhsm_settings, ec_signer, rsa_signer, tmp_path):
    home = softhsm_settings.home
    doctored = with_key_info_child(sign_enveloped(ORDER, ec_signer), rsa_key_value(rsa_signer))
    result = gateway(home, "verify", str(write(tmp_path, "doc.xml", doctored)))
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert json.loads(result.stdout)["code"] == "signature_malformed"

    early = with_signed_attributes(
        sign_detached(CONTENT, rsa_signer), rsa_signer,
        [attribute(SIGNING_TIME_OID, b"\x18\x1300010101000000+0500")], drop=("signing_time",))
    result = gateway(home, "verify", "--content", str(write(tmp_path, "c.bin", CONTENT)),
                     str(write(tmp_path, "early.p7s", early)))
    assert result.returncode == 1, result.stderr
    assert b"Traceback" not in result.stderr
    assert json.loads(result.stdout)["code"] == "certificate_not_yet_valid"
