"""The bounded pool that runs signing and verification, behind admission control.

Signing a document is one blocking job (canonicalise, digest, HSM signature), run on one of the
`AsyncSigner`'s worker threads: one thread hop per request, no more. The workers match the HSM
sessions (one per core); admission control keeps the running jobs at that number and the queue
in front of them bounded, so overload turns into quick 429s rather than growing latency.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from gateway.http.admission import Admission

T = TypeVar("T")


class WorkPool:
    def __init__(self, admission: Admission, signer: Any) -> None:
        self.admission = admission
        self.signer = signer  # gateway.signing.async_signer.AsyncSigner

    @property
    def workers(self) -> int:
        return self.signer.workers

    async def run(self, fn: Callable[..., T], *args: Any, deadline_s: float | None = None) -> T:
        """Queue for a worker (429 when the queue is full or the deadline passes), then run `fn`."""
        async with self.admission.slot(deadline_s):
            return await self.signer.run(fn, *args)
