"""Enrolment of HSM keys and the demo subscribers, on the session's SoftHSM token."""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, ObjectClass

from gateway.identifiers import is_valid_dea_number
from gateway.signing import pki
from gateway.signing.dea import dea_number_matches, read_dea_info
from gateway.signing.enrol import (
    DEMO_IDENTITIES,
    DemoIdentity,
    EnrolError,
    build_csr,
    certificate_path,
    install_certificate,
    issue_demo_identities,
    load_certificate_bytes,
    parse_subject,
)
from gateway.signing.errors import CertificateMismatch, KeyNotFound, SigningError

ROLES = {"purchaser", "supplier", "prescriber", "pharmacy"}


@pytest.fixture(scope="module")
def demo(softhsm_settings, hsm):
    return issue_demo_identities(softhsm_settings, hsm)


def _spki(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify_with(cert: x509.Certificate, signature: bytes, data: bytes) -> None:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))


def _openssl_verify(settings, cert_path) -> subprocess.CompletedProcess:
    layout = pki.PkiLayout(settings.pki_dir)
    cmd = ["openssl", "verify", "-CAfile", str(layout.bundle), "-crl_check_all"]
    for ca in pki.CA_NAMES:
        cmd += ["-CRLfile", str(layout.crl_path(ca, pem=True))]
    return subprocess.run([*cmd, str(cert_path)], capture_output=True, text=True)


def test_demo_identities_have_keys_and_certificates(demo, softhsm_settings, hsm):
    assert ROLES <= set(demo)
    assert len({entry["label"] for entry in demo.values()}) == len(demo)
    for role, entry in demo.items():
        cert = x509.load_pem_x509_certificate(open(entry["certificate"], "rb").read())
        assert entry["certificate"] == str(certificate_path(softhsm_settings, entry["label"]).resolve())
        assert _spki(cert.public_key()) == _spki(hsm.public_key(entry["label"]))
        assert hsm.certificate(entry["label"]) == cert
        assert is_valid_dea_number(entry["dea_number"])
        assert dea_number_matches(cert, entry["dea_number"])
        assert read_dea_info(cert).registrant_name == entry["name"]
        assert {"Line1", "City", "State", "PostalCode"} <= set(entry["address"])
        result = _openssl_verify(softhsm_settings, entry["certificate"])
        assert result.returncode == 0, (role, result.stdout, result.stderr)
        # The key signs inside the HSM, and the certificate's key verifies it.
        data = f"demo {role}".encode()
        _verify_with(cert, hsm.sign(entry["label"], data), data)
        protection = hsm.key_protection(entry["label"])
        assert protection["sensitive"] and not protection["extractable"]
    assert demo["purchaser"]["profile"] == "csos-purchaser"
    assert demo["supplier"]["profile"] == "csos-supplier"
    assert demo["prescriber"]["profile"] == "epcs-prescriber"
    assert demo["pharmacy"]["profile"] == "epcs-pharmacy"
    assert demo["prescriber"]["dea_number"] == "AP5836727"
    assert {e["key_type"] for e in demo.values()} == {"rsa2048", "p256"}
    assert demo["prescriber_ec"]["key_type"] == "p256"


def test_demo_identities_are_idempotent(demo, softhsm_settings, hsm):
    issued_before = len(pki.load_index(softhsm_settings.pki_dir))
    again = issue_demo_identities(softhsm_settings, hsm)
    assert again == demo
    assert len(pki.load_index(softhsm_settings.pki_dir)) == issued_before


@pytest.fixture()
def own_identity():
    """A subscriber of its own, so that these tests never disturb the shared demo identities."""
    base = DEMO_IDENTITIES[0]
    return DemoIdentity(role="enrol_test", label=f"enrol-test-{uuid.uuid4().hex[:8]}", profile=base.profile,
                        key_type="p256", dea_number=base.dea_number, name=base.name,
                        common_name="Enrolment Test", email=base.email, address=base.address)


def test_reissue_only_when_the_certificate_no_longer_fits(own_identity, softhsm_settings, hsm):
    first = issue_demo_identities(softhsm_settings, hsm, [own_identity])["enrol_test"]
    label = own_identity.label
    path = certificate_path(softhsm_settings, label)

    # File lost: the token's copy is put back, same certificate.
    path.unlink()
    again = issue_demo_identities(softhsm_settings, hsm, [own_identity])["enrol_test"]
    assert again["serial"] == first["serial"] and path.exists()

    # Revoked: a new certificate for the same key.
    pki.revoke(softhsm_settings.pki_dir, int(first["serial"]), "superseded")
    renewed = issue_demo_identities(softhsm_settings, hsm, [own_identity])["enrol_test"]
    assert renewed["serial"] != first["serial"]
    assert hsm.certificate(label).serial_number == int(renewed["serial"])

    # Other DEA number: a new certificate that carries it.
    moved = dataclasses.replace(own_identity, dea_number="BD2468103")
    third = issue_demo_identities(softhsm_settings, hsm, [moved])["enrol_test"]
    assert third["serial"] != renewed["serial"]
    assert dea_number_matches(hsm.certificate(label), "BD2468103")
    assert _openssl_verify(softhsm_settings, third["certificate"]).returncode == 0


