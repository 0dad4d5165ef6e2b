"""Admission control in front of the signing and verification pool.

The pool has a fixed number of workers (one per HSM session, sized to the cores) and one FIFO
queue in front of them, bounded here. A request is judged once, on arrival:

- the queue is full (`queue_size` requests already waiting): 429 `queue_full` at once;
- the queue, at the recent service time per job, would keep it waiting past its deadline
  (250 ms by default): 429 `queue_deadline` at once, rather than after waiting the deadline out;
- otherwise it is admitted and its job goes straight to the workers' queue. A worker takes the
  next job without any round trip through the event loop, so a busy loop never starves the HSM.

The bound counts a request from admission until its response is ready (`Admission.request`), not
only while its job is at the pool: the trip back through the loop and the archive commit take time
too, and under overload they would otherwise pile up unbounded behind the pool. Handlers check
(`Admission.check`) before reading the body and are admitted once it is in: the body read is the
one step whose length the client decides, so a slow upload must not hold a place in the queue.

A job still waiting when its deadline passes is withdrawn (429 `queue_deadline`); one that has
started runs to the end. Refusing early keeps the latency of admitted requests bounded instead
of letting every request get slower under overload.

The counters are touched on the event loop thread only; the service time is written by workers
(one float, a moving average: a lost update is harmless).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class Overloaded(Exception):
    """The admission queue is full, or the request cannot be served before its deadline."""

    def __init__(self, code: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.code = code  # "queue_full" | "queue_deadline"
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class AdmissionStats:
    workers: int
    in_flight: int
    queued: int
    queue_size: int
    admitted: int
    rejected_full: int
    rejected_deadline: int
    service_s: float


class Admission:
    """Bounded admission to a pool of `workers`: at most `queue_size` jobs waiting."""

    def __init__(self, workers: int, queue_size: int, deadline_s: float, retry_after_s: int = 1) -> None:
        if workers < 1:
            raise ValueError("admission needs at least one worker")
        self.workers = workers
        self.queue_size = max(0, queue_size)
        self.deadline_s = deadline_s
        self.retry_after_s = retry_after_s
        self.in_flight = 0  # admitted jobs not finished: running or waiting at the pool
        # Admitted requests not yet answered: besides their job, they wait for the loop and for
        # their commit. Bounding them bounds the latency of admitted requests even
        # when the time goes outside the pool (Little's law: latency = open / throughput).
        self.open_requests = 0
        self.service_s = 0.0  # moving average of one job's run time on a worker
        self.admitted = 0
        self.rejected_full = 0
        self.rejected_deadline = 0
        # Recent event-loop lag (set by the app's lag sampler). An admitted request meets the loop
        # several times (body read, job done, commit done, response), so under overload the lag,
        # not the queue, is what makes it late: it counts against the deadline too.
        self.loop_lag_s = 0.0
        self.loop_hops = 8

    @property
    def busy(self) -> int:
        return min(self.in_flight, self.workers)

    @property
    def queued(self) -> int:
        return max(0, self.in_flight - self.workers)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self.workers, self.in_flight, self.queued, self.queue_size, self.admitted,
                              self.rejected_full, self.rejected_deadline, self.service_s)

    def expected_wait_s(self) -> float:
        """How long a job admitted now would wait: for a worker, at the recent service time, and
        for the event loop at each of its hops."""
        ahead = self.in_flight - self.workers + 1
        queue = 0.0 if ahead <= 0 else ahead * self.service_s / self.workers
        return queue + self.loop_hops * self.loop_lag_s

    def record_loop_lag(self, seconds: float) -> None:
        """Called by the lag sampler; a moving average that reacts within a few samples."""
        self.loop_lag_s += 0.5 * (seconds - self.loop_lag_s)

    def check(self, deadline_s: float | None = None) -> None:
        """Raise Overloaded if a request arriving now would be refused (cheap: before the body
        is read). Does not admit."""
        # Jobs can be admitted without an open request (pool.run called directly).
        self._refuse_if_over(max(self.open_requests, self.in_flight), deadline_s)

    def _refuse_if_over(self, count: int, deadline_s: float | None) -> None:
        if count < self.workers:
            return
        if count >= self.workers + self.queue_size:
            self.rejected_full += 1
            raise Overloaded("queue_full", "the signing queue is full; retry later", self.retry_after_s)
        timeout = self.deadline_s if deadline_s is None else deadline_s
        if self.expected_wait_s() > timeout:
            self.rejected_deadline += 1
            raise Overloaded("queue_deadline",
                             f"the signing queue is longer than {timeout * 1000:.0f} ms; retry later",
                             self.retry_after_s)

    @contextmanager
    def request(self) -> Iterator[None]:
        """Check, then count one request as open until its response is ready."""
        self.check()
        self.open_requests += 1
        try:
            yield
        finally:
            self.open_requests -= 1

    def admit(self, deadline_s: float | None = None) -> None:
        """Admit one job or raise Overloaded. Pair every admit with one `done`."""
        self._refuse_if_over(self.in_flight, deadline_s)
        self.in_flight += 1
        self.admitted += 1

    def done(self) -> None:
        self.in_flight -= 1

    def expired(self, timeout: float) -> Overloaded:
        """The error for a job withdrawn from the queue at its deadline."""
        self.rejected_deadline += 1
        return Overloaded("queue_deadline",
                          f"no signing worker became free within {timeout * 1000:.0f} ms; retry later",
                          self.retry_after_s)

    def record_service(self, seconds: float) -> None:
        """Called by a worker after each job."""
        current = self.service_s
        self.service_s = seconds if current == 0.0 else current + 0.05 * (seconds - current)
