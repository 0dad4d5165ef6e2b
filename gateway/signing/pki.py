"""The test PKI: a stand-in for DEA's CSOS PKI and an EPCS certification authority.

THIS IS A TEST PKI. In production the CAs are DEA's (DEA E-Commerce Root CA -> CSOS Sub CA) and
an EPCS credential service provider's; their keys are never anywhere near the gateway, which only
holds trust anchors (configuration) and fetches CRLs. Here the CA private keys are plain files
under `<pki>/private` (mode 0600) so that a developer's home, the demo and the tests can issue,
revoke and publish CRLs on their own.

Hierarchy (names carry "TEST" so nobody mistakes them for DEA's):

    TEST DEA E-Commerce Root CA        self-signed, RSA-2048, SHA-256
      +- TEST CSOS Sub CA              issues csos-purchaser, csos-supplier certificates
      +- TEST EPCS CA                  issues epcs-prescriber, epcs-pharmacy certificates

Layout of `pki_dir`:

    root-ca.pem, csos-ca.pem, epcs-ca.pem   CA certificates
    ca-bundle.pem                           the three, root first (for openssl, xmlsec1)
    private/<ca>.key                        CA private keys, PKCS#8 PEM, 0600 (test only)
    crl/<ca>.crl, crl/<ca>.crl.pem          each CA's CRL (DER and PEM), nextUpdate 7 days
    issued/<serial>.pem                     every certificate issued
    index.json                              serial, subject, label, profile, revoked_at, ...

Each issued certificate carries a CRL distribution point, a `file:` URL naming its issuer's DER
CRL; `crl_path_for(pki_dir, cert)` and `load_crls(pki_dir)` find them without parsing URLs.

Signing certificates (profiles) carry digitalSignature + nonRepudiation key usage; CSOS and EPCS
prescriber profiles carry the DEA extensions of `gateway.signing.dea` (21 CFR 1311.30 ff.).
Deliberately expired or not-yet-valid certificates: pass `not_before` / `not_after`. A second,
unrelated PKI for "untrusted" tests: `untrusted_test_pki(directory)`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.identifiers import DeaNumberError, parse_dea_number
from gateway.signing.dea import add_dea_extensions, dea_info_for
from gateway.signing.validation import crl_number

ROOT = "root-ca"
CSOS_CA = "csos-ca"
EPCS_CA = "epcs-ca"
CA_NAMES = (ROOT, CSOS_CA, EPCS_CA)

CRL_VALIDITY = dt.timedelta(days=7)
_PRINTABLE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]+")  # X.520 PrintableString
# A CRL closer than this to its nextUpdate is reissued by ensure_test_pki.
CRL_REFRESH_MARGIN = dt.timedelta(days=1)
DEFAULT_VALIDITY_DAYS = 365

SubjectKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
CaKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class PkiError(Exception):
    """A test-PKI operation that cannot be done. Codes: `pki_missing`, `unknown_profile`,
    `unknown_serial`, `root_not_revocable`, `already_revoked`, `unknown_reason`,
    `dea_number_required`, `dea_number_not_registration` (an X-prefixed former DATA-waiver
    number), `dea_number_*` (from gateway.identifiers), `csr_invalid`,
    `invalid_validity`, `unsupported_key`."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Profile:
    """What a kind of subscriber certificate looks like."""

    name: str
    ca: str  # issuing CA, one of CA_NAMES
    dea: str  # "required" | "optional" | "none": DEA extensions
    business_activity: str  # default for the DEA extension
    organizational_unit: str
    extended_key_usage: tuple[x509.ObjectIdentifier, ...]


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("csos-purchaser", CSOS_CA, "required", "Retail Pharmacy", "CSOS Purchaser",
                (ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH)),
        Profile("csos-supplier", CSOS_CA, "required", "Distributor", "CSOS Supplier",
                (ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH)),
        Profile("epcs-prescriber", EPCS_CA, "required", "Practitioner", "EPCS Prescriber",
                (ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH)),
        Profile("epcs-pharmacy", EPCS_CA, "optional", "Retail Pharmacy", "EPCS Pharmacy",
                (ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH)),
    )
}

