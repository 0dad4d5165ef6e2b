"""What operators rely on when something goes wrong: request ids, JSON log lines, metrics and the
OpenAPI document, checked against the real server on loopback (SoftHSM token, SQLite database)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.http import keys, logs
from gateway.http.routes import PUBLIC, Route
from tests.http.conftest import HTTP_OTHER, HTTP_RSA, copy_home, start_server, stop_server


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes the root logger for the process: put it back afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    access_level = logging.getLogger("aiohttp.access").level
    yield
    logs.stop_logging()
    root.handlers = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@contextlib.contextmanager
def gateway_log_lines() -> Iterator[list[dict]]:
    """The JSON lines the `gateway` loggers write meanwhile (formatted as they are logged, in the
    request's context, as the server's handler does)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("gateway")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines: list[dict] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        lines.extend(json_lines(stream.getvalue()))


# --- request ids ---------------------------------------------------------------------------------

async def test_a_caller_cannot_take_the_request_id_of_another_request(gw) -> None:
    """Generated ids are a per-process prefix and a counter: seeing one tells the next. A caller
    naming the next one got it echoed, and the next request without an id got it too."""
    seen = (await gw.http.get("/healthz")).headers["X-Request-Id"]
    predicted = f"{seen[:16]}{int(seen[16:], 16) + 1:016x}"
    taken = (await gw.http.get("/healthz", headers={"X-Request-Id": predicted})).headers["X-Request-Id"]
    other = (await gw.http.get("/healthz")).headers["X-Request-Id"]
    assert taken != other
    # Ids of other shapes are still the caller's own, UUIDs included.
    uuid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert (await gw.http.get("/healthz", headers={"X-Request-Id": uuid})).headers["X-Request-Id"] == uuid


# --- OpenAPI -------------------------------------------------------------------------------------

