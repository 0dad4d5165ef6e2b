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
