"""Certificate trust: anchors, validity at the signing time, CRLs (cache, sources), key usage."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from pkihelp import (  # noqa: F401 - fixtures
    SigningPki,
    signing_pki,
    untrusted_pki,
)

from gateway.signing import pki
from gateway.signing.validation import (
    CrlCache,
    TrustStore,
    validate_certificate,
)
from tests.loopback import serving

UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def ec_public(hsm, ec_key):
    return hsm.public_key(ec_key)


@pytest.fixture(scope="module")
def rsa_public(hsm, rsa_key):
    return hsm.public_key(rsa_key)


@pytest.fixture()
def scratch_pki(tmp_path) -> SigningPki:
    """A PKI of its own, for tests that revoke a CA or age its CRLs."""
    directory = tmp_path / "pki"
    pki.ensure_test_pki(directory)
    return SigningPki(directory)


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def test_valid_chain(signing_pki, ec_public, rsa_public):
    trust = signing_pki.trust()
    for key in (ec_public, rsa_public):
        cert = signing_pki.issue(key).certificate
        result = trust.validate_certificate(cert)
        assert result.valid, result
        assert [c.subject for c in result.path] == [
            cert.subject, signing_pki.cert(pki.CSOS_CA).subject, signing_pki.cert(pki.ROOT).subject]
        assert not result.cached


def test_bundle_split_and_chain_for(signing_pki, ec_public):
    trust = signing_pki.trust()
    assert [c.subject for c in trust.anchors] == [signing_pki.cert(pki.ROOT).subject]
    assert {c.subject for c in trust.intermediates} == {
        signing_pki.cert(pki.CSOS_CA).subject, signing_pki.cert(pki.EPCS_CA).subject}
    cert = signing_pki.issue(ec_public, "epcs-pharmacy").certificate
    assert [c.subject for c in trust.chain_for(cert)] == [signing_pki.cert(pki.EPCS_CA).subject]


def test_untrusted_root(signing_pki, untrusted_pki, ec_public):
    cert = untrusted_pki.issue(ec_public).certificate
    result = signing_pki.trust().validate_certificate(cert)
    assert result.code == "certificate_untrusted"
    assert result.failed_check == "certificate_chain"
    # Even with the foreign intermediate supplied, its root is not ours.
    result = signing_pki.trust().validate_certificate(
        cert, extra_certs=[untrusted_pki.cert(pki.CSOS_CA)])
    assert result.code == "certificate_untrusted"


def test_validity_is_judged_at_the_given_time(signing_pki, ec_public):
    trust = signing_pki.trust()
    start = now() - dt.timedelta(days=100)
    cert = signing_pki.issue(ec_public, not_before=start, not_after=start + dt.timedelta(days=30)).certificate
    expired = trust.validate_certificate(cert)
    assert expired.code == "certificate_expired" and expired.failed_check == "certificate_validity"
    assert trust.validate_certificate(cert, start + dt.timedelta(days=10)).valid
    early = trust.validate_certificate(cert, start - dt.timedelta(days=1))
    assert early.code == "certificate_not_yet_valid"


def test_not_yet_valid(signing_pki, ec_public):
    cert = signing_pki.issue(ec_public, not_before=now() + dt.timedelta(days=2)).certificate
    assert signing_pki.trust().validate_certificate(cert).code == "certificate_not_yet_valid"


def test_revoked_certificate(signing_pki, ec_public):
    trust = signing_pki.trust()
    cert = signing_pki.issue(ec_public).certificate
    before = now()
    assert trust.validate_certificate(cert).valid
    signing_pki.revoke(cert)
    result = trust.validate_certificate(cert)
    assert result.code == "certificate_revoked" and result.failed_check == "revocation"
    # Signed before the revocation: still refused, the CRL is checked on receipt.
    result = trust.validate_certificate(cert, before - dt.timedelta(minutes=1))
    assert result.code == "certificate_revoked"
    assert "after the signing time" in result.detail


def test_revoked_intermediate(scratch_pki, ec_public):
    cert = scratch_pki.issue(ec_public).certificate
    trust = scratch_pki.trust()
    assert trust.validate_certificate(cert).valid
    pki.revoke(scratch_pki.directory, scratch_pki.cert(pki.CSOS_CA).serial_number, "ca_compromise")
    assert trust.validate_certificate(cert).code == "certificate_revoked"


def test_no_crl_available(scratch_pki, ec_public):
    cert = scratch_pki.issue(ec_public).certificate
    shutil.rmtree(scratch_pki.crl_dir)
    trust = TrustStore.from_pem_bundle(scratch_pki.bundle, [scratch_pki.crl_dir], fetch_urls=False)
    result = trust.validate_certificate(cert)
    assert result.code == "revocation_unavailable" and result.failed_check == "revocation"


def test_stale_crl(scratch_pki, ec_public):
    cert = scratch_pki.issue(ec_public, not_before=now() - dt.timedelta(days=30)).certificate
    pki.issue_crl(scratch_pki.directory, this_update=now() - dt.timedelta(days=20),
                  next_update=now() - dt.timedelta(days=13))
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert)
    assert result.code in ("revocation_out_of_bounds", "revocation_unavailable")
    assert result.failed_check == "revocation"
    # Not even at a time the CRL covered: the signing time is the signer's claim, and a backdated
    # one must not let a stale CRL stand in for the check on receipt.
    past = scratch_pki.trust(fetch_urls=False).validate_certificate(cert, now() - dt.timedelta(days=15))
    assert past.code == "revocation_out_of_bounds", past
    assert "current on receipt" in past.detail
    # A CRL current now makes the same signing time good.
    pki.issue_crl(scratch_pki.directory)
    assert scratch_pki.trust(fetch_urls=False).validate_certificate(cert, now() - dt.timedelta(days=15)).valid


def test_crl_fetched_from_distribution_point(scratch_pki, ec_public):
    """No CRL directory configured: the file: URL in the certificates is followed."""
    cert = scratch_pki.issue(ec_public).certificate
    trust = TrustStore.from_pem_bundle(scratch_pki.bundle)
    assert trust.validate_certificate(cert).valid
    offline = TrustStore.from_pem_bundle(scratch_pki.bundle, fetch_urls=False)
    assert offline.validate_certificate(cert).code == "revocation_unavailable"


def test_strangers_distribution_points_are_never_fetched(scratch_pki, untrusted_pki, ec_public):
    """A certificate our CAs did not issue cannot make the gateway fetch its CRL URL."""
    trust = TrustStore.from_pem_bundle(scratch_pki.bundle)
    stranger = untrusted_pki.issue(ec_public).certificate
    assert trust.validate_certificate(stranger).code == "certificate_untrusted"
    assert not any("untrusted" in source.lower() or str(untrusted_pki.directory) in source
                   for source in trust.crls.sources())
    ours = scratch_pki.issue(ec_public).certificate
    assert trust.validate_certificate(ours).valid
    assert any(source.startswith("file:") for source in trust.crls.sources())


def test_crl_kept_until_next_update_then_fetched_again(scratch_pki, ec_public):
    cert = scratch_pki.issue(ec_public).certificate
    clock = [now()]
    cache = CrlCache(clock=lambda: clock[0])
    anchors = [scratch_pki.cert(pki.ROOT)]
    intermediates = [scratch_pki.cert(pki.CSOS_CA), scratch_pki.cert(pki.EPCS_CA)]
    trust = TrustStore(anchors, intermediates, cache)
    assert trust.validate_certificate(cert).valid
    generation, crls = cache.current([cert])
    assert any(c.crl.issuer == cert.issuer for c in crls)
    scratch_pki.revoke(cert)  # a new CRL is published at the distribution point
    clock[0] = now() + dt.timedelta(days=1)
    assert cache.current([cert])[0] == generation  # cached CRL still current: not fetched again
    assert trust.validate_certificate(cert, now()).valid
    clock[0] = now() + dt.timedelta(days=8)  # past nextUpdate (7 days)
    assert cache.current([cert])[0] != generation
    assert trust.validate_certificate(cert, now()).code == "certificate_revoked"


def test_crl_directory_polling(scratch_pki, ec_public):
    cert = scratch_pki.issue(ec_public).certificate
    trust = TrustStore.from_pem_bundle(scratch_pki.bundle, [scratch_pki.crl_dir],
                                       fetch_urls=False, poll_seconds=3600)
    assert trust.validate_certificate(cert).valid
    scratch_pki.revoke(cert)
    assert trust.validate_certificate(cert).valid  # not looked at again yet
    trust.crls.refresh()
    assert trust.validate_certificate(cert).code == "certificate_revoked"


def test_result_cache(signing_pki, ec_public):
    trust = signing_pki.trust()
    cert = signing_pki.issue(ec_public).certificate
    first = trust.validate_certificate(cert)
    second = trust.validate_certificate(cert)
    assert first.valid and second.valid
    assert not first.cached and second.cached
    assert second.path == first.path
    # Outside the certificate's validity the cached outcome does not apply.
    early = trust.validate_certificate(cert, cert.not_valid_before_utc - dt.timedelta(days=1))
    assert early.code == "certificate_not_yet_valid" and not early.cached
    # A new CRL state is a new question.
    signing_pki.revoke(cert)
    third = trust.validate_certificate(cert)
    assert third.code == "certificate_revoked" and not third.cached


def _issue_from_csos_ca(layout: pki.PkiLayout, public_key, *, signing: bool = True,
                        crl_url: str | None = None) -> x509.Certificate:
    """A certificate made by hand with the test CSOS CA's key, for shapes the profiles do not
    issue: key encipherment only (`signing=False`), or an http CRL distribution point."""
    ca = x509.load_pem_x509_certificate(layout.cert_path(pki.CSOS_CA).read_bytes())
    ca_key = serialization.load_pem_private_key(layout.key_path(pki.CSOS_CA).read_bytes(), None)
    start = now() - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Hand Made")]))
        .issuer_name(ca.subject).public_key(public_key).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=signing, content_commitment=signing, key_encipherment=not signing,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if crl_url:
        builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(crl_url)], None, None, None)]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


@pytest.fixture()
def crl_server(scratch_pki):
    """A loopback HTTP server publishing the scratch PKI's CSOS CA CRL; counts the fetches."""
    with serving(lambda: scratch_pki.layout.crl_path(pki.CSOS_CA).read_bytes(), "application/pkix-crl") as (
            base, fetches):
        yield f"{base}/csos-ca.crl", fetches


