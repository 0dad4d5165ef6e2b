"""Path validation, revocation and test-PKI defects found in review: each test reproduces one
against the real test PKI on disk (CA keys, CRLs made with `cryptography`) and the session's
SoftHSM keys; no part of the HSM or of the crypto is replaced."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.signing import pki
from gateway.signing.cms import sign_detached
from gateway.signing.report import Indication
from gateway.signing.validation import CrlCache, TrustStore, _split_bundle
from gateway.signing.verify import verify_cms
from pkihelp import SigningPki
from test_revocation_policy import ca_of, crl_builder, ec_public, now, scratch_pki  # noqa: F401 - fixtures too
from test_revocation_policy import make_cert as policy_cert

UTC = dt.timezone.utc
HOLD = x509.CRLReason(x509.ReasonFlags.certificate_hold)
REMOVE = x509.CRLReason(x509.ReasonFlags.remove_from_crl)


def make_cert(issuer, issuer_key, public_key, cn: str, *, eku=None, extra=()) -> x509.Certificate:
    """A signer certificate (test_revocation_policy.make_cert), with an extended key usage."""
    purposes = [] if eku is None else [(x509.ExtendedKeyUsage(eku), False)]
    return policy_cert(issuer, issuer_key, public_key, cn, extra=[*purposes, *extra])


def make_crl(issuer, key, entries=(), *, number: int, extensions=()) -> x509.CertificateRevocationList:
    """`entries`: (serial, revocation date or None, [(extension, critical), ...])."""
    builder = crl_builder(issuer, key, number)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    for serial, when, exts in entries:
        entry = (x509.RevokedCertificateBuilder().serial_number(serial)
                 .revocation_date(when or now() - dt.timedelta(seconds=30)))
        for ext, critical in exts:
            entry = entry.add_extension(ext, critical=critical)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(key, hashes.SHA256())


def put_crl(p: SigningPki, ca: str, crl: x509.CertificateRevocationList, name: str | None = None) -> Path:
    """Write `crl` as the CA's only CRL (`name` None) or as one more file in the CRL directory."""
    if name is None:
        path = p.layout.crl_path(ca)
        p.layout.crl_path(ca, pem=True).write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    else:
        path = p.crl_dir / name
    path.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    return path


def idp(**kwargs) -> x509.IssuingDistributionPoint:
    fields = dict(full_name=None, relative_name=None, only_contains_user_certs=False,
                  only_contains_ca_certs=False, only_some_reasons=None, indirect_crl=False,
                  only_contains_attribute_certs=False)
    fields.update(kwargs)
    return x509.IssuingDistributionPoint(**fields)


def openssl_verify(p: SigningPki, cert: x509.Certificate, tmp_path: Path) -> subprocess.CompletedProcess:
    cert_file = tmp_path / "leaf.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cmd = ["openssl", "verify", "-CAfile", str(p.bundle), "-crl_check_all"]
    for ca in pki.CA_NAMES:
        cmd += ["-CRLfile", str(p.layout.crl_path(ca, pem=True))]
    return subprocess.run([*cmd, str(cert_file)], capture_output=True, text=True, timeout=60)


# --- CRL scope and extensions (RFC 5280 5.2.5, 5.3, 6.3.3) -----------------------------------


def test_a_root_crl_for_end_entities_only_does_not_clear_the_sub_ca(scratch_pki, ec_public, tmp_path):
    """The receipt check took any current CRL of the root as the sub CA's status, even one whose
    issuing distribution point says it lists end-entity certificates only: a revoked sub CA
    would pass. Now the sub CA has no CRL that covers it: indeterminate, and the detail says why."""
    root, root_key = ca_of(scratch_pki, pki.ROOT)
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "Under A Sub CA")
    put_crl(scratch_pki, pki.ROOT, make_crl(root, root_key, number=500,
                                            extensions=[(idp(only_contains_user_certs=True), True)]))
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert)
    assert (result.failed_check, result.code) == ("revocation", "revocation_unavailable")
    assert "onlyContainsUserCerts" in result.detail and "TEST CSOS Sub CA" in result.detail
    assert openssl_verify(scratch_pki, cert, tmp_path).returncode != 0  # openssl agrees
    # A complete root CRL settles it again.
    put_crl(scratch_pki, pki.ROOT, make_crl(root, root_key, number=501))
    assert scratch_pki.trust(fetch_urls=False).validate_certificate(cert).valid
    assert openssl_verify(scratch_pki, cert, tmp_path).returncode == 0


