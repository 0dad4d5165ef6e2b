"""The test PKI: CAs, profiles, CRLs and revocation, checked with openssl and pyhanko-certvalidator."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat
import subprocess

import pytest
from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import RevokedError

from gateway.signing import pki
from gateway.signing.dea import dea_number_matches, read_dea_info

UTC = dt.timezone.utc
DEA = "AP5836727"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("home") / "pki"
    pki.ensure_test_pki(directory)
    return directory


@pytest.fixture(scope="module")
def subject_key():
    return ec.generate_private_key(ec.SECP256R1())


def _issue(pki_dir, key, profile="csos-purchaser", **kw):
    args = dict(common_name="Demo Purchaser", organization="Demo Purchaser Pharmacy", dea_number=DEA,
                address={"Line1": "100 Demo Street", "City": "Springfield", "State": "IL",
                         "PostalCode": "62701"}, email="orders@purchaser.example")
    if profile.startswith("epcs-pharmacy"):
        args.pop("dea_number")
    args.update(kw)
    return pki.issue_certificate(pki_dir, key.public_key(), profile, **args)


def _openssl_verify(pki_dir, cert_path, *extra: str, crl_check: bool = True):
    layout = pki.PkiLayout(pki_dir)
    cmd = ["openssl", "verify", "-CAfile", str(layout.bundle)]
    if crl_check:
        cmd += ["-crl_check_all"]
        for ca in pki.CA_NAMES:
            cmd += ["-CRLfile", str(layout.crl_path(ca, pem=True))]
    cmd += [*extra, str(cert_path)]
    return subprocess.run(cmd, capture_output=True, text=True)


def _crl(pki_dir, ca):
    return x509.load_der_x509_crl(pki.PkiLayout(pki_dir).crl_path(ca).read_bytes())


def _crl_number(pki_dir, ca):
    return _crl(pki_dir, ca).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


# --- the CAs ------------------------------------------------------------------------------------

def test_layout_and_private_key_modes(pki_dir):
    layout = pki.PkiLayout(pki_dir)
    for ca in pki.CA_NAMES:
        assert layout.cert_path(ca).exists()
        assert stat.S_IMODE(layout.key_path(ca).stat().st_mode) == 0o600
        assert layout.crl_path(ca).exists() and layout.crl_path(ca, pem=True).exists()
    assert stat.S_IMODE((pki_dir / "private").stat().st_mode) == 0o700
    certs = pki.load_ca_certificates(pki_dir)
    root = certs[pki.ROOT]
    assert root.subject == root.issuer
    assert "DEA E-Commerce Root CA" in root.subject.rfc4514_string()
    assert "TEST" in root.subject.rfc4514_string()
    assert root.signature_hash_algorithm.name == "sha256"
    for ca in (pki.CSOS_CA, pki.EPCS_CA):
        certs[ca].verify_directly_issued_by(root)
        assert certs[ca].extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The bundle: root first, then the intermediates.
    bundle = x509.load_pem_x509_certificates(pki.ca_bundle(pki_dir).encode())
    assert [c.subject for c in bundle] == [certs[ca].subject for ca in pki.CA_NAMES]
    assert layout.bundle.read_text() == pki.ca_bundle(pki_dir)


def test_ensure_is_idempotent(pki_dir):
    layout = pki.PkiLayout(pki_dir)
    before = {ca: layout.cert_path(ca).read_bytes() for ca in pki.CA_NAMES}
    keys = {ca: layout.key_path(ca).read_bytes() for ca in pki.CA_NAMES}
    numbers = {ca: _crl_number(pki_dir, ca) for ca in pki.CA_NAMES}
    pki.ensure_test_pki(pki_dir)
    pki.ensure_test_pki(pki_dir)
    assert {ca: layout.cert_path(ca).read_bytes() for ca in pki.CA_NAMES} == before
    assert {ca: layout.key_path(ca).read_bytes() for ca in pki.CA_NAMES} == keys
    assert {ca: _crl_number(pki_dir, ca) for ca in pki.CA_NAMES} == numbers  # fresh CRLs kept


def test_ensure_repairs_a_missing_sub_ca_and_a_stale_crl(tmp_path):
    directory = tmp_path / "pki"
    layout = pki.ensure_test_pki(directory)
    root = layout.cert_path(pki.ROOT).read_bytes()
    soon = dt.datetime.now(UTC) + dt.timedelta(hours=2)
    pki.issue_crl(directory, cas=[pki.CSOS_CA], this_update=soon - dt.timedelta(days=7), next_update=soon)
    stale_number = _crl_number(directory, pki.CSOS_CA)
    layout.cert_path(pki.EPCS_CA).unlink()
    pki.ensure_test_pki(directory)
    assert layout.cert_path(pki.ROOT).read_bytes() == root
    epcs = x509.load_pem_x509_certificate(layout.cert_path(pki.EPCS_CA).read_bytes())
    epcs.verify_directly_issued_by(x509.load_pem_x509_certificate(root))
    assert _crl_number(directory, pki.CSOS_CA) == stale_number + 1
    assert _crl(directory, pki.CSOS_CA).next_update_utc - dt.datetime.now(UTC) > dt.timedelta(days=6)
    assert epcs.subject in [c.subject for c in x509.load_pem_x509_certificates(layout.bundle.read_bytes())]


def test_missing_pki_is_a_specific_error(tmp_path):
    with pytest.raises(pki.PkiError) as info:
        pki.ca_bundle(tmp_path / "nothing")
    assert info.value.code == "pki_missing"


# --- subscriber certificates --------------------------------------------------------------------

@pytest.mark.parametrize("profile", sorted(pki.PROFILES))
def test_profiles_chain_and_pass_openssl_crl_checks(pki_dir, subject_key, profile):
    issued = _issue(pki_dir, subject_key, profile, label=f"label-{profile}")
    cert = issued.certificate
    spec = pki.PROFILES[profile]
    ca_cert = pki.load_ca_certificates(pki_dir)[spec.ca]
    cert.verify_directly_issued_by(ca_cert)
    assert issued.issuer_ca == spec.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.content_commitment
    assert not usage.value.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # CRL distribution point: a file: URL naming the issuer's CRL, which exists.
    cdp = cert.extensions.get_extension_for_oid(ExtensionOID.CRL_DISTRIBUTION_POINTS).value
    url = cdp[0].full_name[0].value
    assert url == pki.PkiLayout(pki_dir).crl_path(spec.ca).resolve().as_uri()
    assert pki.crl_path_for(pki_dir, cert) == pki.PkiLayout(pki_dir).crl_path(spec.ca)
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.RFC822Name) == ["orders@purchaser.example"]
    result = _openssl_verify(pki_dir, issued.path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert ": OK" in result.stdout
    layout = pki.PkiLayout(pki_dir)
    leaf = subprocess.run(["openssl", "verify", "-CAfile", str(layout.bundle), "-crl_check",
                           "-CRLfile", str(layout.crl_path(spec.ca, pem=True)), str(issued.path)],
                          capture_output=True, text=True)
    assert leaf.returncode == 0, leaf.stderr + leaf.stdout
    # The DEA extensions: where the profile says so.
    info = read_dea_info(cert)
    if spec.dea == "required":
        assert info is not None and dea_number_matches(cert, DEA)
        assert info.business_activity == spec.business_activity
        assert info.schedules == frozenset({"II", "IIN", "III", "IIIN", "IV", "V"})
    else:
        assert info is None


def test_dea_fields_reach_the_certificate(pki_dir, subject_key):
    issued = _issue(pki_dir, subject_key, "csos-supplier", dea_number="RD7654329",
                    schedules=["III", "IV"], registrant_name="Demo Supply Distributors",
                    business_activity="Distributor", subject_serial_number="abc123")
    info = read_dea_info(issued.certificate)
    assert info.schedules == frozenset({"III", "IV"})
    assert info.registrant_name == "Demo Supply Distributors"
    assert info.address == ("100 Demo Street", "Springfield, IL 62701")
    assert dea_number_matches(issued.certificate, "RD7654329")
    assert not dea_number_matches(issued.certificate, DEA)
    assert issued.certificate.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "ABC123"


def test_index_records_issued_certificates(pki_dir, subject_key):
    issued = _issue(pki_dir, subject_key, label="indexed")
    entry = pki.find_certificate(pki_dir, issued.serial)
    assert entry.label == "indexed"
    assert entry.profile == "csos-purchaser"
    assert entry.issuer_ca == pki.CSOS_CA
    assert entry.subject == issued.certificate.subject.rfc4514_string()
    assert entry.revoked_at is None and not entry.revoked
    raw = json.loads((pki_dir / "index.json").read_text())
    assert any(c["serial"] == issued.serial and c["serial_hex"] == format(issued.serial, "x")
               for c in raw["certificates"])
    assert (pki_dir / entry.path).read_bytes() == issued.pem


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"dea_number": None}, "dea_number_required"),
        ({"dea_number": "AP5836720"}, "dea_number_check_digit"),
        ({"dea_number": "nonsense"}, "dea_number_format"),
        ({"not_before": dt.datetime(2030, 1, 2, tzinfo=UTC), "not_after": dt.datetime(2030, 1, 1, tzinfo=UTC)},
         "invalid_validity"),
        ({"not_before": dt.datetime(2030, 1, 1)}, "invalid_validity"),
        ({"common_name": ""}, "subject_required"),
        ({"subject_serial_number": "\u00e9123"}, "subject_invalid"),  # salt of the DEA hash
        ({"subject_serial_number": "ab_cd@x"}, "subject_invalid"),
        ({"subject_serial_number": "\u00df\u01311"}, "subject_invalid"),  # would upper-case to "SSI1"
    ],
)
def test_refusals(pki_dir, subject_key, kwargs, code):
    before = len(pki.load_index(pki_dir))
    with pytest.raises(pki.PkiError) as info:
        _issue(pki_dir, subject_key, **kwargs)
    assert info.value.code == code
    assert len(pki.load_index(pki_dir)) == before  # nothing half-written


def test_unknown_profile_and_weak_keys(pki_dir, subject_key):
    with pytest.raises(pki.PkiError) as info:
        _issue(pki_dir, subject_key, "tls-server")
    assert info.value.code == "unknown_profile"
    for key in (rsa.generate_private_key(65537, 1024), ec.generate_private_key(ec.SECP384R1())):
        with pytest.raises(pki.PkiError) as info:
            _issue(pki_dir, key)
        assert info.value.code == "unsupported_key"


def test_rsa_subject_key(pki_dir):
    key = rsa.generate_private_key(65537, 2048)
    issued = _issue(pki_dir, key, "epcs-prescriber", common_name="Demo Prescriber")
    assert issued.certificate.public_key().public_numbers() == key.public_key().public_numbers()
    assert _openssl_verify(pki_dir, issued.path).returncode == 0


def test_issue_from_a_csr(pki_dir, subject_key):
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "From CSR"),
                                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Demo Org")]))
           .sign(subject_key, hashes.SHA256()))
    issued = pki.issue_certificate(pki_dir, csr, "csos-purchaser", dea_number=DEA)
    assert issued.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "From CSR"
    assert read_dea_info(issued.certificate).registrant_name == "Demo Org"
    assert dea_number_matches(issued.certificate, DEA)
    # A request whose signature does not verify is refused.
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    forged = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(pki.PkiError) as info:
        pki.issue_certificate(pki_dir, forged, "csos-purchaser", dea_number=DEA)
    assert info.value.code == "csr_invalid"


def test_expired_and_not_yet_valid_certificates(pki_dir, subject_key):
    now = dt.datetime.now(UTC)
    expired = _issue(pki_dir, subject_key, **pki.validity("expired"))
    future = _issue(pki_dir, subject_key, **pki.validity("not_yet_valid"))
    assert expired.certificate.not_valid_after_utc < now < future.certificate.not_valid_before_utc
    with pytest.raises(pki.PkiError) as info:
        pki.validity("someday")
    assert info.value.code == "invalid_validity"
    result = _openssl_verify(pki_dir, expired.path)
    assert result.returncode != 0 and "expired" in result.stdout + result.stderr
    result = _openssl_verify(pki_dir, future.path)
    assert result.returncode != 0 and "not yet valid" in result.stdout + result.stderr
    # Inside their windows they chain fine (CRL time checks off: the CRL is of today).
    at = str(int((now - dt.timedelta(days=100)).timestamp()))
    assert _openssl_verify(pki_dir, expired.path, "-attime", at, crl_check=False).returncode == 0


def test_untrusted_pki_does_not_chain(pki_dir, subject_key, tmp_path):
    other = pki.untrusted_test_pki(tmp_path / "untrusted")
    issued = _issue(other.directory, subject_key)
    assert dea_number_matches(issued.certificate, DEA)  # looks right...
    result = _openssl_verify(pki_dir, issued.path)  # ...but does not chain to our root
    assert result.returncode != 0
    ours = pki.load_ca_certificates(pki_dir)[pki.ROOT]
    theirs = pki.load_ca_certificates(other.directory)[pki.ROOT]
    assert ours.subject != theirs.subject and "Untrusted" in theirs.subject.rfc4514_string()
    assert _openssl_verify(other.directory, issued.path).returncode == 0


# --- revocation and CRLs ----------------------------------------------------------------------

def test_revoke_reissues_the_crl_and_openssl_rejects(pki_dir, subject_key):
    issued = _issue(pki_dir, subject_key, label="to-revoke")
    assert _openssl_verify(pki_dir, issued.path).returncode == 0
    number = _crl_number(pki_dir, pki.CSOS_CA)
    entry = pki.revoke(pki_dir, issued.serial, "key_compromise")
    assert entry.revoked and entry.reason == "key_compromise"
    crl = _crl(pki_dir, pki.CSOS_CA)
    assert _crl_number(pki_dir, pki.CSOS_CA) == number + 1
    revoked = crl.get_revoked_certificate_by_serial_number(issued.serial)
    assert revoked is not None
    assert revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.is_signature_valid(pki.load_ca_certificates(pki_dir)[pki.CSOS_CA].public_key())
    result = _openssl_verify(pki_dir, issued.path)
    assert result.returncode != 0 and "revoked" in result.stdout + result.stderr
    # The plain leaf check with only the issuing CA's CRL says the same.
    layout = pki.PkiLayout(pki_dir)
    leaf = subprocess.run(["openssl", "verify", "-CAfile", str(layout.bundle), "-crl_check",
                           "-CRLfile", str(layout.crl_path(pki.CSOS_CA, pem=True)), str(issued.path)],
                          capture_output=True, text=True)
    assert leaf.returncode != 0 and "certificate revoked" in leaf.stdout + leaf.stderr
    # Only that certificate: a sibling still verifies.
    assert _openssl_verify(pki_dir, _issue(pki_dir, subject_key).path).returncode == 0
    # The EPCS CA's CRL does not list it.
    assert _crl(pki_dir, pki.EPCS_CA).get_revoked_certificate_by_serial_number(issued.serial) is None
    assert pki.find_certificate(pki_dir, issued.serial).revoked_at == entry.revoked_at


def test_revoke_errors(pki_dir, subject_key):
    issued = _issue(pki_dir, subject_key)
    with pytest.raises(pki.PkiError) as info:
        pki.revoke(pki_dir, issued.serial, "because")
    assert info.value.code == "unknown_reason"
    assert not pki.find_certificate(pki_dir, issued.serial).revoked
    pki.revoke(pki_dir, issued.serial)
    with pytest.raises(pki.PkiError) as info:
        pki.revoke(pki_dir, issued.serial)
    assert info.value.code == "already_revoked"
    with pytest.raises(pki.PkiError) as info:
        pki.revoke(pki_dir, 12345)
    assert info.value.code == "unknown_serial"


def test_revoking_a_sub_ca(tmp_path, subject_key):
    directory = tmp_path / "pki"
    pki.ensure_test_pki(directory)
    issued = _issue(directory, subject_key, "epcs-prescriber")
    sub = pki.load_ca_certificates(directory)[pki.EPCS_CA]
    pki.revoke(directory, sub.serial_number, "ca_compromise")
    assert _crl(directory, pki.ROOT).get_revoked_certificate_by_serial_number(sub.serial_number)
    result = _openssl_verify(directory, issued.path)
    assert result.returncode != 0 and "revoked" in result.stdout + result.stderr


def test_issue_crl_numbers_and_next_update(pki_dir):
    numbers = {ca: _crl_number(pki_dir, ca) for ca in pki.CA_NAMES}
    paths = pki.issue_crl(pki_dir)
    assert set(paths) == set(pki.CA_NAMES)
    for ca in pki.CA_NAMES:
        crl = _crl(pki_dir, ca)
        assert _crl_number(pki_dir, ca) == numbers[ca] + 1
        assert crl.next_update_utc - crl.last_update_utc == pki.CRL_VALIDITY
        pem = x509.load_pem_x509_crl(pki.PkiLayout(pki_dir).crl_path(ca, pem=True).read_bytes())
        assert pem.public_bytes(serialization.Encoding.DER) == paths[ca].read_bytes()
    assert len(pki.load_crls(pki_dir)) == 3
    with pytest.raises(pki.PkiError) as info:
        pki.issue_crl(pki_dir, cas=["nope"])
    assert info.value.code == "unknown_ca"


def test_pyhanko_certvalidator_uses_the_crls(pki_dir, subject_key):
    """The verifier validates with pyhanko-certvalidator: the PKI must suit it."""
    good = _issue(pki_dir, subject_key)
    bad = _issue(pki_dir, subject_key)
    pki.revoke(pki_dir, bad.serial, "superseded")
    cas = pki.load_ca_certificates(pki_dir)

    def context():
        return ValidationContext(
            trust_roots=[asn1_x509.Certificate.load(cas[pki.ROOT].public_bytes(serialization.Encoding.DER))],
            other_certs=[asn1_x509.Certificate.load(cas[ca].public_bytes(serialization.Encoding.DER))
                         for ca in (pki.CSOS_CA, pki.EPCS_CA)],
            crls=[asn1_crl.CertificateList.load(c.public_bytes(serialization.Encoding.DER))
                  for c in pki.load_crls(pki_dir)],
            revocation_mode="hard-fail",
        )

    def validator(issued):
        der = issued.certificate.public_bytes(serialization.Encoding.DER)
        return CertificateValidator(asn1_x509.Certificate.load(der), validation_context=context())

    path = asyncio.run(validator(good).async_validate_usage({"digital_signature", "non_repudiation"}))
    assert len(path) == 3
    with pytest.raises(RevokedError):
        asyncio.run(validator(bad).async_validate_usage({"digital_signature"}))


def test_a_blank_subject_serial_number_is_replaced_by_a_random_salt(pki_dir, subject_key):
    """A blank serialNumber would leave the hashed DEA number unsalted (SHA-1 of the number)."""
    from gateway.signing.dea import hashed_dea_number, read_dea_info, subject_serial_number

    cert = _issue(pki_dir, subject_key, subject_serial_number="   ").certificate
    salt = subject_serial_number(cert)
    assert salt and salt.strip() == salt
    assert read_dea_info(cert).hashed_dea_number == hashed_dea_number("AP5836727", salt)
    assert read_dea_info(cert).hashed_dea_number != hashed_dea_number("AP5836727", "")


def test_a_revocation_is_recorded_with_its_crl_or_not_at_all(tmp_path, subject_key):
    """A CA key that cannot be read used to leave the revocation in the index, off the CRL, and
    refused as already_revoked when tried again; a CRL file that cannot be written used to leave
    its CRL number unspent, so the next CRL carried the same number."""
    directory = tmp_path / "pki"
    pki.ensure_test_pki(directory)
    layout = pki.PkiLayout(directory)
    one = _issue(directory, subject_key).certificate
    two = _issue(directory, subject_key).certificate
    key_path = layout.key_path(pki.CSOS_CA)
    saved = key_path.read_bytes()
    key_path.write_bytes(b"garbage")
    with pytest.raises(pki.PkiError) as info:
        pki.revoke(directory, one.serial_number)
    assert info.value.code == "pki_damaged"
    assert not [e for e in pki.load_index(directory) if e.revoked_at]
    key_path.write_bytes(saved)
    pki.revoke(directory, one.serial_number)
    crl = x509.load_der_x509_crl(layout.crl_path(pki.CSOS_CA).read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(one.serial_number) is not None
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    pem = layout.crl_path(pki.CSOS_CA, pem=True)
    pem.unlink()
    pem.mkdir()  # the PEM copy cannot be written
    with pytest.raises(pki.PkiError) as info:
        pki.revoke(directory, two.serial_number)
    assert info.value.code == "pki_unwritable"
    pem.rmdir()
    pki.issue_crl(directory, cas=[pki.CSOS_CA])
    again = x509.load_der_x509_crl(layout.crl_path(pki.CSOS_CA).read_bytes())
    assert again.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 2
    assert again.get_revoked_certificate_by_serial_number(two.serial_number) is not None


def test_a_truncated_index_is_a_coded_error(tmp_path):
    directory = tmp_path / "pki"
    pki.ensure_test_pki(directory)
    index = pki.PkiLayout(directory).index
    index.write_text(index.read_text()[:40])
    with pytest.raises(pki.PkiError) as info:
        pki.revoke(directory, 1)
    assert info.value.code == "pki_damaged"
