"""Reading request bodies: within a time limit, within the size limit, and malformed ones refused.

A client that sends `Expect: 100-continue` is told to send its body only here, when a handler
reads it: after the token, role, size, content type and the handler's own checks have passed.
aiohttp's default answers 100 before any of them, inviting an unauthenticated or oversize upload.

Handlers read bodies through these two functions only. A body that does not arrive within
`server.body_timeout_s` is 408 `request_timeout` (a client that trickles its upload must not hold
a connection, its buffers or a place in the queue as long as it likes); a multipart body that
cannot be parsed, or whose transfer or content encoding is broken, is 400 `bad_request`.
"""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader, HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from gateway.http import keys
from gateway.http.errors import ApiError

# What aiohttp raises for a body it cannot decode: a broken chunked or compressed stream.
PAYLOAD_ERRORS = (HttpProcessingError, RequestPayloadError)


def _timeout(request: web.Request) -> ApiError:
    limit = request.app[keys.SETTINGS].server.body_timeout_s
    return ApiError("request_timeout", f"the body did not arrive within {limit:g} s",
                    details={"timeout_s": limit})


async def expect_continue(request: web.Request) -> None:
    """The routes' expect_handler: note an `Expect: 100-continue`, answer it later (`_send_continue`).

    Any other expectation is 417, as aiohttp's default handler answers (RFC 9110 §10.1.1)."""
    if request.version != HttpVersion11:
        return  # HTTP/1.0 has no 100 Continue: the client sends its body anyway
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.strip().lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    request[keys.EXPECTS_CONTINUE] = True


async def _send_continue(request: web.Request) -> None:
    """The body is about to be read: tell a client that waits for it to send it."""
    if request.get(keys.EXPECTS_CONTINUE):
        request[keys.EXPECTS_CONTINUE] = False
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own handler: the response has not started


async def read_body(request: web.Request) -> bytes:
    """The whole body, at most `server.max_body_bytes` (aiohttp's client_max_size), in time."""
    try:
        async with asyncio.timeout(request.app[keys.SETTINGS].server.body_timeout_s):
            await _send_continue(request)
            return await request.read()
    except TimeoutError:
        raise _timeout(request) from None


async def read_parts(request: web.Request) -> dict[str, bytes]:
    """The named parts of a multipart/form-data body, decoded, together at most `max_body_bytes`.

    Parts are read chunk by chunk so that a chunked upload without Content-Length cannot make one
    part larger than the limit before it is counted."""
    try:
        async with asyncio.timeout(request.app[keys.SETTINGS].server.body_timeout_s):
            await _send_continue(request)
            return await _read_parts(request)
    except TimeoutError:
        raise _timeout(request) from None
    except (ValueError, RuntimeError, AssertionError, LookupError) as exc:
        # No boundary, a broken part header, an unknown or broken Content-Transfer-Encoding
        # (binascii.Error is a ValueError), an unknown charset.
        raise ApiError("bad_request", f"the multipart body cannot be read: {exc}") from None


# Verification needs two parts (signature, content); a form may carry a few more, not thousands.
MAX_PARTS = 16


def _check_received(request: web.Request, limit: int) -> None:
    """The whole body as received (part headers, preamble, ignored parts) is within the limit too:
    counting part contents only let a chunked body of any size through, parsed part by part."""
    if request.content.total_bytes > limit:
        raise ApiError("body_too_large", details={"limit": limit})


async def _read_parts(request: web.Request) -> dict[str, bytes]:
    limit = request.app[keys.SETTINGS].server.max_body_bytes
    reader = await request.multipart()
    parts: dict[str, bytes] = {}
    total = 0
    count = 0
    async for part in reader:
        count += 1
        if count > MAX_PARTS:
            raise ApiError("bad_request", f"a multipart body has at most {MAX_PARTS} parts")
        _check_received(request, limit)
        if not isinstance(part, BodyPartReader):
            raise ApiError("bad_request", "nested multipart bodies are not accepted")
        encoding = part.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
        if encoding != "identity":
            # RFC 7578 form data is not compressed part by part; aiohttp would inflate such a part
            # and cut it silently at the size limit.
            raise ApiError("bad_request", f"a part with Content-Encoding {encoding!r} is not accepted")
        chunks = []
        while chunk := await part.read_chunk():
            total += len(chunk)
            if total > limit:
                raise ApiError("body_too_large", details={"limit": limit})
            chunks.append(chunk)
        _check_received(request, limit)
        if part.name is None:
            continue
        parts[part.name] = bytes(part.decode(b"".join(chunks)))
    return parts
