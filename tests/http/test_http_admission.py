"""Admission control and the work pool: bounded queue, refusal on arrival, deadline withdrawal,
FIFO service, recovery of capacity. Real worker threads (an AsyncSigner running plain functions)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway.http.admission import Admission, Overloaded
from gateway.http.pool import WorkPool, queued_s_var
from gateway.signing.async_signer import AsyncSigner


@pytest.fixture
def pool_of(hsm):
    made: list[AsyncSigner] = []

    def make(workers: int = 1, queue_size: int = 4, deadline_s: float = 5.0) -> WorkPool:
        signer = AsyncSigner(hsm, workers=workers)
        made.append(signer)
        return WorkPool(Admission(workers, queue_size, deadline_s, retry_after_s=2), signer)

    yield make
    for signer in made:
        signer.close()


async def _hold(pool: WorkPool, gate: threading.Event) -> list[asyncio.Task]:
    """Occupy every worker with a job that waits for the gate."""
    tasks = [asyncio.create_task(pool.run(gate.wait, 30.0, deadline_s=30.0)) for _ in range(pool.workers)]
    while pool.admission.busy < pool.workers:
        await asyncio.sleep(0.001)
    return tasks


async def test_full_queue_is_refused_at_once(pool_of) -> None:
    pool = pool_of(workers=1, queue_size=1)
    gate = threading.Event()
    holders = await _hold(pool, gate)
    queued = asyncio.create_task(pool.run(time.monotonic))
    await asyncio.sleep(0)
    assert pool.admission.queued == 1
    started = time.monotonic()
    with pytest.raises(Overloaded) as info:
        await pool.run(time.monotonic)
    assert info.value.code == "queue_full" and info.value.retry_after_s == 2
    assert time.monotonic() - started < 0.05  # no waiting for a refusal
    gate.set()
    await asyncio.gather(*holders)
    assert isinstance(await queued, float)
    assert pool.admission.in_flight == 0 and pool.admission.rejected_full == 1


async def test_a_job_still_waiting_at_its_deadline_is_withdrawn(pool_of) -> None:
    pool = pool_of(workers=1, queue_size=4, deadline_s=0.1)
    gate = threading.Event()
    holders = await _hold(pool, gate)
    ran: list[int] = []
    started = time.monotonic()
    with pytest.raises(Overloaded) as info:
        await pool.run(ran.append, 1)
    assert info.value.code == "queue_deadline" and 0.09 < time.monotonic() - started < 1.0
    assert pool.admission.in_flight == 1  # only the gated job
    gate.set()
    await asyncio.gather(*holders)
    assert await pool.run(ran.append, 2) is None
    assert ran == [2]  # the withdrawn job never ran, even after the worker came free


async def test_jobs_are_served_in_order_and_report_their_queueing(pool_of) -> None:
    pool = pool_of(workers=1, queue_size=10)
    gate = threading.Event()
    holders = await _hold(pool, gate)
    order: list[int] = []

    async def one(i: int) -> float:
        await pool.run(order.append, i)
        return queued_s_var.get()

    tasks = [asyncio.create_task(one(i)) for i in range(5)]
    await asyncio.sleep(0.05)
    gate.set()
    waits = await asyncio.gather(*tasks)
    await asyncio.gather(*holders)
    assert order == [0, 1, 2, 3, 4]
    assert all(w >= 0.04 for w in waits)
    assert pool.admission.in_flight == 0 and pool.admission.admitted == 6


async def test_a_request_that_would_miss_its_deadline_is_refused_on_arrival() -> None:
    adm = Admission(workers=1, queue_size=100, deadline_s=0.1)
    adm.record_service(0.04)  # recent jobs took 40 ms
    adm.admit()  # running
    adm.admit()  # waits ~40 ms
    adm.admit()  # waits ~80 ms
    started = time.monotonic()
    with pytest.raises(Overloaded) as info:  # would wait ~120 ms > 100 ms
        adm.admit()
    assert info.value.code == "queue_deadline" and time.monotonic() - started < 0.01
    assert adm.in_flight == 3 and adm.rejected_deadline == 1
    for _ in range(3):
        adm.done()
    adm.admit()  # capacity is back
    assert adm.in_flight == 1


def test_service_time_is_a_moving_average() -> None:
    adm = Admission(workers=2, queue_size=8, deadline_s=0.25)
    adm.record_service(0.010)
    assert adm.service_s == pytest.approx(0.010)
    for _ in range(200):
        adm.record_service(0.002)
    assert adm.service_s == pytest.approx(0.002, rel=0.01)


async def test_client_cache_looks_a_token_up_once_at_a_time() -> None:
    from datetime import UTC, datetime

    from gateway.http.auth import ClientCache
    from gateway.storage.base import Client

    calls: list[str] = []
    release = asyncio.Event()
    alice = Client("1", "alice", "purchaser", frozenset({"k"}), datetime.now(UTC))

    async def lookup(token: str) -> Client | None:  # a slow database
        calls.append(token)
        await release.wait()
        return alice if token == "good" else None

    cache = ClientCache(lookup, ttl_s=0.05)
    waiting = [asyncio.create_task(cache.client("good")) for _ in range(50)]
    await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*waiting) == [alice] * 50
    assert calls == ["good"]  # one lookup served all fifty
    assert await cache.client("good") is alice and calls == ["good"]  # cached
    await asyncio.sleep(0.06)
    assert await cache.client("good") is alice and calls == ["good", "good"]  # expired: looked up again
    assert await cache.client("bad") is None and await cache.client("bad") is None
    assert calls.count("bad") == 2  # refusals are never cached


async def test_jobs_run_in_the_requests_context(pool_of) -> None:
    """Log lines written on a worker carry the request id of the request that queued the job."""
    import logging

    from gateway.http.logs import JsonFormatter, request_id_var

    pool = pool_of(workers=2)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))  # formatted on the worker, as a stream handler does

    logger = logging.getLogger("gateway.test.worker")
    handler = Keep()
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        async def one(rid: str) -> None:
            request_id_var.set(rid)
            await pool.run(logger.info, "signing for %s", rid)

        await asyncio.gather(*(asyncio.create_task(one(f"req-{i}")) for i in range(6)))
    finally:
        logger.removeHandler(handler)
    parsed = [__import__("json").loads(line) for line in lines]
    assert sorted((p["request_id"], p["msg"]) for p in parsed) == sorted(
        (f"req-{i}", f"signing for req-{i}") for i in range(6))


async def test_requests_waiting_for_their_commit_count_against_the_queue(make_gateway) -> None:
    """The bound covers a request from admission to its response, not only its job at the pool:
    two requests whose signatures are done but whose archive commits are slow fill a pool of one
    worker and a queue of one, and a third is refused at once although the pool is idle."""
    from gateway.http import keys
    from tests.http.conftest import HTTP_RSA
    from tests.http.test_http_service import error_of, xml_doc

    gw = await make_gateway(workers=1, queue_size=1)
    storage = gw.app[keys.STORAGE]
    gate = asyncio.Event()
    real_commit = storage.commit_unit
    waiting = 0

    async def slow_commit(**unit):  # the real commit, once the gate opens
        nonlocal waiting
        waiting += 1
        await gate.wait()
        return await real_commit(**unit)

    storage.commit_unit = slow_commit
    headers = {**gw.auth("purchaser"), "Content-Type": "application/xml"}
    held = [asyncio.create_task(gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(n), headers=headers))
            for n in (1, 2)]
    while waiting < 2:
        await asyncio.sleep(0.01)
    pool = gw.app[keys.POOL]
    assert pool.admission.in_flight == 0  # the pool is idle: both jobs are done
    # (Admitted, it would wait at the gate too: the time limit makes that a failure, not a hang.)
    third = await asyncio.wait_for(
        gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=xml_doc(3), headers=headers), 10)
    assert third.status == 429 and (await error_of(third))["code"] == "queue_full"
    gate.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    storage.commit_unit = real_commit
