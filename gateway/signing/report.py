"""Verification reports: what a signature check found, in the manner of pyHanko / EU DSS.

A report is a list of checks plus facts (signer, signing time). Everything a caller branches on
(`indication`, `sub_indication`, `code`, `valid`) is derived from the checks, so a report cannot
disagree with itself. Indications and sub-indications follow ETSI EN 319 102-1; `code` is the
gateway's stable error code (the same codes the HTTP API returns).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.signing.validation import MAX_CACHED_CERTIFICATE_BYTES


class Indication(str, enum.Enum):
    TOTAL_PASSED = "TOTAL_PASSED"
    TOTAL_FAILED = "TOTAL_FAILED"
    INDETERMINATE = "INDETERMINATE"


class SubIndication(str, enum.Enum):
    FORMAT_FAILURE = "FORMAT_FAILURE"
    HASH_FAILURE = "HASH_FAILURE"
    SIG_CRYPTO_FAILURE = "SIG_CRYPTO_FAILURE"
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"
    NO_SIGNING_CERTIFICATE_FOUND = "NO_SIGNING_CERTIFICATE_FOUND"
    NO_CERTIFICATE_CHAIN_FOUND = "NO_CERTIFICATE_CHAIN_FOUND"
    CERTIFICATE_CHAIN_GENERAL_FAILURE = "CERTIFICATE_CHAIN_GENERAL_FAILURE"
    CHAIN_CONSTRAINTS_FAILURE = "CHAIN_CONSTRAINTS_FAILURE"
    CRYPTO_CONSTRAINTS_FAILURE = "CRYPTO_CONSTRAINTS_FAILURE"
    REVOCATION_OUT_OF_BOUNDS = "REVOCATION_OUT_OF_BOUNDS"
    TRY_LATER = "TRY_LATER"
    SIGNED_DATA_NOT_FOUND = "SIGNED_DATA_NOT_FOUND"


# Sub-indications that settle the matter (the signature is definitely bad); the others leave it
# undecided: a missing chain or CRL could be supplied later.
_TOTAL_FAILED = frozenset({
    SubIndication.FORMAT_FAILURE,
    SubIndication.HASH_FAILURE,
    SubIndication.SIG_CRYPTO_FAILURE,
    SubIndication.REVOKED,
    SubIndication.EXPIRED,
    SubIndication.NOT_YET_VALID,
})

# Stable error codes -> sub-indication. One place, so that the CLI, the HTTP API and the domain
# rules (CSOS, EPCS) speak the same language.
CODE_SUBINDICATION: dict[str, SubIndication] = {
    # input that could not be read as a signed document
    "malformed_xml": SubIndication.FORMAT_FAILURE,
    "xml_dtd_forbidden": SubIndication.FORMAT_FAILURE,
    "xml_too_large": SubIndication.FORMAT_FAILURE,
    "xml_too_deep": SubIndication.FORMAT_FAILURE,
    "signature_malformed": SubIndication.FORMAT_FAILURE,
    "unknown_document_type": SubIndication.FORMAT_FAILURE,
    "signature_missing": SubIndication.SIGNED_DATA_NOT_FOUND,
    "content_missing": SubIndication.SIGNED_DATA_NOT_FOUND,
    "algorithm_not_allowed": SubIndication.CRYPTO_CONSTRAINTS_FAILURE,
    # the signature itself
    "signature_invalid": SubIndication.SIG_CRYPTO_FAILURE,
    # the signer's certificate
    "certificate_missing": SubIndication.NO_SIGNING_CERTIFICATE_FOUND,
    "certificate_malformed": SubIndication.FORMAT_FAILURE,
    "certificate_untrusted": SubIndication.NO_CERTIFICATE_CHAIN_FOUND,
    "certificate_chain_invalid": SubIndication.CERTIFICATE_CHAIN_GENERAL_FAILURE,
    "certificate_expired": SubIndication.EXPIRED,
    "certificate_not_yet_valid": SubIndication.NOT_YET_VALID,
    "certificate_revoked": SubIndication.REVOKED,
    "certificate_key_usage": SubIndication.CHAIN_CONSTRAINTS_FAILURE,
    "revocation_unavailable": SubIndication.TRY_LATER,
    "revocation_out_of_bounds": SubIndication.REVOCATION_OUT_OF_BOUNDS,
}

# A failed digest check is a hash failure whatever its code (callers see `signature_invalid`).
CHECK_SUBINDICATION: dict[str, SubIndication] = {
    "reference_digest": SubIndication.HASH_FAILURE,
    "message_digest": SubIndication.HASH_FAILURE,
}

# Codes meaning "this input cannot be verified at all" (CLI exit status 2, HTTP 400) rather than
# "this is a signature and it is not valid" (exit 1, HTTP 422).
UNUSABLE_INPUT_CODES = frozenset({
    "malformed_xml", "xml_dtd_forbidden", "xml_too_large", "xml_too_deep",
    "signature_malformed", "unknown_document_type", "content_missing",
})


@dataclass(frozen=True)
class Check:
    """One verification step. `passed` is None when the step did not run (an earlier one failed)."""

    name: str
    passed: bool | None
    code: str | None = None  # set when passed is False
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "code": self.code, "detail": self.detail}


@dataclass(frozen=True)
class CertificateSummary:
    """Who signed: enough to identify the certificate without shipping it."""

    subject: str
    issuer: str
    serial: str  # hexadecimal, as openssl prints it
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertificateSummary:
        # a certificate the sender made huge is summarised, never kept (as validation's caches)
        if len(cert.public_bytes(Encoding.DER)) > MAX_CACHED_CERTIFICATE_BYTES:
            return cls._build(cert)
        return _summary(cert)

    @classmethod
    def _build(cls, cert: x509.Certificate) -> CertificateSummary:
        return cls(
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            serial=format(cert.serial_number, "X"),
            fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "fingerprint_sha256": self.fingerprint_sha256,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
        }


@functools.lru_cache(maxsize=1024)
def _summary(cert: x509.Certificate) -> CertificateSummary:
    # Summaries are immutable and the same few certificates sign many documents.
    return CertificateSummary._build(cert)


@dataclass(frozen=True)
class VerificationReport:
    """The outcome of verifying one signature."""

    format: str  # "xmldsig" | "cms" (later: "csos-order", "ncpdp-newrx")
    checks: tuple[Check, ...]  # in the order they ran
    validated_at: datetime  # when the verification ran
    signing_time: datetime | None = None  # the time the certificate was judged at
    # "signed-attribute" (CMS), "document" (read from the signed XML), "caller", "verification-time"
    signing_time_source: str = ""
    signer: CertificateSummary | None = None  # the certificate whose key made the signature
    chain: tuple[CertificateSummary, ...] = ()  # validated path, signer first, anchor last
    signature_algorithm: str | None = None  # "rsa-sha256" | "ecdsa-sha256"
    details: dict[str, Any] = field(default_factory=dict)  # format-specific facts
    # The signer's certificate itself, for rules that read its extensions (the DEA number hash
    # and schedules of a CSOS certificate); not part of the JSON form.
    signer_certificate: x509.Certificate | None = field(default=None, repr=False, compare=False)

    @property
    def failure(self) -> Check | None:
        """The first failed check; it decides the code and the indication."""
        for check in self.checks:
            if check.passed is False:
                return check
        return None

    @property
    def code(self) -> str | None:
        failure = self.failure
        if failure is not None:
            return failure.code
        if not self.checks or any(c.passed is None for c in self.checks):
            return "verification_incomplete"
        return None

    @property
    def sub_indication(self) -> SubIndication | None:
        code = self.code
        if code is None:
            return None
        failure = self.failure
        if failure is not None and failure.name in CHECK_SUBINDICATION:
            return CHECK_SUBINDICATION[failure.name]
        return CODE_SUBINDICATION.get(code, SubIndication.TRY_LATER)

    @property
    def indication(self) -> Indication:
        sub = self.sub_indication
        if sub is None:
            return Indication.TOTAL_PASSED
        return Indication.TOTAL_FAILED if sub in _TOTAL_FAILED else Indication.INDETERMINATE

    @property
    def valid(self) -> bool:
        return self.indication is Indication.TOTAL_PASSED

    @property
    def usable_input(self) -> bool:
        """False when the input could not be read as a signed document at all."""
        return self.code not in UNUSABLE_INPUT_CODES

    @property
    def message(self) -> str:
        failure = self.failure
        if failure is not None:
            return failure.detail or failure.code or ""
        return "signature valid" if self.valid else "verification incomplete"

    def to_dict(self) -> dict[str, Any]:
        sub = self.sub_indication
        return {
            "valid": self.valid,
            "indication": self.indication.value,
            "sub_indication": sub.value if sub is not None else None,
            "code": self.code,
            "message": self.message,
            "format": self.format,
            "signature_algorithm": self.signature_algorithm,
            "signing_time": self.signing_time.isoformat() if self.signing_time else None,
            "signing_time_source": self.signing_time_source or None,
            "validated_at": self.validated_at.isoformat(),
            "signer": self.signer.to_dict() if self.signer else None,
            "chain": [c.to_dict() for c in self.chain],
            "checks": [c.to_dict() for c in self.checks],
            "details": dict(self.details),
        }


def checks_until(names: tuple[str, ...], failed: str, code: str, detail: str) -> tuple[Check, ...]:
    """The check list of a verification that stopped at `failed`: earlier steps passed, later
    steps did not run."""
    out: list[Check] = []
    reached = False
    for name in names:
        if name == failed:
            out.append(Check(name, False, code, detail))
            reached = True
        elif reached:
            out.append(Check(name, None))
        else:
            out.append(Check(name, True))
    if not reached:
        out.append(Check(failed, False, code, detail))
    return tuple(out)
