"""Certificate paths and the limits around them, found in the second review: a look-alike issuer in
the signature's certificates, certificates kept by the caches, too many KeyInfo certificates, the
XML size /v1/verify accepts, and DEA numbers no certificate is issued for. The signatures are made
by the SoftHSM keys; the test PKI, openssl and the HTTP app on loopback are the real ones."""

from __future__ import annotations

import datetime as dt
import gc
import tracemalloc

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from pkihelp import (  # noqa: F401 - fixtures
    openssl_cms_verify,
    rsa_signer,
    signing_pki,
    trust,
)
from test_cms_review2 import with_extra_certificates

from gateway.identifiers import make_dea_number
from gateway.signing import pki, validation
from gateway.signing.cms import MAX_CERTIFICATES, sign_detached
from gateway.signing.verify import verify_cms, verify_xml
from gateway.signing.xmldsig import sign_enveloped
from tests.http.conftest import HTTP_RSA, http_keys, make_gateway  # noqa: F401 - fixtures

UTC = dt.timezone.utc
CONTENT = b"CSOS order 26X000777\r\n"
XML = b"<order><line>2 x NDC 12345-6789-01</line></order>"


def lookalike(signing_pki, serial: int = 1, key=None) -> x509.Certificate:
    """An EC-keyed CA certificate named like the RSA-keyed test CSOS Sub CA, claiming the root as
    its issuer: anyone can add such a one to the certificates a signature carries."""
    real = signing_pki.cert(pki.CSOS_CA)
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    return (x509.CertificateBuilder()
            .subject_name(real.subject).issuer_name(real.issuer).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now + dt.timedelta(days=300))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))


def chain_check(report):
    return next(c for c in report.checks if c.name == "certificate_chain")


# --- 1. a look-alike issuer of another key type -----------------------------------------------


def test_lookalike_intermediate_of_another_key_type_leaves_a_valid_cms_signature_valid(
        rsa_signer, signing_pki, trust, tmp_path):
    """The EC look-alike was also tried as the issuer of the CRL of the RSA-signed signer
    certificate, and the path library's AssertionError on the key type ended the validation:
    certificate_chain_invalid ("AssertionError: ") where openssl says successful."""
    assert isinstance(signing_pki.cert(pki.CSOS_CA).public_key(), type(rsa_signer.public_key))
    der = with_extra_certificates(sign_detached(CONTENT, rsa_signer),
                                  lookalike(signing_pki).public_bytes(Encoding.DER))
    (tmp_path / "sig.p7s").write_bytes(der)
    (tmp_path / "content").write_bytes(CONTENT)
    ours = openssl_cms_verify(tmp_path / "sig.p7s", tmp_path / "content", signing_pki)
    assert ours.returncode == 0, ours.stderr

    report = verify_cms(der, CONTENT, trust)
    assert report.valid, chain_check(report)
    assert [c.subject for c in report.chain][1:] == [signing_pki.cert(pki.CSOS_CA).subject.rfc4514_string(),
                                                     signing_pki.cert(pki.ROOT).subject.rfc4514_string()]


def test_lookalike_intermediate_in_keyinfo_leaves_a_valid_xml_signature_valid(rsa_signer, signing_pki, trust):
    real = signing_pki.cert(pki.CSOS_CA)
    signed = sign_enveloped(XML, rsa_signer, chain=[lookalike(signing_pki), real])
    report, tree = verify_xml(signed, trust)
    assert report.valid and tree is not None, chain_check(report)


def test_only_lookalike_issuers_still_fail_the_chain(rsa_signer, signing_pki, trust):
    """A certificate whose only path runs through the look-alike is refused as a chain that does
    not verify (the look-alike's signature is not the root's), not by the library's crash."""
    foreign = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Look-alike Signer")])
    fake_ca = lookalike(signing_pki, key=foreign)
    leaf = (x509.CertificateBuilder().subject_name(name).issuer_name(fake_ca.subject)
            .public_key(rsa_signer.public_key).serial_number(7)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .sign(foreign, hashes.SHA256()))  # made by the look-alike's key, not the CSOS CA's
    result = trust.validate_certificate(leaf, extra_certs=[fake_ca])
    assert not result.valid and result.failed_check == validation.CHECK_CHAIN
    assert "AssertionError" not in result.detail


# --- 2. the caches keep no large certificates ----------------------------------------------------


