"""Admission control in front of the signing and verification pool.

The pool has a fixed number of slots (one per worker, sized to the cores). In front of it sits a
bounded FIFO queue. A request that finds the queue full is refused at once with 429 and
`Retry-After`; a request that waits longer than the queueing deadline (250 ms by default) is
refused the same way. Refusing early keeps the latency of admitted requests bounded instead of
letting every request get slower under overload.

Everything here runs on the event loop thread: no locks, only futures.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


class Overloaded(Exception):
    """The admission queue is full, or the request waited past its deadline."""

    def __init__(self, code: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.code = code  # "queue_full" | "queue_deadline"
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class _Expired(Exception):
    """The queueing deadline passed (internal: becomes Overloaded("queue_deadline"))."""


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_Expired())


@dataclass(frozen=True)
class AdmissionStats:
    slots: int
    busy: int
    queued: int
    queue_size: int
    admitted: int
    rejected_full: int
    rejected_deadline: int


class Admission:
    """A counting semaphore with a bounded FIFO wait queue and a per-request queueing deadline."""

    def __init__(self, slots: int, queue_size: int, deadline_s: float, retry_after_s: int = 1,
                 on_change: Callable[[int, int], None] | None = None) -> None:
        if slots < 1:
            raise ValueError("admission needs at least one slot")
        self.slots = slots
        self.queue_size = max(0, queue_size)
        self.deadline_s = deadline_s
        self.retry_after_s = retry_after_s
        self._free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._on_change = on_change  # (busy, queued) -> None, for the metrics gauges
        self.admitted = 0
        self.rejected_full = 0
        self.rejected_deadline = 0
        # Moving average of how long a slot is held: with it, a request that could only be served
        # after its deadline is refused on arrival rather than after waiting the deadline out.
        self.hold_s = 0.0

    @property
    def busy(self) -> int:
        return self.slots - self._free

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self.slots, self.busy, self.queued, self.queue_size, self.admitted,
                              self.rejected_full, self.rejected_deadline)

    def expected_wait_s(self) -> float:
        """How long a request arriving now would queue, judged by recent slot hold times."""
        if self._free > 0 and not self._waiters:
            return 0.0
        return (len(self._waiters) + 1) * self.hold_s / self.slots

    def check(self, deadline_s: float | None = None) -> None:
        """Refuse now a request that would find the queue full or could not be served before its
        deadline. Cheap: called before the body is read."""
        if self._free > 0 and not self._waiters:
            return
        if len(self._waiters) >= self.queue_size:
            self.rejected_full += 1
            raise Overloaded("queue_full", "the signing queue is full; retry later", self.retry_after_s)
        timeout = self.deadline_s if deadline_s is None else deadline_s
        if self.expected_wait_s() > timeout:
            self.rejected_deadline += 1
            raise Overloaded("queue_deadline", f"the queue is longer than {timeout * 1000:.0f} ms; retry later",
                             self.retry_after_s)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.busy, self.queued)

    async def acquire(self, deadline_s: float | None = None) -> float:
        """Take a slot; returns the seconds spent queueing. Raises Overloaded."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            self.admitted += 1
            self._changed()
            return 0.0
        self.check(deadline_s)
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self._changed()
        timeout = self.deadline_s if deadline_s is None else deadline_s
        # A timer, not wait_for: no extra task per queued request on the hot path.
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        except _Expired:
            self._forget(waiter)
            self.rejected_deadline += 1
            raise Overloaded("queue_deadline",
                             f"no signing worker became free within {timeout * 1000:.0f} ms; retry later",
                             self.retry_after_s) from None
        except asyncio.CancelledError:
            timer.cancel()
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release_slot()  # handed over just as we were cancelled: pass it on
            else:
                self._forget(waiter)
            self._changed()
            raise
        timer.cancel()
        self.admitted += 1
        self._changed()
        return loop.time() - started

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        self._changed()

    def _release_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the oldest waiter
                return
        self._free += 1

    def release(self) -> None:
        self._release_slot()
        self._changed()

    @asynccontextmanager
    async def slot(self, deadline_s: float | None = None) -> AsyncIterator[float]:
        waited = await self.acquire(deadline_s)
        started = time.monotonic()
        try:
            yield waited
        finally:
            held = time.monotonic() - started
            self.hold_s = held if self.hold_s == 0.0 else self.hold_s + 0.05 * (held - self.hold_s)
            self.release()
