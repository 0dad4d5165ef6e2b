"""The OpenAPI 3.1 document, generated from the route table so it cannot drift from the server."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from gateway.http.errors import ERROR_CODES
from gateway.http.routes import ROLES, Route
from gateway.signing.report import CODE_SUBINDICATION, UNUSABLE_INPUT_CODES

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["code", "message", "details"],
        "properties": {
            "code": {"type": "string", "description": "stable error code"},
            "message": {"type": "string"},
            "details": {"type": "object"},
        },
    }},
}

_REPORT_SCHEMA = {
    "type": "object",
    "properties": {
        "valid": {"type": "boolean"},
        "indication": {"type": "string", "enum": ["TOTAL_PASSED", "TOTAL_FAILED", "INDETERMINATE"]},
        "sub_indication": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]},
        "message": {"type": "string"},
        "format": {"type": "string"},
        "signer": {"type": ["object", "null"]},
        "chain": {"type": "array", "items": {"type": "object"}},
        "checks": {"type": "array", "items": {"type": "object"}},
    },
}

_HEADERS = {
    "X-Request-Id": "the request id (the client's own when sane, else generated); also in every log line",
    "X-Document-Id": "id of the archived document",
    "X-Document-Kind": "kind of the archived document",
    "X-Document-Sha256": "SHA-256 (hex) of the archived bytes",
    "Retry-After": "seconds to wait before retrying",
}

_DESCRIPTION = (
    "Controlled-substance signing gateway. Every call but /healthz, /readyz, /metrics and this document "
    "needs `Authorization: Bearer TOKEN`; a token belongs to one client with one role "
    f"({', '.join(ROLES)}) and a set of HSM key labels it may use. Errors are "
    '`{"error": {"code", "message", "details"}}`; 429 and 503 carry `Retry-After`. '
    "Every response carries `X-Request-Id`. Every GET also answers HEAD: the same status and "
    "headers, no body, the same token and role checks."
)


def _answers_reports(route: Route) -> bool:
    """The route answers with a verification report: any report code can come back."""
    return any(spec.get("schema", {}).get("$ref", "").endswith("/VerificationReport")
               for spec in route.responses.values())


def _status_of(code: str, reports: bool) -> int:
    if reports and code in CODE_SUBINDICATION:
        # As the verify handler answers a report that is not valid: 400 when the input cannot be
        # verified at all (xml_too_large included, which is 413 elsewhere), else 422.
        return 400 if code in UNUSABLE_INPUT_CODES else 422
    return ERROR_CODES.get(code, (422 if code.startswith(("signature", "certificate")) else 400, ""))[0]


def _error_codes_by_status(route: Route) -> dict[int, list[str]]:
    codes = list(route.errors)
    reports = _answers_reports(route)
    if reports:
        codes += [*CODE_SUBINDICATION, "trust_unavailable"]
    if not route.public:
        # The token is looked up in the database: when it is down, every such route answers 503.
        codes += ["missing_token", "invalid_token", "role_not_allowed", "database_unavailable"]
    if route.body_types:
        # Every body is read within the time limit, and a broken chunked or compressed one is a 400.
        codes += ["body_too_large", "unsupported_media_type", "request_timeout", "bad_request"]
    if route.admitted:
        codes += ["queue_full", "queue_deadline"]
    if any(p.where == "query" for p in route.params):
        codes.append("invalid_parameter")  # a query parameter given more than once (`guard`)
    codes.append("internal_error")
    by_status: dict[int, list[str]] = defaultdict(list)
    for code in codes:
        status = _status_of(code, reports)
        if code not in by_status[status]:
            by_status[status].append(code)
    return by_status


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.name,
        "summary": route.summary.split(". ")[0].rstrip("."),
        "description": route.summary,
        "tags": list(route.tags),
        "x-roles": sorted(route.roles) if not route.public else [],
    }
    if route.public:
        op["security"] = []
    if route.params:
        op["parameters"] = []
        for p in route.params:
            schema: dict[str, Any] = {"type": p.schema_type}
            if p.enum:
                schema["enum"] = list(p.enum)
            op["parameters"].append({"name": p.name, "in": p.where, "required": p.required or p.where == "path",
                                     "description": p.description, "schema": schema})
    if route.body_types:
        op["requestBody"] = {"required": True, "content": {
            t: {"schema": {"type": "string", "format": "binary"}} for t in route.body_types}}
    responses: dict[str, Any] = {}
    for status, spec in sorted(route.responses.items()):
        resp: dict[str, Any] = {"description": spec.get("description", "")}
        if "content" in spec:
            resp["content"] = spec["content"]
        elif "schema" in spec:
            resp["content"] = {"application/json": {"schema": spec["schema"]}}
        headers = {"X-Request-Id": {"description": _HEADERS["X-Request-Id"], "schema": {"type": "string"}}}
        for h in spec.get("headers", ()):
            headers[h] = {"description": _HEADERS.get(h, h), "schema": {"type": "string"}}
        resp["headers"] = headers
        responses[str(status)] = resp
    for status, codes in sorted(_error_codes_by_status(route).items()):
        resp = {"description": "error codes: " + ", ".join(codes),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                # Errors carry the request id too: it is what an operator looks the failure up by.
                "headers": {"X-Request-Id": {"description": _HEADERS["X-Request-Id"],
                                             "schema": {"type": "string"}}}}
        if status in (429, 503):
            resp["headers"]["Retry-After"] = {"description": _HEADERS["Retry-After"],
                                              "schema": {"type": "integer"}}
        responses[str(status)] = resp
    op["responses"] = responses
    return op


def build_openapi(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = defaultdict(dict)
    for route in routes:
        paths[route.path][route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Controlled-substance signing gateway", "version": "1", "description": _DESCRIPTION},
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": dict(paths),
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "client token (gw_<id>_<secret>)"}},
            "schemas": {"Error": _ERROR_SCHEMA, "VerificationReport": _REPORT_SCHEMA},
            "x-error-codes": {code: {"status": status, "message": message}
                              for code, (status, message) in ERROR_CODES.items()},
        },
    }
