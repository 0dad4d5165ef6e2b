"""Detached CMS SignedData signed by the SoftHSM keys: structure, attributes and refusals."""

from __future__ import annotations

import datetime as dt
import hashlib
import time

import pytest
from asn1crypto import cms
from pkihelp import (  # noqa: F401 - fixtures
    ec_signer,
    openssl_cms_verify,
    rsa_signer,
    signer,
    signing_pki,
    trust,
)

from gateway.signing.cms import CmsError, sign_detached, verify_detached
from gateway.signing.errors import SigningError
from gateway.signing.verify import verify_cms

CONTENT = b"CSOS order 26X000123\r\nline 1: 10 x NDC 12345-6789-01\n\x00\xff binary tail"
UTC = dt.timezone.utc


def signer_info_of(der: bytes) -> cms.SignerInfo:
    return cms.ContentInfo.load(der)["content"]["signer_infos"][0]


def test_round_trip(signer, trust):
    der = sign_detached(CONTENT, signer)
    report = verify_cms(der, CONTENT, trust)
    assert report.valid, report.to_dict()
    assert report.format == "cms"
    assert report.signature_algorithm == signer.algorithm
    assert report.signing_time_source == "signed-attribute"
    assert abs((report.signing_time - dt.datetime.now(UTC)).total_seconds()) < 120
    assert report.signer.serial == format(signer.certificate.serial_number, "X")


def test_structure(signer):
    der = sign_detached(CONTENT, signer)
    info = cms.ContentInfo.load(der)
    assert info["content_type"].native == "signed_data"
    signed_data = info["content"]
    assert signed_data["encap_content_info"]["content"].native is None  # detached
    assert signed_data["encap_content_info"]["content_type"].native == "data"
    assert len(signed_data["certificates"]) == 2  # signer and its CA
    si = signed_data["signer_infos"][0]
    assert si["digest_algorithm"]["algorithm"].native == "sha256"
    attrs = {a["type"].native: a["values"][0].native for a in si["signed_attrs"]}
    assert set(attrs) == {"content_type", "signing_time", "message_digest"}
    assert attrs["content_type"] == "data"
    assert attrs["message_digest"] == hashlib.sha256(CONTENT).digest()
    expected = {"rsa-sha256": "rsassa_pkcs1v15", "ecdsa-sha256": "sha256_ecdsa"}[signer.algorithm]
    assert si["signature_algorithm"]["algorithm"].native == expected
    # DER: the attributes are in SET OF order, as verifiers re-encode them.
    encodings = [a.dump() for a in si["signed_attrs"]]
    assert encodings == sorted(encodings)


def test_signing_time_given(ec_signer, trust):
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    der = sign_detached(CONTENT, ec_signer, signing_time=when)
    verified = verify_detached(der, CONTENT)
    assert verified.signing_time == when


def test_a_naive_signing_time_is_utc_whatever_the_host_zone(ec_signer, monkeypatch):
    """It was taken as the host's local time: five hours off on a host in New York."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        der = sign_detached(CONTENT, ec_signer, signing_time=dt.datetime(2026, 1, 2, 3, 4, 5))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert verify_detached(der, CONTENT).signing_time == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize("year", [2050, 1949])
def test_signing_time_outside_utctime_years_is_generalized_time(year, ec_signer, signing_pki, tmp_path):
    """RFC 5652 11.3: UTCTime only for 1950-2049. Before, such a time raised asn1crypto's ValueError."""
    when = dt.datetime(year, 1, 2, 3, 4, 5, tzinfo=UTC)
    der = sign_detached(CONTENT, ec_signer, signing_time=when)
    assert verify_detached(der, CONTENT).signing_time == when
    attrs = {a["type"].native: a["values"][0] for a in signer_info_of(der)["signed_attrs"]}
    assert attrs["signing_time"].name == "generalized_time"
    (tmp_path / "content.bin").write_bytes(CONTENT)
    (tmp_path / "sig.p7s").write_bytes(der)
    result = openssl_cms_verify(tmp_path / "sig.p7s", tmp_path / "content.bin", signing_pki)
    assert result.returncode == 0, result.stderr


def test_tampered_content(signer, trust):
    der = sign_detached(CONTENT, signer)
    report = verify_cms(der, CONTENT + b"!", trust)
    assert report.code == "signature_invalid"
    assert report.sub_indication.value == "HASH_FAILURE"
    assert [c.name for c in report.checks if c.passed is False] == ["message_digest"]


def test_tampered_signed_attributes(ec_signer, trust):
    der = sign_detached(CONTENT, ec_signer, signing_time=dt.datetime(2026, 1, 2, tzinfo=UTC))
    # Same length, other signing time: the signature over the attributes no longer holds.
    tampered = der.replace(b"260102000000Z", b"260103000000Z")
    assert tampered != der
    report = verify_cms(tampered, CONTENT, trust)
    assert report.code == "signature_invalid"
    assert report.sub_indication.value == "SIG_CRYPTO_FAILURE"


