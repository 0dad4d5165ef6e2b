"""Certificate trust: chains to configured anchors, validity at the signing time, CRLs, key usage.

21 CFR 1311.55(c) / 1305.22(c) (CSOS) and 1311.210 (EPCS): the recipient checks that the signer's
certificate chains to the trusted CA, had not expired when the document was signed, and is not on
the CA's CRL; a CRL may be cached until its nextUpdate.

Path building and checking is pyhanko-certvalidator's (point-in-time validation at `at`, CRLs
only, no network of its own); this module supplies the anchors, the CRLs and caching:
- `CrlCache` keeps each CRL until its nextUpdate and fetches it again after; sources are
  directories of CRL files (the test PKI's `<home>/pki/crl`) and the http/file URLs of the
  certificates' CRL distribution points. A directory is looked at again at most every
  `poll_seconds`, so a CRL reissued on disk is seen at once. Distribution points are followed
  only for certificates that a configured CA verifiably issued (a stranger's certificate must not
  make the gateway fetch URLs of its choosing); intermediates therefore belong in the bundle.
- `TrustStore.validate_certificate` remembers successful validations per (certificate, extra
  certificates, usage, CRL state) and reuses one while `at` lies inside the window in which every
  certificate of the path and every CRL is valid: nothing that decided the outcome can differ.
  No cache keeps a certificate larger than MAX_CACHED_CERTIFICATE_BYTES (the sender's choice).
- Every certificate a signature carries named like an issuer is a candidate issuer (of the path,
  and of each CRL): one whose key cannot have made a signature counts as not verifying it.

Revocation policy (`_revocation_on_receipt`): every certificate of the path below the anchor needs
a CRL of its issuer, signed by the issuer's key and current *now* (not at the signing time), and a
certificate on that CRL fails whatever the signing time. The signing time is asserted by the
signer (a CMS attribute, or the document), so a key revoked for compromise could otherwise sign
"in the past" against a CRL that was current then; the regulation asks for a CRL check on
receipt. A certificate without a distribution point is no exception: its issuer's CRL comes from
the CRL directories or the issuer's own distribution point.
Which CRLs count (RFC 5280 5.2, 5.3, 6.3.3): one with a critical extension or entry extension not
understood here decides nothing; only a complete CRL whose issuing distribution point covers the
certificate, and that has a nextUpdate, shows it is not revoked (a delta CRL never does); a
listing on any authentic CRL refuses, except a certificateHold that a newer complete CRL no
longer lists and a removeFromCRL entry (which revokes nothing, but releases a hold only through
the next complete CRL: delta CRLs are not merged). The report's detail gives the reason code, the
invalidity date and whether each came before or after the signing time.

The signer's certificate must also allow signing documents by its extended key usage, when it
has one, and no key of the path may be weak (RSA below 2048 bits, curves other than P-256/384/521).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import hashlib
import logging
import os
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import CRLEntryExtensionOID, ExtendedKeyUsageOID, ExtensionOID
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator import errors as cv_errors
from pyhanko_certvalidator.sig_validate import DefaultSignatureValidator

from gateway.signing.errors import SignerCertificateRefused, TimeOutOfRange

log = logging.getLogger(__name__)

DIGITAL_SIGNATURE = "digital_signature"
NON_REPUDIATION = "non_repudiation"
KEY_USAGES = frozenset({DIGITAL_SIGNATURE, NON_REPUDIATION})

CHECK_CHAIN = "certificate_chain"
CHECK_VALIDITY = "certificate_validity"
CHECK_REVOCATION = "revocation"
CHECK_KEY_USAGE = "key_usage"
CHECKS = (CHECK_CHAIN, CHECK_VALIDITY, CHECK_REVOCATION, CHECK_KEY_USAGE)

MAX_CRL_BYTES = 10 * 1024 * 1024
CLOCK_SKEW = dt.timedelta(minutes=5)  # a CRL issued this little "in the future" is usable
_COVERED_LIMIT = 10_000
_RESULT_CACHE_SIZE = 4096
# Certificates come from whoever sends a signature, and every cache below keeps those it is keyed
# by: 20 documents under 300 KB self-signed certificates left 48 MB held. Real certificates are
# 1-2 KB; larger ones are worked on anew each time and never kept.
MAX_CACHED_CERTIFICATE_BYTES = 16 * 1024


def _small(certs: Iterable[x509.Certificate]) -> bool:
    """Small enough, together, to be kept by a cache (a signer and its chain are a few KB; a
    remembered validation is keyed by the signer and every other certificate the signature
    carries, up to 31 of the sender's choosing)."""
    return sum(len(_der(c)) for c in certs) <= MAX_CACHED_CERTIFICATE_BYTES


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def as_utc(when: dt.datetime) -> dt.datetime:
    """Naive datetimes are taken as UTC. Raises TimeOutOfRange (a ValueError) for a time with no
    UTC form, e.g. 0001-01-01T00:00+05:00 (datetime itself raises OverflowError)."""
    if when.tzinfo is None:
        return when.replace(tzinfo=dt.timezone.utc)
    try:
        return when.astimezone(dt.timezone.utc)
    except OverflowError:
        raise TimeOutOfRange(f"{when.isoformat()} has no UTC form (it lies outside years 1 to 9999 in UTC)") from None


@dataclass(frozen=True)
class CertificateValidation:
    """The outcome of validating one signer certificate at one moment."""

    at: dt.datetime  # the moment the certificate was judged at
    failed_check: str | None = None  # one of CHECKS, None when valid
    code: str | None = None  # stable error code (see gateway.signing.report)
    detail: str = ""
    path: tuple[x509.Certificate, ...] = ()  # signer first, trust anchor last (when one was found)
    cached: bool = False  # the outcome of an earlier validation, reused

    @property
    def valid(self) -> bool:
        return self.failed_check is None


def load_certificate(der: bytes) -> x509.Certificate:
    """A DER certificate from an untrusted source, fully read: cryptography parses names and
    extensions lazily, and a malformed one would otherwise raise later, anywhere.
    Raises ValueError."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018 - parsed on access
        list(cert.extensions)
        cert.public_key()
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - DuplicateExtension, UnsupportedGeneralNameType,
        # UnsupportedAlgorithm, InvalidVersion, a TypeError of an odd name type...: all unreadable
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    return cert


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


# ---------------------------------------------------------------------------------------------
# CRLs


@dataclass
class _CrlEntry:
    der: bytes
    crl: x509.CertificateRevocationList
    asn1: asn1_crl.CertificateList
    next_update: dt.datetime | None
    stamp: tuple[int, int] = (0, 0)  # (mtime_ns, size) for files
    signed_by: dict[bytes, bool] = field(default_factory=dict)  # issuer DER -> signature checks

    def is_signed_by(self, issuer: x509.Certificate) -> bool:
        """The CRL's signature verifies with `issuer`'s key (worked out once per issuer)."""
        der = _der(issuer)
        known = self.signed_by.get(der)
        if known is None:
            known = _crl_signed_by(self.crl, issuer)
            self.signed_by[der] = known
        return known

    @functools.cached_property
    def unusable(self) -> str | None:
        """Why this CRL may not decide anything (RFC 5280 5.2, 5.3: a critical CRL or CRL entry
        extension the relying party cannot process), or None."""
        try:
            for ext in self.crl.extensions:
                if ext.critical and ext.oid not in _CRL_CRITICAL_UNDERSTOOD:
                    return f"it carries the unrecognised critical extension {ext.oid.dotted_string}"
            for revoked in self.crl:
                for ext in revoked.extensions:
                    if ext.critical and ext.oid not in _ENTRY_CRITICAL_UNDERSTOOD:
                        return (f"its entry for serial {revoked.serial_number:X} carries the "
                                f"unrecognised critical extension {ext.oid.dotted_string}")
        except ValueError as exc:  # a duplicate or undecodable extension
            return f"its extensions cannot be read ({exc})"
        return None

    @functools.cached_property
    def idp(self) -> x509.IssuingDistributionPoint | None:
        return _extension(self.crl, x509.IssuingDistributionPoint)

    @functools.cached_property
    def delta(self) -> bool:
        """A delta CRL (RFC 5280 5.2.4): a list of changes, never a complete CRL on its own."""
        try:
            self.crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        except x509.ExtensionNotFound:
            return False
        except ValueError:
            return True  # unreadable: certainly not a complete CRL to rely on
        return True

    @functools.cached_property
    def order(self) -> tuple[int, dt.datetime]:
        """Which of two CRLs of one issuer and scope is newer: CRL number, then thisUpdate."""
        number = crl_number(self.crl)
        return -1 if number is None else number, self.crl.last_update_utc

    @functools.cached_property
    def scope_key(self) -> tuple:
        """CRLs with equal keys are successive issues of one CRL (same issuer key and scope)."""
        return (self.crl.issuer.public_bytes(), _authority_key_id(self.crl), self.idp, self.delta)

    def listing(self, cert: x509.Certificate) -> x509.RevokedCertificate | None:
        """The entry revoking `cert`, or None. An entry with reason removeFromCRL revokes nothing
        (RFC 5280 5.3.1: it only appears in delta CRLs, to undo a certificateHold); on an
        indirect CRL an entry belongs to the issuer its certificateIssuer names (5.3.3)."""
        if self.idp is not None and self.idp.indirect_crl:
            found = None
            owner = self.crl.issuer
            for revoked in self.crl:
                try:
                    names = revoked.extensions.get_extension_for_class(x509.CertificateIssuer).value
                    owner = next((n.value for n in names if isinstance(n, x509.DirectoryName)), None)
                except x509.ExtensionNotFound:
                    pass
                if revoked.serial_number == cert.serial_number and owner == cert.issuer:
                    found = revoked
                    break
        else:
            found = self.crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if found is None or _entry_reason(found) is x509.ReasonFlags.remove_from_crl:
            return None
        return found

    def scope_excludes(self, cert: x509.Certificate) -> str | None:
        """Why this CRL does not cover `cert` (RFC 5280 5.2.5, 6.3.3 (b)), or None."""
        if self.delta:
            return "it is a delta CRL, not a complete one"
        idp = self.idp
        if idp is None:
            return None
        if idp.only_contains_user_certs and _is_ca(cert):
            return "it covers end-entity certificates only (onlyContainsUserCerts)"
        if idp.only_contains_ca_certs and not _is_ca(cert):
            return "it covers CA certificates only (onlyContainsCACerts)"
        if idp.only_contains_attribute_certs:
            return "it covers attribute certificates only"
        if idp.only_some_reasons is not None:
            return "it covers some revocation reasons only (onlySomeReasons)"
        if idp.full_name is not None and not set(idp.full_name) & set(_distribution_point_names(cert)):
            return "its distribution point is not one the certificate names"
        if idp.relative_name is not None:
            return "it is a partitioned CRL (relative distribution point name)"
        return None


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    if crl.issuer != issuer.subject or not _strong_hash(crl):
        return False
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False  # a key type that cannot have signed it


def _load_crl(data: bytes) -> _CrlEntry:
    """DER or PEM; ValueError when it is neither."""
    if data.lstrip().startswith(b"-----BEGIN"):
        crl = x509.load_pem_x509_crl(data)
        der = crl.public_bytes(Encoding.DER)
    else:
        crl = x509.load_der_x509_crl(data)
        der = data
    return _CrlEntry(der=der, crl=crl, asn1=asn1_crl.CertificateList.load(der),
                     next_update=crl.next_update_utc)


class CrlCache:
    """CRLs from directories and distribution-point URLs, each kept until its nextUpdate."""

    def __init__(
        self,
        directories: Iterable[str | os.PathLike[str]] = (),
        *,
        fetch_urls: bool = True,
        poll_seconds: float = 1.0,
        fetch_timeout: float = 5.0,
        retry_failed_after: float = 60.0,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.directories = tuple(Path(d) for d in directories)
        self.fetch_urls = fetch_urls
        self.poll_seconds = poll_seconds
        self.fetch_timeout = fetch_timeout
        self.retry_failed_after = retry_failed_after
        self._clock = clock
        self._lock = threading.Lock()
        self._files: dict[Path, _CrlEntry] = {}
        self._urls: dict[str, _CrlEntry] = {}
        self._failed_urls: dict[str, dt.datetime] = {}
        self._last_scan: dt.datetime | None = None
        self._generation = 0
        self._snapshot: tuple[int, tuple[_CrlEntry, ...]] | None = None
        self._covered: set[x509.Certificate] = set()  # certificates whose CRLs were looked for
        self._tracked: tuple[x509.Certificate, ...] = ()  # always looked for (intermediates)
        # Which certificates' distribution points may be fetched: a trust store allows only those
        # its CAs verifiably issued, so that a stranger's certificate cannot make us fetch a URL.
        self.fetch_filter: Callable[[x509.Certificate], bool] | None = None
        # Which fetched CRLs may be kept: a trust store keeps only those one of its CAs signed, so
        # that one forged response can neither decide nor block anything until its nextUpdate.
        self.crl_filter: Callable[[x509.CertificateRevocationList], bool] | None = None
        self._refetch_at: dt.datetime | None = None  # earliest nextUpdate of a fetched CRL

    # -- sources

    def _scan_directories(self, now: dt.datetime) -> bool:
        seen: set[Path] = set()
        changed = False
        for directory in self.directories:
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for item in entries:
                if not item.is_file() or not item.name.endswith((".crl", ".pem", ".der")):
                    continue
                path = Path(item.path)
                seen.add(path)
                info = item.stat()
                stamp = (info.st_mtime_ns, info.st_size)
                current = self._files.get(path)
                if current is not None and current.stamp == stamp:
                    continue  # unchanged file: re-reading would give the same CRL
                try:
                    data = path.read_bytes()
                    if len(data) > MAX_CRL_BYTES:
                        raise ValueError("too large")
                    entry = _load_crl(data)
                except (OSError, ValueError) as exc:
                    log.warning("CRL file %s skipped: %s", path, exc)
                    if path in self._files:
                        del self._files[path]
                        changed = True
                    continue
                entry.stamp = stamp
                self._files[path] = entry
                changed = True
        for gone in set(self._files) - seen:  # a removed file takes its CRL with it
            del self._files[gone]
            changed = True
        return changed

    def _fetch(self, url: str) -> _CrlEntry | None:
        parsed = urllib.parse.urlparse(url)
        try:
            if parsed.scheme == "file":
                data = Path(urllib.request.url2pathname(parsed.path)).read_bytes()
            elif parsed.scheme in ("http", "https"):
                with urllib.request.urlopen(url, timeout=self.fetch_timeout) as response:  # noqa: S310
                    data = response.read(MAX_CRL_BYTES + 1)
            else:
                return None
            if len(data) > MAX_CRL_BYTES:
                raise ValueError("too large")
            entry = _load_crl(data)
            if self.crl_filter is not None and not self.crl_filter(entry.crl):
                raise ValueError("not signed by a configured CA")
            return entry
        except (OSError, ValueError) as exc:
            log.warning("CRL %s could not be fetched: %s", url, exc)
            return None

    def _fetch_for(self, certs: Sequence[x509.Certificate], now: dt.datetime) -> bool:
        """Fetch the distribution-point CRLs of certificates that have no current CRL of their
        issuer's key: one from a directory with the same issuer and authority key identifier, or
        one fetched from that very URL. A CRL of the same issuer name is not enough: after a CA
        key change both keys' CRLs carry the same name."""
        if not self.fetch_urls:
            return False
        changed = False
        for cert in certs:
            if cert.issuer == cert.subject:
                continue
            if self.fetch_filter is not None and not self.fetch_filter(cert):
                continue
            key_id = _authority_key_id(cert)
            if key_id is not None and any(
                e.crl.issuer == cert.issuer and _authority_key_id(e.crl) == key_id and _current(e, now)
                and e.unusable is None and e.scope_excludes(cert) is None  # a delta or scoped CRL is not enough
                for e in self._files.values()
            ):
                continue
            for url in _distribution_points(cert):
                held = self._urls.get(url)
                if held is not None and _current(held, now):
                    break
                if not self._may_try(url, now):
                    continue
                entry = self._fetch(url)
                if entry is None:
                    self._failed_urls[url] = now
                    continue
                self._failed_urls.pop(url, None)
                old = self._urls.get(url)
                if old is None or old.der != entry.der:
                    self._urls[url] = entry
                    changed = True
                if _current(entry, now):
                    break
        return changed

    def _all_entries(self) -> list[_CrlEntry]:
        return [*self._files.values(), *self._urls.values()]

    # -- use

    def current(self, certs: Sequence[x509.Certificate] = ()) -> tuple[int, tuple[_CrlEntry, ...]]:
        """(generation, CRLs): the generation changes whenever the set of CRLs does."""
        now = self._clock()
        with self._lock:
            if (
                self._snapshot is not None
                and self._last_scan is not None
                and (now - self._last_scan).total_seconds() < self.poll_seconds
                and (self._refetch_at is None or now < self._refetch_at)
                and all(c in self._covered for c in certs)
            ):
                return self._snapshot  # nothing due: the common case, kept cheap
            changed = False
            if self._last_scan is None or (now - self._last_scan).total_seconds() >= self.poll_seconds:
                changed |= self._scan_directories(now)
                self._last_scan = now
            # CRLs fetched from URLs are kept until their nextUpdate, then fetched again.
            for url, entry in list(self._urls.items()):
                if _current(entry, now) or not self._may_try(url, now):
                    continue
                fresh = self._fetch(url)
                if fresh is None:
                    self._failed_urls[url] = now
                elif fresh.der != entry.der:
                    self._urls[url] = fresh
                    changed = True
            changed |= self._fetch_for((*certs, *self._tracked), now)
            if changed or self._snapshot is None:
                unique: dict[bytes, _CrlEntry] = {}
                for entry in self._all_entries():
                    unique.setdefault(hashlib.sha256(entry.der).digest(), entry)
                self._generation += 1
                self._snapshot = (self._generation, tuple(unique.values()))
                self._covered.clear()
            if len(self._covered) > _COVERED_LIMIT:
                self._covered.clear()
            self._covered.update(c for c in certs if _small((c,)))
            due = [
                e.next_update if _current(e, now)
                else self._failed_urls.get(url, now) + dt.timedelta(seconds=self.retry_failed_after)
                for url, e in self._urls.items() if e.next_update is not None
            ]
            self._refetch_at = min(due) if due else None
            return self._snapshot

    def _may_try(self, url: str, now: dt.datetime) -> bool:
        failed = self._failed_urls.get(url)
        return failed is None or (now - failed).total_seconds() >= self.retry_failed_after

    def sources(self) -> list[str]:
        """Where the CRLs held come from (file paths and URLs), for diagnostics."""
        with self._lock:
            return [str(p) for p in self._files] + list(self._urls)

    def track(self, certs: Iterable[x509.Certificate]) -> None:
        """Certificates whose CRLs are wanted on every use (a trust store's intermediates)."""
        with self._lock:
            self._tracked = tuple(dict.fromkeys((*self._tracked, *certs)))
            self._snapshot = None

    def refresh(self) -> None:
        """Look at the directories again on the next use."""
        with self._lock:
            self._last_scan = None


def _current(entry: _CrlEntry, now: dt.datetime) -> bool:
    return entry.next_update is None or entry.next_update > now


def _strong_hash(crl: x509.CertificateRevocationList) -> bool:
    """Not signed over SHA-1 or MD5, which certificates are refused for too."""
    try:
        algorithm = crl.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return False
    return algorithm is None or algorithm.name not in ("sha1", "md5")  # None: Ed25519/Ed448


def _extension(item: Any, cls: type[x509.ExtensionType]) -> Any:
    """The value of `item`'s extension of class `cls` (a certificate, CRL or CRL entry), None
    when it has none or the extensions cannot be read (duplicated, undecodable)."""
    try:
        return item.extensions.get_extension_for_class(cls).value
    except (x509.ExtensionNotFound, ValueError):
        return None


def _authority_key_id(item: x509.Certificate | x509.CertificateRevocationList) -> bytes | None:
    found = _extension(item, x509.AuthorityKeyIdentifier)
    return found.key_identifier if found is not None else None


# Critical extensions this module processes; any other critical one makes a CRL unusable.
_CRL_CRITICAL_UNDERSTOOD = frozenset({
    ExtensionOID.ISSUING_DISTRIBUTION_POINT, ExtensionOID.DELTA_CRL_INDICATOR,
})
_ENTRY_CRITICAL_UNDERSTOOD = frozenset({
    CRLEntryExtensionOID.CRL_REASON, CRLEntryExtensionOID.INVALIDITY_DATE,
    CRLEntryExtensionOID.CERTIFICATE_ISSUER,
})


def _entry_reason(revoked: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    found = _extension(revoked, x509.CRLReason)
    return found.reason if found is not None else None


def _invalidity_date(revoked: x509.RevokedCertificate) -> dt.datetime | None:
    found = _extension(revoked, x509.InvalidityDate)
    return found.invalidity_date_utc if found is not None else None


def _is_ca(cert: x509.Certificate) -> bool:
    found = _extension(cert, x509.BasicConstraints)
    return found is not None and found.ca


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    """The CRL number (RFC 5280 5.2.3), None when the CRL has none or it cannot be read."""
    found = _extension(crl, x509.CRLNumber)
    return found.crl_number if found is not None else None


def _distribution_point_names(cert: x509.Certificate) -> list[x509.GeneralName]:
    points = _extension(cert, x509.CRLDistributionPoints) or ()
    return [name for point in points for name in (point.full_name or ())]


def _distribution_points(cert: x509.Certificate) -> list[str]:
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls: list[str] = []
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                urls.append(name.value)
    return urls


# ---------------------------------------------------------------------------------------------
# Trust store


def _split_bundle(certs: Iterable[x509.Certificate]) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    anchors, intermediates = [], []
    for cert in certs:
        (anchors if cert.subject == cert.issuer else intermediates).append(cert)
    return anchors, intermediates


@dataclass
class _CachedSuccess:
    not_before: dt.datetime  # the window of `at` in which the outcome holds
    not_after: dt.datetime
    fresh_until: dt.datetime  # and of the clock: the earliest nextUpdate of the CRLs it used
    path: tuple[x509.Certificate, ...]


class TrustStore:
    """Trust anchors, known intermediates and a CRL source: everything trust decisions need."""

    def __init__(
        self,
        anchors: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
        crls: CrlCache | None = None,
        *,
        revocation_mode: str = "require",
        usage: Iterable[str] = (DIGITAL_SIGNATURE,),
    ) -> None:
        if not anchors:
            raise ValueError("a trust store needs at least one trust anchor")
        if revocation_mode not in ("hard-fail", "require"):
            raise ValueError("revocation_mode is 'hard-fail' or 'require'")
        self.anchors = tuple(anchors)
        self.intermediates = tuple(intermediates)
        self.crls = crls if crls is not None else CrlCache()
        self.revocation_mode = revocation_mode
        self.usage = frozenset(usage)
        _check_usage(self.usage)
        self.crls.track(self.intermediates)
        self.crls.fetch_filter = self._issued_by_ours
        self.crls.crl_filter = self._crl_of_ours
        self._cas = (*self.anchors, *self.intermediates)
        self._clock = self.crls._clock
        self._issued_cache: dict[x509.Certificate, bool] = {}
        self._asn1_anchors = [_asn1(c) for c in self.anchors]
        self._asn1_intermediates = [_asn1(c) for c in self.intermediates]
        self._results: dict[tuple, _CachedSuccess] = {}

    @classmethod
    def from_pem_bundle(
        cls,
        bundle: str | os.PathLike[str] | bytes,
        crl_dirs: Iterable[str | os.PathLike[str]] = (),
        **kwargs: Any,
    ) -> TrustStore:
        """Self-signed certificates of the bundle are anchors, the others intermediates."""
        data = bundle if isinstance(bundle, bytes) else Path(bundle).read_bytes()
        anchors, intermediates = _split_bundle(x509.load_pem_x509_certificates(data))
        crl_options = {k: kwargs.pop(k) for k in ("fetch_urls", "poll_seconds") if k in kwargs}
        return cls(anchors, intermediates, CrlCache(crl_dirs, **crl_options), **kwargs)

    def _issued_by_ours(self, cert: x509.Certificate) -> bool:
        """Issued (signature checked) by an anchor or a configured intermediate."""
        known = self._issued_cache.get(cert)
        if known is None:
            known = any(_issued(cert, ca) for ca in (*self.anchors, *self.intermediates))
            if not _small((cert,)):
                return known
            if len(self._issued_cache) > _COVERED_LIMIT:
                self._issued_cache.clear()
            self._issued_cache[cert] = known
        return known

    def _crl_of_ours(self, crl: x509.CertificateRevocationList) -> bool:
        """Signed by an anchor or a configured intermediate (a fetched CRL, checked once)."""
        return any(_crl_signed_by(crl, ca) for ca in (*self.anchors, *self.intermediates))

    def chain_for(self, cert: x509.Certificate) -> tuple[x509.Certificate, ...]:
        """The known intermediates above `cert`, nearest first, up to (not including) an anchor:
        what a signature should carry so that tools given only the root can build the path."""
        out: list[x509.Certificate] = []
        current = cert
        while current.issuer != current.subject and len(out) < 8:
            if any(_issued(current, a) for a in self.anchors):
                break
            parent = next((c for c in self.intermediates if c not in out and _issued(current, c)), None)
            if parent is None:
                break
            out.append(parent)
            current = parent
        return tuple(out)

    def validate_certificate(
        self,
        cert: x509.Certificate,
        at: dt.datetime | None = None,
        usage: Iterable[str] | None = None,
        *,
        extra_certs: Sequence[x509.Certificate] = (),
    ) -> CertificateValidation:
        """Judge `cert` at `at` (default now): path to an anchor, validity of every certificate
        of the path at that time, CRLs, key usage. Never raises for a bad certificate."""
        at = as_utc(at) if at is not None else utcnow()
        wanted = frozenset(usage) if usage is not None else self.usage
        _check_usage(wanted)
        generation, entries = self.crls.current((cert, *extra_certs))
        key = (cert, frozenset(extra_certs), wanted, generation)
        now = self._clock()
        hit = self._cached(key, at, now)
        if hit is not None:
            return hit

        # Only CRLs a CA we know of signed reach the path checks: a forged one decides nothing
        # (and one signed with a key of another type made them raise).
        # Only the configured CAs: the certificates a signature carries are the sender's choice,
        # and each would be remembered on every CRL (a bounded set keeps memory bounded).
        entries = tuple(e for e in entries if any(e.is_signed_by(ca) for ca in self._cas))
        with _PATH_CHECKS:
            hit = self._cached(key, at, now)  # a thread that waited here finds the outcome made
            if hit is not None:
                return hit
            result, window = self._validate(cert, at, wanted, extra_certs, entries, now)
            if result.valid and window is not None and _small((cert, *extra_certs)):
                if len(self._results) >= _RESULT_CACHE_SIZE:
                    self._results.clear()
                self._results[key] = _CachedSuccess(*window, result.path)
        return result

    def _cached(self, key: tuple, at: dt.datetime, now: dt.datetime) -> CertificateValidation | None:
        hit = self._results.get(key)
        if hit is not None and hit.not_before <= at <= hit.not_after and now < hit.fresh_until:
            return CertificateValidation(at=at, path=hit.path, cached=True)
        return None

    def _validate(
        self,
        cert: x509.Certificate,
        at: dt.datetime,
        usage: frozenset[str],
        extra_certs: Sequence[x509.Certificate],
        entries: tuple[_CrlEntry, ...],
        now: dt.datetime,
    ) -> tuple[CertificateValidation, tuple[dt.datetime, dt.datetime, dt.datetime] | None]:
        context = ValidationContext(
            trust_roots=self._asn1_anchors,
            other_certs=[*self._asn1_intermediates, *(_asn1(c) for c in extra_certs)],
            crls=[e.asn1 for e in _latest_usable(entries, self._cas)],
            moment=at,
            allow_fetching=False,
            revocation_mode=self.revocation_mode,
            # The current CRL is used for a signing time in the past (its thisUpdate is later).
            retroactive_revinfo=True,
            signature_validator=_SIGNATURES,
        )
        validator = CertificateValidator(_asn1(cert), validation_context=context)
        try:
            path = _run_sync(lambda: validator.async_validate_usage(set(usage)))
        except cv_errors.PathBuildingError as exc:
            return _failed(at, CHECK_CHAIN, "certificate_untrusted", exc), None
        except cv_errors.RevokedError as exc:
            return _failed(at, CHECK_REVOCATION, "certificate_revoked", exc), None
        except cv_errors.StaleRevinfoError as exc:
            return _failed(at, CHECK_REVOCATION, "revocation_out_of_bounds", exc), None
        except cv_errors.InsufficientRevinfoError as exc:
            return _failed(at, CHECK_REVOCATION, "revocation_unavailable", exc), None
        except cv_errors.ExpiredError as exc:
            return _failed(at, CHECK_VALIDITY, "certificate_expired", exc), None
        except cv_errors.NotYetValidError as exc:
            return _failed(at, CHECK_VALIDITY, "certificate_not_yet_valid", exc), None
        except cv_errors.DisallowedAlgorithmError as exc:
            return _failed(at, CHECK_CHAIN, "algorithm_not_allowed", exc), None
        except cv_errors.InvalidCertificateError as exc:  # key usage, or no path from a self-signed one
            if "self-signed" in str(exc):
                return _failed(at, CHECK_CHAIN, "certificate_untrusted", exc), None
            return _failed(at, CHECK_KEY_USAGE, "certificate_key_usage", exc), None
        except (cv_errors.PathValidationError, cv_errors.ValidationError) as exc:
            return _failed(at, CHECK_CHAIN, "certificate_chain_invalid", exc), None
        except (ValueError, TypeError, KeyError, NotImplementedError, UnsupportedAlgorithm) as exc:
            # A certificate cryptography parsed but asn1crypto or the path checks cannot handle
            # (an exotic extension or key): not a chain we can trust.
            return _failed(at, CHECK_CHAIN, "certificate_chain_invalid",
                           f"{type(exc).__name__}: {exc}"), None
        except Exception as exc:  # noqa: BLE001 - any other error of the path checks on a
            # crafted chain (keys of the wrong type are _SignatureValidator's): it must not crash
            # the verifier
            return _failed(at, CHECK_CHAIN, "certificate_chain_invalid",
                           f"{type(exc).__name__}: {exc}"), None

        chain = tuple(_from_asn1(c) for c in reversed(list(path)))  # signer first
        weak = weak_key(chain)
        if weak is not None:
            return _failed(at, CHECK_CHAIN, "algorithm_not_allowed", weak, chain), None
        purpose = signing_purpose_missing(chain[0])
        if purpose is not None:
            return _failed(at, CHECK_KEY_USAGE, "certificate_key_usage", purpose, chain), None
        refusal, used = self._revocation_on_receipt(chain, entries, at, now)
        if refusal is not None:
            return _failed(at, CHECK_REVOCATION, refusal[0], refusal[1], chain), None
        # Window in which this outcome holds: every certificate valid, every CRL current.
        lo = max(c.not_valid_before_utc for c in chain)
        hi = min(c.not_valid_after_utc for c in chain)
        fresh = min((e.next_update for e in used if e.next_update is not None), default=hi)
        for entry in entries:
            if entry.next_update is not None:
                hi = min(hi, entry.next_update)
        return CertificateValidation(at=at, path=chain), (lo, hi, fresh) if lo <= at <= hi else None

    def _revocation_on_receipt(
        self, chain: Sequence[x509.Certificate], entries: Sequence[_CrlEntry], at: dt.datetime,
        now: dt.datetime,
    ) -> tuple[tuple[str, str] | None, list[_CrlEntry]]:
        """21 CFR 1311.55(c)(2)/1305.22(c): each certificate of the path below the anchor is
        checked against a CRL of its issuer that the issuer's key signed and that is current
        now. Returns ((code, detail) or None, the CRLs relied on).

        RFC 5280 6.3.3: a CRL with a critical extension (or entry extension) not understood here
        decides nothing; only a complete CRL whose scope (issuing distribution point) covers the
        certificate can show it is not revoked. A listing on any authentic CRL refuses, delta
        CRLs included, except a certificateHold that a newer complete CRL no longer lists (the
        hold was released) and a removeFromCRL entry, which revokes nothing."""
        used: list[_CrlEntry] = []
        for cert, issuer in zip(chain, chain[1:]):
            own = [e for e in entries if e.is_signed_by(issuer)]
            usable = [e for e in own if e.unusable is None]
            complete = [e for e in usable if e.scope_excludes(cert) is None]
            for entry in usable:
                revoked = entry.listing(cert)
                if revoked is None:
                    continue
                reason = _entry_reason(revoked)
                if reason is x509.ReasonFlags.certificate_hold and any(
                    other.order > entry.order and other.listing(cert) is None for other in complete
                ):
                    continue  # the hold was released: a newer complete CRL omits it
                return ("certificate_revoked", _revocation_detail(cert, revoked, reason, at)), used
            # RFC 5280 5.1.2.5: a CRL without nextUpdate says nothing of how long it holds, so it
            # is never current (an old one could be replayed for ever).
            bounded = [e for e in complete if e.next_update is not None]
            current = [e for e in bounded if _current(e, now) and e.crl.last_update_utc <= now + CLOCK_SKEW]
            if not current:
                who = f"the CRL of {cert.issuer.rfc4514_string()}"
                newest = max((e.next_update for e in bounded), default=None)
                early = [e for e in bounded if _current(e, now)]  # current but issued "in the future"
                if complete and not bounded:
                    return ("revocation_out_of_bounds",
                            f"{who} has no nextUpdate: its freshness cannot be judged"), used
                if early:
                    return ("revocation_out_of_bounds",
                            f"{who} is dated {early[0].crl.last_update_utc.isoformat()}, later than now"), used
                if newest is not None:
                    return ("revocation_out_of_bounds",
                            f"the newest CRL of {cert.issuer.rfc4514_string()} expired at "
                            f"{newest.isoformat()}; a CRL current on receipt is needed"), used
                why = [e.unusable or e.scope_excludes(cert) for e in own]
                if why:
                    return ("revocation_unavailable",
                            f"no CRL of {cert.issuer.rfc4514_string()} can show the status of "
                            f"{cert.subject.rfc4514_string()}: {'; '.join(dict.fromkeys(w for w in why if w))}"), used
                return ("revocation_unavailable",
                        f"no CRL of {cert.issuer.rfc4514_string()} is available to check "
                        f"{cert.subject.rfc4514_string()}"), used
            used.extend(current)
        return None, used


def _revocation_detail(cert: x509.Certificate, revoked: x509.RevokedCertificate,
                       reason: x509.ReasonFlags | None, at: dt.datetime) -> str:
    """What the report says of a revocation: when, why, and how that relates to the signing
    time. A revocation after the signing time still refuses (the CRL is read on receipt, and the
    signing time is the signer's claim), which the detail states."""
    when = revoked.revocation_date_utc
    invalid = _invalidity_date(revoked)
    text = (f"certificate serial {cert.serial_number:X} ({cert.subject.rfc4514_string()}) is on the "
            f"CRL of {cert.issuer.rfc4514_string()}, revoked at {when.isoformat()} "
            f"({'before' if when <= at else 'after'} the signing time), reason "
            f"{(reason or x509.ReasonFlags.unspecified).value}")
    if invalid is not None:
        text += (f", key invalid since {invalid.isoformat()} "
                 f"({'before' if invalid <= at else 'after'} the signing time)")
    return text


def _latest_usable(entries: Iterable[_CrlEntry], cas: Sequence[x509.Certificate]) -> list[_CrlEntry]:
    """The CRLs the path checks may read: usable ones, and of successive issues of one CRL (same
    signing CA, same scope) only the newest, so that a certificateHold released since is not read
    from an older issue."""
    newest: dict[tuple, _CrlEntry] = {}
    for entry in entries:
        if entry.unusable is not None:
            continue
        signer = next((_der(ca) for ca in cas if entry.is_signed_by(ca)), b"")
        key = (signer, *entry.scope_key)
        held = newest.get(key)
        if held is None or entry.order > held.order:
            newest[key] = entry
    return list(newest.values())


# Extended key usages that allow signing documents (RFC 5280 4.2.1.12: when the extension is
# present the key serves only the purposes listed). clientAuth is kept: CSOS certificates are
# also used to authenticate to suppliers' systems.
_SIGNING_PURPOSES = frozenset({
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    ExtendedKeyUsageOID.EMAIL_PROTECTION,
    ExtendedKeyUsageOID.CLIENT_AUTH,
    x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36"),  # id-kp-documentSigning, RFC 9336
    x509.ObjectIdentifier("1.3.6.1.4.1.311.10.3.12"),  # Microsoft document signing
})


def signing_purpose_missing(cert: x509.Certificate) -> str | None:
    """Why the signer's extended key usage rules out signing documents, or None. An OCSP
    responder's, a TLS server's or a code-signing certificate of the CA must not sign orders."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        return f"the extended key usage cannot be read ({exc})"
    if _SIGNING_PURPOSES & set(usages):
        return None
    names = ", ".join(getattr(u, "_name", None) or u.dotted_string for u in usages)
    return f"the extended key usage ({names}) does not allow signing documents"


_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MIN_RSA_BITS = 2048


def weak_key(chain: Sequence[x509.Certificate]) -> str | None:
    """A key of the path too weak to rely on (NIST SP 800-131A: RSA below 2048 bits, curves
    other than P-256/384/521, DSA), or None. The signer's own key is included: it verifies the
    document."""
    for cert in chain:
        try:
            key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            return f"the key of {cert.subject.rfc4514_string()} cannot be read ({exc})"
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size >= MIN_RSA_BITS:
                continue
            why = f"RSA-{key.key_size}, below {MIN_RSA_BITS} bits"
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if isinstance(key.curve, _CURVES):
                continue
            why = f"elliptic curve {key.curve.name}, not P-256, P-384 or P-521"
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            continue
        else:
            why = f"{type(key).__name__}"
        return f"the key of {cert.subject.rfc4514_string()} is not allowed: {why}"
    return None


def _issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_usage(usage: frozenset[str]) -> None:
    unknown = usage - KEY_USAGES
    if unknown:
        raise ValueError(f"unknown key usage {sorted(unknown)}; use {sorted(KEY_USAGES)}")


def _failed(
    at: dt.datetime, check: str, code: str, exc: Exception | str, path: tuple[x509.Certificate, ...] = ()
) -> CertificateValidation:
    detail = str(exc) if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    return CertificateValidation(at=at, failed_check=check, code=code, detail=detail, path=path)


# asn1crypto parses lazily and is not thread-safe: two threads checking paths through one cached
# certificate (or CRL) at once saw half-parsed fields ("No field numbered 1 is present"), and a
# good certificate came out certificate_chain_invalid. The checks are pure Python under the GIL
# anyway, so running one at a time costs nothing; only a cache miss gets here.
_PATH_CHECKS = threading.Lock()
_asn1_cache: dict[bytes, asn1_x509.Certificate] = {}
_x509_cache: dict[bytes, x509.Certificate] = {}


def _asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    der = _der(cert)
    if len(der) > MAX_CACHED_CERTIFICATE_BYTES:
        return asn1_x509.Certificate.load(der)
    found = _asn1_cache.get(der)
    if found is None:
        if len(_asn1_cache) > 1024:
            _asn1_cache.clear()
        found = _asn1_cache[der] = asn1_x509.Certificate.load(der)
    return found


def _from_asn1(cert: asn1_x509.Certificate) -> x509.Certificate:
    der = cert.dump()
    if len(der) > MAX_CACHED_CERTIFICATE_BYTES:
        return x509.load_der_x509_certificate(der)
    found = _x509_cache.get(der)
    if found is None:
        if len(_x509_cache) > 1024:
            _x509_cache.clear()
        found = _x509_cache[der] = x509.load_der_x509_certificate(der)
    return found


class _SignatureValidator(DefaultSignatureValidator):
    """The library's signature check, with a key that cannot have made the signature (an EC key
    for an RSA signature: the library asserts the key type) a signature that does not verify.
    Every certificate of the bag named like an issuer is tried as one, for the path and for each
    CRL's issuer; an AssertionError ended the whole validation at the first look-alike."""

    def validate_signature(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().validate_signature(*args, **kwargs)
        except (AssertionError, TypeError, ValueError, UnsupportedAlgorithm) as exc:
            raise InvalidSignature(f"the key cannot verify this signature ({type(exc).__name__})") from None


_SIGNATURES = _SignatureValidator()


def _run_sync(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a certvalidator coroutine to completion from synchronous code.

    With fetching off it never waits on I/O, so it completes on its first step, even when the
    caller is itself inside an event loop (the HTTP server). Should it ever need a loop, it is
    run again on an event loop of its own in a helper thread.
    """
    coro = make()
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    except RuntimeError as exc:
        if "event loop" not in str(exc):
            raise
    coro.close()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, make()).result()


# A CRL that is not current here says nothing against the certificate: the relying party
# fetches its own on receipt, so the signer is not stopped by it.
_SIGNER_NOT_DECIDED = frozenset({"revocation_unavailable", "revocation_out_of_bounds"})


def check_signer_certificate(trust: TrustStore, cert: x509.Certificate,
                             at: dt.datetime | None = None) -> CertificateValidation:
    """Judge the certificate of a key about to sign, as the recipient will (21 CFR 1311.55(c),
    1305.22(c), 1311.210): raises SignerCertificateRefused, with the verifier's code, for one
    that is expired, not yet valid, revoked, untrusted, not for signing or weak, so the gateway
    never makes a signature every relying party refuses. A CRL not current here does not stop
    signing (the result is returned with its code)."""
    result = trust.validate_certificate(cert, at)
    if result.valid or result.code in _SIGNER_NOT_DECIDED:
        return result
    raise SignerCertificateRefused(f"the certificate of this key is refused: {result.detail}",
                                   code=result.code)


def load_trust(bundle: Path, crl_dir: Path | None = None) -> TrustStore:
    """The trust store of a home: the CA bundle (self-signed: anchors, others: intermediates)
    and, when it exists, the directory of its CRLs. Raises OSError / ValueError."""
    dirs = [crl_dir] if crl_dir is not None and crl_dir.is_dir() else []
    return TrustStore.from_pem_bundle(bundle, crl_dirs=dirs)


def validate_certificate(
    trust: TrustStore,
    cert: x509.Certificate,
    at: dt.datetime | None = None,
    usage: Iterable[str] | None = None,
    *,
    extra_certs: Sequence[x509.Certificate] = (),
) -> CertificateValidation:
    """Function form of `TrustStore.validate_certificate`."""
    return trust.validate_certificate(cert, at, usage, extra_certs=extra_certs)


__all__ = [
    "CHECKS", "CertificateValidation", "CrlCache", "DIGITAL_SIGNATURE", "NON_REPUDIATION",
    "TrustStore", "check_signer_certificate", "load_trust", "validate_certificate",
]
