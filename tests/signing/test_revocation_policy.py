"""Revocation on receipt (validation._revocation_on_receipt) and the CRLs the trust store may rely
on: real test PKI on disk, certificates and CRLs made here with the PKI's own CA keys."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gateway.signing import pki
from gateway.signing.validation import CrlCache, TrustStore, _split_bundle
from pkihelp import SigningPki

UTC = dt.timezone.utc


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


@pytest.fixture
def scratch_pki(tmp_path) -> SigningPki:
    pki.ensure_test_pki(tmp_path / "pki")
    return SigningPki(tmp_path / "pki")


@pytest.fixture(scope="module")
def ec_public(hsm, ec_key):
    return hsm.public_key(ec_key)


def ca_of(p: SigningPki, name: str = pki.CSOS_CA):
    return p.cert(name), serialization.load_pem_private_key(p.layout.key_path(name).read_bytes(), None)


def make_cert(issuer: x509.Certificate, issuer_key, public_key, cn: str, *, cdp: str | None = None,
              subject: x509.Name | None = None, ca: bool = False, key_id: bool = True,
              extra=()) -> x509.Certificate:
    """`extra`: more extensions, as (extension, critical) pairs."""
    start = now() - dt.timedelta(minutes=5)
    usage = x509.KeyUsage(digital_signature=not ca, content_commitment=not ca, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                          encipher_only=False, decipher_only=False)
    builder = (x509.CertificateBuilder()
               .subject_name(subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(issuer.subject).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(usage, critical=True))
    if key_id:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if cdp:
        builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(cdp)], None, None, None)]), critical=False)
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def crl_builder(issuer: x509.Certificate, key, number: int) -> x509.CertificateRevocationListBuilder:
    """What every test CRL starts with: its issuer, a week from a minute ago, its number and the
    issuer key's identifier."""
    this = now() - dt.timedelta(minutes=1)
    return (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
            .last_update(this).next_update(this + dt.timedelta(days=7))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                           critical=False))


def make_crl(issuer: x509.Certificate, key, revoked=(), *, signing_key=None, number: int = 1000,
             revoked_at: dt.datetime | None = None) -> x509.CertificateRevocationList:
    builder = crl_builder(issuer, key, number)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(revoked_at or now() - dt.timedelta(seconds=30)).build())
    return builder.sign(signing_key or key, hashes.SHA256())


def write(path: Path, crl: x509.CertificateRevocationList) -> None:
    path.write_bytes(crl.public_bytes(serialization.Encoding.DER))


def test_a_certificate_without_distribution_point_is_checked_against_its_issuers_crl(scratch_pki, ec_public):
    """Before: no distribution point meant no revocation check at all, reported as passed."""
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "No Distribution Point")
    assert scratch_pki.trust(fetch_urls=False).validate_certificate(cert).valid
    write(scratch_pki.layout.crl_path(pki.CSOS_CA), make_crl(csos, key, [cert.serial_number]))
    scratch_pki.layout.crl_path(pki.CSOS_CA, pem=True).unlink()
    assert scratch_pki.trust(fetch_urls=False).validate_certificate(cert).code == "certificate_revoked"
    # A store that only follows distribution points has nothing to check it with: refused.
    url_only = TrustStore.from_pem_bundle(scratch_pki.bundle)
    result = url_only.validate_certificate(cert)
    assert (result.failed_check, result.code) == ("revocation", "revocation_unavailable")


def test_the_crl_of_a_ca_key_is_not_taken_from_its_predecessor(scratch_pki, ec_public, tmp_path):
    """After a CA key change both keys' CRLs carry the CA's name; the new key's CRL must still be
    fetched and read for a certificate of the new key, whatever was validated before."""
    logging.disable(logging.WARNING)
    try:
        root, root_key = ca_of(scratch_pki, pki.ROOT)
        old, old_key = ca_of(scratch_pki)
        new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        new = make_cert(root, root_key, new_key.public_key(), "", subject=old.subject, ca=True,
                        cdp=scratch_pki.layout.crl_url(pki.ROOT))
        old_crl, new_crl = tmp_path / "old.crl", tmp_path / "new.crl"
        by_old = make_cert(old, old_key, ec_public, "Issued By The Old Key", cdp=old_crl.as_uri())
        by_new = make_cert(new, new_key, ec_public, "Issued By The New Key", cdp=new_crl.as_uri())
        write(old_crl, make_crl(old, old_key))
        write(new_crl, make_crl(new, new_key, [by_new.serial_number]))
        bundle = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (root, old, new))
        trust = TrustStore.from_pem_bundle(bundle)
        assert trust.validate_certificate(by_old).valid
        assert trust.validate_certificate(by_new).code == "certificate_revoked"
    finally:
        logging.disable(logging.NOTSET)


