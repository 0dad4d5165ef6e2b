"""The async signer's callers are independent: one caller's bad job never fails or strands another's.

Real SoftHSM keys; one worker, held busy with an event, so that the jobs queued meanwhile are taken
as one batch.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest

from gateway.signing.async_signer import _STOP, AsyncSigner, _take_batch
from gateway.signing.hsm import Hsm


async def _held(signer: AsyncSigner) -> threading.Event:
    """Occupy the (single) worker until the returned event is set."""
    release = threading.Event()
    signer.submit(release.wait, 10)
    await asyncio.sleep(0.05)
    return release


async def test_a_job_raising_stop_iteration_fails_alone(hsm: Hsm, ec_key: str) -> None:
    signer = AsyncSigner(hsm, workers=1)
    try:
        release = await _held(signer)
        bad = signer.submit(next, iter(()))  # raises StopIteration, which a future refuses
        good = signer.sign(ec_key, b"order 1")
        release.set()
        # Before: TypeError in the loop callback, both futures never resolved.
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(bad, 5)
        signature = await asyncio.wait_for(good, 5)
        hsm.signer(ec_key).verify(signature, b"order 1")
        assert signer.pending == 0
    finally:
        signer.close()


async def test_a_malformed_sign_job_is_refused_before_it_joins_a_batch(hsm: Hsm, rsa_key: str) -> None:
    signer = AsyncSigner(hsm, workers=1)
    try:
        release = await _held(signer)
        payloads = [b"order %d" % i for i in range(4)]
        queued = [signer.sign(rsa_key, p) for p in payloads]
        with pytest.raises(TypeError):
            signer.sign(rsa_key, "not bytes")  # type: ignore[arg-type]
        release.set()
        # Before: the str went into the batch and all four other callers got its TypeError.
        signatures = await asyncio.wait_for(asyncio.gather(*queued), 10)
        verify = hsm.signer(rsa_key).verify
        for p, s in zip(payloads, signatures):
            verify(s, p)
        assert signer.pending == 0
    finally:
        signer.close()


async def test_cancelled_callers_leave_the_pool_usable(hsm: Hsm, ec_key: str) -> None:
    signer = AsyncSigner(hsm, workers=1)
    try:
        release = await _held(signer)
        queued = [signer.sign(ec_key, b"doc %d" % i) for i in range(6)]
        for fut in queued[:3]:
            fut.cancel()  # their callers went away while the jobs were queued
        release.set()
        signatures = await asyncio.wait_for(asyncio.gather(*queued[3:]), 10)
        assert len(signatures) == 3 and signer.pending == 0
        hsm.signer(ec_key).verify(await signer.sign(ec_key, b"after"), b"after")
    finally:
        signer.close()


def test_a_batch_takes_at_most_one_stop_marker() -> None:
    """close() queues one stop marker per worker behind the last job. A worker's share is judged
    from the queue's size; when another worker has meanwhile taken the jobs in front, the share
    reached into the markers and one worker took two, leaving another waiting for ever."""
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    for item in ("job", _STOP, _STOP):  # as left after another worker took the jobs between
        jobs.put(item)
    assert _take_batch(jobs, workers=1) == ["job", _STOP]
    assert _take_batch(jobs, workers=1) == [_STOP]
    jobs.put(_STOP)
    jobs.put(_STOP)
    assert _take_batch(jobs, workers=1) == [_STOP]  # a marker first is a batch of its own
    assert jobs.qsize() == 1


def test_close_stops_every_worker_at_once(hsm: Hsm, ec_key: str) -> None:
    signer = AsyncSigner(hsm, workers=3)

    async def busy() -> None:
        await asyncio.gather(*(signer.sign(ec_key, b"doc %d" % i) for i in range(200)))

    asyncio.run(busy())
    started = time.monotonic()
    signer.close(timeout=10)
    assert time.monotonic() - started < 5
    assert not any(thread.is_alive() for thread in signer._threads)
