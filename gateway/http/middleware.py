"""Cross-cutting concerns as middlewares: request ids, error bodies, metrics and access logs
(`context`), then authentication, role check, body size and content type (`guard`).

Handlers only run once `guard` has let the request through, so they never repeat these checks.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
import uuid
from urllib.parse import unquote, unquote_to_bytes

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from gateway.clients import parse_token_id, refusal_reason
from gateway.http import keys
from gateway.http.admission import Overloaded
from gateway.http.auth import bearer_token, refusal_event
from gateway.http.bodies import PAYLOAD_ERRORS
from gateway.http.errors import ERROR_CODES, ApiError
from gateway.http.logs import request_id_var
from gateway.http.metrics import Metrics
from gateway.http.pool import queued_s_var
from gateway.http.routes import Route
from gateway.signing.errors import HsmError, HsmLoginError, KeyNotFound, TokenUnavailable
from gateway.storage.base import AuditEvent, StorageError, StorageUnavailable

log = logging.getLogger("gateway.http")
access_log = logging.getLogger("gateway.http.access")

REQUEST_ID_HEADER = "X-Request-Id"
# Generated ids: a random per-process prefix and a counter. Unique across processes and restarts
# without a system call per request (uuid4 reads the kernel's random source every time).
_ID_PREFIX = uuid.uuid4().hex[:16]
_id_counter = itertools.count(1)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# A caller's id of the generated shape is replaced: the counter makes generated ids predictable,
# and a caller naming the id of another request (here or on another node) would mix its log lines
# and audit records with that request's.
_GENERATED_SHAPE = re.compile(r"[0-9a-f]{32}")


def request_id_for(supplied: str | None) -> str:
    """The caller's X-Request-Id when sane and not of the generated shape, else a new one."""
    if supplied and _SANE_REQUEST_ID.fullmatch(supplied) and not _GENERATED_SHAPE.fullmatch(supplied):
        return supplied
    return f"{_ID_PREFIX}{next(_id_counter):016x}"