def test_an_issuer_key_of_the_wrong_type_is_an_invalid_chain_not_a_crash(scratch_pki, ec_public):
    csos, _ = ca_of(scratch_pki)  # an RSA CA
    forged = make_cert(csos, ec.generate_private_key(ec.SECP256R1()), ec_public, "Forged", key_id=False)
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(forged)
    assert (result.failed_check, result.code) == ("certificate_chain", "certificate_chain_invalid")


def test_a_fetched_crl_not_signed_by_the_ca_is_not_kept(scratch_pki, ec_public, tmp_path):
    """One forged response must not stand until its own nextUpdate: it is refused when fetched,
    and the genuine CRL is taken at the next try."""
    csos, key = ca_of(scratch_pki)
    url = tmp_path / "csos.crl"
    cert = make_cert(csos, key, ec_public, "Fetched CRL", cdp=url.as_uri())
    write(url, make_crl(csos, key, signing_key=rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    anchors, intermediates = _split_bundle(x509.load_pem_x509_certificates(scratch_pki.bundle.read_bytes()))
    trust = TrustStore(anchors, intermediates, CrlCache(poll_seconds=0, retry_failed_after=0))
    assert trust.validate_certificate(cert).code == "revocation_unavailable"
    assert not any(s.endswith("csos.crl") for s in trust.crls.sources())
    write(url, make_crl(csos, key))
    assert trust.validate_certificate(cert).valid


def test_a_revocation_after_the_signing_time_still_refuses_and_says_so(scratch_pki, ec_public):
    """The CRL is read on receipt: a key revoked since it signed (a compromise found later) is
    refused, and the detail says the revocation came after the signing time."""
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "Revoked Later")
    write(scratch_pki.layout.crl_path(pki.CSOS_CA),
          make_crl(csos, key, [cert.serial_number], revoked_at=now() - dt.timedelta(minutes=1)))
    scratch_pki.layout.crl_path(pki.CSOS_CA, pem=True).unlink()
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert, now() - dt.timedelta(minutes=2))
    assert result.code == "certificate_revoked"
    assert "(after the signing time)" in result.detail


def test_a_forged_crl_beside_the_genuine_one_decides_nothing(scratch_pki, ec_public):
    """A CRL in the CA's name signed by another key (here of another type, which made the path
    checks raise) is set aside; the genuine CRL decides."""
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "Beside A Forgery")
    write(scratch_pki.crl_dir / "forged.crl",
          make_crl(csos, key, [cert.serial_number], signing_key=ec.generate_private_key(ec.SECP256R1())))
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert)
    assert result.valid, result


def test_certificates_a_signature_carries_are_not_remembered_on_crls(scratch_pki, ec_public):
    """A CRL no configured CA signed was checked against every certificate a signature carried,
    and each was remembered on it: memory grew with what senders chose to send."""
    csos, key = ca_of(scratch_pki)
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = make_cert(csos, stranger_key, stranger_key.public_key(), "Stranger CA", ca=True)
    write(scratch_pki.crl_dir / "stranger.crl", make_crl(stranger, stranger_key))
    trust = scratch_pki.trust(fetch_urls=False)
    cert = make_cert(csos, key, ec_public, "Carrying Extras")
    for _ in range(5):
        extras = [make_cert(csos, key, ec.generate_private_key(ec.SECP256R1()).public_key(), "Extra")
                  for _ in range(4)]
        assert trust.validate_certificate(cert, extra_certs=extras).valid
    _, entries = trust.crls.current()
    assert max(len(e.signed_by) for e in entries) <= len(trust.anchors) + len(trust.intermediates)