async def test_openapi_names_the_errors_every_route_really_answers(gw) -> None:
    doc = await (await gw.http.get("/v1/openapi.json")).json()

    def documented(path: str, method: str, status: int) -> str:
        return doc["paths"][path][method]["responses"].get(str(status), {}).get("description", "")

    # An empty body to sign is a 400 bad_request.
    resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=b"", headers={
        **gw.auth("purchaser"), "Content-Type": "application/xml"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"
    assert "bad_request" in documented("/v1/sign", "post", 400)
    # With the database down, the token lookup makes every authenticated route a 503.
    await gw.storage.close()
    try:
        resp = await gw.http.get("/v1/documents/00000000-0000-0000-0000-000000000000",
                                 headers=gw.auth("purchaser"))
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "database_unavailable"
    finally:
        await gw.storage.open()
    for route in gw.app[keys.ROUTE_TABLE].values():
        method = route.method.lower()
        if not route.public:
            assert "database_unavailable" in documented(route.path, method, 503), route.name
        if route.body_types:
            assert "request_timeout" in documented(route.path, method, 408), route.name
            assert "bad_request" in documented(route.path, method, 400), route.name
        if route.admitted:
            assert "queue_full" in documented(route.path, method, 429), route.name


async def test_openapi_names_the_report_codes_verify_answers_with_their_status(gw) -> None:
    """/v1/verify answers any verification report code: 400 when the input cannot be verified
    (xml_too_large too, which is 413 elsewhere), else 422. The document named four of them."""
    doc = await (await gw.http.get("/v1/openapi.json")).json()
    responses = doc["paths"]["/v1/verify"]["post"]["responses"]
    many = b"<Doc>" + b"<a/>" * 50_001 + b"</Doc>"
    for body, status, code in ((b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>', 400, "xml_dtd_forbidden"),
                               (many, 400, "xml_too_large"),
                               (b'<Doc xmlns="urn:t"><a>1</a></Doc>', 422, "signature_missing")):
        resp = await gw.http.post("/v1/verify", data=body, headers={
            **gw.auth("supplier"), "Content-Type": "application/xml"})
        assert (resp.status, (await resp.json())["error"]["code"]) == (status, code)
        assert code in responses[str(status)]["description"], code
    assert "xml_too_large" not in responses["413"]["description"]
    for code in ("certificate_key_usage", "algorithm_not_allowed", "revocation_unavailable"):
        assert code in responses["422"]["description"]
    assert "trust_unavailable" in responses["503"]["description"]


async def test_openapi_error_responses_carry_the_request_id_header(gw) -> None:
    """Every response carries X-Request-Id, errors included: the document said so only for
    successes."""
    resp = await gw.http.get("/v1/documents/x", headers={"X-Request-Id": "doc-401"})
    assert resp.status == 401 and resp.headers["X-Request-Id"] == "doc-401"
    doc = await (await gw.http.get("/v1/openapi.json")).json()
    missing = [(path, method, status) for path, ops in doc["paths"].items() for method, op in ops.items()
               for status, response in op["responses"].items()
               if "X-Request-Id" not in response.get("headers", {})]
    assert missing == []
    sign_429 = doc["paths"]["/v1/sign"]["post"]["responses"]["429"]["headers"]
    assert set(sign_429) == {"X-Request-Id", "Retry-After"}


# --- log lines -----------------------------------------------------------------------------------

def test_a_log_call_that_cannot_be_formatted_is_still_one_json_line() -> None:
    """logging's own fallback for a broken call is a multi-line report on stderr, outside the
    JSON stream; now the line is JSON with the error named."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("gateway.test.format")
    log.propagate = False  # pytest's own capture handler re-raises logging errors
    log.addHandler(handler)
    try:
        log.error("%d documents", "not a number")
        log.error("odd details", extra={"details": {("a", "b"): 1}})  # keys json cannot write
        log.error("fine")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    lines = json_lines(stream.getvalue())
    assert [line["msg"] for line in lines] == ["'%d documents'", "'odd details'", "fine"]
    assert lines[0]["log_error"].startswith("TypeError") and lines[1]["log_error"].startswith("TypeError")


async def test_a_huge_failure_is_one_bounded_json_line_that_keeps_the_exception(make_gateway) -> None:
    """A handler failing with a long message (a document quoted in it, say): its line was as long
    as the message and its traceback, and collectors split lines past 16 KiB into broken JSON."""

    async def fails(request: web.Request) -> web.Response:
        raise ValueError("quoted document: " + "\u00e9<Item>payload</Item>" * 5_000)

    gw = await make_gateway(routes=[Route("GET", "/fails", "fails", fails, "Fails.", PUBLIC)])
    with gateway_log_lines() as lines:
        resp = await gw.http.get("/fails", headers={"X-Request-Id": "huge-1"})
    assert resp.status == 500 and resp.headers["X-Request-Id"] == "huge-1"
    (failure,) = [line for line in lines if line["msg"] == "unhandled error"]
    assert failure["request_id"] == "huge-1" and failure.get("truncated") is True
    assert failure["exc"].rstrip().endswith("<Item>payload</Item>")
    assert len(json.dumps(failure, separators=(",", ":"))) <= 16_000


class _StalledStream(io.StringIO):
    """A stream whose reader has stopped (a full pipe): writes wait until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(30)
        return super().write(text)


def test_a_stalled_log_stream_holds_a_bounded_backlog_and_says_what_it_dropped(restore_logging) -> None:
    stream = _StalledStream()
    logs.configure_logging("INFO", stream, background=True)
    queue_handler = next(h for h in logging.getLogger().handlers if isinstance(h, logs._ContextQueueHandler))
    log = logging.getLogger("gateway.test")
    limit = getattr(logs, "QUEUE_LIMIT", 10_000)
    total = limit * 3
    for i in range(total):
        log.info("line %d", i)
    assert queue_handler.queue.qsize() <= limit  # was every record, without bound
    stream.release.set()
    deadline = time.monotonic() + 30
    while queue_handler.queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    log.info("after the stall")
    logs.stop_logging()
    lines = json_lines(stream.getvalue())
    written = [line for line in lines if line["msg"].startswith("line ")]
    notes = [line for line in lines if line["logger"] == "gateway.logs"]
    assert len(notes) == 1 and notes[0]["level"] == "warning"
    assert len(written) + notes[0]["dropped"] == total
    assert lines[-1]["msg"] == "after the stall"


def test_lines_logged_after_the_writer_stopped_are_written(restore_logging) -> None:
    """At exit, threads still ending (and the interpreter) may log after stop_logging: those
    records went to the queue of a writer that had stopped, and were lost."""
    stream = io.StringIO()
    logs.configure_logging("INFO", stream, background=True)
    log = logging.getLogger("gateway.test")
    log.info("before the stop")
    logs.stop_logging()
    log.warning("after the stop")
    assert [line["msg"] for line in json_lines(stream.getvalue())] == ["before the stop", "after the stop"]


# --- requests refused before any middleware ------------------------------------------------------

async def _raw(gw, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http.port)
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


async def test_requests_the_parser_refuses_are_logged_with_an_id_and_counted(gw, caplog) -> None:
    """aiohttp answers these 400s itself: they had no access line, no request id, no count, and an
    ERROR traceback each (quoting the offending header: here a bearer token)."""
    secret = "gw_1234_" + "s3cr3t" * 4000
    malformed = [
        f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n\r\n".encode(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\nConnection: close\r\n\r\n",
        b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    ]
    with caplog.at_level(logging.DEBUG):
        for data in malformed:
            assert (await _raw(gw, data)).startswith(b"HTTP/1.0 400 ")
    access = [r for r in caplog.records if r.name == "gateway.http.access"]
    assert len(access) == 3
    assert all(r.route == "unparsed" and r.status == 400 and r.request_id for r in access)
    assert len({r.request_id for r in access}) == 3
    assert access[0].reason == "Got more than 16384 bytes when reading"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "s3cr3t" not in caplog.text
    metrics = await (await gw.http.get("/metrics")).text()
    assert 'gateway_http_requests_total{method="other",route="unparsed",status="400"} 3.0' in metrics


async def test_an_unknown_expect_is_answered_with_a_request_id_logged_and_counted(gw, caplog) -> None:
    """aiohttp answers an unknown Expect with a 417 before any middleware: it had no X-Request-Id,
    no access line and no count."""
    with caplog.at_level(logging.INFO):
        resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=b"<a/>", headers={
            **gw.auth("purchaser"), "Content-Type": "application/xml", "Expect": "teapot",
            "X-Request-Id": "expect-1"})
    assert resp.status == 417 and resp.headers["X-Request-Id"] == "expect-1"
    access = [r for r in caplog.records if r.name == "gateway.http.access"]
    assert [(r.request_id, r.route, r.status) for r in access] == [("expect-1", "sign", 417)]
    metrics = await (await gw.http.get("/metrics")).text()
    assert 'gateway_http_requests_total{method="POST",route="sign",status="417"} 1.0' in metrics


# --- metrics -------------------------------------------------------------------------------------

async def test_database_failures_are_counted_and_logged_with_their_cause(gw) -> None:
    """HSM failures had a counter and a warning naming the cause; database failures had neither
    (only the client saw why)."""
    await gw.storage.close()
    try:
        with gateway_log_lines() as lines:
            docs = await gw.http.get("/v1/documents/00000000-0000-0000-0000-000000000000",
                                     headers={**gw.auth("purchaser"), "X-Request-Id": "db-down-1"})
            ready = await gw.http.get("/readyz", headers={"X-Request-Id": "db-down-2"})
    finally:
        await gw.storage.open()
    assert docs.status == 503 and ready.status == 503
    warnings = {line["request_id"]: line["msg"] for line in lines if line["level"] == "warning"}
    assert set(warnings) == {"db-down-1", "db-down-2"}
    assert all(m.startswith("database failure: ") for m in warnings.values())
    families = {f.name: f for f in text_string_to_metric_families(await (await gw.http.get("/metrics")).text())}
    assert [s.value for s in families["gateway_database_errors"].samples if s.name.endswith("_total")] == [2.0]


async def test_metrics_count_what_happened(gw) -> None:
    """N requests of each outcome, then /metrics read with Prometheus' own parser."""
    outcomes = {
        ("GET", "healthz", "200"): lambda: gw.http.get("/healthz"),
        ("GET", "unmatched", "404"): lambda: gw.http.get("/v1/nothing"),
        ("DELETE", "unmatched", "405"): lambda: gw.http.delete("/healthz"),
        ("GET", "get_document", "401"): lambda: gw.http.get("/v1/documents/x"),
        ("POST", "sign", "403"): lambda: gw.http.post(f"/v1/sign?key={HTTP_OTHER}", data=b"<a/>", headers={
            **gw.auth("purchaser"), "Content-Type": "application/xml"}),
        ("POST", "sign", "415"): lambda: gw.http.post(f"/v1/sign?key={HTTP_RSA}&format=xmldsig", data=b"x", headers={
            **gw.auth("purchaser"), "Content-Type": "text/plain"}),
    }
    for make in outcomes.values():
        for _ in range(3):
            await make()
    families = {f.name: f for f in text_string_to_metric_families(await (await gw.http.get("/metrics")).text())}
    counted = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
               for s in families["gateway_http_requests"].samples if s.name.endswith("_total")}
    for key in outcomes:
        assert counted[key] == 3.0, key
    auth = {s.labels["code"]: s.value for s in families["gateway_auth_failures"].samples
            if s.name.endswith("_total")}
    assert auth == {"missing_token": 3.0, "key_not_allowed": 3.0}


