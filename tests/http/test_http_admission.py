"""Admission control on its own: slots, the bounded queue, the deadline, FIFO hand-over."""

from __future__ import annotations

import asyncio

import pytest

from gateway.http.admission import Admission, Overloaded


async def test_full_queue_is_refused_at_once() -> None:
    adm = Admission(slots=1, queue_size=1, deadline_s=5.0, retry_after_s=2)
    await adm.acquire()  # the one worker is busy
    waiting = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert adm.queued == 1
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Overloaded) as info:
        await adm.acquire()
    assert info.value.code == "queue_full" and info.value.retry_after_s == 2
    assert loop.time() - started < 0.05  # no waiting for a refusal
    adm.release()  # hands the slot to the waiter
    await waiting
    assert adm.busy == 1 and adm.queued == 0
    adm.release()
    assert adm.busy == 0 and adm.rejected_full == 1


async def test_deadline_refuses_and_leaves_no_ghost_waiter() -> None:
    adm = Admission(slots=1, queue_size=4, deadline_s=0.05)
    await adm.acquire()
    with pytest.raises(Overloaded) as info:
        await adm.acquire()
    assert info.value.code == "queue_deadline"
    assert adm.queued == 0 and adm.rejected_deadline == 1
    adm.release()
    assert adm.busy == 0
    async with adm.slot():  # the slot is free again, not lost to the timed-out waiter
        assert adm.busy == 1


async def test_waiters_are_served_in_order() -> None:
    adm = Admission(slots=1, queue_size=10, deadline_s=5.0)
    await adm.acquire()
    order: list[int] = []

    async def worker(i: int) -> None:
        async with adm.slot():
            order.append(i)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(worker(i)) for i in range(5)]
    await asyncio.sleep(0)
    adm.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert adm.busy == 0 and adm.admitted == 6


async def test_cancelled_waiter_gives_up_its_place() -> None:
    adm = Admission(slots=1, queue_size=2, deadline_s=5.0)
    await adm.acquire()
    task = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adm.queued == 0
    adm.release()
    assert adm.busy == 0


async def test_a_request_that_would_miss_its_deadline_is_refused_on_arrival() -> None:
    adm = Admission(slots=1, queue_size=100, deadline_s=0.1)
    for _ in range(3):  # teach it that a slot is held about 40 ms
        async with adm.slot():
            await asyncio.sleep(0.04)
    assert 0.02 < adm.hold_s < 0.06
    await adm.acquire()
    first = asyncio.create_task(adm.acquire())  # expected wait ~40 ms: queued
    await asyncio.sleep(0)
    second = asyncio.create_task(adm.acquire())  # ~80 ms: still within 100 ms
    await asyncio.sleep(0)
    assert adm.queued == 2
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Overloaded) as info:  # ~120 ms > 100 ms: refused at once
        await adm.acquire()
    assert info.value.code == "queue_deadline" and loop.time() - started < 0.02
    adm.release()
    await first
    adm.release()
    await second
    adm.release()
    assert adm.busy == 0 and adm.queued == 0
