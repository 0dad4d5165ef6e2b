"""The async face of the HSM: `await signer.sign(label, data)` without ever blocking the loop.

A fixed set of worker threads (one per HSM session) takes jobs from one queue. A worker signs
its batch in one call that holds no GIL (`Hsm.sign_batch`, `pkcs11_batch`), so the workers sign
in parallel while the loop keeps serving.
Compared with `loop.run_in_executor` this skips the executor's per-call bookkeeping (futures
wrapped twice, a work item object, a wake-up of an idle thread per call): a busy worker goes from
one job to the next without sleeping. The number of queued jobs is visible (`pending`) so the
admission layer in front can refuse work instead of letting latency grow.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.signing.hsm import Hsm

T = TypeVar("T")

_STOP = object()


def _resolve_all(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():  # cancelled by its caller while queued or running: nobody waits
            continue
        if ok:
            fut.set_result(value)
        elif isinstance(value, StopIteration):
            # A future refuses StopIteration (TypeError), which would leave this caller and every
            # later one of the batch waiting forever; it becomes a RuntimeError, as PEP 479 does.
            error = RuntimeError(f"job raised StopIteration: {value!r}")
            error.__cause__ = value
            fut.set_exception(error)
        else:
            fut.set_exception(value)


_MAX_BATCH = 16


def _take_batch(jobs: queue.SimpleQueue[Any], workers: int) -> list[Any]:
    """The next batch of one worker: the next job, then a fair share of what is waiting (fewer
    loop wake-ups and session borrows when busy, without starving the other workers when not).

    A batch ends at a stop marker. close() queues one per worker behind the last job; the share is
    judged from the queue's size before the other workers take their part, so without this one
    worker could take two markers and leave another waiting for ever (close() then sat out its
    whole join timeout)."""
    batch = [jobs.get()]
    if batch[0] is _STOP:
        return batch
    for _ in range(min(_MAX_BATCH, jobs.qsize() // workers)):
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            break
        batch.append(job)
        if job is _STOP:
            break
    return batch


def _lower_priority(nice: int) -> None:
    """Raise this thread's niceness by `nice` (Linux schedules threads one by one).

    A software token (SoftHSM) signs on the worker's own CPU time, so a saturated machine splits
    the cores between the workers and the event loop. Niced workers leave the loop enough to keep
    reading requests and refusing the excess at once; signing still gets every idle cycle.
    """
    if not sys.platform.startswith("linux"):
        return  # elsewhere PRIO_PROCESS with a thread id would renice the whole process
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError:
        pass  # not permitted in this sandbox: run at the default priority


class AsyncSigner:
    """Bounded pool of worker threads in front of an `Hsm` (or any blocking work)."""

    def __init__(self, hsm: Hsm, workers: int | None = None, nice: int = 0) -> None:
        self.hsm = hsm
        self.workers = workers or hsm.size or (os.cpu_count() or 2)
        self.nice = nice
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending = 0
        self._count_lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"hsm-worker-{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._pending

    def _work(self) -> None:
        if self.nice > 0:
            _lower_priority(self.nice)
        while True:
            batch = _take_batch(self._jobs, self.workers)
            stop = batch[-1] is _STOP
            if stop:
                batch.pop()
            if batch:
                self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[Any]) -> None:
        by_loop: dict[Any, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        # A signature whose caller is gone (cancelled, asyncio.wait_for timed out) is not made: it
        # would spend the token on a result nobody reads, and a burst of timed-out callers kept
        # the workers busy for the ones behind them. done() is one read of the future's state; a
        # cancel coming just after it finds the job made, harmlessly. Other jobs (`submit`) may
        # have effects of their own and always run.
        live = [job for job in batch if job[2] is not None or not job[1].done()]
        if len(live) < len(batch):
            with self._count_lock:
                self._pending -= len(batch) - len(live)
            batch = live
        signs = [job for job in batch if job[2] is None]
        others = [job for job in batch if job[2] is not None]
        if signs:
            try:
                results: list[Any] = self.hsm.sign_batch([job[3] for job in signs])
            except BaseException as exc:  # noqa: BLE001 - handed to every awaiting coroutine
                results = [exc] * len(signs)
            for (loop, fut, _fn, _args), result in zip(signs, results):
                by_loop.setdefault(loop, []).append((fut, not isinstance(result, BaseException), result))
        for loop, fut, fn, args in others:
            try:
                value: Any = fn(*args)
                ok = True
            except BaseException as exc:  # noqa: BLE001
                value, ok = exc, False
            by_loop.setdefault(loop, []).append((fut, ok, value))
        with self._count_lock:
            self._pending -= len(batch)
        for loop, results_of_loop in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, results_of_loop)
            except RuntimeError:  # loop closed while we worked: nobody is waiting
                pass

    def _enqueue(self, fn: Callable[..., Any] | None, args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        # Checked and queued under the lock close() takes: a job queued behind the workers'
        # stop marks would never run and its future would never resolve.
        with self._count_lock:
            if self._closed:
                raise RuntimeError("AsyncSigner is closed")
            self._pending += 1
            self._jobs.put((loop, fut, fn, args))
        return fut

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn(*args)` on a worker; returns a future of the running loop."""
        return self._enqueue(fn, args)

    def sign(self, label: str, data: bytes) -> asyncio.Future[bytes]:
        """Sign on a worker (awaitable). Errors are the Hsm's: KeyNotFound, TokenUnavailable...

        Raises TypeError at once for data that is not bytes: the jobs of a batch are signed in one
        call, and one malformed job would fail every other caller's job batched with it."""
        if not isinstance(label, str) or not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("AsyncSigner.sign takes a str label and bytes data")
        return self._enqueue(None, (label, bytes(data)))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)

    def close(self, timeout: float = 10.0) -> None:
        """Let queued jobs finish, then stop the workers."""
        with self._count_lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
