"""The HTTP service on loopback with a real SoftHSM token and a real SQLite database."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp import web

from gateway.clients import revoke_client
from gateway.http import keys
from gateway.http.routes import ROLES, Route, all_routes
from gateway.signing.xmldsig import verify_enveloped
from tests.http.conftest import HTTP_EC, HTTP_OTHER, HTTP_RSA

ORDER = b'<?xml version="1.0"?><Doc xmlns="urn:test"><Item n="1">alpha</Item></Doc>'


def xml_doc(n: int) -> bytes:
    return f'<Doc xmlns="urn:test"><Item n="{n}">payload {n}</Item></Doc>'.encode()


async def audit_for(gw, request_id: str) -> list:
    return [r for r in await gw.storage.audit_records(0, 10_000) if r.request_id == request_id]


async def error_of(resp) -> dict:
    body = await resp.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"])
    return body["error"]


# --- operations --------------------------------------------------------------------------------

async def test_request_id_generated_echoed_or_replaced(gw) -> None:
    resp = await gw.http.get("/healthz")
    assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-Id"])
    resp = await gw.http.get("/healthz", headers={"X-Request-Id": "client-abc.123"})
    assert resp.headers["X-Request-Id"] == "client-abc.123"
    resp = await gw.http.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-Id"])
    resp = await gw.http.get("/v1/nothing-here", headers={"X-Request-Id": "r-404"})
    assert resp.status == 404 and resp.headers["X-Request-Id"] == "r-404"
    assert (await error_of(resp))["code"] == "not_found"
    resp = await gw.http.delete("/v1/sign", headers=gw.auth("purchaser"))
    assert resp.status == 405 and (await error_of(resp))["code"] == "method_not_allowed"


async def test_readyz_signs_with_the_hsm_and_writes_the_database(gw) -> None:
    resp = await gw.http.get("/readyz")
    assert resp.status == 200, await resp.text()
    assert (await resp.json()) == {"status": "ready", "checks": {"hsm": "ok", "database": "ok"}}


async def test_readyz_is_honest_about_the_database(gw) -> None:
    await gw.storage.close()  # the database goes away under the running app
    resp = await gw.http.get("/readyz")
    assert resp.status == 503 and resp.headers["Retry-After"]
    assert (await error_of(resp))["code"] == "database_unavailable"
    await gw.storage.open()
    assert (await gw.http.get("/readyz")).status == 200


async def test_metrics_exposed(gw) -> None:
    await gw.http.get("/healthz")
    await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(1), headers={
        **gw.auth("purchaser"), "Content-Type": "application/xml"})
    resp = await gw.http.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    assert 'gateway_http_requests_total{method="GET",route="healthz",status="200"} 1.0' in text
    assert 'gateway_http_requests_total{method="POST",route="sign",status="200"} 1.0' in text
    assert 'gateway_http_request_seconds_bucket{le="0.25",route="sign"} 1.0' in text
    for name in ("gateway_admission_queue_depth", "gateway_http_in_flight", "gateway_pool_busy",
                 "gateway_hsm_errors", "gateway_admission_rejected"):
        assert name in text


async def test_openapi_lists_every_route_and_error(gw) -> None:
    resp = await gw.http.get("/v1/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    served = {(r.method, r.resource.canonical) for r in gw.app.router.routes() if r.method != "HEAD"}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    sign = doc["paths"]["/v1/sign"]["post"]
    assert "key_not_allowed" in sign["responses"]["403"]["description"]
    assert "Retry-After" in sign["responses"]["429"]["headers"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []


# --- signing, archive, retrieval ---------------------------------------------------------------

@pytest.mark.parametrize("label", [HTTP_RSA, HTTP_EC])
async def test_sign_xml_archive_and_get(gw, label: str) -> None:
    resp = await gw.http.post(f"/v1/sign?key={label}&format=xmldsig", data=ORDER,
                              headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
    assert resp.status == 200, await resp.text()
    signed = await resp.read()
    verified = verify_enveloped(signed)
    assert verified.algorithm == ("rsa-sha256" if label == HTTP_RSA else "ecdsa-sha256")
    doc_id = resp.headers["X-Document-Id"]
    resp = await gw.http.get(f"/v1/documents/{doc_id}", headers=gw.auth("purchaser"))
    assert resp.status == 200 and await resp.read() == signed
    assert resp.headers["X-Document-Kind"] == "signed_xml"
    records = await audit_for(gw, (await gw.http.get("/healthz")).headers["X-Request-Id"])
    assert records == []  # healthz writes nothing
    events = [r for r in await gw.storage.audit_records(0, 1000) if r.subject == doc_id]
    assert [(e.event_type, e.actor, e.outcome) for e in events] == [("document.signed", "purchaser", "success")]


async def test_same_document_twice_is_a_conflict(gw) -> None:
    headers = {**gw.auth("purchaser"), "Content-Type": "application/xml"}
    first = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(7), headers=headers)
    assert first.status == 200
    second = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(7), headers=headers)
    assert second.status == 409
    err = await error_of(second)
    assert err["code"] == "duplicate_document" and err["details"]["document_id"] == first.headers["X-Document-Id"]


async def test_sign_input_errors(gw) -> None:
    auth = gw.auth("purchaser")
    xml = {**auth, "Content-Type": "application/xml"}
    cases = [
        ("/v1/sign", ORDER, xml, 400, "missing_parameter"),
        (f"/v1/sign?key={HTTP_RSA}&format=pdf", ORDER, xml, 400, "invalid_parameter"),
        (f"/v1/sign?key={HTTP_RSA}", b"<Doc><unclosed></Doc>", xml, 400, "malformed_xml"),
        (f"/v1/sign?key={HTTP_RSA}", b'<!DOCTYPE d [<!ENTITY x "y">]><d>&x;</d>', xml, 400, "xml_dtd_forbidden"),
        (f"/v1/sign?key={HTTP_RSA}", b"", xml, 400, "bad_request"),
        (f"/v1/sign?key={HTTP_RSA}&format=xmldsig", ORDER, {**auth, "Content-Type": "text/plain"}, 415,
         "unsupported_media_type"),
    ]
    for path, body, headers, status, code in cases:
        resp = await gw.http.post(path, data=body, headers=headers)
        assert resp.status == status, (path, await resp.text())
        assert (await error_of(resp))["code"] == code
    verify = await gw.http.post("/v1/verify", data=b"{}", headers={**auth, "Content-Type": "application/json"})
    assert verify.status == 415 and (await error_of(verify))["code"] == "unsupported_media_type"


async def test_body_limit_413(make_gateway) -> None:
    gw = await make_gateway(max_body_bytes=2048)
    headers = {**gw.auth("purchaser"), "Content-Type": "application/xml"}
    big = b"<Doc>" + b"x" * 4096 + b"</Doc>"
    resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=big, headers=headers)
    assert resp.status == 413 and (await error_of(resp))["code"] == "body_too_large"

    async def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(8):
            yield b"<x>" + b"y" * 1000 + b"</x>"

    resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=chunks(), headers=headers)
    assert resp.status == 413 and (await error_of(resp))["code"] == "body_too_large"
    ok = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(1), headers=headers)
    assert ok.status == 200


# --- authentication and authorisation ----------------------------------------------------------

async def test_missing_and_unknown_tokens_are_401_and_audited(gw) -> None:
    cases = [({}, "missing_token"), ({"Authorization": "Basic dXNlcjpwdw=="}, "missing_token"),
             ({"Authorization": "Bearer gw_0123456789ab_notarealsecret"}, "invalid_token"),
             ({"Authorization": "Bearer garbage"}, "invalid_token"),
             ({"Authorization": gw.auth("purchaser")["Authorization"] + "x"}, "invalid_token")]
    for headers, code in cases:
        resp = await gw.http.get("/v1/documents/00000000-0000-0000-0000-000000000000", headers=headers)
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await error_of(resp))["code"] == code
        events = await audit_for(gw, resp.headers["X-Request-Id"])
        assert [(e.event_type, e.actor, e.outcome, e.details["code"]) for e in events] == [
            ("auth.refused", "anonymous", "refused", code)]


async def test_revoked_token_is_refused(make_gateway) -> None:
    gw = await make_gateway(auth_cache_ttl_s=0.2)
    headers = {**gw.auth("purchaser"), "Content-Type": "application/xml"}
    assert (await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(1), headers=headers)).status == 200
    await revoke_client(gw.storage, gw.names["purchaser"])
    await asyncio.sleep(0.25)  # the cache keeps a token at most this long (another process revoked it)
    resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(2), headers=headers)
    assert resp.status == 401 and (await error_of(resp))["code"] == "invalid_token"
    # the other clients are untouched
    assert (await gw.http.get("/v1/openapi.json", headers=gw.auth("supplier"))).status == 200


async def test_a_client_never_signs_with_another_clients_key(gw) -> None:
    """Every role against every key it was not given: 403 key_not_allowed, audited."""
    from tests.http.conftest import CLIENT_KEYS

    for role in ROLES:
        for label in (HTTP_RSA, HTTP_EC, HTTP_OTHER, "no-such-key"):
            if label in CLIENT_KEYS[role]:
                continue
            resp = await gw.http.post(f"/v1/sign?key={label}", data=xml_doc(3),
                                      headers={**gw.auth(role), "Content-Type": "application/xml"})
            assert resp.status == 403, (role, label)
            assert (await error_of(resp))["code"] == "key_not_allowed"
            events = await audit_for(gw, resp.headers["X-Request-Id"])
            assert [(e.event_type, e.actor, e.outcome, e.subject) for e in events] == [
                ("sign.refused", gw.names[role], "refused", label)]


async def test_documents_are_visible_only_to_their_signer(gw) -> None:
    headers = {**gw.auth("supplier"), "Content-Type": "application/xml"}
    resp = await gw.http.post(f"/v1/sign?key={HTTP_OTHER}", data=xml_doc(11), headers=headers)
    doc_id = resp.headers["X-Document-Id"]
    assert (await gw.http.get(f"/v1/documents/{doc_id}", headers=gw.auth("supplier"))).status == 200
    missing = await gw.http.get("/v1/documents/00000000-0000-0000-0000-000000000000", headers=gw.auth("purchaser"))
    assert missing.status == 404
    for role in ROLES:
        if role == "supplier":
            continue
        resp = await gw.http.get(f"/v1/documents/{doc_id}", headers=gw.auth(role))
        # the same answer as for a document that does not exist: ids do not leak
        assert resp.status == 404 and await error_of(resp) == await error_of(missing)
        events = await audit_for(gw, resp.headers["X-Request-Id"])
        assert [(e.event_type, e.actor, e.outcome, e.subject) for e in events] == [
            ("document.access_refused", gw.names[role], "refused", doc_id)]


# Every (route, role) pair the route table forbids; grows as domain routes land.
FORBIDDEN = [(r.name, role) for r in all_routes() if not r.public for role in ROLES if role not in r.roles]


@pytest.mark.parametrize(("route_name", "role"), FORBIDDEN)
async def test_every_role_is_refused_every_endpoint_outside_its_role(gw, route_name: str, role: str) -> None:
    """The route table declares the roles; every other role gets 403 role_not_allowed + audit."""
    route = gw.app[keys.ROUTE_TABLE][route_name]
    path = re.sub(r"\{[^}]+\}", "00000000-0000-0000-0000-000000000000", route.path)
    resp = await gw.http.request(route.method, path, data=b"{}", headers={
        **gw.auth(role), "Content-Type": "application/json"})
    assert resp.status == 403, (route.name, role, await resp.text())
    assert (await error_of(resp))["code"] == "role_not_allowed"
    events = await audit_for(gw, resp.headers["X-Request-Id"])
    assert [(e.event_type, e.actor, e.outcome) for e in events] == [
        ("access.refused", gw.names[role], "refused")]


async def test_role_check_comes_from_the_route_table(make_gateway) -> None:
    """The guard on a role-restricted route (compliance only): all five other roles refused."""
    async def holds(request: web.Request) -> web.Response:
        return web.json_response({"client": request[keys.CLIENT].name})

    extra = Route("GET", "/v1/test/compliance-only", "test_compliance_only", holds, "test route",
                  frozenset({"compliance"}))
    gw = await make_gateway(routes=[*all_routes(), extra])
    for role in ROLES:
        resp = await gw.http.get("/v1/test/compliance-only", headers=gw.auth(role))
        if role == "compliance":
            assert resp.status == 200 and (await resp.json()) == {"client": gw.names[role]}
            continue
        assert resp.status == 403 and (await error_of(resp))["code"] == "role_not_allowed"
        events = await audit_for(gw, resp.headers["X-Request-Id"])
        assert [(e.event_type, e.actor, e.details["role"]) for e in events] == [
            ("access.refused", gw.names[role], role)]


# --- verification ------------------------------------------------------------------------------

@pytest.mark.parametrize("label", [HTTP_RSA, HTTP_EC])
async def test_sign_verify_get_round_trip_xmldsig(gw, label: str) -> None:
    headers = {**gw.auth("purchaser"), "Content-Type": "application/xml"}
    resp = await gw.http.post(f"/v1/sign?key={label}", data=xml_doc(21), headers=headers)
    assert resp.status == 200
    signed = await resp.read()
    fetched = await (await gw.http.get(f"/v1/documents/{resp.headers['X-Document-Id']}",
                                       headers=gw.auth("purchaser"))).read()
    # any client may verify, whoever signed
    resp = await gw.http.post("/v1/verify", data=fetched, headers={**gw.auth("pharmacy"),
                                                                  "Content-Type": "application/xml"})
    assert resp.status == 200, await resp.text()
    report = await resp.json()
    assert report["valid"] is True and report["indication"] == "TOTAL_PASSED" and report["format"] == "xmldsig"
    assert report["signer"]["subject"].startswith("CN=HTTP test") or "HTTP test" in report["signer"]["subject"]
    assert report["signature_algorithm"] == ("rsa-sha256" if label == HTTP_RSA else "ecdsa-sha256")

    tampered = signed.replace(b"payload 21", b"payload 99")
    resp = await gw.http.post("/v1/verify", data=tampered, headers={**gw.auth("pharmacy"),
                                                                   "Content-Type": "application/xml"})
    assert resp.status == 422
    err = await error_of(resp)
    assert err["code"] == "signature_invalid" and err["details"]["report"]["valid"] is False

    resp = await gw.http.post("/v1/verify", data=b"<not-closed>", headers={**gw.auth("pharmacy"),
                                                                          "Content-Type": "application/xml"})
    assert resp.status == 400 and (await error_of(resp))["code"] == "malformed_xml"


async def test_sign_verify_get_round_trip_cms(gw) -> None:
    from aiohttp import FormData

    content = b"any bytes at all \x00\x01\x02 " * 10
    resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}&format=cms", data=content,
                              headers={**gw.auth("purchaser"), "Content-Type": "application/octet-stream"})
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/pkcs7-signature"
    signature = await resp.read()
    doc = await gw.http.get(f"/v1/documents/{resp.headers['X-Document-Id']}", headers=gw.auth("purchaser"))
    assert await doc.read() == signature and doc.headers["X-Document-Kind"] == "signed_cms"
    original = await gw.http.get(f"/v1/documents/{resp.headers['X-Content-Document-Id']}",
                                 headers=gw.auth("purchaser"))
    assert await original.read() == content

    def form(sig: bytes, data: bytes) -> FormData:
        f = FormData()
        f.add_field("signature", sig, content_type="application/pkcs7-signature", filename="s.p7s")
        f.add_field("content", data, content_type="application/octet-stream", filename="c.bin")
        return f

    resp = await gw.http.post("/v1/verify", data=form(signature, content), headers=gw.auth("supplier"))
    assert resp.status == 200, await resp.text()
    report = await resp.json()
    assert report["valid"] is True and report["format"] == "cms"
    resp = await gw.http.post("/v1/verify", data=form(signature, content + b"!"), headers=gw.auth("supplier"))
    assert resp.status == 422 and (await error_of(resp))["details"]["report"]["valid"] is False
    only = FormData()
    only.add_field("signature", signature, filename="s.p7s")
    resp = await gw.http.post("/v1/verify", data=only, headers=gw.auth("supplier"))
    assert resp.status == 400 and (await error_of(resp))["code"] == "missing_parameter"


async def test_every_log_line_of_a_request_is_json_with_its_request_id(gw) -> None:
    import io
    import json
    import logging

    from gateway.http.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("gateway.http")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(31), headers={
            **gw.auth("purchaser"), "Content-Type": "application/xml", "X-Request-Id": "trace-31"})
        assert resp.status == 200
        refused = await gw.http.post(f"/v1/sign?key={HTTP_OTHER}", data=xml_doc(32), headers={
            **gw.auth("purchaser"), "Content-Type": "application/xml", "X-Request-Id": "trace-32"})
        assert refused.status == 403
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = {line["request_id"]: line for line in lines if line["logger"] == "gateway.http.access"}
    assert access["trace-31"]["status"] == 200 and access["trace-31"]["client"] == "purchaser"
    assert access["trace-31"]["queued_ms"] is not None and access["trace-31"]["route"] == "sign"
    assert access["trace-32"]["status"] == 403 and access["trace-32"]["error"] == "key_not_allowed"
    assert all("request_id" in line for line in lines)
