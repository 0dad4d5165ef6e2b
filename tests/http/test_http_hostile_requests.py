"""Requests built to break the service: stalled uploads, undecodable tokens, broken multipart and
compressed bodies, times outside the calendar. Each gets its own error code, on the real server."""

from __future__ import annotations

import asyncio
import json
import zlib

from tests.http.conftest import HTTP_RSA
from tests.http.test_http_service import audit_for, error_of, xml_doc


async def raw_request(gw, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send bytes aiohttp's client would not send; (status, headers, body) of the response."""
    reader, writer = await asyncio.open_connection(gw.http.host, gw.http.port)
    try:
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_text, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, payload


def sign_head(gw, length: int, extra: str = "") -> bytes:
    return (f"POST /v1/sign?key={HTTP_RSA} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {gw.auth('purchaser')['Authorization']}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n{extra}").encode()


async def test_stalled_uploads_time_out_and_do_not_hold_the_queue(make_gateway) -> None:
    gw = await make_gateway(workers=1, queue_size=1, body_timeout_s=1.5)
    body = xml_doc(1)
    stalled = []
    for _ in range(3):  # more than the pool and its queue hold together
        reader, writer = await asyncio.open_connection(gw.http.host, gw.http.port)
        writer.write(sign_head(gw, len(body)) + b"\r\n" + body[:10])  # and then nothing
        await writer.drain()
        stalled.append((reader, writer))
    await asyncio.sleep(0.3)
    headers = {**gw.auth("purchaser"), "Content-Type": "application/xml"}
    ok = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(2), headers=headers)
    assert ok.status == 200, await ok.text()
    for reader, writer in stalled:
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status_line, _, rest = raw.partition(b"\r\n")
        assert status_line.split()[1] == b"408"
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    # Nothing of the stalled documents was archived: only the one that arrived.
    signed = [r for r in await gw.storage.audit_records(0, 10_000) if r.event_type == "document.signed"]
    assert len(signed) == 1


async def test_a_token_that_is_not_ascii_is_an_audited_401(gw) -> None:
    head = (b"GET /v1/documents/00000000-0000-0000-0000-000000000000 HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer gw_\xff\xfe\xc3(\r\nX-Request-Id: bad-token-1\r\nConnection: close\r\n")
    status, headers, payload = await raw_request(gw, head)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(payload)["error"]["code"] == "invalid_token"
    events = await audit_for(gw, "bad-token-1")
    assert [(e.event_type, e.outcome, e.details["code"]) for e in events] == [
        ("auth.refused", "refused", "invalid_token")]


async def test_malformed_multipart_is_a_bad_request(gw) -> None:
    auth = f"Authorization: {gw.auth('supplier')['Authorization']}\r\n"

    def verify_head(content_type: str, body: bytes) -> bytes:
        return (f"POST /v1/verify HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()

    def part(name: str, data: bytes, extra: str = "") -> bytes:
        return (f"--B\r\nContent-Disposition: form-data; name=\"{name}\"\r\n{extra}\r\n").encode() + data + b"\r\n"

    nested = (b"--B\r\nContent-Type: multipart/mixed; boundary=C\r\n\r\n"
              b"--C\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nx\r\n--C--\r\n--B--\r\n")
    cases = {
        "no boundary": ("multipart/form-data", part("signature", b"x") + b"--B--\r\n"),
        "bad base64": ("multipart/form-data; boundary=B",
                       part("signature", b"QQ=", "Content-Transfer-Encoding: base64\r\n") + b"--B--\r\n"),
        "unknown transfer encoding": ("multipart/form-data; boundary=B",
                                      part("signature", b"x", "Content-Transfer-Encoding: rot13\r\n") + b"--B--\r\n"),
        "unknown content encoding": ("multipart/form-data; boundary=B",
                                     part("signature", b"x", "Content-Encoding: br-ish\r\n") + b"--B--\r\n"),
        "nested multipart": ("multipart/form-data; boundary=B", nested),
    }
    for name, (content_type, body) in cases.items():
        status, _, payload = await raw_request(gw, verify_head(content_type, body), body)
        assert status == 400, (name, payload)
        assert json.loads(payload)["error"]["code"] == "bad_request", name


async def test_a_compressed_part_is_refused_not_inflated(make_gateway) -> None:
    gw = await make_gateway(max_body_bytes=4096)
    bomb = zlib.compress(b"\0" * 1_000_000)  # about 1 KB on the wire
    body = (b"--B\r\nContent-Disposition: form-data; name=\"content\"\r\nContent-Encoding: deflate\r\n\r\n"
            + bomb + b"\r\n--B--\r\n")
    head = (f"POST /v1/verify HTTP/1.1\r\nHost: x\r\nAuthorization: {gw.auth('supplier')['Authorization']}\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n").encode()
    status, _, payload = await raw_request(gw, head, body)
    assert status == 400 and json.loads(payload)["error"]["code"] == "bad_request", payload


async def test_a_body_that_fails_its_content_encoding_is_a_bad_request(gw) -> None:
    body = b"this is not gzip at all"
    status, _, payload = await raw_request(gw, sign_head(gw, len(body), "Content-Encoding: gzip\r\n"), body)
    assert status == 400 and json.loads(payload)["error"]["code"] == "bad_request"


async def test_a_time_outside_the_calendar_is_an_invalid_parameter(gw) -> None:
    for at in ("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "yesterday"):
        resp = await gw.http.post("/v1/verify", params={"at": at}, data=xml_doc(1),
                                  headers={**gw.auth("supplier"), "Content-Type": "application/xml"})
        assert resp.status == 400, (at, await resp.text())
        err = await error_of(resp)
        assert err["code"] == "invalid_parameter" and err["details"] == {"parameter": "at"}


async def test_a_405_names_the_allowed_methods(gw) -> None:
    resp = await gw.http.delete("/v1/sign", headers=gw.auth("purchaser"))
    assert resp.status == 405 and (await error_of(resp))["code"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]