# --- a real `gateway serve` process --------------------------------------------------------------

async def test_the_served_log_is_json_lines_with_request_ids_to_the_last_line(
        softhsm_settings, http_keys, tmp_path, servers) -> None:
    """`gateway serve` with its background log writer: a refused-by-the-parser request, a signed
    document and a 404, then SIGTERM. Every line of stderr is one JSON object, every access line
    has a request id, no traceback, and the last line written before exit is there."""
    server = start_server(copy_home(softhsm_settings, tmp_path / "home"))
    servers.append(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.0 400 ")
    writer.close()
    async with aiohttp.ClientSession(server.url) as http:
        async with http.get("/v1/nothing", headers={"X-Request-Id": "served-404"}) as resp:
            assert resp.status == 404
        async with http.get("/metrics") as resp:
            metrics = await resp.text()
    assert 'gateway_http_requests_total{method="other",route="unparsed",status="400"} 1.0' in metrics
    assert stop_server(server) == 0
    lines = json_lines(server.log())
    access = [line for line in lines if line["logger"] == "gateway.http.access"]
    assert [line["status"] for line in access] == [400, 404, 200]
    assert all(line.get("request_id") for line in access)
    assert access[1]["request_id"] == "served-404"
    assert not [line for line in lines if line["level"] == "error" or "exc" in line]
    assert lines[-1]["msg"] == "stopped"


async def test_the_latency_histogram_reaches_past_the_body_timeout(make_gateway) -> None:
    """A stalled upload is answered 408 after body_timeout_s (15 s by default); the buckets
    stopped at 5 s, so such requests were only in +Inf and p99 read as 5 s."""
    gw = await make_gateway(body_timeout_s=5.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http.port)
    writer.write((f"POST /v1/sign?key={HTTP_RSA} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  f"{gw.tokens['purchaser']}\r\nContent-Type: application/xml\r\nContent-Length: 100\r\n"
                  f"Connection: close\r\n\r\n<Doc>").encode())
    await writer.drain()
    assert (await asyncio.wait_for(reader.read(), 20)).startswith(b"HTTP/1.1 408 ")
    writer.close()
    families = {f.name: f for f in text_string_to_metric_families(await (await gw.http.get("/metrics")).text())}
    buckets = {s.labels["le"]: s.value for s in families["gateway_http_request_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["route"] == "sign"}
    assert buckets["5.0"] == 0.0 and buckets["10.0"] == 1.0


async def test_metrics_name_their_exposition_format_version(gw) -> None:
    # The media type without its version made newer Prometheus servers guess the format.
    from gateway.http.metrics import CONTENT_TYPE_LATEST

    resp = await gw.http.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert "version=" in resp.headers["Content-Type"]