def _bulky(i: int, key, *, self_signed: bool) -> x509.Certificate:
    """A certificate of some 300 KB (an unknown extension holding zeros), as a sender may make."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Bulky {i}")])
    issuer = subject if self_signed else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Nobody")])
    now = dt.datetime.now(UTC)
    filler = b"\x04\x83" + (300_000).to_bytes(3, "big") + bytes(300_000)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(1000 + i)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), filler),
                           critical=False)
            .sign(key, hashes.SHA256()))


def test_large_certificates_are_not_kept_by_the_caches(trust, rsa_signer):
    key = ec.generate_private_key(ec.SECP256R1())
    signers = [_bulky(i, key, self_signed=i % 2 == 0) for i in range(6)]
    extras = [_bulky(100 + i, key, self_signed=False) for i in range(6)]
    assert all(len(c.public_bytes(Encoding.DER)) > validation.MAX_CACHED_CERTIFICATE_BYTES for c in signers)
    trust.validate_certificate(rsa_signer.certificate)  # anchors, intermediates: cached already

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for cert, extra in zip(signers, extras):
            result = trust.validate_certificate(cert, extra_certs=[extra])
            assert not result.valid
        del result, cert, extra
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 12 certificates of 300 KB left some 20 MB held (DER keys, asn1crypto's parsed copies, the
    # certificates whose CRLs were looked for or whose issuer was checked).
    assert held < 500_000, f"{held} bytes held after validating 12 certificates of 300 KB"
    assert not any(len(der) > validation.MAX_CACHED_CERTIFICATE_BYTES
                   for der in (*validation._asn1_cache, *validation._x509_cache))
    # Nor the sets of certificates already seen (their DER lives in cryptography's own memory,
    # which tracemalloc does not see).
    bulky = {*signers, *extras}
    assert not bulky & set(trust.crls._covered) and not bulky & set(trust._issued_cache)
    # A certificate of a usual size is still worked out once.
    assert rsa_signer.certificate.public_bytes(Encoding.DER) in validation._asn1_cache
    assert trust.validate_certificate(rsa_signer.certificate).cached
    # A valid signature carrying a large certificate besides is judged anew each time: the
    # outcome is not remembered under a key holding that certificate.
    for _ in range(2):
        again = trust.validate_certificate(rsa_signer.certificate, extra_certs=[extras[0]])
        assert again.valid and not again.cached


def test_the_report_keeps_no_large_signer_certificate(rsa_signer):
    """Every verification report summarises its signer's certificate; the summaries were kept by
    certificate (1,024 of them), the sender's 300 KB ones too."""
    from gateway.signing import report

    bulky = _bulky(7, ec.generate_private_key(ec.SECP256R1()), self_signed=True)
    before = report._summary.cache_info().currsize
    summary = report.CertificateSummary.of(bulky)
    assert summary.subject == "CN=Bulky 7"
    assert report._summary.cache_info().currsize == before
    report.CertificateSummary.of(rsa_signer.certificate)
    assert report.CertificateSummary.of(rsa_signer.certificate) is report.CertificateSummary.of(
        rsa_signer.certificate)


# --- 3. at most MAX_CERTIFICATES in KeyInfo --------------------------------------------------


def test_keyinfo_certificates_are_limited_like_cms(rsa_signer, signing_pki, trust):
    """Each KeyInfo certificate is a path candidate; 200 look-alikes kept the path checks, which
    all verifications share, busy for some 3 s."""
    key = ec.generate_private_key(ec.SECP256R1())
    real = signing_pki.cert(pki.CSOS_CA)
    fakes = [lookalike(signing_pki, serial=10 + i, key=key) for i in range(MAX_CERTIFICATES - 1)]

    too_many = sign_enveloped(XML, rsa_signer, chain=[real, *fakes])  # signer + 32 = 33
    report, tree = verify_xml(too_many, trust)
    assert tree is None and report.code == "signature_malformed"
    assert f"at most {MAX_CERTIFICATES}" in report.message

    at_limit = sign_enveloped(XML, rsa_signer, chain=[real, *fakes[:-1]])  # signer + 31 = 32
    report, tree = verify_xml(at_limit, trust)
    assert report.valid, report.checks


# --- 4. /v1/verify takes what /v1/sign made ---------------------------------------------------------


async def test_verify_takes_documents_up_to_the_configured_body_limit(make_gateway):
    gw = await make_gateway(max_body_bytes=3_000_000)
    body = b"<order>" + b"".join(b"<line>%07d %s</line>" % (i, b"x" * 1000) for i in range(1500)) + b"</order>"
    assert len(body) > 1_048_576
    resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}&format=xmldsig", data=body,
                              headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
    assert resp.status == 200, await resp.text()
    signed = await resp.read()
    resp = await gw.http.post("/v1/verify", data=signed,
                              headers={**gw.auth("pharmacy"), "Content-Type": "application/xml"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["valid"] is True


# --- 5. no DEA certificate for an X (former DATA-waiver) number ---------------------------------------


@pytest.mark.parametrize("profile", ["csos-purchaser", "csos-supplier", "epcs-prescriber", "epcs-pharmacy"])
def test_x_numbers_are_not_certified(signing_pki, profile):
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    number = make_dea_number("XB", "123456")
    with pytest.raises(pki.PkiError) as refused:
        pki.issue_certificate(signing_pki.directory, key, profile, common_name="Waiver Number",
                              dea_number=number)
    assert refused.value.code == "dea_number_not_registration"
    assert number in str(refused.value)
    # The practitioner's registration is certified as before.
    issued = pki.issue_certificate(signing_pki.directory, key, profile, common_name="Registrant",
                                   dea_number=make_dea_number("BB", "123456"))
    assert issued.certificate.issuer == signing_pki.cert(pki.PROFILES[profile].ca).subject
