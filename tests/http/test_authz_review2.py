"""Who may do what over HTTP, against the real server: document ids do not leak through the
audit-and-metrics path, and a revocation or a withdrawn key grant is not outlived by a request
already in flight."""

from __future__ import annotations

import asyncio
import json

from gateway.clients import revoke_client, set_client_keys
from tests.http.conftest import HTTP_EC, HTTP_OTHER, HTTP_RSA


def xml_doc(n: int) -> bytes:
    return f'<Doc xmlns="urn:test"><Item n="{n}">payload {n}</Item></Doc>'.encode()


async def audit_for(gw, request_id: str) -> list:
    return [r for r in await gw.storage.audit_records(0, 10_000) if r.request_id == request_id]


async def not_found_failures(gw) -> float:
    text = await (await gw.http.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith('gateway_auth_failures_total{code="not_found"}'):
            return float(line.split()[-1])
    return 0.0


async def test_an_unknown_id_and_another_clients_document_are_indistinguishable(gw) -> None:
    signed = await gw.http.post(f"/v1/sign?key={HTTP_OTHER}", data=xml_doc(1),
                                headers={**gw.auth("supplier"), "Content-Type": "application/xml"})
    assert signed.status == 200
    theirs = signed.headers["X-Document-Id"]
    unknown = "00000000-0000-4000-8000-000000000000"
    seen = {}
    for method in ("GET", "HEAD"):
        for doc_id in (theirs, unknown):
            before = await not_found_failures(gw)
            resp = await gw.http.request(method, f"/v1/documents/{doc_id}", headers=gw.auth("purchaser"))
            # The public /metrics moved the same way for both: it cannot be asked which ids exist.
            after = await not_found_failures(gw)
            body = await resp.read()
            seen[(method, doc_id)] = (resp.status, body, after - before, resp.headers.get("Content-Length"))
            # Both are refusals the trail records, naming the client and the reason.
            events = await audit_for(gw, resp.headers["X-Request-Id"])
            assert [(e.event_type, e.actor, e.outcome, e.subject, e.details["code"]) for e in events] == [
                ("document.access_refused", gw.names["purchaser"], "refused", doc_id, "not_found")]
        assert seen[(method, theirs)] == seen[(method, unknown)], method
        assert seen[(method, theirs)][0] == 404 and seen[(method, theirs)][2] == 1.0
    # the owner still reads it
    assert (await gw.http.get(f"/v1/documents/{theirs}", headers=gw.auth("supplier"))).status == 200


async def _upload_across(gw, change) -> tuple[int, dict, str]:
    """POST /v1/sign with half the body, `change()` the client (as `gateway clients` does from
    another process: no cache invalidation here), wait past the cache TTL, send the rest."""
    body = xml_doc(42)
    reader, writer = await asyncio.open_connection(gw.http.host, gw.http.port)
    try:
        writer.write((f"POST /v1/sign?key={HTTP_RSA} HTTP/1.1\r\nHost: gw\r\n"
                      f"Authorization: Bearer {gw.tokens['purchaser']}\r\nX-Request-Id: in-flight-1\r\n"
                      f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
                      "Connection: close\r\n\r\n").encode() + body[:10])
        await writer.drain()
        await asyncio.sleep(0.1)  # the guard has let it through: it is reading the body
        await change()
        await asyncio.sleep(0.35)  # past the 0.2 s TTL of the cached client
        writer.write(body[10:])
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in head.decode().split("\r\n")[1:])}
    return status, headers, payload.decode(errors="replace")


async def test_a_client_revoked_during_its_upload_gets_no_signature(make_gateway) -> None:
    gw = await make_gateway(auth_cache_ttl_s=0.2)
    status, headers, payload = await _upload_across(
        gw, lambda: revoke_client(gw.storage, gw.names["purchaser"]))
    assert status == 401, payload
    assert json.loads(payload)["error"]["code"] == "invalid_token"
    assert headers["www-authenticate"].startswith("Bearer")
    assert await gw.storage.list_documents(client=gw.names["purchaser"]) == []
    events = await audit_for(gw, "in-flight-1")
    assert [(e.event_type, e.actor, e.subject, e.details["code"], e.details["reason"]) for e in events] == [
        ("sign.refused", gw.names["purchaser"], HTTP_RSA, "invalid_token", "client_revoked")]
    assert gw.tokens["purchaser"].rsplit("_", 1)[1] not in json.dumps([e.details for e in events])


async def test_a_key_grant_withdrawn_during_the_upload_is_refused(make_gateway) -> None:
    gw = await make_gateway(auth_cache_ttl_s=0.2)
    status, _headers, payload = await _upload_across(
        gw, lambda: set_client_keys(gw.storage, gw.names["purchaser"], [HTTP_EC]))
    assert status == 403, payload
    assert json.loads(payload)["error"]["code"] == "key_not_allowed"
    assert await gw.storage.list_documents(client=gw.names["purchaser"]) == []
    events = await audit_for(gw, "in-flight-1")
    assert [(e.event_type, e.actor, e.details["reason"]) for e in events] == [
        ("sign.refused", gw.names["purchaser"], "key_grant_withdrawn")]
    # the grant it still has works
    ok = await gw.http.post(f"/v1/sign?key={HTTP_EC}", data=xml_doc(43),
                            headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
    assert ok.status == 200


async def test_two_authorization_headers_are_refused_whichever_comes_first(gw) -> None:
    """The first header won: purchaser-then-supplier read nothing of the supplier's, supplier-
    then-purchaser read it. A proxy reading the last one would disagree with the gateway."""
    signed = await gw.http.post(f"/v1/sign?key={HTTP_OTHER}", data=xml_doc(2),
                                headers={**gw.auth("supplier"), "Content-Type": "application/xml"})
    doc_id = signed.headers["X-Document-Id"]
    for first, second in (("supplier", "purchaser"), ("purchaser", "supplier")):
        resp = await gw.http.get(f"/v1/documents/{doc_id}", headers=[
            ("Authorization", f"Bearer {gw.tokens[first]}"),
            ("Authorization", f"Bearer {gw.tokens[second]}")])
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_token"
        events = await audit_for(gw, resp.headers["X-Request-Id"])
        assert [(e.event_type, e.details["code"]) for e in events] == [("auth.refused", "invalid_token")]


async def test_a_refused_token_is_audited_with_its_client_and_why(make_gateway) -> None:
    """A revoked client's token or a wrong secret was `anonymous`, `invalid_token` and the
    token id only: the review could not tell who tried, nor that the client was revoked."""
    gw = await make_gateway()
    token = gw.tokens["purchaser"]
    wrong = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
    await revoke_client(gw.storage, gw.names["supplier"])
    reasons = {}
    for who, presented in (("wrong", wrong), ("revoked", gw.tokens["supplier"]),
                           ("unknown", "gw_nosuchid_" + "x" * 32)):
        resp = await gw.http.get("/v1/documents/x", headers={"Authorization": f"Bearer {presented}"})
        assert resp.status == 401
        (event,) = await audit_for(gw, resp.headers["X-Request-Id"])
        reasons[who] = (event.actor, event.details.get("client"), event.details["reason"])
        assert presented.rsplit("_", 1)[-1] not in json.dumps(event.details)
    assert reasons == {"wrong": ("anonymous", gw.names["purchaser"], "wrong_secret"),
                       "revoked": ("anonymous", gw.names["supplier"], "revoked"),
                       "unknown": ("anonymous", None, "unknown_token")}
