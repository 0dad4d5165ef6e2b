"""Verification entry points: bytes in, a VerificationReport out, never an exception for bad input.

    verify_xml(data, trust, at=None) -> (report, signed tree or None)
    verify_cms(signature_der, content, trust, at=None) -> report
    verify_document(data, trust, content=None, at=None) -> (report, signed tree or None)

The signer certificate is judged at the signing time: the CMS signing-time attribute when there is
one, else the time the caller gives (`at`), else now (21 CFR 1311.55(c): the certificate must not
have expired at the date the order was signed). Only programming errors raise.

`verify_document` dispatches by document type: a detached CMS when content is given, otherwise an
XML document by its root element. Domain packages register their XML document types (a CSOS
order, an NCPDP NewRx) with `register_xml_document`; anything else is a plain XML-DSig document.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Callable, Iterable

from lxml import etree

from gateway.signing import cms as cms_format
from gateway.signing import xmldsig
from gateway.signing.errors import TimeOutOfRange
from gateway.signing.report import CertificateSummary, Check, VerificationReport, checks_until
from gateway.signing.validation import CHECKS as TRUST_CHECKS
from gateway.signing.validation import CertificateValidation, TrustStore, as_utc, utcnow
from gateway.xmlsafe import DEFAULT_MAX_BYTES, DEFAULT_MAX_DEPTH, XmlError, parse_xml

XML_CHECKS = ("format", "signer_certificate", "reference_digest", "signature_value", *TRUST_CHECKS)
CMS_CHECKS = ("format", "signer_certificate", "message_digest", "signature_value", *TRUST_CHECKS)

SignedTree = etree._ElementTree
# When to judge the certificate: a time, or a function that reads it from the signed content
# (e.g. a CSOS order's SignedDate); None: now.
SigningTime = dt.datetime | Callable[[etree._ElementTree], "dt.datetime | None"] | None
XmlDocumentVerifier = Callable[
    [etree._ElementTree, TrustStore, SigningTime], "tuple[VerificationReport, SignedTree | None]"
]

_XML_DOCUMENT_TYPES: dict[str, XmlDocumentVerifier] = {}


def register_xml_document(root_tag: str, verifier: XmlDocumentVerifier) -> None:
    """Verify XML documents whose root element is `root_tag` ("{namespace}local", or "local"
    for any namespace) with `verifier(tree, trust, at)`; the tree is parsed by gateway.xmlsafe
    with comments removed."""
    _XML_DOCUMENT_TYPES[root_tag] = verifier


def verify_xml(
    data: bytes,
    trust: TrustStore,
    at: SigningTime = None,
    *,
    usage: Iterable[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> tuple[VerificationReport, SignedTree | None]:
    """Verify an enveloped XML-DSig document (see gateway.signing.xmldsig for the profile).

    The tree returned is what the signature covers (the document without its Signature and
    comments); it is None unless the report is valid. `at` is the time the certificate is judged
    at: a datetime given by the caller, or a function reading it from the signed tree (it is
    called only once the signature is intact, and a time later than now counts as now).
    """
    started = utcnow()
    try:
        tree = parse_xml(data, max_bytes=max_bytes, max_depth=max_depth, remove_comments=True)
    except XmlError as exc:
        return _failed_report("xmldsig", started, XML_CHECKS, "format", exc.code, exc.message), None
    return verify_xml_tree(tree, trust, at, usage=usage, started=started)


def verify_xml_tree(
    tree: etree._ElementTree,
    trust: TrustStore,
    at: SigningTime = None,
    *,
    usage: Iterable[str] | None = None,
    started: dt.datetime | None = None,
    document_format: str = "xmldsig",
) -> tuple[VerificationReport, SignedTree | None]:
    """As verify_xml, on a tree from gateway.xmlsafe.parse_xml(..., remove_comments=True);
    the tree is modified (its Signature is removed). For document types built on XML-DSig."""
    started = started or utcnow()
    try:
        verified = xmldsig.verify_tree(tree)
    except xmldsig.XmlSignatureError as exc:
        return _failed_report(document_format, started, XML_CHECKS, exc.check, exc.code, exc.message), None
    except XmlError as exc:  # parsed, yet not canonicalisable (a relative namespace URI)
        return _failed_report(document_format, started, XML_CHECKS, "format", exc.code, exc.message), None
    when, source = _signing_time(at, verified.tree, started)
    validation = trust.validate_certificate(
        verified.signer, when, usage, extra_certs=verified.other_certificates
    )
    report = _report(
        document_format, started, XML_CHECKS[:4], validation, verified.signer, verified.algorithm,
        when, source,
    )
    return report, (verified.tree if report.valid else None)


def verify_cms(
    signature_der: bytes,
    content: bytes | None,
    trust: TrustStore,
    at: dt.datetime | None = None,
    *,
    usage: Iterable[str] | None = None,
) -> VerificationReport:
    """Verify a detached CMS SignedData over `content`.

    The certificate is judged at the signed signing-time attribute when present (never later
    than now: a signature cannot have been made in the future, and a claimed future time must not
    reach a certificate's validity that has not begun); `at` (the caller's time, also never later than
    now) is used only when the signature carries none, else now. A signed time the certificate
    was not judged at stays in the report, as details["claimed_signing_time"].
    """
    started = utcnow()
    try:
        verified = cms_format.verify_detached(signature_der, content)
    except cms_format.CmsError as exc:
        return _failed_report("cms", started, CMS_CHECKS, exc.check, exc.code, exc.message)
    if verified.signing_time is not None:
        when, source = _judged_at(verified.signing_time, started), "signed-attribute"
    elif at is not None:
        when, source = _judged_at(at, started), "caller"
    else:
        when, source = started, "verification-time"
    validation = trust.validate_certificate(
        verified.signer, when, usage, extra_certs=verified.other_certificates
    )
    report = _report("cms", started, CMS_CHECKS[:4], validation, verified.signer, verified.algorithm,
                     when, source)
    if verified.signing_time is not None and when != verified.signing_time:
        # Judged at another time than the one signed (a claim later than now): the report keeps
        # what the signer claimed, for whoever reads it later.
        report = dataclasses.replace(report, details={
            **report.details, "claimed_signing_time": verified.signing_time.isoformat()})
    return report


def verify_document(
    data: bytes,
    trust: TrustStore,
    *,
    content: bytes | None = None,
    at: SigningTime = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[VerificationReport, SignedTree | None]:
    """Verify whatever signed document `data` is: a detached CMS (when `content` is given, or
    when `data` is not XML) or an XML document, by its type."""
    if content is not None or not _looks_like_xml(data):
        return verify_cms(data, content, trust, None if callable(at) else at), None
    started = utcnow()
    try:
        tree = parse_xml(data, max_bytes=max_bytes, remove_comments=True)
    except XmlError as exc:
        return _failed_report("xmldsig", started, XML_CHECKS, "format", exc.code, exc.message), None
    root = tree.getroot()
    verifier = _XML_DOCUMENT_TYPES.get(root.tag) or _XML_DOCUMENT_TYPES.get(etree.QName(root).localname)
    if verifier is not None:
        return verifier(tree, trust, at)
    return verify_xml_tree(tree, trust, at, started=started)


def _signing_time(
    at: SigningTime, signed: etree._ElementTree, started: dt.datetime
) -> tuple[dt.datetime, str]:
    if at is None:
        return started, "verification-time"
    if callable(at):
        found = at(signed)
        if found is None:
            return started, "verification-time"
        return _judged_at(found, started), "document"
    return _judged_at(at, started), "caller"


_EARLIEST = dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def _judged_at(when: dt.datetime, started: dt.datetime) -> dt.datetime:
    """`when` in UTC and never later than now: a future time must not reach the validity of a
    certificate that has not begun."""
    try:
        return min(as_utc(when), started)
    except TimeOutOfRange:
        # Year 1 or 9999 with a UTC offset (a signed attribute, a document date, the caller's
        # time) has no UTC form: it lies before year 1, when no certificate was valid, or after
        # 9999, which is later than now.
        return _EARLIEST if when.year == 1 else started


def _looks_like_xml(data: bytes) -> bool:
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"<") or head.startswith((b"\xff\xfe", b"\xfe\xff"))


def _failed_report(
    document_format: str, started: dt.datetime, names: tuple[str, ...], check: str, code: str, detail: str
) -> VerificationReport:
    return VerificationReport(
        format=document_format,
        checks=checks_until(names, check, code, detail),
        validated_at=started,
    )


def _report(
    document_format: str,
    started: dt.datetime,
    intact_checks: tuple[str, ...],
    validation: CertificateValidation,
    signer,
    algorithm: str,
    when: dt.datetime,
    source: str,
) -> VerificationReport:
    checks = [Check(name, True) for name in intact_checks]
    reached = False
    for name in TRUST_CHECKS:
        if validation.valid:
            checks.append(Check(name, True))
        elif name == validation.failed_check:
            checks.append(Check(name, False, validation.code, validation.detail))
            reached = True
        else:
            checks.append(Check(name, None if reached else True))
    return VerificationReport(
        format=document_format,
        checks=tuple(checks),
        validated_at=started,
        signing_time=when,
        signing_time_source=source,
        signer=CertificateSummary.of(signer),
        chain=_summaries(validation.path),
        signature_algorithm=algorithm,
        details={"trust_result_reused": validation.cached},
        signer_certificate=signer,
    )


@functools.lru_cache(maxsize=256)
def _summaries(path: tuple) -> tuple[CertificateSummary, ...]:
    return tuple(CertificateSummary.of(c) for c in path)


__all__ = [
    "CMS_CHECKS", "XML_CHECKS", "register_xml_document", "verify_cms", "verify_document",
    "verify_xml", "verify_xml_tree",
]
