"""Detached CMS found in the second review: encodings and certificate bags that openssl judges one
way and the gateway judged the other. Every signature is made by the SoftHSM keys; the test PKI
and `openssl cms -verify` are the real ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from pkihelp import (  # noqa: F401 - fixtures
    ec_signer,
    openssl_cms_verify,
    rsa_signer,
    signing_pki,
    trust,
)

from gateway.signing.cms import sign_detached, verify_detached
from gateway.signing.verify import verify_cms

CONTENT = b"CSOS order 26X000321\r\nline 1: 2 x NDC 12345-6789-01\n\x00\xff"
SIGNED_DATA_OID = "1.2.840.113549.1.7.2"


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def tlv(tag: int, body: bytes, *, long_form: bool = False) -> bytes:
    """A DER element; with `long_form`, its length in a form DER forbids (0x81 0x05 for 5)."""
    n = len(body)
    if n < 0x80 and not long_form:
        return bytes([tag, n]) + body
    size = n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def resigned(der: bytes, signer, *, signed_form=None, sent_form=None, attributes=None) -> bytes:
    """`der` with its SignerInfo rebuilt by hand: the attributes (raw DER, order kept) signed by
    the HSM key over `signed_form(body)` (default: the DER SET) and carried in the SignerInfo as
    `sent_form(body)` (default: the DER [0])."""
    signed_data = cms.ContentInfo.load(der)["content"]
    signer_info = signed_data["signer_infos"][0]
    body = b"".join(attributes or [a.dump() for a in signer_info["signed_attrs"]])
    signature = signer.sign(signed_form(body) if signed_form else tlv(0x31, body))
    sent = sent_form(body) if sent_form else tlv(0xA0, body)
    signer_info_der = tlv(0x30, signer_info["version"].dump() + signer_info["sid"].dump()
                          + signer_info["digest_algorithm"].dump() + sent
                          + signer_info["signature_algorithm"].dump() + core.OctetString(signature).dump())
    return content_info(signed_data, signer_infos=tlv(0x31, signer_info_der))


def content_info(signed_data: cms.SignedData, *, certificates: bytes | None = None,
                 signer_infos: bytes | None = None) -> bytes:
    body = (signed_data["version"].dump() + signed_data["digest_algorithms"].dump()
            + signed_data["encap_content_info"].dump()
            + (certificates if certificates is not None else signed_data["certificates"].dump())
            + (signer_infos if signer_infos is not None else signed_data["signer_infos"].dump()))
    return tlv(0x30, core.ObjectIdentifier(SIGNED_DATA_OID).dump() + tlv(0xA0, tlv(0x30, body)))


def with_extra_certificates(der: bytes, *extra: bytes) -> bytes:
    signed_data = cms.ContentInfo.load(der)["content"]
    certs = b"".join(c.chosen.dump() for c in signed_data["certificates"])
    return content_info(signed_data, certificates=tlv(0xA0, certs + b"".join(extra)))


# --- signed attributes: the signature covers their DER ------------------------------------------


def test_signed_attributes_sent_with_ber_lengths_verify_as_openssl_verifies_them(ec_signer, signing_pki,
                                                                                   trust, tmp_path):
    """Signed as DER (RFC 5652 5.4), carried with a long-form length, as a BER re-encoder may
    leave them: openssl re-encodes and verifies; the gateway checked the bytes received and
    called the signature invalid."""
    der = resigned(sign_detached(CONTENT, ec_signer), ec_signer,
                   sent_form=lambda body: tlv(0xA0, body, long_form=True))
    assert cms.ContentInfo.load(der)["content"]["signer_infos"][0]["signed_attrs"].dump()[:2] == b"\xa0\x81"
    report = verify_cms(der, CONTENT, trust)
    assert report.valid, report.to_dict()
    result = openssl_cms_verify(write(tmp_path, "sig.p7s", der), write(tmp_path, "c.bin", CONTENT), signing_pki)
    assert result.returncode == 0, result.stderr
    indefinite = resigned(sign_detached(CONTENT, ec_signer), ec_signer,
                          sent_form=lambda body: b"\xa0\x80" + body + b"\x00\x00")
    assert verify_cms(indefinite, CONTENT, trust).valid


def test_a_signature_over_signed_attributes_that_are_not_der_is_refused_as_openssl_refuses_it(
        rsa_signer, signing_pki, trust, tmp_path):
    """The HSM key signed the attributes with a long-form length (not DER) and they are sent as
    signed: the gateway accepted it; openssl (and RFC 5652 5.4, the DER is what is signed)
    does not."""
    der = resigned(sign_detached(CONTENT, rsa_signer), rsa_signer,
                   signed_form=lambda body: tlv(0x31, body, long_form=True),
                   sent_form=lambda body: tlv(0xA0, body, long_form=True))
    report = verify_cms(der, CONTENT, trust)
    assert (report.code, report.failure.name) == ("signature_invalid", "signature_value"), report.to_dict()
    result = openssl_cms_verify(write(tmp_path, "sig.p7s", der), write(tmp_path, "c.bin", CONTENT), signing_pki)
    assert result.returncode != 0 and "verification failure" in result.stderr, result.stderr


def test_attributes_signed_in_the_order_sent_still_verify(ec_signer, signing_pki, trust, tmp_path):
    """Not sorted as DER would, but signed as sent: openssl keeps the order received, so do we."""
    attributes = [a.dump() for a in
                  cms.ContentInfo.load(sign_detached(CONTENT, ec_signer))["content"]["signer_infos"][0]["signed_attrs"]]
    der = resigned(sign_detached(CONTENT, ec_signer), ec_signer, attributes=attributes[::-1])
    assert verify_cms(der, CONTENT, trust).valid
    result = openssl_cms_verify(write(tmp_path, "sig.p7s", der), write(tmp_path, "c.bin", CONTENT), signing_pki)
    assert result.returncode == 0, result.stderr


def test_a_deeply_nested_signed_attribute_is_a_report_not_a_crash(rsa_signer, trust):
    deep = b"\x05\x00"
    for _ in range(5000):
        deep = tlv(0x30, deep)
    odd = tlv(0x30, core.ObjectIdentifier("1.2.3.4.5").dump() + tlv(0x31, deep))
    der = sign_detached(CONTENT, rsa_signer)
    attributes = sorted([a.dump() for a in cms.ContentInfo.load(der)["content"]["signer_infos"][0]["signed_attrs"]]
                        + [odd])
    report = verify_cms(resigned(der, rsa_signer, attributes=attributes), CONTENT, trust)
    assert report.code == "signature_malformed"
    assert "nested too deeply" in report.message


# --- the certificate bag ------------------------------------------------------------------------


def unreadable_copy_of(cert_der: bytes) -> bytes:
    """The certificate with its first extension twice: DER that cryptography refuses to read
    (DuplicateExtension) and openssl reads."""
    cert = asn1_x509.Certificate.load(cert_der)
    tbs = asn1_x509.TbsCertificate.load(cert["tbs_certificate"].dump())
    extensions = list(tbs["extensions"])
    tbs["extensions"] = asn1_x509.Extensions([*extensions, asn1_x509.Extension.load(extensions[0].dump())])
    return asn1_x509.Certificate({"tbs_certificate": tbs, "signature_algorithm": cert["signature_algorithm"],
                                  "signature_value": cert["signature_value"]}).dump()


def test_an_unreadable_unrelated_certificate_in_the_bag_does_not_refuse_a_good_signature(
        ec_signer, signing_pki, softhsm_settings, trust, tmp_path):
    """The bag is not signed: anyone may add to it. One extra certificate cryptography cannot
    read made the gateway refuse the signature (certificate_malformed, exit 1); openssl verifies."""
    from cryptography.hazmat.primitives.serialization import Encoding

    der = sign_detached(CONTENT, ec_signer)
    extra = unreadable_copy_of(ec_signer.chain[0].public_bytes(Encoding.DER))
    bagged = with_extra_certificates(der, extra)
    report = verify_cms(bagged, CONTENT, trust)
    assert report.valid, report.to_dict()
    assert report.signer.serial == format(ec_signer.certificate.serial_number, "X")
    result = openssl_cms_verify(write(tmp_path, "sig.p7s", bagged), write(tmp_path, "c.bin", CONTENT), signing_pki)
    assert result.returncode == 0, result.stderr
    # The command line says so too.
    run = subprocess.run([sys.executable, "-m", "gateway", "--home", str(softhsm_settings.home), "verify",
                          "--content", str(tmp_path / "c.bin"), str(tmp_path / "sig.p7s")],
                         capture_output=True, timeout=120, env=dict(os.environ))
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout)["valid"] is True


def test_the_signers_own_certificate_must_still_be_readable(ec_signer, trust):
    from cryptography.hazmat.primitives.serialization import Encoding

    signed_data = cms.ContentInfo.load(sign_detached(CONTENT, ec_signer))["content"]
    unreadable = unreadable_copy_of(ec_signer.certificate.public_bytes(Encoding.DER))
    der = content_info(signed_data, certificates=tlv(0xA0, unreadable))
    report = verify_cms(der, CONTENT, trust)
    assert (report.code, report.failure.name) == ("certificate_malformed", "signer_certificate")
    assert "DuplicateExtension" in report.message


def test_a_bag_entry_that_is_no_certificate_at_all_is_a_malformed_signature(ec_signer, signing_pki,
                                                                            trust, tmp_path):
    """Not even the outline of a certificate: openssl cannot read the SignedData; neither do we."""
    junk = tlv(0x30, tlv(0x30, b"\x02\x01\x01") + b"\x05\x00")
    der = with_extra_certificates(sign_detached(CONTENT, ec_signer), junk)
    report = verify_cms(der, CONTENT, trust)
    assert report.code == "signature_malformed" and not report.usable_input
    result = openssl_cms_verify(write(tmp_path, "sig.p7s", der), write(tmp_path, "c.bin", CONTENT), signing_pki)
    assert result.returncode != 0


def test_the_signer_found_by_subject_key_identifier(rsa_signer, ec_signer, trust):
    """SignerIdentifier by subjectKeyIdentifier (v3): the certificate with that key identifier,
    not another one in the bag."""
    from cryptography import x509

    der = sign_detached(CONTENT, ec_signer)
    signed_data = cms.ContentInfo.load(der)["content"]
    signer_info = signed_data["signer_infos"][0]

    def by_key_id(cert):
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        sid = cms.SignerIdentifier({"subject_key_identifier": ski}).dump()
        rebuilt = tlv(0x30, core.Integer(3).dump() + sid + signer_info["digest_algorithm"].dump()
                      + signer_info["signed_attrs"].dump() + signer_info["signature_algorithm"].dump()
                      + signer_info["signature"].dump())
        return content_info(signed_data, signer_infos=tlv(0x31, rebuilt))

    verified = verify_detached(by_key_id(ec_signer.certificate), CONTENT)
    assert verified.signer == ec_signer.certificate
    assert verify_cms(by_key_id(rsa_signer.certificate), CONTENT, trust).code == "certificate_missing"


def look_alike_intermediates(signer, count: int) -> list[bytes]:
    """`count` CA certificates with the name of the signer's issuing CA and issued in the name of
    the root, signed by a key of no CA: junk anyone can make, each a path to try."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding

    key = rsa.generate_private_key(65537, 2048)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(signer.certificate.issuer)
               .issuer_name(signer.chain[0].issuer).public_key(key.public_key())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    return [builder.serial_number(x509.random_serial_number()).sign(key, hashes.SHA256()).public_bytes(Encoding.DER)
            for _ in range(count)]