def test_a_crl_with_an_unknown_critical_entry_extension_decides_nothing(scratch_pki, ec_public, tmp_path):
    """RFC 5280 5.3: a CRL carrying a critical entry extension the relying party cannot process
    must not be used for any certificate. It was used (for every serial but the odd entry's),
    and the certificate passed; openssl refuses it too."""
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "Odd CRL Entry Elsewhere")
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.7"), b"\x05\x00")
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, [(12345, None, [(odd, True)])], number=600))
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert)
    assert (result.failed_check, result.code) == ("revocation", "revocation_unavailable")
    assert openssl_verify(scratch_pki, cert, tmp_path).returncode != 0
    # The same CRL without the critical entry extension is a good one.
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, [(12345, None, [(odd, False)])], number=601))
    assert scratch_pki.trust(fetch_urls=False).validate_certificate(cert).valid
    assert openssl_verify(scratch_pki, cert, tmp_path).returncode == 0


def test_a_remove_from_crl_entry_of_a_delta_crl_is_not_a_revocation(scratch_pki, ec_public):
    """removeFromCRL (RFC 5280 5.3.1) undoes a hold; the receipt check read any entry as a
    revocation and refused a certificate a delta CRL had just released."""
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "Released By A Delta")
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, number=700))
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(
        csos, key, [(cert.serial_number, None, [(REMOVE, False)])], number=701,
        extensions=[(x509.DeltaCRLIndicator(700), True)]), name="csos-delta.crl")
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert)
    assert result.valid, result


def test_a_delta_crl_is_never_taken_for_a_complete_one(scratch_pki, ec_public):
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "Only A Delta")
    scratch_pki.layout.crl_path(pki.CSOS_CA).unlink()
    scratch_pki.layout.crl_path(pki.CSOS_CA, pem=True).unlink()
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, number=801,
                                               extensions=[(x509.DeltaCRLIndicator(800), True)]),
            name="csos-delta.crl")
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert)
    assert (result.failed_check, result.code) == ("revocation", "revocation_unavailable")


def test_a_hold_released_by_a_newer_crl_does_not_refuse(scratch_pki, ec_public):
    """Two issues of the CSOS CA's CRL in the directory (an archive kept beside the current one):
    the older lists a certificateHold, the newer no longer does. The older one's hold refused
    the certificate for as long as the file stayed; the newest issue decides a hold."""
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "Hold Released")
    held = make_crl(csos, key, [(cert.serial_number, None, [(HOLD, False)])], number=900)
    put_crl(scratch_pki, pki.CSOS_CA, held, name="csos-archive-900.crl")
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, number=901))
    assert scratch_pki.trust(fetch_urls=False).validate_certificate(cert).valid
    # A hold on the newest issue still refuses, and says it is a hold.
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, [(cert.serial_number, None, [(HOLD, False)])],
                                               number=902))
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert)
    assert result.code == "certificate_revoked"
    # A permanent revocation on an older issue is never undone by a newer one leaving it out.
    compromised = make_cert(csos, key, ec_public, "Compromised Earlier")
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, [(compromised.serial_number, None, [
        (x509.CRLReason(x509.ReasonFlags.key_compromise), False)])], number=903), name="csos-archive-903.crl")
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, number=904))
    assert scratch_pki.trust(fetch_urls=False).validate_certificate(compromised).code == "certificate_revoked"


