"""Enrolment: HSM key pairs get certificates, and the demo subscribers get theirs.

A key pair is generated inside the HSM (it never leaves it); a PKCS#10 request signed by the key
goes to the CA (DEA's CSOS registration authority in production, `gateway.signing.pki` here); the
issued certificate is stored with the key on the token and as `<home>/keys/<label>.pem`.

`issue_demo_identities` is what `gateway init` calls: the purchaser pharmacy, the supplier
(distributor), the prescriber and the receiving pharmacy of the demo, each with an HSM key and a
test-PKI certificate. It is idempotent: existing keys are kept, and a certificate is reissued only
when it no longer fits (other key, other CA, revoked, expiring within 30 days, other DEA number).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from gateway.config import Settings
from gateway.signing.dea import DeaExtensionError, dea_number_matches, read_dea_info
from gateway.signing.errors import CertificateMismatch, KeyNotFound, SigningError
from gateway.signing.hsm import Hsm, valid_label
from gateway.signing.pki import (
    PROFILES,
    PkiError,
    ensure_test_pki,
    find_certificate,
    issue_certificate,
    load_ca_certificates,
)
from gateway.signing.validation import signing_purpose_missing, weak_key

DEMO_VALIDITY_DAYS = 730
# A certificate closer than this to its notAfter is replaced by issue_demo_identities.
RENEW_MARGIN = dt.timedelta(days=30)


class EnrolError(SigningError):
    """An enrolment step that cannot be done. Codes: `subject_invalid`, `certificate_unreadable`,
    `certificate_unusable`, `dea_extension_malformed`, `label_invalid`, plus those of
    CertificateMismatch (`certificate_key_mismatch`)."""

    code = "enrol_error"


# --- certificates next to HSM keys --------------------------------------------------------------

def certificate_path(settings: Settings, label: str) -> Path:
    """Where the certificate of HSM key `label` is kept as a file."""
    if not label or "/" in label or label.startswith(".") or not valid_label(label):
        raise EnrolError(f"label {label!r} cannot name a file", code="label_invalid")
    return settings.keys_dir / f"{label}.pem"


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_certificate_bytes(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes; EnrolError(code="certificate_unreadable") otherwise."""
    try:
        if b"-----BEGIN" in data:
            found = x509.load_pem_x509_certificates(data)
            if len(found) != 1:  # which one is meant is a guess: the first was taken silently
                raise ValueError(f"{len(found)} certificates in one file; give the key's own alone")
            return found[0]
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise EnrolError(f"not an X.509 certificate: {exc}", code="certificate_unreadable") from exc


def _unusable(cert: x509.Certificate) -> str | None:
    """Why `cert` cannot serve a signing key now, or None."""
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc <= now:
        return f"it expired at {cert.not_valid_after_utc.isoformat()}"
    if cert.not_valid_before_utc > now:
        return f"it is valid only from {cert.not_valid_before_utc.isoformat()}"
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "it is a CA certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not (usage.digital_signature or usage.content_commitment):
            return "its key usage allows no signature (digitalSignature or nonRepudiation)"
    except x509.ExtensionNotFound:
        pass
    # The verifier refuses these (gateway.signing.validation); installing one would only make
    # every later signature of the key fail.
    return signing_purpose_missing(cert) or weak_key((cert,))


def install_certificate(settings: Settings, hsm: Hsm, label: str, cert: x509.Certificate) -> Path:
    """Store `cert` with HSM key `label`: on the token and in `<home>/keys/<label>.pem`.

    Refuses (CertificateMismatch, code `certificate_key_mismatch`) a certificate that does not
    carry the key's public key; EnrolError `dea_extension_malformed` one whose DEA extensions do
    not parse, `certificate_unusable` one that cannot sign now; KeyNotFound when there is no
    such key."""
    public = hsm.public_key(label)
    if _spki(cert.public_key()) != _spki(public):
        raise CertificateMismatch(f"the certificate does not carry the public key of HSM key '{label}'")
    try:
        read_dea_info(cert)
    except DeaExtensionError as exc:  # no receiver could read its DEA number or schedules
        raise EnrolError(f"the certificate's DEA extensions are malformed: {exc}",
                         code="dea_extension_malformed") from exc
    why = _unusable(cert)
    if why is not None:  # it would replace the key's good certificate with one nothing verifies
        raise EnrolError(f"the certificate cannot be used for signing: {why}", code="certificate_unusable")
    path = certificate_path(settings, label)
    settings.keys_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # The file is written before the token is touched, so that a full disk or a bad
        # permission refuses the whole installation instead of leaving the two disagreeing.
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        hsm.store_certificate(label, cert)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --- certificate requests -----------------------------------------------------------------------

