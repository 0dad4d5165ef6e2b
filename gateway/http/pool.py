"""The bounded pool that runs signing and verification, behind admission control.

Signing a document is one blocking job (canonicalise, digest, HSM signature), run on one of the
`AsyncSigner`'s worker threads: one thread hop per request, no more. The workers match the HSM
sessions (one per core). Admitted jobs go straight to the workers' queue; admission control
(gateway.http.admission) bounds that queue and refuses, at once, what could not be served in time.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.http.admission import Admission

T = TypeVar("T")

# Seconds the current request's job waited for a worker (for its access log line).
queued_s_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("queued_s", default=None)


class _Withdrawn(Exception):
    """A job whose deadline passed before a worker took it (never seen outside this module)."""


def _withdraw(claim: list[bool], fut: asyncio.Future[Any], flag: list[bool]) -> None:
    """Deadline timer: withdraw the job unless a worker has already started it."""
    try:
        claim.pop()  # atomic: exactly one of this and the worker gets the job
    except IndexError:
        return  # running: it finishes
    flag.append(True)
    fut.cancel()


class WorkPool:
    def __init__(self, admission: Admission, signer: Any) -> None:
        self.admission = admission
        self.signer = signer  # gateway.signing.async_signer.AsyncSigner

    @property
    def workers(self) -> int:
        return self.signer.workers

    async def run(self, fn: Callable[..., T], *args: Any, deadline_s: float | None = None) -> T:
        """Run `fn(*args)` on a worker; Overloaded (429) when refused or past the deadline."""
        admission = self.admission
        admission.admit(deadline_s)
        timeout = admission.deadline_s if deadline_s is None else deadline_s
        claim = [True]
        withdrawn: list[bool] = []
        enqueued = time.monotonic()
        # The worker runs the job in this request's context, so that anything it logs carries
        # the request id.
        context = contextvars.copy_context()

        def job() -> tuple[T, float]:
            try:
                claim.pop()
            except IndexError:
                raise _Withdrawn() from None
            started = time.monotonic()
            try:
                return context.run(fn, *args), started - enqueued
            finally:
                admission.record_service(time.monotonic() - started)

        try:
            fut = self.signer.submit(job)
            timer = asyncio.get_running_loop().call_later(timeout, _withdraw, claim, fut, withdrawn)
            try:
                result, queued = await fut
            except asyncio.CancelledError:
                if withdrawn:
                    raise admission.expired(timeout) from None
                raise
            finally:
                timer.cancel()
        finally:
            admission.done()
        queued_s_var.set(queued)
        return result
