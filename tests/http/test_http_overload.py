"""Backpressure and faults: 429 with Retry-After when the queue is full or the deadline passes,
503 with Retry-After when the HSM fails, and recovery without a restart."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import time

import aiohttp

from gateway.http import keys
from gateway.storage import storage_for_url
from tests.http.conftest import HTTP_RSA, copy_home, create_clients, start_server, stop_server


def xml_doc(n: int) -> bytes:
    return f'<Doc xmlns="urn:test"><Item n="{n}">payload {n}</Item></Doc>'.encode()


async def test_full_queue_gives_429_at_once_and_deadline_gives_429(make_gateway) -> None:
    gw = await make_gateway(workers=1, queue_size=1, queue_deadline_ms=300, retry_after_s=3)
    pool = gw.app[keys.POOL]
    admission = gw.app[keys.ADMISSION]
    headers = {**gw.auth("purchaser"), "Content-Type": "application/xml"}

    # A gate holds the only worker, so what follows is deterministic.
    gate = threading.Event()
    holders = [asyncio.create_task(pool.run(gate.wait, 30.0, deadline_s=30.0)) for _ in range(pool.workers)]
    while admission.busy < pool.workers:
        await asyncio.sleep(0.001)

    queued = asyncio.create_task(gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(1), headers=headers))
    while admission.queued < 1:
        await asyncio.sleep(0.001)

    started = time.monotonic()
    refused = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(2), headers=headers)
    assert time.monotonic() - started < 0.2  # refused at once, not after queueing
    assert refused.status == 429 and refused.headers["Retry-After"] == "3"
    assert (await refused.json())["error"]["code"] == "queue_full"

    late = await queued  # waited its 300 ms for the gated worker, then gave up
    assert late.status == 429 and late.headers["Retry-After"] == "3"
    assert (await late.json())["error"]["code"] == "queue_deadline"
    assert time.monotonic() - started >= 0.25

    gate.set()
    assert await asyncio.gather(*holders) == [True] * pool.workers
    ok = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(3), headers=headers)
    assert ok.status == 200
    metrics = await (await gw.http.get("/metrics")).text()
    assert 'gateway_admission_rejected_total{reason="queue_full"} 1.0' in metrics
    assert 'gateway_admission_rejected_total{reason="queue_deadline"} 1.0' in metrics
    assert admission.in_flight == 0


async def test_requests_waiting_for_their_commit_count_against_the_queue(make_gateway) -> None:
    """Admission counts a request as open until it is answered, not only while its job is at
    the pool: requests signed but waiting for their commit still fill the queue (under overload
    that wait is where admitted requests lost their time)."""
    gw = await make_gateway(workers=1, queue_size=1)
    admission = gw.app[keys.ADMISSION]
    headers = {**gw.auth("purchaser"), "Content-Type": "application/xml"}
    blocker = sqlite3.connect(gw.settings.database_url.removeprefix("sqlite:///"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database: commits wait
    try:
        waiting = [asyncio.create_task(gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(n),
                                                    headers=headers)) for n in (1, 2)]
        deadline = time.monotonic() + 10
        while (admission.admitted < 2 or admission.in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert admission.admitted == 2 and admission.in_flight == 0  # signed, not committed
        # Counted only at the pool, this one would be admitted and wait for the database too.
        refused = await asyncio.wait_for(
            gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(3), headers=headers), 5)
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == "queue_full"
        assert admission.open_requests == 2
        assert not any(task.done() for task in waiting)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert [r.status for r in await asyncio.gather(*waiting)] == [200, 200]
    assert admission.open_requests == 0
    ok = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(3), headers=headers)
    assert ok.status == 200


async def test_hsm_failure_gives_503_and_the_pool_recovers(softhsm_settings, http_keys, tmp_path, servers) -> None:
    """A real `gateway serve` whose token disappears and comes back (its own copy of the token)."""
    home = copy_home(softhsm_settings, tmp_path / "home")
    storage = storage_for_url(f"sqlite:///{home / 'gateway.sqlite3'}")
    await storage.open()
    tokens, _names = await create_clients(storage)
    await storage.close()
    server = start_server(home)
    servers.append(server)
    headers = {"Authorization": f"Bearer {tokens['purchaser']}", "Content-Type": "application/xml"}
    async with aiohttp.ClientSession(server.url) as http:
        async with http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(1), headers=headers) as resp:
            assert resp.status == 200

        away = tmp_path / "tokens.away"
        shutil.move(home / "tokens", away)  # the token is pulled out
        try:
            for n in (2, 3):
                async with http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(n), headers=headers) as resp:
                    assert resp.status == 503, await resp.text()
                    assert int(resp.headers["Retry-After"]) >= 1
                    assert (await resp.json())["error"]["code"] == "hsm_unavailable"
            async with http.get("/readyz") as resp:
                assert resp.status == 503 and (await resp.json())["error"]["code"] == "hsm_unavailable"
            async with http.get("/healthz") as resp:
                assert resp.status == 200  # alive, just not ready
        finally:
            shutil.move(away, home / "tokens")

        deadline = time.monotonic() + 10
        n = 10
        while True:  # the pool reconnects on its own, no restart
            n += 1
            async with http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(n), headers=headers) as resp:
                if resp.status == 200:
                    break
                assert resp.status == 503
            assert time.monotonic() < deadline, "the HSM pool did not recover"
            await asyncio.sleep(0.2)
        async with http.get("/readyz") as resp:
            assert resp.status == 200
        async with http.get("/metrics") as resp:
            assert 'gateway_hsm_errors_total{code="hsm_unavailable"}' in await resp.text()
    assert stop_server(server) == 0
    assert '"hsm failure' in server.log() or "hsm failure" in server.log()