_CA_TITLES = {ROOT: "DEA E-Commerce Root CA", CSOS_CA: "CSOS Sub CA", EPCS_CA: "EPCS CA"}


@dataclass(frozen=True)
class PkiLayout:
    """Where the files of one test PKI are."""

    directory: Path

    def cert_path(self, ca: str) -> Path:
        return self.directory / f"{ca}.pem"

    def key_path(self, ca: str) -> Path:
        return self.directory / "private" / f"{ca}.key"

    def crl_path(self, ca: str, pem: bool = False) -> Path:
        return self.directory / "crl" / (f"{ca}.crl.pem" if pem else f"{ca}.crl")

    @property
    def bundle(self) -> Path:
        return self.directory / "ca-bundle.pem"

    @property
    def index(self) -> Path:
        return self.directory / "index.json"

    @property
    def issued_dir(self) -> Path:
        return self.directory / "issued"

    @property
    def crl_paths(self) -> tuple[Path, ...]:
        """DER CRLs of all CAs."""
        return tuple(self.crl_path(ca) for ca in CA_NAMES)

    def crl_url(self, ca: str) -> str:
        return self.crl_path(ca).resolve().as_uri()


@dataclass(frozen=True)
class IndexEntry:
    """One line of index.json."""

    serial: int
    serial_hex: str
    subject: str
    issuer_ca: str
    profile: str
    label: str | None
    not_before: str  # ISO 8601 UTC
    not_after: str
    path: str  # relative to the PKI directory
    revoked_at: str | None = None
    reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class IssuedCertificate:
    certificate: x509.Certificate
    serial: int
    path: Path
    profile: str
    issuer_ca: str
    label: str | None

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


# --- small helpers --------------------------------------------------------------------------------

def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename: never an empty CRL or key after a crash
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # and the rename itself
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One writer at a time per PKI directory (gateway init, CLI and tests may overlap)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate_ca_key(key_type: str) -> CaKey:
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise PkiError(f"unknown CA key type {key_type!r}", "unsupported_key")


def _ca_name(title: str, organization: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Test PKI - not for production use"),
        x509.NameAttribute(NameOID.COMMON_NAME, title),
    ])


def _serial() -> int:
    # 63 random bits: unique in practice, and short enough to type on the command line.
    return secrets.randbits(63) | (1 << 56)


def _load_cert(path: Path) -> x509.Certificate:
    """A CA certificate of the PKI; PkiError `pki_damaged` when the file cannot be read."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"the CA certificate {path} cannot be read ({exc}); restore it, or remove "
                       "it and its key to have the CA made anew", "pki_damaged") from None


def _load_key(path: Path) -> CaKey:
    """A CA private key of the PKI; PkiError `pki_damaged` when the file cannot be read."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"the CA key {path} cannot be read ({exc})", "pki_damaged") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise PkiError(f"the CA key {path} is a {type(key).__name__}, not an RSA or EC key", "pki_damaged")
    return key