def test_signature_of_another_key(rsa_signer, ec_signer, trust):
    """An ECDSA signature presented with the RSA signer's certificate."""
    der = sign_detached(CONTENT, ec_signer)
    info = cms.ContentInfo.load(der)
    rsa_der = sign_detached(CONTENT, rsa_signer)
    rsa_info = cms.ContentInfo.load(rsa_der)
    # Keep the RSA SignerInfo (its identifier and attributes), with the ECDSA signature bytes.
    si = rsa_info["content"]["signer_infos"][0]
    si["signature"] = info["content"]["signer_infos"][0]["signature"].native
    report = verify_cms(rsa_info.dump(force=True), CONTENT, trust)
    assert report.code == "signature_invalid"


def test_signer_certificate_missing(ec_signer, trust):
    info = cms.ContentInfo.load(sign_detached(CONTENT, ec_signer))
    signed_data = info["content"]
    signed_data["certificates"] = [signed_data["certificates"][1]]  # the CA only
    report = verify_cms(info.dump(force=True), CONTENT, trust)
    assert report.code == "certificate_missing"
    assert report.sub_indication.value == "NO_SIGNING_CERTIFICATE_FOUND"


def test_content_missing(ec_signer, trust):
    report = verify_cms(sign_detached(CONTENT, ec_signer), None, trust)
    assert report.code == "content_missing"
    assert not report.usable_input


@pytest.mark.parametrize("data", [b"", b"\x30\x03\x02\x01", b"not der at all", b"\x30" + b"\x80" * 10])
def test_malformed(data, trust):
    report = verify_cms(data, CONTENT, trust)
    assert report.code == "signature_malformed"
    assert report.indication.value == "TOTAL_FAILED"