def test_crl_over_http(scratch_pki, crl_server, ec_public):
    """A certificate whose distribution point is an http URL: the CRL is fetched once, kept, and
    its entries are honoured."""
    url, fetches = crl_server
    cert = _issue_from_csos_ca(scratch_pki.layout, ec_public, crl_url=url)
    trust = TrustStore.from_pem_bundle(scratch_pki.bundle, [scratch_pki.crl_dir.parent / "no-such-dir"])
    # The intermediates' own CRL (the root's) comes from its file: distribution point.
    assert trust.validate_certificate(cert).valid
    assert trust.validate_certificate(cert, now() - dt.timedelta(minutes=1)).valid
    assert fetches == ["/csos-ca.crl"]
    assert url in trust.crls.sources()

    # Revoked later: a new trust store (fresh cache) fetches the new CRL and refuses.
    ca_key = serialization.load_pem_private_key(
        scratch_pki.layout.key_path(pki.CSOS_CA).read_bytes(), None)
    ca = scratch_pki.cert(pki.CSOS_CA)
    crl = (
        x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
        .last_update(now() - dt.timedelta(minutes=1)).next_update(now() + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(99), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                                 .revocation_date(now() - dt.timedelta(seconds=30)).build())
        .sign(ca_key, hashes.SHA256())
    )
    scratch_pki.layout.crl_path(pki.CSOS_CA).write_bytes(crl.public_bytes(serialization.Encoding.DER))
    fresh = TrustStore.from_pem_bundle(scratch_pki.bundle)
    assert fresh.validate_certificate(cert).code == "certificate_revoked"
    assert fetches == ["/csos-ca.crl", "/csos-ca.crl"]


def test_key_usage(signing_pki, rsa_public):
    trust = signing_pki.trust()
    cert = _issue_from_csos_ca(signing_pki.layout, rsa_public, signing=False)
    result = trust.validate_certificate(cert)
    assert result.code == "certificate_key_usage" and result.failed_check == "key_usage"
    good = signing_pki.issue(rsa_public).certificate
    assert trust.validate_certificate(good, usage={"digital_signature", "non_repudiation"}).valid
    assert validate_certificate(trust, good, usage=["non_repudiation"]).valid
    with pytest.raises(ValueError):
        trust.validate_certificate(good, usage={"key_encipherment_typo"})


async def test_validation_inside_an_event_loop(signing_pki, ec_public):
    """The HTTP server calls the synchronous API from worker threads and from the loop."""
    trust = signing_pki.trust()
    cert = signing_pki.issue(ec_public).certificate
    assert trust.validate_certificate(cert).valid
    result = await asyncio.get_running_loop().run_in_executor(None, trust.validate_certificate, cert)
    assert result.valid


def test_trust_store_needs_an_anchor(signing_pki):
    with pytest.raises(ValueError):
        TrustStore([], [signing_pki.cert(pki.CSOS_CA)])
