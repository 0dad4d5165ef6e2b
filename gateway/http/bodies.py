"""Reading request bodies: within a time limit, within the size limit, and malformed ones refused.

Handlers read bodies through these two functions only. A body that does not arrive within
`server.body_timeout_s` is 408 `request_timeout` (a client that trickles its upload must not hold
a connection, its buffers or a place in the queue as long as it likes); a multipart body that
cannot be parsed, or whose transfer or content encoding is broken, is 400 `bad_request`.
"""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader, hdrs, web
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


async def read_body(request: web.Request) -> bytes:
    """The whole body, at most `server.max_body_bytes` (aiohttp's client_max_size), in time."""
    try:
        async with asyncio.timeout(request.app[keys.SETTINGS].server.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise _timeout(request) from None


async def read_parts(request: web.Request) -> dict[str, bytes]:
    """The named parts of a multipart/form-data body, decoded, together at most `max_body_bytes`.

    Parts are read chunk by chunk so that a chunked upload without Content-Length cannot make one
    part larger than the limit before it is counted."""
    try:
        async with asyncio.timeout(request.app[keys.SETTINGS].server.body_timeout_s):
            return await _read_parts(request)
    except TimeoutError:
        raise _timeout(request) from None
    except (ValueError, RuntimeError, AssertionError, LookupError) as exc:
        # No boundary, a broken part header, an unknown or broken Content-Transfer-Encoding
        # (binascii.Error is a ValueError), an unknown charset.
        raise ApiError("bad_request", f"the multipart body cannot be read: {exc}") from None


async def _read_parts(request: web.Request) -> dict[str, bytes]:
    limit = request.app[keys.SETTINGS].server.max_body_bytes
    reader = await request.multipart()
    parts: dict[str, bytes] = {}
    total = 0
    async for part in reader:
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
        if part.name is None:
            continue
        parts[part.name] = bytes(part.decode(b"".join(chunks)))
    return parts