def test_a_bag_of_hundreds_of_look_alike_intermediates_is_refused_at_once(ec_signer, trust):
    """200 of them (80 kB) kept the path checks, which every verification of the process waits
    on, busy for 11 s (1 MiB of them: minutes); openssl takes them all too."""
    import time

    der = with_extra_certificates(sign_detached(CONTENT, ec_signer), *look_alike_intermediates(ec_signer, 200))
    started = time.monotonic()
    report = verify_cms(der, CONTENT, trust)
    elapsed = time.monotonic() - started
    assert report.code == "signature_malformed", report.to_dict()
    assert "202 certificates in the signature; at most 32" in report.message
    assert elapsed < 2, elapsed


def test_a_bag_of_32_certificates_still_verifies(ec_signer, trust):
    from cryptography.hazmat.primitives.serialization import Encoding

    ca = ec_signer.chain[0].public_bytes(Encoding.DER)
    der = with_extra_certificates(sign_detached(CONTENT, ec_signer), *[ca] * 30)
    assert len(cms.ContentInfo.load(der)["content"]["certificates"]) == 32
    assert verify_cms(der, CONTENT, trust).valid


def test_a_signing_time_claimed_in_the_future_stays_in_the_report(ec_signer, trust):
    """Judged now (the claim cannot reach a validity not begun), but the report showed only now
    as the signing time from the signed attribute: what the signer claimed was lost."""
    import datetime as dt

    claimed = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)).replace(microsecond=0)
    report = verify_cms(sign_detached(CONTENT, ec_signer, signing_time=claimed), CONTENT, trust)
    assert report.valid, report.to_dict()
    assert report.signing_time < claimed and report.signing_time_source == "signed-attribute"
    assert report.to_dict()["details"]["claimed_signing_time"] == claimed.isoformat()
    assert "claimed_signing_time" not in verify_cms(sign_detached(CONTENT, ec_signer), CONTENT, trust).details