def test_truncated(ec_signer, trust):
    der = sign_detached(CONTENT, ec_signer)
    for cut in (10, len(der) // 2, len(der) - 1):
        assert verify_cms(der[:cut], CONTENT, trust).code == "signature_malformed"


def test_two_signer_infos_refused(ec_signer, rsa_signer, trust):
    info = cms.ContentInfo.load(sign_detached(CONTENT, ec_signer))
    other = signer_info_of(sign_detached(CONTENT, rsa_signer))
    info["content"]["signer_infos"] = [info["content"]["signer_infos"][0], other]
    assert verify_cms(info.dump(force=True), CONTENT, trust).code == "signature_malformed"


def test_without_signed_attributes_refused(ec_signer, trust):
    info = cms.ContentInfo.load(sign_detached(CONTENT, ec_signer))
    si = info["content"]["signer_infos"][0]
    # A signature directly over the content (no attributes), made by the HSM key.
    bare = cms.SignerInfo({
        "version": "v1", "sid": si["sid"], "digest_algorithm": si["digest_algorithm"],
        "signature_algorithm": si["signature_algorithm"], "signature": ec_signer.sign(CONTENT),
    })
    info["content"]["signer_infos"] = [bare]
    report = verify_cms(info.dump(force=True), CONTENT, trust)
    assert report.code == "signature_malformed"
    assert "signed attributes" in report.message


def test_sha1_digest_refused(ec_signer):
    info = cms.ContentInfo.load(sign_detached(CONTENT, ec_signer))
    info["content"]["signer_infos"][0]["digest_algorithm"] = {"algorithm": "sha1"}
    with pytest.raises(CmsError) as caught:
        verify_detached(info.dump(force=True), CONTENT)
    assert caught.value.code == "algorithm_not_allowed"


def test_signing_refusals(ec_signer, rsa_signer):
    import dataclasses

    with pytest.raises(SigningError) as caught:
        sign_detached(CONTENT, dataclasses.replace(ec_signer, certificate=None))
    assert caught.value.code == "certificate_missing"
    with pytest.raises(SigningError) as caught:
        sign_detached(CONTENT, dataclasses.replace(ec_signer, certificate=rsa_signer.certificate))
    assert caught.value.code == "certificate_key_mismatch"


def test_certificate_judged_at_the_signed_signing_time(hsm, ec_key, signing_pki):
    """A certificate that has expired since is still good for a signature made while it was
    valid (21 CFR 1311.55(c)); one made after it expired is not."""
    now = dt.datetime.now(UTC)
    short = signing_pki.signer(hsm, ec_key, common_name="Expired Since",
                               not_before=now - dt.timedelta(days=30),
                               not_after=now - dt.timedelta(days=10))
    trust = signing_pki.trust()
    during = sign_detached(CONTENT, short, signing_time=now - dt.timedelta(days=20))
    report = verify_cms(during, CONTENT, trust)
    assert report.valid, report.to_dict()
    assert report.signing_time == (now - dt.timedelta(days=20)).replace(microsecond=0)
    after = sign_detached(CONTENT, short)
    report = verify_cms(after, CONTENT, trust)
    assert report.code == "certificate_expired"
    assert report.sub_indication.value == "EXPIRED"


def test_future_signing_time_is_not_believed(hsm, ec_key, signing_pki):
    """A certificate not valid yet cannot be reached by claiming a signing time in the future."""
    start = dt.datetime.now(UTC) + dt.timedelta(days=3)
    future = signing_pki.signer(hsm, ec_key, common_name="Future Cert", not_before=start)
    der = sign_detached(CONTENT, future, signing_time=start + dt.timedelta(days=1))
    report = verify_cms(der, CONTENT, signing_pki.trust())
    assert report.code == "certificate_not_yet_valid"
    assert report.signing_time <= dt.datetime.now(UTC)


def test_verification_never_raises_on_mangled_input(ec_signer, trust):
    import random

    der = sign_detached(CONTENT, ec_signer)
    rng = random.Random(1127)
    for _ in range(300):
        data = bytearray(der)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            if rng.random() < 0.7:
                data[at] = rng.randrange(256)
            else:
                del data[at:at + rng.randint(1, 20)]
        report = verify_cms(bytes(data), CONTENT, trust)
        assert report.code is None or isinstance(report.code, str)
        report.to_dict()


def _resigned(der: bytes, signer, *, attrs=None, content_type: str | None = None, unsigned=None) -> bytes:
    """`der` with its signed attributes replaced by `attrs(old)` and signed again by the HSM key."""
    info = cms.ContentInfo.load(der)
    sd = info["content"]
    si = sd["signer_infos"][0]
    new_attrs = [cms.CMSAttribute.load(a.dump()) for a in si["signed_attrs"]]
    if attrs is not None:
        new_attrs = attrs(new_attrs)
    signed = cms.CMSAttributes(sorted(new_attrs, key=lambda a: a.dump()))
    fields = {"version": "v1", "sid": si["sid"], "digest_algorithm": si["digest_algorithm"],
              "signed_attrs": signed, "signature_algorithm": si["signature_algorithm"],
              "signature": signer.sign(signed.dump())}
    if unsigned is not None:
        fields["unsigned_attrs"] = cms.CMSAttributes(unsigned)
    encap = {"content_type": content_type} if content_type else sd["encap_content_info"]
    return cms.ContentInfo({"content_type": "signed_data", "content": cms.SignedData({
        "version": "v1", "digest_algorithms": sd["digest_algorithms"], "encap_content_info": encap,
        "certificates": sd["certificates"], "signer_infos": [cms.SignerInfo(fields)]})}).dump()


def test_another_content_type_is_not_a_signature_over_bytes(rsa_signer, trust):
    """A SignedData for a timestamp token (id-ct-TSTInfo), consistent in itself and signed by the
    HSM key, is not accepted as a signature over the document bytes (openssl would take it)."""
    tst = "1.2.840.113549.1.9.16.1.4"

    def retype(attrs):
        return [a for a in attrs if a["type"].native != "content_type"] + [
            cms.CMSAttribute({"type": "content_type", "values": [tst]})]

    der = _resigned(sign_detached(CONTENT, rsa_signer), rsa_signer, attrs=retype, content_type=tst)
    report = verify_cms(der, CONTENT, trust)
    assert report.code == "signature_malformed"
    assert "not id-data" in report.message
    assert verify_cms(_resigned(sign_detached(CONTENT, rsa_signer), rsa_signer), CONTENT, trust).valid


def test_signing_time_as_an_unsigned_attribute_is_refused(rsa_signer, trust):
    """RFC 5652 §11.3: signing-time is a signed attribute; openssl refuses it unsigned too."""
    late = cms.CMSAttribute({"type": "signing_time",
                             "values": [cms.Time({"utc_time": dt.datetime(2049, 1, 1, tzinfo=UTC)})]})
    der = _resigned(sign_detached(CONTENT, rsa_signer), rsa_signer, unsigned=[late])
    report = verify_cms(der, CONTENT, trust)
    assert report.code == "signature_malformed"
    assert "signing-time must be a signed attribute" in report.message


def test_a_certificate_with_a_duplicated_extension_is_a_report_not_a_crash(rsa_signer, trust):
    """cryptography raises DuplicateExtension (not a ValueError) when the extensions are read."""
    from asn1crypto import x509 as asn1_x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = asn1_x509.Certificate.load(rsa_signer.certificate.public_bytes(Encoding.DER))
    tbs = asn1_x509.TbsCertificate.load(cert["tbs_certificate"].dump())
    extensions = list(cert["tbs_certificate"]["extensions"])
    tbs["extensions"] = asn1_x509.Extensions([*extensions, asn1_x509.Extension.load(extensions[0].dump())])
    doubled = asn1_x509.Certificate({"tbs_certificate": tbs, "signature_algorithm": cert["signature_algorithm"],
                                     "signature_value": cert["signature_value"]})
    info = cms.ContentInfo.load(sign_detached(CONTENT, rsa_signer))
    info["content"]["certificates"] = [doubled]
    report = verify_cms(info.dump(force=True), CONTENT, trust)
    assert report.code == "certificate_malformed"
    assert "DuplicateExtension" in report.message
