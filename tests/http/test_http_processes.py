"""Real `gateway serve` processes: graceful drain on SIGTERM, nothing acknowledged lost on SIGKILL,
and two nodes on one PostgreSQL database and one HSM token behaving as one system."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import asyncpg
import pytest

from gateway.audit import verify_trail
from gateway.storage import storage_for_url
from tests.http.conftest import (
    HTTP_RSA, PG_URL, ServerProcess, copy_home, create_clients, start_server, stop_server, wait_ready,
)

pytestmark = pytest.mark.slow


def xml_doc(tag: str, n: int) -> bytes:
    return f'<Doc xmlns="urn:test"><Item run="{tag}" n="{n}">payload {n}</Item></Doc>'.encode()


async def _pg_schema(name: str) -> str:
    try:
        conn = await asyncpg.connect(PG_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        import os

        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable in CI: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    return name


async def _drop_schema(name: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


async def _database(kind: str, home, tag: str) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{home / 'gateway.sqlite3'}", None
    schema = await _pg_schema(f"gw_http_{tag}_{int(time.time() * 1000) % 10**9}")
    return f"{PG_URL}?search_path={schema}", schema


async def _clients(url: str) -> dict[str, str]:
    storage = storage_for_url(url)
    await storage.open()
    try:
        tokens, _ = await create_clients(storage)
    finally:
        await storage.close()
    return tokens


async def test_sigterm_drains_in_flight_requests(softhsm_settings, http_keys, tmp_path, servers) -> None:
    home = copy_home(softhsm_settings, tmp_path / "home", server={"queue_size": 256, "queue_deadline_ms": 10_000})
    url, _ = await _database("sqlite", home, "drain")
    (home / "gateway.toml").write_text((home / "gateway.toml").read_text().replace('url = ""', f'url = "{url}"'))
    tokens = await _clients(url)
    server = start_server(home)
    servers.append(server)
    headers = {"Authorization": f"Bearer {tokens['purchaser']}", "Content-Type": "application/xml"}
    n = 120
    first_done = asyncio.Event()
    async with aiohttp.ClientSession(server.url, connector=aiohttp.TCPConnector(limit=n)) as http:
        async def one(i: int):
            async with http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc("drain", i), headers=headers) as resp:
                body = await resp.read()
                first_done.set()
                return resp.status, resp.headers.get("X-Document-Id"), body

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await first_done.wait()
        server.proc.send_signal(signal.SIGTERM)  # while most requests are queued or running
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert server.proc.wait(30) == 0
    statuses = [r[0] for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [] and statuses == [200] * n, (failures[:3], statuses, [r[2][:300] for r in results if not isinstance(r, BaseException) and r[0] != 200][:3])
    log = server.log()
    assert '"msg":"draining"' in log and '"msg":"stopped"' in log
    storage = storage_for_url(url)
    await storage.open()
    try:
        for _status, doc_id, body in results:
            doc = await storage.get_document(doc_id)
            assert doc is not None and doc.content == body
    finally:
        await storage.close()


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_sigkill_loses_no_acknowledged_document(db, softhsm_settings, http_keys, tmp_path, servers) -> None:
    home = copy_home(softhsm_settings, tmp_path / "home")
    url, schema = await _database(db, home, "kill")
    tokens = await _clients(url)
    server = start_server(home, env={"GATEWAY_DATABASE_URL": url})
    servers.append(server)
    headers = {"Authorization": f"Bearer {tokens['purchaser']}", "Content-Type": "application/xml"}
    acked: dict[str, bytes] = {}
    errors: list[str] = []
    stop = asyncio.Event()
    counter = iter(range(10**9))

    async def sender(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            i = next(counter)
            try:
                async with http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc("kill", i), headers=headers) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        acked[resp.headers["X-Document-Id"]] = body
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors.append(type(exc).__name__)  # the kill cuts requests off: not acknowledged

    async with aiohttp.ClientSession(server.url) as http:
        senders = [asyncio.create_task(sender(http)) for _ in range(16)]
        deadline = time.monotonic() + 120
        while len(acked) < 200:
            # a server that refuses every request (a key gone from its token) fails the test
            # rather than keeping it waiting for ever
            assert time.monotonic() < deadline, f"{len(acked)} signed in 120 s; errors {errors[-3:]}"
            await asyncio.sleep(0.02)
        server.proc.send_signal(signal.SIGKILL)  # mid-stream, no chance to flush anything
        server.proc.wait(10)
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*senders)
    assert server.proc.returncode == -signal.SIGKILL
    assert len(acked) >= 200
    storage = storage_for_url(url)
    await storage.open()
    try:
        missing = [doc_id for doc_id, body in acked.items()
                   if (doc := await storage.get_document(doc_id)) is None or doc.content != body]
        assert missing == [], f"{len(missing)} acknowledged documents lost"
        assert (await verify_trail(storage, None)).ok
    finally:
        await storage.close()
        if schema:
            await _drop_schema(schema)


@pytest.mark.postgres
async def test_two_nodes_on_one_postgresql_behave_as_one(softhsm_settings, http_keys, tmp_path, servers) -> None:
    home = copy_home(softhsm_settings, tmp_path / "home")  # one HSM token, shared by both nodes
    url, schema = await _database("postgresql", home, "nodes")
    tokens = await _clients(url)
    env = {"GATEWAY_DATABASE_URL": url}
    nodes: list[ServerProcess] = [start_server(home, "node-a", env=env), start_server(home, "node-b", env=env)]
    servers.extend(nodes)
    headers = {"Authorization": f"Bearer {tokens['purchaser']}", "Content-Type": "application/xml"}
    try:
        for node in nodes:
            await wait_ready(node.url)
        async with aiohttp.ClientSession() as http:
            async def post(node: ServerProcess, body: bytes):
                for _attempt in range(50):  # a burst may be refused with 429: clients retry
                    async with http.post(f"{node.url}/v1/sign?key={HTTP_RSA}", data=body,
                                         headers=headers) as resp:
                        payload = await resp.read()
                        if resp.status != 429:
                            return resp.status, resp.headers.get("X-Document-Id"), payload
                    await asyncio.sleep(0.05)
                raise AssertionError("still refused after 50 tries")

            # The same document to both nodes at the same moment, 40 times over.
            rounds = await asyncio.gather(*(
                asyncio.gather(post(nodes[0], xml_doc("twin", i)), post(nodes[1], xml_doc("twin", i)))
                for i in range(40)))
            accepted: dict[str, str] = {}
            for i, pair in enumerate(rounds):
                statuses = sorted(status for status, _, _ in pair)
                assert statuses == [200, 409], (i, pair)
                ok = next(p for p in pair if p[0] == 200)
                conflict = next(p for p in pair if p[0] == 409)
                import json

                assert json.loads(conflict[2])["error"]["details"]["document_id"] == ok[1]
                accepted[ok[1]] = ok[2]
            # A document signed on one node is served by the other.
            for doc_id, body in list(accepted.items())[:5]:
                for node in nodes:
                    async with http.get(f"{node.url}/v1/documents/{doc_id}", headers=headers) as resp:
                        assert resp.status == 200 and await resp.read() == body
            # A refusal on either node lands in the same trail.
            for node in nodes:
                async with http.post(f"{node.url}/v1/sign?key=not-mine", data=xml_doc("x", 1),
                                     headers=headers) as resp:
                    assert resp.status == 403
        storage = storage_for_url(url)
        await storage.open()
        try:
            docs = await storage.list_documents(kind="signed_xml", limit=10_000)
            assert sorted(d.id for d in docs) == sorted(accepted)
            trail = await verify_trail(storage, None)
            assert trail.ok, trail.message
            records = await storage.audit_records(0, 10_000)
            assert sum(r.event_type == "document.signed" for r in records) == 40
            assert sum(r.event_type == "sign.refused" for r in records) == 2
            assert [r.seq for r in records] == list(range(1, len(records) + 1))
        finally:
            await storage.close()
        # Readiness is honest about the shared database: both nodes say so when it goes away.
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f"ALTER SCHEMA {schema} RENAME TO {schema}_away")
            async with aiohttp.ClientSession() as http:
                for node in nodes:
                    async with http.get(f"{node.url}/readyz") as resp:
                        assert resp.status == 503 and resp.headers["Retry-After"]
                        assert (await resp.json())["error"]["code"] == "database_unavailable"
        finally:
            await conn.execute(f"ALTER SCHEMA {schema}_away RENAME TO {schema}")
            await conn.close()
        for node in nodes:
            await wait_ready(node.url)
        for node in nodes:
            assert stop_server(node) == 0
    finally:
        await _drop_schema(schema)


def test_a_repeated_sigterm_still_exits_0(softhsm_settings, http_keys, tmp_path, servers) -> None:
    """An orchestrator that repeats SIGTERM: the gateway drains once and exits 0. A signal that
    came after the event loop had closed used to take the default action (status -15)."""
    server = start_server(copy_home(softhsm_settings, tmp_path / "home"))
    servers.append(server)
    deadline = time.monotonic() + 30
    while server.proc.poll() is None and time.monotonic() < deadline:
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    assert server.proc.wait(5) == 0
    assert '"msg":"stopped"' in server.log()


async def test_a_taken_port_is_one_clean_error(softhsm_settings, http_keys, initialized_home, tmp_path) -> None:
    """The port is in use: exit 1 with `listen_failed`, and what start-up opened is closed in
    order (it used to be left to the interpreter's exit, which logged the final audit checkpoint
    failing with a traceback: the token holds the audit key and the trail has records, so there is
    a checkpoint to sign)."""
    home = copy_home(softhsm_settings, tmp_path / "home")
    await _clients((await _database("sqlite", home, "port"))[0])
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_DATABASE_URL"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "serve", "--port",
                               str(taken.getsockname()[1])], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in map(json.loads, proc.stderr.splitlines()) if line["level"] == "error"]
    assert [e.get("code") for e in errors] == ["listen_failed"], errors
    assert "address already in use" in errors[0]["msg"]


async def test_invented_methods_do_not_grow_the_metrics(softhsm_settings, http_keys, tmp_path, servers) -> None:
    """aiohttp's pure-Python parser (no C extension) accepts any method token: each invented one
    was a new series in /metrics, without bound. They are counted as method="other"."""
    server = start_server(copy_home(softhsm_settings, tmp_path / "home"), env={"AIOHTTP_NO_EXTENSIONS": "1"})
    servers.append(server)

    async def raw(method: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"{method} /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status = await reader.readline()
        writer.close()
        return status

    statuses = [await raw(f"M{i:04d}") for i in range(200)]
    assert all(b" 404 " in s for s in statuses), statuses[:3]  # reached the app, as any request
    async with aiohttp.ClientSession(server.url) as http:
        async with http.get("/metrics") as resp:
            text = await resp.text()
    series = [line for line in text.splitlines() if line.startswith("gateway_http_requests_total{")]
    assert 'gateway_http_requests_total{method="other",route="unmatched",status="404"} 200.0' in series
    assert not any('method="M0' in line for line in series)
    assert stop_server(server) == 0