_STATUS_CODES = {400: "bad_request", 401: "invalid_token", 403: "role_not_allowed", 404: "not_found",
                 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


_OVERLOAD_BODIES: dict[tuple[str, str], bytes] = {}


def _overload_response(exc: Overloaded) -> web.Response:
    """429 on the cheapest path: under overload most responses are these."""
    key = (exc.code, exc.message)
    body = _OVERLOAD_BODIES.get(key)
    if body is None:
        body = json.dumps({"error": {"code": exc.code, "message": exc.message, "details": {}}}).encode()
        if len(_OVERLOAD_BODIES) < 64:
            _OVERLOAD_BODIES[key] = body
    return web.Response(body=body, status=429, content_type="application/json",
                        headers={"Retry-After": str(exc.retry_after_s)})


def error_response(err: ApiError, request_id: str | None = None) -> web.Response:
    resp = web.json_response(err.body(), status=err.status)
    if err.retry_after_s is not None:
        resp.headers["Retry-After"] = str(err.retry_after_s)
    if err.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="gateway"'
    return resp


def as_api_error(exc: BaseException, request: web.Request) -> ApiError:
    """Map any failure below a handler onto the error contract."""
    settings = request.app[keys.SETTINGS]
    retry = settings.server.retry_after_s
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Overloaded):
        return ApiError(exc.code, exc.message, retry_after_s=exc.retry_after_s)
    if isinstance(exc, KeyNotFound):
        return ApiError("key_not_found", str(exc), status=404)
    if isinstance(exc, HsmLoginError):  # not passing: an operator must give the right PIN
        return ApiError("hsm_login_failed", str(exc) or None, retry_after_s=retry)
    if isinstance(exc, (TokenUnavailable, HsmError)):
        return ApiError("hsm_unavailable", str(exc) or None, retry_after_s=retry)
    if isinstance(exc, StorageUnavailable):
        return ApiError("database_unavailable", exc.message, retry_after_s=retry)
    if isinstance(exc, StorageError):
        return ApiError(exc.code, exc.message, status=409 if exc.code.startswith("duplicate") else 400,
                        details={k: v for k, v in exc.details.items() if v is not None})
    if isinstance(exc, PAYLOAD_ERRORS):  # a broken chunked or compressed body
        return ApiError("bad_request", f"the body cannot be decoded: {exc}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError("body_too_large", details={"limit": request.app[keys.SETTINGS].server.max_body_bytes})
    if isinstance(exc, web.HTTPException):
        code = _STATUS_CODES.get(exc.status, "bad_request" if exc.status < 500 else "internal_error")
        return ApiError(code, exc.reason if code not in ERROR_CODES else None, status=exc.status)
    return ApiError("internal_error")


def _route_label(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None:
        return "unmatched"
    return info.route.name or "unnamed"


@web.middleware
async def context(request: web.Request, handler):  # noqa: ANN001 - aiohttp's handler type
    """Request id, error rendering, metrics and one access log line per request."""
    rid = request_id_for(request.headers.get(REQUEST_ID_HEADER))
    token = request_id_var.set(rid)
    request[keys.REQUEST_ID] = rid
    request[_SEEN] = True
    app = request.app
    metrics = app[keys.METRICS]
    state = app[keys.STATE]
    state.in_flight += 1
    metrics.in_flight.inc()
    started = time.perf_counter()
    error_code = None
    resp: web.StreamResponse | None = None
    gone = False
    try:
        try:
            resp = await handler(request)
        except Overloaded as exc:
            error_code = exc.code
            metrics.rejected.labels(exc.code).inc()
            resp = _overload_response(exc)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON error body
            if isinstance(exc, ConnectionError) and _client_gone(request):
                # The client went away while its body was read: not a server error, and nobody
                # is left to answer (the access line and the metrics say 499).
                gone, error_code = True, "client_gone"
                resp = error_response(ApiError("bad_request", "the client closed the connection"))
            else:
                err = as_api_error(exc, request)
                error_code = err.code
                if err.status >= 500 and err.code == "internal_error":
                    log.exception("unhandled error", extra={"path": request.path})
                elif err.code in ("hsm_unavailable", "hsm_login_failed"):
                    metrics.hsm_errors.labels(getattr(exc, "code", "hsm_error")).inc()
                    log.warning("hsm failure: %s", exc)
                elif err.code == "database_unavailable":
                    # Like HSM failures: the cause goes to the log (the client sees the code).
                    metrics.database_errors.inc()
                    log.warning("database failure: %s", err.message)
                if err.status == 429:
                    metrics.rejected.labels(err.code).inc()
                resp = error_response(err)
                if isinstance(exc, web.HTTPMethodNotAllowed):
                    resp.headers["Allow"] = exc.headers["Allow"]  # RFC 9110 §15.5.6: a 405 names them
        resp.headers[REQUEST_ID_HEADER] = rid
        if gone:
            pass
        elif resp.status >= 400 and not request.content.is_eof() and _rest_unwanted(request, error_code):
            # Refused before the body was read whole: answer and close, instead of aiohttp's default
            # of lingering up to 10 s to read what the client still sends.
            resp.force_close()
            await _deliver(request, resp)
            request.protocol.force_close()
        elif resp.status < 400 and request.method not in _SAFE_METHODS and isinstance(resp, web.Response):
            if not await _deliver(request, resp):
                gone = True  # the access line and the metrics say 499, as for any client gone
                error_code = "client_gone"
                await _audit_undelivered(request, resp, route=_route_label(request))
        return resp
    finally:
        elapsed = time.perf_counter() - started
        state.in_flight -= 1
        metrics.in_flight.dec()
        route = _route_label(request)
        status = resp.status if resp is not None and not gone else 499  # 499: the client went away
        metrics.observe_request(request.method, route, status, elapsed)
        # One access line per request; refusals for overload at DEBUG only, so that logging them
        # does not add to the overload (the 429s are counted in the metrics).
        level = logging.DEBUG if status == 429 else logging.INFO
        if access_log.isEnabledFor(level):
            client = request.get(keys.CLIENT)
            queued = queued_s_var.get()
            access_log.log(level, "%s %s %s", request.method, request.path, status,
                           extra={"route": route, "status": status, "ms": round(elapsed * 1000, 2),
                                  "queued_ms": round(queued * 1000, 2) if queued is not None else None,
                                  "client": client.name if client else None, "error": error_code})
        request_id_var.reset(token)


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _rest_unwanted(request: web.Request, error_code: str | None) -> bool:
    """Whether the unread rest of a refused body is not worth lingering for: it is not coming (a
    timeout; a client still waiting for 100 Continue), or reading it means inflating it (aiohttp
    decompresses while it lingers: a small compressed body costs seconds of the event loop).

    A plain body still arriving is left to aiohttp's lingering: closing on a client that is still
    sending resets the connection, and the client may never read its 413."""
    if error_code == "request_timeout" or request.get(keys.EXPECTS_CONTINUE):
        return True
    return request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower() not in ("", "identity")


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _deliver(request: web.Request, resp: web.Response) -> bool:
    """Send the response now; False when the client has gone.

    aiohttp would send it after the middlewares and drop it silently if the connection is closed;
    sent here, a client that went away while the request ran (while the HSM signed) is known."""
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionError:
        return False
    return True


async def _audit_undelivered(request: web.Request, resp: web.Response, *, route: str) -> None:
    """A request that succeeded (a document signed and archived, its audit record written) but
    whose client went away before the response: the audit trail says that too (21 CFR 1311.150)."""
    client = request.get(keys.CLIENT)
    event = AuditEvent("response.undelivered", client.name if client else "anonymous", "failure",
                       subject=resp.headers.get("X-Document-Id"),
                       details={"reason": "client_gone", "status": resp.status, "route": route,
                                "method": request.method, "path": request.path},
                       request_id=request.get(keys.REQUEST_ID))
    try:
        await request.app[keys.STORAGE].append_audit(event)
    except Exception:  # noqa: BLE001 - the response is lost anyway; the log keeps what the trail cannot
        log.exception("could not audit an undelivered response")


# Responses aiohttp makes without the middlewares: a 400 for a request line or header its parser
# refuses (a header past max_field_size, Content-Length beside Transfer-Encoding...), a 417 for an
# unknown Expect. The two hooks below give them what `context` gives the rest.
UNPARSED_ROUTE = "unparsed"
_SEEN = web.RequestKey("seen_by_context", bool)


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: a response made outside `context` (only those reach here without the
    header) carries a request id too. aiohttp does not call it for requests it could not parse."""
    if REQUEST_ID_HEADER not in response.headers:
        rid = request.get(keys.REQUEST_ID) or request_id_for(request.headers.get(REQUEST_ID_HEADER))
        request[keys.REQUEST_ID] = rid
        response.headers[REQUEST_ID_HEADER] = rid


def bypass_access_logger(metrics: Metrics) -> type[AbstractAccessLogger]:
    """An access logger for the app's handler_args: aiohttp calls it for every response, and it
    logs and counts those `context` did not see (they had no access line and no count)."""

    class BypassAccessLog(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, elapsed: float) -> None:
            if request.get(_SEEN):
                return
            status = response.status
            try:
                info = request.match_info
            except AssertionError:  # aiohttp asserts it is there: a request it could not parse has none
                info = None
            route = UNPARSED_ROUTE if info is None else _route_label(request)
            metrics.observe_request("other" if info is None else request.method, route, status, elapsed)
            # aiohttp's message quotes the offending bytes (a header value, maybe a token): only
            # its first clause goes to the log.
            body = response.body if isinstance(response, web.Response) else None
            text = body.decode("utf-8", "replace") if isinstance(body, bytes) else ""
            reason = text.split(":", 1)[0].strip()[:200] or None
            rid = request.get(keys.REQUEST_ID) or request_id_for(None)
            access_log.info("%s %s %s", request.method, request.path, status, extra={
                "request_id": rid, "route": route, "status": status, "ms": round(elapsed * 1000, 2),
                "client": None, "error": _STATUS_CODES.get(status, "bad_request"), "reason": reason})

    return BypassAccessLog


class ParserErrorFilter(logging.Filter):
    """aiohttp logs each request its parser refuses at ERROR with a traceback: any client could
    fill the log with them. The access line above records the refusal; other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


async def _refuse(request: web.Request, event_type: str, actor: str, code: str, message: str | None = None,
                  *, subject: str | None = None, status: int | None = None, **details) -> ApiError:
    """Record the refusal in the audit trail, then return the error to raise."""
    metrics = request.app[keys.METRICS]
    metrics.auth_failures.labels(code).inc()
    storage = request.app[keys.STORAGE]
    events = []
    individually = True
    throttle = request.app.get(keys.REFUSALS)
    if actor == "anonymous" and throttle is not None:
        individually, events = throttle.refusal(request.remote or "unknown", code)
    if individually:
        events.append(refusal_event(event_type, actor, subject=subject, request_id=request.get(keys.REQUEST_ID),
                                    code=code, method=request.method, path=request.path, **details))
    if events:
        await storage.append_audit(*events)
    return ApiError(code, message, status=status)


async def refuse(request: web.Request, event_type: str, code: str, message: str | None = None, *,
                 subject: str | None = None, status: int | None = None, **details) -> ApiError:
    """For handlers: audit a refusal by the authenticated client and return the error to raise."""
    client = request.get(keys.CLIENT)
    actor = client.name if client else "anonymous"
    return await _refuse(request, event_type, actor, code, message, subject=subject, status=status,
                         **details)


def _undecodable_query_parameter(raw: str) -> str | None:
    """The name of the first query parameter whose percent-decoded bytes are not UTF-8, or None."""
    if "%" not in raw:
        return None  # the fast path: aiohttp has already refused raw bytes that are not ASCII
    for pair in raw.split("&"):
        name, _, value = pair.partition("=")
        for text in (name, value):
            try:
                unquote_to_bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                return unquote(name, errors="replace")
    return None


def _media_type(request: web.Request) -> str:
    return request.content_type.lower()  # aiohttp strips parameters (charset, boundary)


def _accepts(route: Route, media: str) -> bool:
    if "*/*" in route.body_types:
        return True
    if media in route.body_types:
        return True
    return any(t.endswith("/*") and media.startswith(t[:-1]) for t in route.body_types)


@web.middleware
async def guard(request: web.Request, handler):  # noqa: ANN001
    """Authentication, role check, body size and content type, as the route table declares."""
    route: Route | None = request.app[keys.ROUTE_TABLE].get(request.match_info.route.name)
    if route is None:  # no such route: the router's 404/405 follows
        return await handler(request)
    request[keys.ROUTE] = route
    if not route.public:
        headers = request.headers.getall("Authorization", [])
        if len(headers) > 1:
            # a proxy in front may read the other one than we would (as with ?key=a&key=b)
            raise await _refuse(request, "auth.refused", "anonymous", "invalid_token",
                                "more than one Authorization header", token_id=None)
        token = bearer_token(headers[0] if headers else "")
        if token is None:
            raise await _refuse(request, "auth.refused", "anonymous", "missing_token")
        if not (token.isascii() and token.isprintable()):
            # Our tokens are printable ASCII; other bytes cannot be one (and cannot be hashed as
            # text: aiohttp hands undecodable header bytes over as surrogates).
            raise await _refuse(request, "auth.refused", "anonymous", "invalid_token", token_id=None)
        client = await request.app[keys.CLIENTS].client(token)
        if client is None:
            # Only the token's public id goes into the audit trail, never the presented secret;
            # with the client it names and why (revoked, wrong secret), looked up on refusal only.
            why = await refusal_reason(request.app[keys.STORAGE], token)
            raise await _refuse(request, "auth.refused", "anonymous", "invalid_token",
                                token_id=parse_token_id(token), **why)
        request[keys.CLIENT] = client
        if client.role not in route.roles:
            raise await _refuse(request, "access.refused", client.name, "role_not_allowed",
                                f"role {client.role!r} may not call {route.method} {route.path}",
                                role=client.role, route=route.name)
    takes_query = any(p.where == "query" for p in route.params)
    bad = _undecodable_query_parameter(request.rel_url.raw_query_string) if takes_query else None
    if bad is not None:
        # aiohttp turns the bytes into U+FFFD: a key label would be refused (and audited) as
        # another label than the one sent.
        raise ApiError("invalid_parameter", f"query parameter {bad!r} is not UTF-8 text",
                       details={"parameter": bad})
    for param in route.params:
        if param.where == "query" and len(request.query.getall(param.name, ())) > 1:
            # `?key=a&key=b`: a proxy or filter in front may read the other one than we would.
            raise ApiError("invalid_parameter", f"query parameter {param.name!r} is given more than once",
                           details={"parameter": param.name})
    if route.body_types:
        limit = request.app[keys.SETTINGS].server.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise ApiError("body_too_large", f"the body is {length} bytes, the limit is {limit}",
                           details={"limit": limit})
        media = _media_type(request)
        if not _accepts(route, media):
            raise ApiError("unsupported_media_type", f"{media or 'no content type'} is not accepted here",
                           details={"accepted": list(route.body_types)})
    return await handler(request)
