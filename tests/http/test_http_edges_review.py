"""Edges of HTTP itself, on the real server on loopback (SoftHSM token, SQLite database): Expect:
100-continue, HEAD, a client that leaves mid-upload or while the HSM signs, bodies compressed or
multipart past the limit, clients trickling their headers, repeated or undecodable query
parameters, pipelining, and the OpenAPI document against what routes really answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import replace
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from gateway.http import keys
from gateway.http.app import create_app
from gateway.storage import storage_for_url
from tests.http.conftest import HTTP_RSA, create_clients
from tests.http.test_http_service import ORDER, audit_for, error_of, xml_doc


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}


async def read_head(reader: asyncio.StreamReader, timeout: float = 20) -> tuple[int, dict[str, str]]:
    """The status and headers of the next response (an interim 100 included)."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    return parse_head(raw[:-4])


def chunked(data: bytes, size: int = 65536) -> bytes:
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def exchange(gw, head: str, body: bytes = b"", *,
                   until_eof: bool = True) -> tuple[int, dict[str, str], bytes | None]:
    """Send a request (its body from a task, as a client streaming it would), read the response
    (and wait for the end of the connection)."""
    reader, writer = await asyncio.open_connection(gw.http.host, gw.http.port)

    async def send() -> None:
        try:
            for i in range(0, len(body), 65536):
                writer.write(body[i:i + 65536])
                await writer.drain()
        except ConnectionError:
            pass  # the server answered and closed before taking all of it

    writer.write(head.encode() + b"\r\n")
    sender = asyncio.create_task(send())
    try:
        status, headers = await read_head(reader)
        length = 0 if head.startswith("HEAD ") else int(headers.get("content-length", 0))
        try:  # the body, then the end of the connection
            payload = await asyncio.wait_for(reader.readexactly(length), 30)
            if until_eof:
                payload += await asyncio.wait_for(reader.read(), 30)
        except ConnectionResetError:
            # The server closed on bytes it did not read: the kernel resets the connection, and
            # what had not reached this side yet is lost.
            payload = None
    finally:
        await sender
        writer.close()
    return status, headers, payload


# --- Expect: 100-continue ------------------------------------------------------------------------

async def test_100_continue_only_after_the_token_size_and_type_checks(gw) -> None:
    """aiohttp answered 100 Continue before any check: an unauthenticated or oversize upload was
    invited. Now the final error comes first, with our JSON body, request id and audit record."""
    purchaser = gw.auth("purchaser")["Authorization"]
    limit = gw.settings.server.max_body_bytes
    cases = {
        "no-token": (f"POST /v1/sign?key={HTTP_RSA}", "", "application/xml", 100, 401, "missing_token"),
        "bad-token": (f"POST /v1/sign?key={HTTP_RSA}", "Authorization: Bearer gw_nope_nope\r\n",
                      "application/xml", 100, 401, "invalid_token"),
        "too-large": (f"POST /v1/sign?key={HTTP_RSA}", f"Authorization: {purchaser}\r\n", "application/xml",
                      limit + 1, 413, "body_too_large"),
        "wrong-type": ("POST /v1/verify", f"Authorization: {purchaser}\r\n", "text/plain", 100, 415,
                       "unsupported_media_type"),
        "not-their-key": ("POST /v1/sign?key=http-other", f"Authorization: {purchaser}\r\n", "application/xml",
                          100, 403, "key_not_allowed"),
    }
    for rid, (target, auth, media, length, status, code) in cases.items():
        reader, writer = await asyncio.open_connection(gw.http.host, gw.http.port)
        try:
            writer.write((f"{target} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: {media}\r\n"
                          f"Content-Length: {length}\r\nExpect: 100-continue\r\nX-Request-Id: expect-{rid}\r\n"
                          "\r\n").encode())
            await writer.drain()
            got, headers = await read_head(reader)  # the body is never sent
            payload = await asyncio.wait_for(reader.read(), 30)  # and the server closes
        finally:
            writer.close()
        assert got == status, (rid, got, payload)
        assert headers["x-request-id"] == f"expect-{rid}" and headers["connection"] == "close"
        assert json.loads(payload)["error"]["code"] == code, rid
    refused = {r.request_id: r.details["code"] for r in await gw.storage.audit_records(0, 10_000)
               if r.outcome == "refused"}
    assert refused["expect-no-token"] == "missing_token" and refused["expect-bad-token"] == "invalid_token"
    assert refused["expect-not-their-key"] == "key_not_allowed"