def test_a_compromise_dated_before_the_signing_time_is_reported_with_reason_and_date(scratch_pki, ec_public):
    """Revoked after the signing time for keyCompromise with an invalidityDate before it: the
    certificate is refused on receipt, and the report says the reason and that the key was
    invalid before the signature was made (the detail named neither)."""
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "Compromised Before Signing")
    signed_at = now() - dt.timedelta(minutes=3)
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, [(cert.serial_number, now() - dt.timedelta(minutes=1), [
        (x509.CRLReason(x509.ReasonFlags.key_compromise), False),
        (x509.InvalidityDate(now().replace(tzinfo=None) - dt.timedelta(minutes=4)), False)])], number=1000))
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert, signed_at)
    assert result.code == "certificate_revoked"
    assert "(after the signing time), reason keyCompromise" in result.detail
    assert "key invalid since" in result.detail and result.detail.endswith("(before the signing time)")
    # A superseded key (no compromise) revoked after the signing time: refused all the same, and
    # the detail says which reason it was.
    other = make_cert(csos, key, ec_public, "Superseded After Signing")
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, [(other.serial_number, now() - dt.timedelta(minutes=1), [
        (x509.CRLReason(x509.ReasonFlags.superseded), False)])], number=1001))
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(other, signed_at)
    assert result.code == "certificate_revoked"
    assert "(after the signing time), reason superseded" in result.detail


# --- the signer's certificate: purposes and key strength (RFC 5280 4.2.1.12, SP 800-131A) -----


@pytest.mark.parametrize("eku", [
    [ExtendedKeyUsageOID.SERVER_AUTH],
    [ExtendedKeyUsageOID.CODE_SIGNING],
    [ExtendedKeyUsageOID.OCSP_SIGNING],
    [ExtendedKeyUsageOID.TIME_STAMPING],
])
def test_a_certificate_for_another_purpose_cannot_sign(scratch_pki, ec_public, eku):
    """A TLS server, code-signing, OCSP-responder or time-stamping certificate of the CSOS CA
    was accepted as an order signer: the extended key usage was not looked at."""
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "Other Purpose", eku=eku)
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert)
    assert (result.failed_check, result.code) == ("key_usage", "certificate_key_usage")
    assert "extended key usage" in result.detail


def test_signing_purposes_pass(scratch_pki, ec_public):
    csos, key = ca_of(scratch_pki)
    trust = scratch_pki.trust(fetch_urls=False)
    for eku in ([ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH],
                [x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")], [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], None):
        assert trust.validate_certificate(make_cert(csos, key, ec_public, "Signer", eku=eku)).valid


@pytest.mark.parametrize("make_key", [
    lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
    lambda: ec.generate_private_key(ec.SECP192R1()),
    lambda: ec.generate_private_key(ec.SECP256K1()),
], ids=["rsa1024", "p192", "secp256k1"])
def test_a_weak_signer_key_is_refused(scratch_pki, make_key):
    """RSA-1024 and curves outside P-256/384/521 passed: the path checks only weigh the keys that
    sign certificates, and the signer's own key verifies the document."""
    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, make_key().public_key(), "Weak Key")
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert)
    assert (result.failed_check, result.code) == ("certificate_chain", "algorithm_not_allowed")
    assert "Weak Key" in result.detail