def _cdp(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints([
        x509.DistributionPoint(full_name=[x509.UniformResourceIdentifier(url)],
                               relative_name=None, reasons=None, crl_issuer=None)
    ])


# --- index ---------------------------------------------------------------------------------------

def _read_index(layout: PkiLayout) -> dict[str, Any]:
    if not layout.index.exists():
        return {"version": 1, "crl_numbers": {}, "certificates": []}
    try:
        return json.loads(layout.index.read_text())
    except (ValueError, OSError) as exc:  # a truncated or unreadable index: say so, change nothing
        raise PkiError(f"the PKI index {layout.index} cannot be read: {exc}", "pki_damaged") from None


def _write_index(layout: PkiLayout, data: dict[str, Any]) -> None:
    _atomic_write(layout.index, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _entry(raw: Mapping[str, Any]) -> IndexEntry:
    return IndexEntry(**{k: raw.get(k) for k in IndexEntry.__dataclass_fields__})


def _record(data: dict[str, Any], cert: x509.Certificate, *, issuer_ca: str, profile: str,
            label: str | None, path: str) -> None:
    data["certificates"] = [c for c in data["certificates"] if c["serial"] != cert.serial_number]
    data["certificates"].append(asdict(IndexEntry(
        serial=cert.serial_number,
        serial_hex=format(cert.serial_number, "x"),
        subject=cert.subject.rfc4514_string(),
        issuer_ca=issuer_ca,
        profile=profile,
        label=label,
        not_before=_iso(cert.not_valid_before_utc),
        not_after=_iso(cert.not_valid_after_utc),
        path=path,
    )))


def load_index(pki_dir: str | os.PathLike[str]) -> list[IndexEntry]:
    """Every certificate the test PKI issued (sub CAs included), oldest first."""
    layout = PkiLayout(Path(pki_dir))
    return [_entry(c) for c in _read_index(layout)["certificates"]]


def find_certificate(pki_dir: str | os.PathLike[str], serial: int) -> IndexEntry:
    for entry in load_index(pki_dir):
        if entry.serial == serial:
            return entry
    raise PkiError(f"no certificate with serial {serial} in the test PKI", "unknown_serial")


# --- building the CAs -----------------------------------------------------------------------------

def _make_root(title: str, organization: str, key: CaKey, now: dt.datetime) -> x509.Certificate:
    name = _ca_name(title, organization)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    # Back-dated so that point-in-time checks of old test signatures still find a valid chain.
    builder = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - dt.timedelta(days=3650))
        .not_valid_after(now + dt.timedelta(days=7300))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def _make_sub_ca(title: str, organization: str, key: CaKey, root: x509.Certificate,
                 root_key: CaKey, crl_url: str, now: dt.datetime) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_ca_name(title, organization)).issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - dt.timedelta(days=3650))
        .not_valid_after(min(now + dt.timedelta(days=5475), root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                       critical=False)
        .add_extension(_cdp(crl_url), critical=False)
    )
    return builder.sign(root_key, hashes.SHA256())


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _write_key(path: Path, key: CaKey) -> None:
    _atomic_write(path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _atomic_write(path, cert.public_bytes(serialization.Encoding.PEM))


def ensure_test_pki(
    pki_dir: str | os.PathLike[str],
    *,
    organization: str = "CSOS Gateway Test PKI",
    root_title: str | None = None,
    key_type: str = "rsa2048",
) -> PkiLayout:
    """Create what is missing of the test PKI in `pki_dir`; reuse what is there (idempotent).

    A CA certificate is kept while its key file is present and it still chains to the current
    root; CRLs are reissued when missing or within a day of their nextUpdate; the bundle is
    rewritten when it differs. Returns the layout.
    """
    layout = PkiLayout(Path(pki_dir))
    with _locked(layout.directory):
        return _ensure_locked(layout, organization, root_title, key_type)


def _ensure_locked(layout: PkiLayout, organization: str, root_title: str | None,
                   key_type: str) -> PkiLayout:
    directory = layout.directory
    (directory / "private").mkdir(parents=True, exist_ok=True)
    os.chmod(directory / "private", 0o700)
    (directory / "crl").mkdir(exist_ok=True)
    layout.issued_dir.mkdir(exist_ok=True)
    now = _now()
    index = _read_index(layout)
    titles = {ca: f"TEST {title}" for ca, title in _CA_TITLES.items()}
    if root_title:
        titles[ROOT] = root_title

    changed: set[str] = set()
    # Root.
    if layout.cert_path(ROOT).exists() and layout.key_path(ROOT).exists():
        root = _load_cert(layout.cert_path(ROOT))
        root_key = _load_key(layout.key_path(ROOT))
    else:
        root_key = _generate_ca_key(key_type)
        root = _make_root(titles[ROOT], organization, root_key, now)
        _write_key(layout.key_path(ROOT), root_key)
        _write_cert(layout.cert_path(ROOT), root)
        _record(index, root, issuer_ca=ROOT, profile="root-ca", label=ROOT, path=f"{ROOT}.pem")
        changed.add(ROOT)
    # Intermediates.
    for ca in (CSOS_CA, EPCS_CA):
        cert_path, key_path = layout.cert_path(ca), layout.key_path(ca)
        if cert_path.exists() and key_path.exists() and _issued_by(_load_cert(cert_path), root):
            continue
        key = _generate_ca_key(key_type)
        cert = _make_sub_ca(titles[ca], organization, key, root, root_key, layout.crl_url(ROOT), now)
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
        _record(index, cert, issuer_ca=ROOT, profile="sub-ca", label=ca, path=f"{ca}.pem")
        changed.add(ca)
    if changed or not layout.index.exists():
        _write_index(layout, index)

    # CRLs: missing, stale, or from a CA that was just replaced.
    for ca in CA_NAMES:
        path = layout.crl_path(ca)
        stale = True
        if path.exists() and layout.crl_path(ca, pem=True).exists() and ca not in changed and ROOT not in changed:
            crl = _read_crl(path)  # a truncated or damaged file is reissued, not a traceback
            next_update = crl.next_update_utc if crl is not None else None
            stale = next_update is None or next_update - now < CRL_REFRESH_MARGIN
        if stale:
            _issue_crl_locked(layout, ca)

    bundle = ca_bundle_from(layout)
    if not layout.bundle.exists() or layout.bundle.read_text() != bundle:
        _atomic_write(layout.bundle, bundle.encode())
    return layout


def validity(kind: str, *, now: dt.datetime | None = None) -> dict[str, dt.datetime]:
    """`not_before` / `not_after` keyword arguments for issue_certificate, for tests:
    "current" (a year from 5 minutes ago), "expired" (ended 30 days ago) or "not_yet_valid"
    (starts in 30 days)."""
    now = now or _now()
    windows = {
        "current": (now - dt.timedelta(minutes=5), now + dt.timedelta(days=365)),
        "expired": (now - dt.timedelta(days=395), now - dt.timedelta(days=30)),
        "not_yet_valid": (now + dt.timedelta(days=30), now + dt.timedelta(days=395)),
    }
    if kind not in windows:
        raise PkiError(f"unknown validity {kind!r} (one of {', '.join(windows)})", "invalid_validity")
    start, end = windows[kind]
    return {"not_before": start, "not_after": end}


def untrusted_test_pki(directory: str | os.PathLike[str]) -> PkiLayout:
    """A second, unrelated PKI (own root, own CSOS and EPCS CAs, same profiles) for tests of
    "certificate does not chain to a trusted root". Issue from it with `issue_certificate`."""
    return ensure_test_pki(directory, organization="Untrusted Test PKI",
                           root_title="TEST Untrusted Root CA")


def require_pki(pki_dir: str | os.PathLike[str]) -> PkiLayout:
    layout = PkiLayout(Path(pki_dir))
    for ca in CA_NAMES:
        if not layout.cert_path(ca).exists() or not layout.key_path(ca).exists():
            raise PkiError(f"no test PKI in {layout.directory} (run `gateway init`)", "pki_missing")
    return layout


# --- bundle and CRLs -----------------------------------------------------------------------------

def ca_bundle_from(layout: PkiLayout) -> str:
    return "".join(layout.cert_path(ca).read_text() for ca in CA_NAMES)


def ca_bundle(pki_dir: str | os.PathLike[str]) -> str:
    """The CA certificates, root first then the intermediates, as PEM text."""
    return ca_bundle_from(require_pki(pki_dir))


def load_ca_certificates(pki_dir: str | os.PathLike[str]) -> dict[str, x509.Certificate]:
    layout = require_pki(pki_dir)
    return {ca: _load_cert(layout.cert_path(ca)) for ca in CA_NAMES}


def load_crls(pki_dir: str | os.PathLike[str]) -> list[x509.CertificateRevocationList]:
    """The current CRL of every CA of the test PKI."""
    layout = require_pki(pki_dir)
    return [x509.load_der_x509_crl(layout.crl_path(ca).read_bytes()) for ca in CA_NAMES]


def crl_path_for(pki_dir: str | os.PathLike[str], cert: x509.Certificate) -> Path | None:
    """The DER CRL of the CA that issued `cert` (None: not issued by this PKI)."""
    layout = require_pki(pki_dir)
    for ca in CA_NAMES:
        if cert.issuer == _load_cert(layout.cert_path(ca)).subject:
            return layout.crl_path(ca)
    return None


_REASONS = {flag.value.lower(): flag for flag in x509.ReasonFlags} | {
    flag.name.replace("_", "").lower(): flag for flag in x509.ReasonFlags
}
REVOCATION_REASONS = tuple(
    flag.name for flag in x509.ReasonFlags if flag is not x509.ReasonFlags.remove_from_crl
)


def _reason(name: str) -> x509.ReasonFlags:
    flag = _REASONS.get(name.replace("_", "").replace("-", "").lower())
    if flag is None or flag is x509.ReasonFlags.remove_from_crl:
        raise PkiError(f"unknown revocation reason {name!r} (one of {', '.join(REVOCATION_REASONS)})",
                       "unknown_reason")
    return flag


def _issue_crl_locked(layout: PkiLayout, ca: str, *, this_update: dt.datetime | None = None,
                      next_update: dt.datetime | None = None, index: dict[str, Any] | None = None) -> Path:
    """The CRL is made (CA key loaded, signed) before anything is written; then the index, with
    the CRL number it uses (and the caller's changes to `index`), then the CRL files. A failure
    before the index write leaves everything as it was; after it, the number is spent, never
    issued twice (RFC 5280 5.2.3), and `gateway pki crl` writes the CRL again."""
    index = _read_index(layout) if index is None else index
    # The CRL on disk counts too: an index rebuilt or restored from a backup must not make a
    # number issued before come out again (RFC 5280 5.2.3: monotonically increasing).
    number = max(int(index["crl_numbers"].get(ca, 0)), _crl_number(layout.crl_path(ca))) + 1
    index["crl_numbers"][ca] = number
    try:
        ca_cert = _load_cert(layout.cert_path(ca))
        ca_key = _load_key(layout.key_path(ca))
    except (OSError, ValueError) as exc:
        raise PkiError(f"the key or certificate of {ca} cannot be read: {exc}", "pki_damaged") from None
    this_update = this_update or _now()
    next_update = next_update or this_update + CRL_VALIDITY
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    for raw in index["certificates"]:
        if raw.get("issuer_ca") != ca or not raw.get("revoked_at") or raw.get("profile") == "root-ca":
            continue
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(raw["serial"]))
            .revocation_date(dt.datetime.strptime(raw["revoked_at"], "%Y-%m-%dT%H:%M:%SZ")
                             .replace(tzinfo=dt.timezone.utc))
        )
        reason = _reason(raw.get("reason") or "unspecified")
        if reason is not x509.ReasonFlags.unspecified:  # RFC 5280 5.3.1: omit "unspecified"
            revoked = revoked.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    try:
        _write_index(layout, index)
    except OSError as exc:
        raise PkiError(f"the PKI index cannot be written: {exc}", "pki_unwritable") from None
    try:
        _atomic_write(layout.crl_path(ca), crl.public_bytes(serialization.Encoding.DER))
        _atomic_write(layout.crl_path(ca, pem=True), crl.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise PkiError(f"the CRL of {ca} cannot be written ({exc}); the index is updated, "
                       "`gateway pki crl` writes the CRL again", "pki_unwritable") from None
    return layout.crl_path(ca)


def _read_crl(path: Path) -> x509.CertificateRevocationList | None:
    """The DER CRL at `path`, or None when it is missing or cannot be read."""
    try:
        return x509.load_der_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return None


def _crl_number(path: Path) -> int:
    """The CRL number of the CRL at `path`, 0 when there is none to read."""
    crl = _read_crl(path)
    return (crl_number(crl) if crl is not None else None) or 0


def issue_crl(
    pki_dir: str | os.PathLike[str],
    *,
    cas: Iterable[str] = CA_NAMES,
    this_update: dt.datetime | None = None,
    next_update: dt.datetime | None = None,
) -> dict[str, Path]:
    """Reissue the CRLs of `cas` (all by default) with the next CRL number; returns DER paths.

    `this_update` / `next_update` default to now and now + 7 days; tests pass past times to
    get a stale CRL."""
    layout = require_pki(pki_dir)
    out: dict[str, Path] = {}
    with _locked(layout.directory):
        for ca in cas:
            if ca not in CA_NAMES:
                raise PkiError(f"unknown CA {ca!r}", "unknown_ca")
            out[ca] = _issue_crl_locked(layout, ca, this_update=this_update, next_update=next_update)
    return out


def revoke(
    pki_dir: str | os.PathLike[str],
    serial: int,
    reason: str = "unspecified",
    *,
    revoked_at: dt.datetime | None = None,
    reissue_crl: bool = True,
) -> IndexEntry:
    """Mark certificate `serial` revoked and (by default) reissue its CA's CRL.

    Raises PkiError `unknown_serial`, `root_not_revocable`, `already_revoked`, `unknown_reason`."""
    layout = require_pki(pki_dir)
    flag = _reason(reason)
    with _locked(layout.directory):
        index = _read_index(layout)
        for raw in index["certificates"]:
            if raw["serial"] == serial:
                break
        else:
            raise PkiError(f"no certificate with serial {serial} in the test PKI", "unknown_serial")
        if raw.get("profile") == "root-ca":
            raise PkiError("a root is not revoked, it is removed from the trust bundle", "root_not_revocable")
        if raw.get("revoked_at"):
            raise PkiError(f"certificate {serial} was revoked at {raw['revoked_at']}", "already_revoked")
        raw["revoked_at"] = _iso(revoked_at or _now())
        raw["reason"] = flag.name
        if reissue_crl:
            # The revocation is recorded with the CRL that lists it, or not at all: a CA key that
            # cannot be read used to leave it in the index, off the CRL, and refused as
            # already_revoked when tried again.
            _issue_crl_locked(layout, raw["issuer_ca"], index=index)
        else:
            _write_index(layout, index)
        return _entry(raw)


# --- issuing subscriber certificates --------------------------------------------------------------

def _subject(
    *,
    csr: x509.CertificateSigningRequest | None,
    common_name: str | None,
    organization: str | None,
    organizational_unit: str | None,
    country: str | None,
    state: str | None,
    locality: str | None,
    serial_number: str,
) -> x509.Name:
    if common_name is None and csr is not None:
        attrs = [a for a in csr.subject if a.oid != NameOID.SERIAL_NUMBER]
    else:
        if not common_name:
            raise PkiError("a subject common name is required", "subject_required")
        attrs = []
        for oid, value in ((NameOID.COUNTRY_NAME, country), (NameOID.STATE_OR_PROVINCE_NAME, state),
                           (NameOID.LOCALITY_NAME, locality), (NameOID.ORGANIZATION_NAME, organization),
                           (NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit),
                           (NameOID.COMMON_NAME, common_name)):
            if value:
                attrs.append(x509.NameAttribute(oid, value))
    attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
    return x509.Name(attrs)


def issue_certificate(
    pki_dir: str | os.PathLike[str],
    subject_key: SubjectKey | x509.CertificateSigningRequest,
    profile: str,
    *,
    common_name: str | None = None,
    organization: str | None = None,
    organizational_unit: str | None = None,
    country: str | None = "US",
    state: str | None = None,
    locality: str | None = None,
    email: str | None = None,
    subject_serial_number: str | None = None,
    dea_number: str | None = None,
    schedules: Iterable[str] | None = None,
    registrant_name: str | None = None,
    business_activity: str | None = None,
    address: Mapping[str, str] | Iterable[str] = (),
    label: str | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    validity_days: int = DEFAULT_VALIDITY_DAYS,
) -> IssuedCertificate:
    """Issue a subscriber certificate from the test PKI.

    `subject_key` is a public key (e.g. of an HSM key) or a PKCS#10 request (its signature is
    checked; its subject is used when `common_name` is not given). `profile` is one of PROFILES.
    CSOS profiles and epcs-prescriber need `dea_number` (valid, checked) and put the DEA extensions
    in, with `schedules` (default: all), `registrant_name` (default: organization or CN),
    `business_activity` (default: the profile's) and `address`. The subject DN always carries a
    serialNumber (given or random), the salt of the hashed DEA number.

    Validity: `not_before` (default now - 5 min) to `not_after` (default not_before +
    validity_days); pass past or future times for deliberately expired / not-yet-valid
    certificates. They are not clamped to the CA's validity.
    """
    if profile not in PROFILES:
        raise PkiError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})", "unknown_profile")
    spec = PROFILES[profile]
    layout = require_pki(pki_dir)

    csr: x509.CertificateSigningRequest | None = None
    if isinstance(subject_key, x509.CertificateSigningRequest):
        csr = subject_key
        if not csr.is_signature_valid:
            raise PkiError("the certificate request's signature does not verify", "csr_invalid")
        public_key = csr.public_key()
    else:
        public_key = subject_key
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise PkiError("RSA keys shorter than 2048 bits are not certified", "unsupported_key")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise PkiError("only P-256 elliptic-curve keys are certified", "unsupported_key")
    else:
        raise PkiError(f"unsupported key type {type(public_key).__name__}", "unsupported_key")

    registration = None
    if dea_number is not None:
        try:
            registration = parse_dea_number(dea_number)
        except DeaNumberError as exc:
            raise PkiError(str(exc), exc.code) from exc
    if spec.dea == "required" and registration is None:
        raise PkiError(f"profile {profile} needs a DEA number", "dea_number_required")
    if spec.dea == "none":
        registration = None
    if registration is not None and registration.registrant_kind == "data_waiver_practitioner":
        # 21 CFR 1311.25, 1311.105: a CSOS or EPCS certificate carries a DEA registration. An
        # X number was the DATA-waiver identifier, never a registration of its own (and the
        # waiver ended in 2023): no DEA certificate is issued for it.
        raise PkiError(f"{registration.registration} is a former DATA-waiver number, not a DEA "
                       "registration; certify the practitioner's registration number",
                       "dea_number_not_registration")

    start = not_before or (_now() - dt.timedelta(minutes=5))
    end = not_after or (start + dt.timedelta(days=validity_days))
    if start.tzinfo is None or end.tzinfo is None:
        raise PkiError("not_before / not_after must be timezone-aware", "invalid_validity")
    if end <= start:
        raise PkiError("not_after must be later than not_before", "invalid_validity")

    # The salt of the hashed DEA number: a blank one would leave the hash unsalted.
    serial_text = (subject_serial_number or "").strip()
    # Checked before upper-casing, which would turn "ß" into "SS": no second spelling of a salt.
    if serial_text and not (serial_text.isascii() and _PRINTABLE.fullmatch(serial_text)):
        raise PkiError(f"subject serial number {subject_serial_number!r} is not PrintableString text",
                       "subject_invalid")
    serial_text = serial_text.upper() or secrets.token_hex(8).upper()
    subject = _subject(csr=csr, common_name=common_name, organization=organization,
                       organizational_unit=organizational_unit or (spec.organizational_unit if common_name else None),
                       country=country, state=state, locality=locality, serial_number=serial_text)
    cn_attrs = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cn_attrs[0].value) if cn_attrs else ""
    org_attrs = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    org = str(org_attrs[0].value) if org_attrs else ""
    ca_cert = _load_cert(layout.cert_path(spec.ca))
    ca_key = _load_key(layout.key_path(spec.ca))

    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=True, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(spec.extended_key_usage)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .add_extension(_cdp(layout.crl_url(spec.ca)), critical=False)
    )
    if email:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
    if registration is not None:
        info = dea_info_for(
            dea_number=registration.registration,
            subject_serial_number=serial_text,
            registrant_name=registrant_name or org or cn,
            schedules=schedules if schedules is not None else ("II", "IIN", "III", "IIIN", "IV", "V"),
            business_activity=business_activity or spec.business_activity,
            address=address,
        )
        builder = add_dea_extensions(builder, info)
    cert = builder.sign(ca_key, hashes.SHA256())

    with _locked(layout.directory):
        relative = f"issued/{cert.serial_number:x}.pem"
        _write_cert(layout.directory / relative, cert)
        index = _read_index(layout)
        _record(index, cert, issuer_ca=spec.ca, profile=profile, label=label, path=relative)
        _write_index(layout, index)
    return IssuedCertificate(certificate=cert, serial=cert.serial_number,
                             path=layout.directory / relative, profile=profile,
                             issuer_ca=spec.ca, label=label)