async def test_100_continue_then_the_body_when_the_request_passes(gw) -> None:
    body = xml_doc(100)
    reader, writer = await asyncio.open_connection(gw.http.host, gw.http.port)
    try:
        writer.write((f"POST /v1/sign?key={HTTP_RSA} HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: {gw.auth('purchaser')['Authorization']}\r\nContent-Type: application/xml\r\n"
                      f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").encode())
        await writer.drain()
        interim, _ = await read_head(reader)
        assert interim == 100
        writer.write(body)
        await writer.drain()
        status, headers = await read_head(reader)
        signed = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    assert status == 200 and b"<ds:Signature" in signed
    doc = await gw.storage.get_document(headers["x-document-id"])
    assert doc is not None and doc.content == signed


async def test_an_unknown_expectation_is_still_417(gw) -> None:
    status, headers, _ = await exchange(gw, "POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                            "Expect: teapot\r\nConnection: close\r\n")
    assert status == 417 and headers["x-request-id"]


# --- HEAD ---------------------------------------------------------------------------------------

async def test_head_answers_as_get_without_a_body(gw) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v1/openapi.json"):
        get = await gw.http.get(path)
        head = await gw.http.head(path)
        assert (head.status, head.content_type) == (get.status, get.content_type) == (200, get.content_type), path
        assert head.headers["X-Request-Id"]
        if path in ("/healthz", "/v1/openapi.json"):
            assert head.headers["Content-Length"] == str(len(await get.read())), path
    # On the wire: headers only, then the connection is free for the next request.
    status, headers, rest = await exchange(gw, "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
    assert status == 200 and int(headers["content-length"]) > 0 and rest == b""


async def test_head_of_a_document_checks_the_token_and_the_owner(gw) -> None:
    signed = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=ORDER,
                                headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
    assert signed.status == 200
    path = signed.headers["Location"]
    get = await gw.http.get(path, headers=gw.auth("purchaser"))
    head = await gw.http.head(path, headers=gw.auth("purchaser"))
    assert head.status == 200
    for name in ("Content-Type", "Content-Length", "X-Document-Id", "X-Document-Sha256"):
        assert head.headers[name] == get.headers[name], name
    anonymous = await gw.http.head(path, headers={"X-Request-Id": "head-anon"})
    assert anonymous.status == 401
    other = await gw.http.head(path, headers={**gw.auth("supplier"), "X-Request-Id": "head-other"})
    assert other.status == 404
    assert [(r.event_type, r.details["code"]) for r in await audit_for(gw, "head-anon")] == [
        ("auth.refused", "missing_token")]
    assert [r.event_type for r in await audit_for(gw, "head-other")] == ["document.access_refused"]


# --- OpenAPI against what routes answer ---------------------------------------------------------

async def test_openapi_lists_the_429_of_readyz_and_the_422_of_sign(make_gateway) -> None:
    gw = await make_gateway(workers=1, queue_size=0)
    doc = await (await gw.http.get("/v1/openapi.json")).json()
    # The only worker is busy: the readiness probe is refused with 429 queue_full.
    busy = asyncio.create_task(gw.app[keys.POOL].run(time.sleep, 1.0, deadline_s=10))
    await asyncio.sleep(0.2)
    resp = await gw.http.get("/readyz")
    code = (await error_of(resp))["code"]
    await busy
    assert resp.status == 429 and code == "queue_full"
    readyz = doc["paths"]["/readyz"]["get"]["responses"]
    assert "queue_full" in readyz["429"]["description"] and "queue_deadline" in readyz["429"]["description"]
    assert "Retry-After" in readyz["429"]["headers"]
    # Signing what is already signed is 422 already_signed.
    first = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(7),
                               headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
    again = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=await first.read(),
                               headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
    assert again.status == 422 and (await error_of(again))["code"] == "already_signed"
    sign = doc["paths"]["/v1/sign"]["post"]["responses"]
    assert "already_signed" in sign["422"]["description"]
    assert "already_signed" not in sign.get("400", {}).get("description", "")


# --- a client that leaves while the HSM signs ----------------------------------------------------

@pytest.fixture
async def served(softhsm_settings, hsm, http_keys, tmp_path) -> AsyncIterator[SimpleNamespace]:
    """The app served as `gateway serve` serves it (aiohttp's AppRunner with its defaults: a client
    that goes away does not cancel its handler; aiohttp's TestServer cancels it), one worker."""
    url = f"sqlite:///{tmp_path / 'served.sqlite3'}"
    settings = replace(softhsm_settings, database_url=url,
                       server=replace(softhsm_settings.server, queue_deadline_ms=20_000))
    storage = storage_for_url(url)
    await storage.open()
    tokens, names = await create_clients(storage)
    app = create_app(settings, hsm=hsm, storage=storage, workers=1)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session:
        yield SimpleNamespace(app=app, storage=storage, settings=settings, tokens=tokens, names=names,
                              host="127.0.0.1", port=port, session=session,
                              auth=lambda role: {"Authorization": f"Bearer {tokens[role]}"})
    await runner.cleanup()
    await storage.close()


async def _send_sign(gw, body: bytes, *, short_by: int, request_id: str) -> asyncio.StreamWriter:
    """A raw sign request whose Content-Length announces `short_by` bytes more than it sends."""
    _reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write((f"POST /v1/sign?key={HTTP_RSA} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {gw.auth('purchaser')['Authorization']}\r\nContent-Type: application/xml\r\n"
                  f"Content-Length: {len(body) + short_by}\r\nX-Request-Id: {request_id}\r\n\r\n").encode() + body)
    await writer.drain()
    return writer


async def test_a_client_gone_during_signing_is_in_the_audit_trail(served) -> None:
    """The signature is made and archived (its audit record too), the response never arrives: the
    trail said `document.signed` success and nothing more, the access line and metrics 200."""
    gw = served
    busy = asyncio.create_task(gw.app[keys.POOL].run(time.sleep, 1.0, deadline_s=10))
    await asyncio.sleep(0.2)  # the sign request below waits behind this job
    writer = await _send_sign(gw, xml_doc(41), short_by=0, request_id="gone-1")
    await asyncio.sleep(0.2)
    writer.close()  # and the client is gone while its job still waits for the worker
    await busy
    events: list = []
    for _ in range(300):
        events = await audit_for(gw, "gone-1")
        if len(events) >= 2:
            break
        await asyncio.sleep(0.1)
    assert [(e.event_type, e.outcome) for e in events] == [("document.signed", "success"),
                                                             ("response.undelivered", "failure")]
    signed, gone = events
    assert gone.subject == signed.subject and gone.actor == gw.names["purchaser"]
    assert gone.details["reason"] == "client_gone" and gone.details["status"] == 200
    assert (await gw.storage.get_document(signed.subject)) is not None
    async with gw.session.get("/metrics") as resp:
        metrics = await resp.text()
    assert any('route="sign"' in line and 'status="499"' in line for line in metrics.splitlines()), metrics


# --- bodies past the limit -------------------------------------------------------------------------

def deflate_bomb(megabytes: int) -> bytes:
    c = zlib.compressobj(9)
    block = b"\0" * 1_000_000
    return b"".join(c.compress(block) for _ in range(megabytes)) + c.flush()


async def test_a_compressed_body_past_the_limit_is_413_and_the_connection_closes(gw) -> None:
    """The limit held on the inflated size, but then aiohttp lingered: it read, and inflated, the
    rest of the body (a few hundred KB inflating to hundreds of MB) on the event loop."""
    bomb = deflate_bomb(300)
    head = (f"POST /v1/sign?key={HTTP_RSA} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {gw.auth('purchaser')['Authorization']}\r\nContent-Type: application/xml\r\n"
            f"Content-Encoding: deflate\r\nContent-Length: {len(bomb)}\r\n")
    status, headers, payload = await exchange(gw, head, bomb, until_eof=False)
    assert status == 413 and headers["connection"] == "close"
    if payload is not None:
        assert json.loads(payload)["error"]["code"] == "body_too_large"


async def test_a_chunked_multipart_body_is_limited_as_a_whole(gw) -> None:
    """Only part contents were counted: part headers, a preamble and the parts of any number
    passed uncounted in a chunked body (no Content-Length for the guard to refuse)."""
    head = ("POST /v1/verify HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {gw.auth('supplier')['Authorization']}\r\n"
            "Content-Type: multipart/form-data; boundary=B\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n")
    preamble = (b"x" * 98 + b"\r\n") * 30_000 + b"--B\r\nContent-Disposition: form-data; name=\"content\"\r\n\r\nabc\r\n--B--\r\n"
    status, _, payload = await exchange(gw, head, chunked(preamble))
    assert status == 413 and json.loads(payload)["error"]["code"] == "body_too_large", payload
    many = b"".join(b"--B\r\nContent-Disposition: form-data; name=\"p%d\"\r\n\r\nx\r\n" % i for i in range(50_000))
    status, _, payload = await exchange(gw, head, chunked(many + b"--B--\r\n"))
    assert status == 400, payload
    err = json.loads(payload)["error"]
    assert err["code"] == "bad_request" and "parts" in err["message"]


# --- query parameters ---------------------------------------------------------------------------

async def test_a_repeated_query_parameter_is_refused(gw) -> None:
    """`?key=a&key=b` signed with the first: a filter in front reading the last saw another key."""
    for query in (f"key={HTTP_RSA}&key=http-other", f"key={HTTP_RSA}&format=cms&format=xmldsig"):
        resp = await gw.http.post(f"/v1/sign?{query}", data=xml_doc(9),
                                  headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
        assert resp.status == 400, query
        err = await error_of(resp)
        assert err["code"] == "invalid_parameter" and err["details"]["parameter"] in ("key", "format")
    signed = [r for r in await gw.storage.audit_records(0, 10_000) if r.event_type == "document.signed"]
    assert signed == []



async def test_a_client_gone_mid_upload_is_499_not_an_internal_error(served, caplog) -> None:
    """It was logged as "unhandled error" with a traceback and counted as a 500 internal_error."""
    caplog.set_level(logging.INFO, logger="gateway")
    gw = served
    writer = await _send_sign(gw, xml_doc(77), short_by=100, request_id="half-1")
    await asyncio.sleep(0.3)
    writer.close()  # 100 bytes short
    access: list = []
    for _ in range(100):
        access = [r for r in caplog.records if r.name == "gateway.http.access" and "/v1/sign" in r.getMessage()]
        if access:
            break
        await asyncio.sleep(0.1)
    assert [(r.status, r.error) for r in access] == [(499, "client_gone")]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    async with gw.session.get("/metrics") as resp:
        metrics = await resp.text()
    assert not any('route="sign"' in line and 'status="500"' in line for line in metrics.splitlines())
    assert await audit_for(gw, "half-1") == []  # nothing was signed


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """The server closed without answering (an end of stream, or a reset: it closed on bytes it
    had not read)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# --- slow clients -------------------------------------------------------------------------------

async def test_a_client_trickling_its_headers_is_closed_after_the_idle_timeout(make_gateway,
                                                                            softhsm_settings) -> None:
    """aiohttp's AppRunner keeps a connection without a complete request for 3630 s: a few
    hundred slow clients held the server's connections for an hour."""
    gw = await make_gateway(idle_timeout_s=1.0)
    quiet_reader, quiet = await asyncio.open_connection(gw.http.host, gw.http.port)  # sends nothing
    reader, writer = await asyncio.open_connection(gw.http.host, gw.http.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(60):  # a header line now and then, never the end of the head
            await asyncio.sleep(0.5)
            if reader.at_eof() or reader.exception() is not None:
                break
            writer.write(b"X-Slow: 1\r\n")
        assert await closed_by_server(reader)
        assert await closed_by_server(quiet_reader)
    finally:
        writer.close()
        quiet.close()
    # A connection in use between requests stays usable within the timeout.
    assert (await gw.http.get("/healthz")).status == 200


async def test_a_query_parameter_that_is_not_utf8_is_refused_as_such(gw) -> None:
    """`?key=%ff%fe` was read as the label U+FFFD U+FFFD: refused as key_not_allowed, and that
    label, not what was sent, went into the audit trail."""
    body = xml_doc(12)
    head = (f"POST /v1/sign?key=%ff%fe HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {gw.auth('purchaser')['Authorization']}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: not-utf8\r\nConnection: close\r\n")
    status, _, payload = await exchange(gw, head, body)
    assert status == 400, payload
    err = json.loads(payload)["error"]
    assert err["code"] == "invalid_parameter" and err["details"] == {"parameter": "key"}
    assert await audit_for(gw, "not-utf8") == []
    # Escaped UTF-8 is text like any other.
    resp = await gw.http.post("/v1/sign", params={"key": "clé"}, data=body,
                              headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
    assert resp.status == 403 and (await error_of(resp))["code"] == "key_not_allowed"


async def test_pipelined_requests_are_answered_in_order(gw) -> None:
    """Signing responses are now sent from the middleware (to notice a client gone): pipelined
    requests behind a signature still get their answers, in order, on one connection."""
    auth = gw.auth("purchaser")["Authorization"]
    requests = b""
    for n in (21, 22):
        body = xml_doc(n)
        requests += (f"POST /v1/sign?key={HTTP_RSA} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                     f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    requests += b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection(gw.http.host, gw.http.port)
    try:
        writer.write(requests)
        await writer.drain()
        answers = []
        for _ in range(3):
            status, headers = await read_head(reader)
            content = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
            answers.append((status, headers.get("content-type", "").split(";")[0], content))
    finally:
        writer.close()
    assert [(s, t) for s, t, _ in answers] == [(200, "application/xml"), (200, "application/xml"),
                                               (200, "application/json")]
    assert b'n="21"' in answers[0][2] and b'n="22"' in answers[1][2]
