"""HTTP errors: one exception carrying status, a stable code, a message and details.

Handlers raise `ApiError`; the error middleware renders every failure as
`{"error": {"code", "message", "details"}}`. The codes below are the ones this layer produces
itself; domain codes (`signature_invalid`, `duplicate_order`, ...) pass through unchanged.
"""

from __future__ import annotations

from typing import Any

# code -> (status, default message). The OpenAPI document lists these, so they cannot drift.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "the request is malformed"),
    "missing_parameter": (400, "a required parameter is missing"),
    "invalid_parameter": (400, "a parameter has an invalid value"),
    "malformed_xml": (400, "the body is not well-formed XML"),
    "malformed_json": (400, "the body is not valid JSON"),
    "xml_dtd_forbidden": (400, "DOCTYPE and ENTITY declarations are not accepted"),
    "xml_too_deep": (400, "the XML nests too deeply"),
    "xml_too_large": (413, "the XML document is too large"),
    "missing_token": (401, "an Authorization: Bearer token is required"),
    "invalid_token": (401, "the token is unknown or revoked"),
    "role_not_allowed": (403, "this endpoint is not open to the client's role"),
    "key_not_allowed": (403, "the client may not use this key"),
    "not_found": (404, "no such resource"),
    "key_not_found": (404, "no such key on the HSM"),
    "method_not_allowed": (405, "method not allowed"),
    "request_timeout": (408, "the request body did not arrive in time"),
    "duplicate_document": (409, "this document was already accepted"),
    "body_too_large": (413, "the request body is too large"),
    "unsupported_media_type": (415, "unsupported content type"),
    "unprocessable": (422, "the document fails a rule"),
    "already_signed": (422, "the document already carries an XML signature"),
    "certificate_missing": (422, "the key has no certificate"),
    "algorithm_not_allowed": (422, "the key's algorithm is not allowed"),
    "signing_error": (422, "the document cannot be signed"),
    # The verifier's codes: for /v1/verify the signer's certificate, for /v1/sign the key's own
    # (a key whose certificate relying parties refuse does not sign).
    "signature_invalid": (422, "the signature does not verify"),
    "certificate_expired": (422, "the certificate had expired"),
    "certificate_not_yet_valid": (422, "the certificate was not yet valid"),
    "certificate_revoked": (422, "the certificate is revoked"),
    "certificate_untrusted": (422, "the certificate does not chain to a trust anchor"),
    "certificate_key_usage": (422, "the certificate is not for signing documents"),
    "certificate_chain_invalid": (422, "the certificate path is invalid"),
    "queue_full": (429, "the signing queue is full; retry later"),
    "queue_deadline": (429, "no signing worker became free in time; retry later"),
    "hsm_unavailable": (503, "the HSM is unavailable; retry later"),
    "hsm_login_failed": (503, "the HSM refused the gateway's PIN; an operator must restart it with the right one"),
    "database_unavailable": (503, "the database is unavailable; retry later"),
    "trust_unavailable": (503, "no trust anchors are configured"),
    "shutting_down": (503, "the gateway is shutting down"),
    "internal_error": (500, "internal error"),
}


class ApiError(Exception):
    """An HTTP failure the client can act on: `status`, stable `code`, message, details."""

    def __init__(self, code: str, message: str | None = None, *, status: int | None = None,
                 details: dict[str, Any] | None = None, retry_after_s: int | None = None) -> None:
        default_status, default_message = ERROR_CODES.get(code, (400, code.replace("_", " ")))
        self.code = code
        self.status = status if status is not None else default_status
        self.message = message or default_message
        self.details = details or {}
        self.retry_after_s = retry_after_s
        super().__init__(f"{self.status} {code}: {self.message}")

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}
