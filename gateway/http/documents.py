"""General document signing and verification: POST /v1/sign, POST /v1/verify, GET /v1/documents/{id}."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.http import keys
from gateway.http.auth import bearer_token
from gateway.http.bodies import read_body, read_parts
from gateway.http.errors import ApiError
from gateway.http.middleware import refuse
from gateway.http.pool import WorkPool
from gateway.http.routes import ANY_ROLE, ANY_TYPE, XML_TYPES, Param, Route
from gateway.signing import xmldsig
from gateway.signing.errors import HsmError, SignerCertificateRefused
from gateway.storage.base import AuditEvent, Client, DuplicateDocument, NewDocument, NewLink
from gateway.xmlsafe import XmlError

FORMATS = ("xmldsig", "cms")
CMS_TYPE = "application/pkcs7-signature"
KIND_BY_FORMAT = {"xmldsig": "signed_xml", "cms": "signed_cms"}


# --- work done on a pool thread (one job per request) ----------------------------------------

def _sign_xml(body: bytes, signer: Any, max_bytes: int) -> bytes:
    return xmldsig.sign_enveloped(body, signer, max_bytes=max_bytes)


def _sign_cms(body: bytes, signer: Any) -> bytes:
    from gateway.signing import cms

    return cms.sign_detached(body, signer)


def _verify_xml(body: bytes, trust: Any, at: datetime | None, max_bytes: int) -> Any:
    from gateway.signing import verify

    # the limit signing checks its output against: /v1/verify takes every document /v1/sign made
    report, _tree = verify.verify_xml(body, trust, at,
                                      max_bytes=xmldsig.verified_max_bytes(max_bytes))
    return report


def _verify_cms(signature: bytes, content: bytes, trust: Any, at: datetime | None) -> Any:
    from gateway.signing import verify

    return verify.verify_cms(signature, content, trust, at=at)


# --- helpers -------------------------------------------------------------------------------

SIGNER_CACHE_SECONDS = 60.0


async def _signer(request: web.Request, label: str) -> tuple[Any, SignerCertificateRefused | None]:
    """The KeySigner for a label with its chain, and the refusal of its certificate when relying
    parties would refuse it (validation.check_signer_certificate). Cached for a minute, and never
    past the certificate's notAfter: the HSM lookups are per label, and a certificate renewed or
    revoked meanwhile (`gateway keys import-cert`, `gateway pki revoke`) is seen without a restart."""
    cache: dict[str, tuple[Any, SignerCertificateRefused | None, float]] = (
        request.app[keys.STATE].extra.setdefault("signers", {}))
    locks: dict[str, asyncio.Lock] = request.app[keys.STATE].extra.setdefault("signer_locks", {})
    cached = cache.get(label)
    if cached is not None and time.monotonic() < cached[2]:
        return cached[0], cached[1]
    # One lookup and one certificate check per label at a time: a burst of first requests
    # (after a start, or each minute) waits for it instead of repeating it.
    async with locks.setdefault(label, asyncio.Lock()):
        cached = cache.get(label)
        if cached is not None and time.monotonic() < cached[2]:
            return cached[0], cached[1]
        return await _look_up_signer(request, label, cache)


async def _look_up_signer(request: web.Request, label: str, cache: dict) -> tuple[Any, Any]:
    now = time.monotonic()
    signer = request.app[keys.HSM].signer(label)
    trust = request.app[keys.TRUST]
    refusal = None
    until = now + SIGNER_CACHE_SECONDS
    if trust is not None and signer.certificate is not None:
        refusal = await asyncio.get_running_loop().run_in_executor(
            None, _certificate_refusal, trust, signer.certificate)
        left = (signer.certificate.not_valid_after_utc - datetime.now(UTC)).total_seconds()
        until = now + max(0.0, min(SIGNER_CACHE_SECONDS, left))
        if not signer.chain:
            # Intermediates travel in KeyInfo / the CMS certificates, so that verifiers holding
            # only the root (xmlsec1, openssl) can build the path.
            signer = dataclasses.replace(signer, chain=tuple(trust.chain_for(signer.certificate)))
    cache[label] = (signer, refusal, until)
    return signer, refusal


def _certificate_refusal(trust: Any, certificate: Any) -> SignerCertificateRefused | None:
    from gateway.signing.validation import check_signer_certificate

    try:
        check_signer_certificate(trust, certificate)
    except SignerCertificateRefused as exc:
        return exc
    return None


async def _still_allowed(request: web.Request, label: str) -> None:
    """Refuse unless the client's token is still valid and still grants `label`.

    The guard checked the token when the request arrived; the body may take up to
    `body_timeout_s` to come in and the signature waits in the queue. A client revoked, or a key
    grant withdrawn, meanwhile (`gateway clients revoke|keys`) must not get a signature and an
    archived document seconds later (21 CFR 1311.150: changes to access controls). Asked through
    the client cache, this costs a database lookup at most once per token per cache TTL."""
    token = bearer_token(request.headers.get("Authorization", ""))
    current = await request.app[keys.CLIENTS].client(token) if token else None
    if current is None:
        raise await refuse(request, "sign.refused", "invalid_token",
                           "the client's token was revoked while the request ran", subject=label,
                           reason="client_revoked")
    if label not in current.key_labels:
        raise await refuse(request, "sign.refused", "key_not_allowed",
                           f"client {current.name!r} may no longer sign with key {label!r}",
                           subject=label, reason="key_grant_withdrawn")


def _parse_at(request: web.Request) -> datetime | None:
    text = request.query.get("at")
    if not text:
        return None
    from gateway.signing.validation import as_utc

    try:
        # In UTC here, where it can still fail (TimeOutOfRange, a ValueError):
        # 0001-01-01T00:00+23:59 lies before year 1.
        return as_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise ApiError("invalid_parameter", "at must be an ISO 8601 time from year 1 to 9999",
                       details={"parameter": "at"}) from None


def _xml_error(exc: XmlError) -> ApiError:
    status = 413 if exc.code == "xml_too_large" else 400
    return ApiError(exc.code, exc.message, status=status)


def _report_response(report: Any) -> web.Response:
    body = report.to_dict()
    if report.valid:
        return web.json_response(body)
    code = report.code or "signature_invalid"
    status = 422 if report.usable_input else 400
    return web.json_response({"error": {"code": code, "message": report.message, "details": {"report": body}}},
                             status=status)


# --- handlers ------------------------------------------------------------------------------

async def sign(request: web.Request) -> web.Response:
    client = request[keys.CLIENT]
    label = request.query.get("key")
    if not label:
        raise ApiError("missing_parameter", "query parameter 'key' is required", details={"parameter": "key"})
    media = request.content_type.lower()
    fmt = request.query.get("format") or ("xmldsig" if media in XML_TYPES else "cms")
    if fmt not in FORMATS:
        raise ApiError("invalid_parameter", f"format must be one of {', '.join(FORMATS)}",
                       details={"parameter": "format"})
    if label not in client.key_labels:
        raise await refuse(request, "sign.refused", "key_not_allowed",
                           f"client {client.name!r} may not sign with key {label!r}", subject=label)
    if fmt == "xmldsig" and media not in XML_TYPES:
        raise ApiError("unsupported_media_type", "XML-DSig signs application/xml bodies",
                       details={"accepted": list(XML_TYPES)})
    signer, refusal = await _signer(request, label)
    if refusal is not None:  # before the body is read: no signature its recipients would refuse
        raise await refuse(request, "sign.refused", refusal.code, str(refusal), subject=label,
                           status=422)
    pool = request.app[keys.POOL]
    # Refused before the body is read under overload; counted as open once the body is in, so a
    # client that uploads slowly does not hold a place in the queue while it does.
    pool.admission.check()
    body = await read_body(request)
    with pool.admission.request():
        return await _sign_admitted(request, pool, client, signer, label, fmt, media, body)


async def _sign_admitted(request: web.Request, pool: WorkPool, client: Client, signer: Any, label: str,
                         fmt: str, media: str, body: bytes) -> web.Response:
    if not body:
        raise ApiError("bad_request", "the body is empty")
    await _still_allowed(request, label)  # the upload took time: no HSM work for a revoked client
    try:
        if fmt == "xmldsig":
            signed = await pool.run(_sign_xml, body, signer, request.app[keys.SETTINGS].server.max_body_bytes)
        else:
            signed = await pool.run(_sign_cms, body, signer)
    except XmlError as exc:
        raise _xml_error(exc) from None
    except HsmError as exc:
        if exc.code == "key_not_found":  # deleted, or generated again, by another process:
            request.app[keys.STATE].extra.get("signers", {}).pop(label, None)  # looked up anew
        raise  # 503 / 404 by the error middleware
    except xmldsig.SigningError as exc:  # already signed, key without certificate...
        raise ApiError(exc.code, getattr(exc, "message", str(exc)), status=422) from None
    await _still_allowed(request, label)  # nor a signature released or archived
    digest = hashlib.sha256(body).hexdigest()
    # The natural key makes a resubmission (to this node or another) a 409, never a second record.
    natural_key = f"{client.name}:{label}:{fmt}:{digest}"
    content_type = "application/xml" if fmt == "xmldsig" else CMS_TYPE
    doc = NewDocument(kind=KIND_BY_FORMAT[fmt], content=signed, content_type=content_type,
                      client=client.name, key_label=label, natural_key=natural_key)
    documents = [doc]
    links = []
    if fmt == "cms":  # the signature is detached: keep what it signs next to it
        content = NewDocument(kind="cms_content", content=body, content_type=media or "application/octet-stream",
                              client=client.name, key_label=label)
        documents.insert(0, content)
        links.append(NewLink(doc.id, "detached_content", {"content_document_id": content.id},
                             client=client.name))
    event = AuditEvent("document.signed", client.name, "success", subject=doc.id,
                       details={"key_label": label, "format": fmt, "content_sha256": digest},
                       request_id=request.get(keys.REQUEST_ID))
    try:
        await request.app[keys.STORAGE].commit_unit(documents=documents, links=links, audit=[event])
    except DuplicateDocument as exc:
        raise ApiError("duplicate_document", "this document was already signed with this key",
                       details={"document_id": exc.existing_id}) from None
    headers = {"X-Document-Id": doc.id, "Location": f"/v1/documents/{doc.id}"}
    if fmt == "cms":
        headers["X-Content-Document-Id"] = documents[0].id
    return web.Response(body=signed, content_type=content_type, headers=headers)


async def verify_document(request: web.Request) -> web.Response:
    at = _parse_at(request)
    trust = request.app[keys.TRUST]
    if trust is None:
        raise ApiError("trust_unavailable", "no trust bundle is configured", status=503,
                       retry_after_s=request.app[keys.SETTINGS].server.retry_after_s)
    pool = request.app[keys.POOL]
    pool.admission.check()  # as for signing: refused before the body is read, counted after
    if request.content_type.lower() == "multipart/form-data":
        parts = await read_parts(request)
        if "signature" not in parts or "content" not in parts:
            raise ApiError("missing_parameter", "multipart body needs 'signature' and 'content' parts",
                           details={"parts": sorted(parts)})
        with pool.admission.request():
            report = await pool.run(_verify_cms, parts["signature"], parts["content"], trust, at)
    else:
        body = await read_body(request)
        with pool.admission.request():
            report = await pool.run(_verify_xml, body, trust, at,
                                    request.app[keys.SETTINGS].server.max_body_bytes)
    return _report_response(report)


async def get_document(request: web.Request) -> web.Response:
    client = request[keys.CLIENT]
    doc_id = request.match_info["id"]
    doc = await request.app[keys.STORAGE].get_document(doc_id)
    if doc is None or doc.client != client.name:
        # 404, not 403, and the same path for an id that does not exist as for another client's
        # document: same body, same audit event and auth-failure count (the public /metrics would
        # otherwise tell which ids exist), about the same time. Guessing ids is an attempted
        # unauthorized access either way (21 CFR 1311.150).
        owner = {"owner": doc.client} if doc is not None else {}
        raise await refuse(request, "document.access_refused", "not_found", "no such document",
                           subject=doc_id, **owner)
    headers = {"X-Document-Id": doc.id, "X-Document-Kind": doc.kind, "X-Document-Sha256": doc.sha256}
    return web.Response(body=doc.content, content_type=doc.content_type, headers=headers)


_DOC_ID = Param("id", "path", "document id (UUID) from X-Document-Id", required=True)

ROUTES: list[Route] = [
    Route("POST", "/v1/sign", "sign", sign,
          "Sign any document with an HSM key the client may use: enveloped XML-DSig (exclusive C14N) "
          "for XML, or a detached CMS SignedData (DER) for anything. Archives the result.",
          ANY_ROLE, body_types=ANY_TYPE,
          params=(Param("key", "query", "HSM key label", required=True),
                  Param("format", "query", "signature format (default: xmldsig for XML bodies, else cms)",
                        enum=FORMATS)),
          responses={200: {"description": "the signed XML or the DER CMS; X-Document-Id names the archived copy",
                           "content": {"application/xml": {"schema": {"type": "string"}},
                                       CMS_TYPE: {"schema": {"type": "string", "format": "binary"}}},
                           "headers": ("X-Document-Id",)}},
          errors=("missing_parameter", "invalid_parameter", "key_not_allowed", "key_not_found",
                  "malformed_xml", "xml_dtd_forbidden", "xml_too_deep", "xml_too_large",
                  "duplicate_document", "request_timeout", "queue_full", "queue_deadline", "hsm_unavailable", "hsm_login_failed",
                  "database_unavailable", "already_signed", "certificate_missing", "algorithm_not_allowed",
                  "signing_error", "certificate_expired", "certificate_not_yet_valid", "certificate_revoked",
                  "certificate_untrusted", "certificate_key_usage", "certificate_chain_invalid"),
          tags=("documents",), admitted=True),
    Route("POST", "/v1/verify", "verify", verify_document,
          "Verify an XML-DSig document (application/xml) or a detached CMS signature with its content "
          "(multipart/form-data, parts 'signature' and 'content'). 200 with the report when valid, 422 "
          "with the report in error.details.report when not, 400 when the input is unusable.",
          ANY_ROLE, body_types=XML_TYPES + ("multipart/form-data",),
          params=(Param("at", "query", "judge the certificate at this ISO 8601 time"),),
          responses={200: {"description": "verification report (valid)", "schema": {"$ref": "#/components/schemas/VerificationReport"}}},
          errors=("signature_invalid", "certificate_untrusted", "certificate_expired", "certificate_revoked",
                  "malformed_xml", "signature_missing", "missing_parameter", "invalid_parameter", "bad_request",
                  "request_timeout", "queue_full", "queue_deadline"),
          tags=("documents",), admitted=True),
    Route("GET", "/v1/documents/{id}", "get_document", get_document,
          "The archived signed document, byte for byte. Only for the client that signed it (404 for others).",
          ANY_ROLE, params=(_DOC_ID,),
          responses={200: {"description": "the archived document with its original content type",
                           "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                           "headers": ("X-Document-Id", "X-Document-Kind", "X-Document-Sha256")}},
          errors=("not_found",), tags=("documents",)),
]