def test_a_cms_signature_by_a_tls_server_certificate_is_not_passed(scratch_pki, hsm, rsa_key):
    """End to end: the HSM key signs, its certificate is a serverAuth-only one of the CSOS CA."""
    import dataclasses

    csos, key = ca_of(scratch_pki)
    base = hsm.signer(rsa_key)
    cert = make_cert(csos, key, base.public_key, "TLS Server", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    signer = dataclasses.replace(base, certificate=cert, chain=(csos,))
    content = b"26X000123 order content"
    report = verify_cms(sign_detached(content, signer), content, scratch_pki.trust(fetch_urls=False))
    assert report.code == "certificate_key_usage"
    assert report.indication is not Indication.TOTAL_PASSED


# --- the test PKI -------------------------------------------------------------------------------


def test_ensure_reissues_a_damaged_crl_instead_of_raising(tmp_path):
    """`gateway init` on a home whose CRL file was truncated ended in a ValueError traceback."""
    layout = pki.ensure_test_pki(tmp_path / "pki")
    layout.crl_path(pki.CSOS_CA).write_bytes(layout.crl_path(pki.CSOS_CA).read_bytes()[:40])
    pki.ensure_test_pki(tmp_path / "pki")
    crl = x509.load_der_x509_crl(layout.crl_path(pki.CSOS_CA).read_bytes())
    assert crl.is_signature_valid(SigningPki(layout.directory).cert(pki.CSOS_CA).public_key())


def test_a_crl_number_is_not_issued_again_when_the_index_lost_it(tmp_path):
    """The next CRL number came from index.json alone: an index restored from an older backup
    (or rebuilt) issued CRL numbers already used (RFC 5280 5.2.3)."""
    layout = pki.ensure_test_pki(tmp_path / "pki")
    number = lambda: x509.load_der_x509_crl(layout.crl_path(pki.CSOS_CA).read_bytes()).extensions \
        .get_extension_for_class(x509.CRLNumber).value.crl_number  # noqa: E731
    pki.issue_crl(layout.directory, cas=[pki.CSOS_CA])
    pki.issue_crl(layout.directory, cas=[pki.CSOS_CA])
    before = number()
    index = json.loads(layout.index.read_text())
    index["crl_numbers"] = {}
    layout.index.write_text(json.dumps(index))
    pki.issue_crl(layout.directory, cas=[pki.CSOS_CA])
    assert number() == before + 1


def test_a_delta_crl_in_the_directory_does_not_stop_fetching_the_complete_one(scratch_pki, ec_public, tmp_path):
    """A current CRL of the issuer's key in the directory made the cache skip the certificate's
    distribution point, even when that CRL was only a delta: revocation_unavailable although
    the complete CRL was one fetch away."""
    csos, key = ca_of(scratch_pki)
    complete = tmp_path / "csos-complete.crl"
    cert = make_cert(csos, key, ec_public, "Complete CRL Elsewhere", extra=[(x509.CRLDistributionPoints([
        x509.DistributionPoint([x509.UniformResourceIdentifier(complete.as_uri())], None, None, None)]), False)])
    complete.write_bytes(make_crl(csos, key, number=1100).public_bytes(serialization.Encoding.DER))
    scratch_pki.layout.crl_path(pki.CSOS_CA).unlink()
    scratch_pki.layout.crl_path(pki.CSOS_CA, pem=True).unlink()
    put_crl(scratch_pki, pki.CSOS_CA, make_crl(csos, key, number=1101,
                                               extensions=[(x509.DeltaCRLIndicator(1100), True)]),
            name="csos-delta.crl")
    result = scratch_pki.trust().validate_certificate(cert)
    assert result.valid, result


def test_a_crl_without_next_update_is_not_current(scratch_pki, ec_public):
    """RFC 5280 5.1.2.5: a CRL without nextUpdate gives no bound on how long it holds; it was
    taken as current for ever, so an old one (replayed on a plain-http distribution point) would
    clear a certificate revoked since. cryptography cannot build one: the CA signs it here."""
    from asn1crypto import crl as asn1_crl
    from cryptography.hazmat.primitives.asymmetric import padding

    csos, key = ca_of(scratch_pki)
    cert = make_cert(csos, key, ec_public, "Endless CRL")
    full = asn1_crl.CertificateList.load(make_crl(csos, key, number=1200).public_bytes(serialization.Encoding.DER))
    tbs = full["tbs_cert_list"].copy()
    tbs["next_update"] = None
    tbs = asn1_crl.TbsCertList.load(tbs.dump(force=True))
    endless = asn1_crl.CertificateList({
        "tbs_cert_list": tbs, "signature_algorithm": full["signature_algorithm"],
        "signature": key.sign(tbs.dump(), padding.PKCS1v15(), hashes.SHA256())}).dump()
    assert x509.load_der_x509_crl(endless).next_update_utc is None
    scratch_pki.layout.crl_path(pki.CSOS_CA).write_bytes(endless)
    scratch_pki.layout.crl_path(pki.CSOS_CA, pem=True).unlink()
    result = scratch_pki.trust(fetch_urls=False).validate_certificate(cert)
    assert (result.failed_check, result.code) == ("revocation", "revocation_out_of_bounds")
    assert "no nextUpdate" in result.detail


def test_import_cert_refuses_a_certificate_the_verifier_would_refuse(home_pki_key):
    """`gateway keys import-cert` installed a serverAuth-only certificate over the key's good one:
    every later signature of the key then failed verification."""
    from click.testing import CliRunner

    from gateway.cli import cli

    settings, hsm, label, public, good, tmp_path = home_pki_key
    csos, key = ca_of(SigningPki(settings.pki_dir))
    tls = make_cert(csos, key, public, "TLS Only", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    path = tmp_path / "tls.pem"
    path.write_bytes(tls.public_bytes(serialization.Encoding.PEM))
    result = CliRunner().invoke(cli, ["--home", str(settings.home), "keys", "import-cert", "--label", label,
                                      str(path)], catch_exceptions=False)
    assert result.exit_code == 1 and "[certificate_unusable]" in result.stderr
    assert "extended key usage" in result.stderr
    assert hsm.certificate(label) == good


@pytest.fixture
def home_pki_key(softhsm_settings, hsm, tmp_path):
    """A P-256 key of its own in the session token, with a good certificate installed."""
    import uuid

    from gateway.signing.enrol import install_certificate

    pki.ensure_test_pki(softhsm_settings.pki_dir)
    label = f"review-eku-{uuid.uuid4().hex[:8]}"
    public = hsm.generate_keypair(label, "p256")
    good = pki.issue_certificate(softhsm_settings.pki_dir, public, "csos-purchaser", common_name="Usable",
                                 dea_number="FD1234563").certificate
    install_certificate(softhsm_settings, hsm, label, good)
    return softhsm_settings, hsm, label, public, good, tmp_path


def test_crls_of_two_keys_of_one_ca_name_are_both_read(scratch_pki, ec_public):
    """Only the newest issue of a CRL is read; CRLs of two keys of one CA name (a key change,
    CRLs without an authority key identifier) are not issues of one CRL, so neither hides the
    other."""
    root, root_key = ca_of(scratch_pki, pki.ROOT)
    old, old_key = ca_of(scratch_pki)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    start = now() - dt.timedelta(minutes=5)
    new = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(root.subject)
           .public_key(new_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(start).not_valid_after(start + dt.timedelta(days=30))
           .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
           .add_extension(x509.KeyUsage(
               digital_signature=False, content_commitment=False, key_encipherment=False,
               data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
               encipher_only=False, decipher_only=False), critical=True)
           .sign(root_key, hashes.SHA256()))

    def crl_without_key_id(issuer_key, number, revoked=()):
        this = now() - dt.timedelta(minutes=1)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(old.subject).last_update(this)
                   .next_update(this + dt.timedelta(days=7)).add_extension(x509.CRLNumber(number), critical=False))
        for serial in revoked:
            builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                                      .revocation_date(this).build())
        return builder.sign(issuer_key, hashes.SHA256())

    by_old = make_cert(old, old_key, ec_public, "By The Old Key")
    by_new = make_cert(new, new_key, ec_public, "By The New Key")
    put_crl(scratch_pki, pki.CSOS_CA, crl_without_key_id(old_key, 1300, [by_old.serial_number]))
    put_crl(scratch_pki, pki.CSOS_CA, crl_without_key_id(new_key, 5), name="new-key.crl")
    anchors, intermediates = _split_bundle(x509.load_pem_x509_certificates(scratch_pki.bundle.read_bytes()))
    crls = CrlCache([scratch_pki.crl_dir], poll_seconds=0, fetch_urls=False)
    trust = TrustStore(anchors, [*intermediates, new], crls)
    assert trust.validate_certificate(by_new).valid
    assert trust.validate_certificate(by_old).code == "certificate_revoked"


def test_a_damaged_ca_file_is_a_coded_error_not_a_traceback(tmp_path, ec_public):
    """A truncated CA certificate or key made `gateway init` and `gateway pki issue` end in a
    ValueError traceback (the CLI only turns PkiError into `error [code]`)."""
    layout = pki.ensure_test_pki(tmp_path / "pki")
    good_cert = layout.cert_path(pki.CSOS_CA).read_bytes()
    layout.cert_path(pki.CSOS_CA).write_bytes(good_cert[:60])
    for attempt in (lambda: pki.ensure_test_pki(layout.directory),
                    lambda: pki.issue_certificate(layout.directory, ec_public, "csos-purchaser",
                                                  common_name="Damaged CA", dea_number="FD1234563")):
        with pytest.raises(pki.PkiError) as info:
            attempt()
        assert info.value.code == "pki_damaged" and "csos-ca.pem" in str(info.value)
    layout.cert_path(pki.CSOS_CA).write_bytes(good_cert)
    layout.key_path(pki.CSOS_CA).write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(pki.PkiError) as info:
        pki.issue_certificate(layout.directory, ec_public, "csos-purchaser", common_name="Damaged Key",
                              dea_number="FD1234563")
    assert info.value.code == "pki_damaged"