_SUBJECT_NAMES = {
    "E": NameOID.EMAIL_ADDRESS,
    "EMAIL": NameOID.EMAIL_ADDRESS,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "UID": NameOID.USER_ID,
}


def parse_subject(text: str) -> x509.Name:
    """A distinguished name from "CN=...,O=...,C=US" (RFC 4514 string form; also E=, emailAddress=,
    serialNumber=). EnrolError(code="subject_invalid") when it does not parse or has no CN."""
    overrides = {}
    for name, oid in _SUBJECT_NAMES.items():
        overrides[name] = oid
        overrides[name.lower()] = oid
    overrides["emailAddress"] = NameOID.EMAIL_ADDRESS
    overrides["serialNumber"] = NameOID.SERIAL_NUMBER
    try:
        name = x509.Name.from_rfc4514_string(text.strip(), attr_name_overrides=overrides)
    except ValueError as exc:
        raise EnrolError(f"subject {text!r} does not parse: {exc}", code="subject_invalid") from exc
    if not name.get_attributes_for_oid(NameOID.COMMON_NAME):
        raise EnrolError(f"subject {text!r} has no CN", code="subject_invalid")
    return name


def build_csr(hsm: Hsm, label: str, subject: x509.Name | str) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for HSM key `label`, signed inside the HSM."""
    name = parse_subject(subject) if isinstance(subject, str) else subject
    private = hsm.signer(label).private_key()
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(private, hashes.SHA256())


# --- issuing from the test PKI for HSM keys -----------------------------------------------------

def issue_for_label(settings: Settings, hsm: Hsm, label: str, profile: str, **fields: Any) -> tuple[x509.Certificate, Path]:
    """Issue a test-PKI certificate for HSM key `label` and install it; `fields` as for
    `pki.issue_certificate` (common_name defaults to the label)."""
    public = hsm.public_key(label)
    ensure_test_pki(settings.pki_dir)
    fields.setdefault("common_name", label)
    issued = issue_certificate(settings.pki_dir, public, profile, label=label, **fields)
    return issued.certificate, install_certificate(settings, hsm, label, issued.certificate)


# --- the demo subscribers -------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoIdentity:
    role: str  # key of demo.json "keys"
    label: str
    profile: str
    key_type: str
    dea_number: str
    name: str  # registrant (business or practitioner) name
    common_name: str  # subscriber
    email: str
    address: Mapping[str, str]
    schedules: tuple[str, ...] = ("II", "IIN", "III", "IIIN", "IV", "V")
    extra: Mapping[str, str] = field(default_factory=dict)


_ALL = ("II", "IIN", "III", "IIIN", "IV", "V")

# DEA numbers carry valid check digits (gateway.identifiers.make_dea_number); the prescriber's is
# the worked example of domain.md §5.
DEMO_IDENTITIES: tuple[DemoIdentity, ...] = (
    DemoIdentity(
        role="purchaser", label="demo-purchaser", profile="csos-purchaser", key_type="rsa2048",
        dea_number="FD1234563", name="Demo Purchaser Pharmacy",
        common_name="Demo Purchaser Pharmacy CSOS Signer", email="csos@purchaser.demo.example",
        address={"Line1": "100 Demo Street", "City": "Springfield", "State": "IL", "PostalCode": "62701"},
    ),
    DemoIdentity(
        role="supplier", label="demo-supplier", profile="csos-supplier", key_type="rsa2048",
        dea_number="RD7654329", name="Demo Supply Distributors",
        common_name="Demo Supply Distributors CSOS Signer", email="csos@supplier.demo.example",
        address={"Line1": "1 Warehouse Road", "City": "Columbus", "State": "OH", "PostalCode": "43215"},
    ),
    DemoIdentity(
        role="prescriber", label="demo-prescriber", profile="epcs-prescriber", key_type="rsa2048",
        dea_number="AP5836727", name="Demo Prescriber",
        common_name="Demo Prescriber", email="prescriber@clinic.demo.example",
        address={"Line1": "200 Demo Avenue", "City": "Springfield", "State": "IL", "PostalCode": "62704"},
        extra={"first_name": "Demo", "last_name": "Prescriber"},
    ),
    DemoIdentity(
        role="pharmacy", label="demo-pharmacy", profile="epcs-pharmacy", key_type="rsa2048",
        dea_number="BD2468103", name="Demo Dispensing Pharmacy",
        common_name="Demo Dispensing Pharmacy", email="rx@pharmacy.demo.example",
        address={"Line1": "300 Demo Boulevard", "City": "Springfield", "State": "IL", "PostalCode": "62702"},
    ),
    DemoIdentity(
        role="prescriber_ec", label="demo-prescriber-ec", profile="epcs-prescriber", key_type="p256",
        dea_number="AP5836727", name="Demo Prescriber",
        common_name="Demo Prescriber (P-256)", email="prescriber@clinic.demo.example",
        address={"Line1": "200 Demo Avenue", "City": "Springfield", "State": "IL", "PostalCode": "62704"},
        extra={"first_name": "Demo", "last_name": "Prescriber"},
    ),
)


def _ensure_key(hsm: Hsm, label: str, key_type: str) -> Any:
    try:
        return hsm.public_key(label)
    except KeyNotFound:
        return hsm.generate_keypair(label, key_type)


def _still_fits(settings: Settings, cert: x509.Certificate, public: Any, ident: DemoIdentity,
                issuer: x509.Certificate) -> bool:
    """Whether an existing certificate can stay: same key, current CA, in date, not revoked,
    same DEA number."""
    if _spki(cert.public_key()) != _spki(public):
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_before_utc > now or cert.not_valid_after_utc - now < RENEW_MARGIN:
        return False
    try:
        if find_certificate(settings.pki_dir, cert.serial_number).revoked:
            return False
    except PkiError:
        return False  # not in this PKI's index: issued elsewhere
    # False too for a malformed DEA extension (dea_number_matches does not raise): the
    # certificate is replaced rather than `gateway init` stopping on it.
    return dea_number_matches(cert, ident.dea_number)


def _describe(ident: DemoIdentity, cert: x509.Certificate, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "label": ident.label,
        "certificate": str(path.resolve()),
        "dea_number": ident.dea_number,
        "name": ident.name,
        "address": dict(ident.address),
        "profile": ident.profile,
        "key_type": ident.key_type,
        "serial": str(cert.serial_number),
        "schedules": list(ident.schedules),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "email": ident.email,
    }
    out.update(ident.extra)
    return out


def issue_demo_identities(settings: Settings, hsm: Hsm,
                          identities: Iterable[DemoIdentity] = DEMO_IDENTITIES) -> dict[str, dict[str, Any]]:
    """Make sure each demo subscriber has an HSM key and a fitting test-PKI certificate.

    Returns {role: {label, certificate (absolute path), dea_number, name, address, profile,
    key_type, serial, schedules, not_after, email, ...}} for demo.json "keys". Idempotent.
    """
    layout = ensure_test_pki(settings.pki_dir)
    cas = load_ca_certificates(layout.directory)
    out: dict[str, dict[str, Any]] = {}
    for ident in identities:
        public = _ensure_key(hsm, ident.label, ident.key_type)
        issuer = cas[PROFILES[ident.profile].ca]
        path = certificate_path(settings, ident.label)
        candidates = []
        if path.exists():
            try:
                candidates.append(load_certificate_bytes(path.read_bytes()))
            except EnrolError:
                pass
        stored = hsm.certificate(ident.label)
        if stored is not None:
            candidates.append(stored)
        cert = next((c for c in candidates if _still_fits(settings, c, public, ident, issuer)), None)
        if cert is None:
            issued = issue_certificate(
                layout.directory, public, ident.profile,
                common_name=ident.common_name, organization=ident.name,
                state=ident.address.get("State"), locality=ident.address.get("City"),
                email=ident.email, dea_number=ident.dea_number, schedules=ident.schedules,
                registrant_name=ident.name, address=ident.address, label=ident.label,
                validity_days=DEMO_VALIDITY_DAYS,
            )
            cert = issued.certificate
        # Token and file both hold this certificate (either may have been missing or older).
        on_file = path.exists() and path.read_bytes() == cert.public_bytes(serialization.Encoding.PEM)
        if stored is None or stored != cert or not on_file:
            install_certificate(settings, hsm, ident.label, cert)
        out[ident.role] = _describe(ident, cert, path)
    return out