def test_csr_from_an_hsm_key_and_certificate_install(softhsm_settings, hsm, ec_key, rsa_key):
    for label in (ec_key, rsa_key):
        csr = build_csr(hsm, label, "CN=Enrolment Test,O=Demo Org,C=US")
        assert csr.is_signature_valid
        assert _spki(csr.public_key()) == _spki(hsm.public_key(label))
        assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Enrolment Test"
    pki.ensure_test_pki(softhsm_settings.pki_dir)
    label = f"enrol-csr-{uuid.uuid4().hex[:8]}"
    hsm.generate_keypair(label, "rsa2048")
    csr = build_csr(hsm, label, "CN=Enrolment Test,O=Demo Org,C=US")
    issued = pki.issue_certificate(softhsm_settings.pki_dir, csr, "csos-purchaser", dea_number="FD1234563")
    path = install_certificate(softhsm_settings, hsm, label, issued.certificate)
    assert path == certificate_path(softhsm_settings, label)
    assert x509.load_pem_x509_certificate(path.read_bytes()) == issued.certificate
    assert hsm.certificate(label) == issued.certificate
    assert hsm.signer(label).certificate == issued.certificate
    # A certificate for another key is refused, and nothing is written.
    other = f"enrol-other-{uuid.uuid4().hex[:8]}"
    hsm.generate_keypair(other, "p256")
    with pytest.raises(CertificateMismatch) as info:
        install_certificate(softhsm_settings, hsm, other, issued.certificate)
    assert info.value.code == "certificate_key_mismatch"
    assert not certificate_path(softhsm_settings, other).exists()
    assert hsm.certificate(other) is None
    with pytest.raises(KeyNotFound):
        install_certificate(softhsm_settings, hsm, "no-such-label", issued.certificate)


def test_parse_subject():
    name = parse_subject("CN=Demo Pharmacy,O=Demo\\, Inc.,C=US,emailAddress=a@b.example,serialNumber=X1")
    assert name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Demo, Inc."
    assert name.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)[0].value == "a@b.example"
    assert name.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "X1"
    assert parse_subject("E=x@y.example,CN=a").get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
    for bad in ("O=No Common Name", "CN", "=x", "NOPE=1,CN=x"):
        with pytest.raises(EnrolError) as info:
            parse_subject(bad)
        assert info.value.code == "subject_invalid"


def test_labels_must_name_files(softhsm_settings):
    for bad in ("", "../x", ".hidden", "a/b", "L" * 65, "tab\there", "caf\u00e9"):
        with pytest.raises(EnrolError) as info:
            certificate_path(softhsm_settings, bad)
        assert info.value.code == "label_invalid"


def test_a_label_too_long_for_a_file_or_a_common_name_is_refused_before_a_key_is_made(hsm):
    """A 260-character label made a key that broke `keys list` for the whole token."""
    before = len(hsm.list_keys())
    with pytest.raises(SigningError) as info:
        hsm.generate_keypair("L" * 260, "p256")
    assert info.value.code == "label_invalid"
    assert len(hsm.list_keys()) == before


def test_unusable_or_ambiguous_certificates_are_not_installed(softhsm_settings, hsm):
    """An expired, not yet valid or CA certificate would replace the key's good one with one that
    nothing verifies; a file of several certificates was cut to its first."""
    pki.ensure_test_pki(softhsm_settings.pki_dir)
    label = f"enrol-unusable-{uuid.uuid4().hex[:8]}"
    public = hsm.generate_keypair(label, "p256")
    good = pki.issue_certificate(softhsm_settings.pki_dir, public, "csos-purchaser", common_name="Usable",
                                 dea_number="FD1234563").certificate
    install_certificate(softhsm_settings, hsm, label, good)
    now = dt.datetime.now(dt.timezone.utc)
    expired = pki.issue_certificate(softhsm_settings.pki_dir, public, "csos-purchaser", common_name="Expired",
                                    dea_number="FD1234563", not_before=now - dt.timedelta(days=30),
                                    not_after=now - dt.timedelta(days=1)).certificate
    future = pki.issue_certificate(softhsm_settings.pki_dir, public, "csos-purchaser", common_name="Future",
                                   dea_number="FD1234563", not_before=now + dt.timedelta(days=1)).certificate
    ca_key = serialization.load_pem_private_key(
        pki.PkiLayout(softhsm_settings.pki_dir).key_path(pki.CSOS_CA).read_bytes(), None)
    as_ca = (x509.CertificateBuilder().subject_name(good.subject).issuer_name(good.issuer)
             .public_key(public).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(ca_key, hashes.SHA256()))
    for cert in (expired, future, as_ca):
        with pytest.raises(EnrolError) as info:
            install_certificate(softhsm_settings, hsm, label, cert)
        assert info.value.code == "certificate_unusable"
    assert hsm.certificate(label) == good
    assert x509.load_pem_x509_certificate(certificate_path(softhsm_settings, label).read_bytes()) == good
    two = good.public_bytes(serialization.Encoding.PEM) + expired.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(EnrolError) as info:
        load_certificate_bytes(two)
    assert info.value.code == "certificate_unreadable"
    assert load_certificate_bytes(good.public_bytes(serialization.Encoding.PEM)) == good


def test_a_label_with_a_certificate_left_behind_is_not_generated_again(softhsm_settings, hsm):
    """A certificate left on the token under a label would pair with a new key of that label."""
    label = f"enrol-leftover-{uuid.uuid4().hex[:8]}"
    hsm.generate_keypair(label, "p256")

    def drop_keys(session, _conn):
        for obj in session.get_objects({Attribute.LABEL: label}):
            if obj[Attribute.CLASS] != ObjectClass.CERTIFICATE:
                obj.destroy()

    pki.ensure_test_pki(softhsm_settings.pki_dir)
    cert = pki.issue_certificate(softhsm_settings.pki_dir, hsm.public_key(label), "csos-purchaser",
                                 common_name="Leftover", dea_number="FD1234563").certificate
    hsm.store_certificate(label, cert)
    hsm._admin(drop_keys)  # a key deleted by another tool, its certificate kept
    with pytest.raises(SigningError) as info:
        hsm.generate_keypair(label, "p256")
    assert info.value.code == "key_exists"
