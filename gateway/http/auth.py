"""Bearer-token authentication with a short-lived cache, and the audit of refusals.

Token checking (`gateway.clients.authenticate`) hashes the token and reads the client from the
database. The fast path cannot afford that on every request, so successful lookups are cached by
the SHA-256 of the token for a short time (`ttl_s`, one second by default): a revocation or key
change (`gateway clients`, another process) takes effect within that time. Failed lookups are never cached, so a client created a moment ago works at once.
The same holds for a request already in flight: signing asks the cache again once the body is in
and once the signature is made (gateway.http.documents), so a revocation or a withdrawn key grant
is not outlived by a slow upload or a wait in the queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.storage.base import AuditEvent, Client

log = logging.getLogger("gateway.http.auth")

Authenticate = Callable[[str], Awaitable[Client | None]]


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` value (scheme case-insensitive), else None."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ClientCache:
    def __init__(self, authenticate: Authenticate, ttl_s: float = 1.0, max_entries: int = 10_000) -> None:
        self._authenticate = authenticate
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[Client, float]] = {}
        self._pending: dict[bytes, asyncio.Future[Client | None]] = {}

    async def client(self, token: str) -> Client | None:
        key = hashlib.sha256(token.encode()).digest()
        hit = self._entries.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        # One database lookup per token at a time: when an entry expires under load, hundreds of
        # requests carrying the same token would otherwise all miss together.
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Client | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            client = await self._authenticate(token)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters get it, nobody else needs to
            raise
        finally:
            del self._pending[key]
        fut.set_result(client)
        if client is None or not client.active:
            self._entries.pop(key, None)
            return None
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # simple bound; the cache refills in one TTL
        self._entries[key] = (client, time.monotonic() + self.ttl_s)
        return client


def refusal_event(event_type: str, actor: str, *, subject: str | None, request_id: str | None,
                  **details: Any) -> AuditEvent:
    """An audit event for a refused request (21 CFR 1311.150: attempted unauthorized access)."""
    return AuditEvent(event_type=event_type, actor=actor, outcome="refused", subject=subject,
                      details=details, request_id=request_id)


class RefusalThrottle:
    """Bounds how many refusals of unauthenticated callers are audited one by one.

    Every refused request is an audit event (21 CFR 1311.150: attempted unauthorized access), and
    each costs a durable commit; a flood of bad tokens would otherwise grow the trail and the
    database as fast as it arrives. Per peer address, the first `burst` refusals of a window are
    audited individually; the rest are counted and written as one `auth.refused.suppressed` event
    (peer, count, codes, first and last time) when the window closes, when the peer is refused
    again after it, or on shutdown. So the trail still says what happened, in bounded space.
    """

    def __init__(self, burst: int = 20, window_s: float = 60.0, max_peers: int = 10_000) -> None:
        self.burst = burst
        self.window_s = window_s
        self.max_peers = max_peers
        self._windows: dict[str, dict[str, Any]] = {}

    def _summary(self, peer: str, w: dict[str, Any]) -> AuditEvent | None:
        if not w["suppressed"]:
            return None
        return AuditEvent(event_type="auth.refused.suppressed", actor="anonymous", outcome="refused",
                          subject=peer, details={"peer": peer, "count": w["suppressed"],
                                                 "codes": dict(sorted(w["codes"].items())),
                                                 "first": w["first"], "last": w["last"],
                                                 "window_s": self.window_s})

    def refusal(self, peer: str, code: str, now: float | None = None) -> tuple[bool, list[AuditEvent]]:
        """(audit this refusal individually?, summary events of windows that closed)."""
        now = time.time() if now is None else now
        closed: list[AuditEvent] = []
        w = self._windows.get(peer)
        if w is not None and now - w["start"] >= self.window_s:
            summary = self._summary(peer, self._windows.pop(peer))
            if summary is not None:
                closed.append(summary)
            w = None
        if w is None:
            if len(self._windows) >= self.max_peers:
                closed.extend(self.expire(now))
                if len(self._windows) >= self.max_peers:
                    peer = "*"  # too many peers at once: count the rest together
            w = self._windows.setdefault(peer, {"start": now, "audited": 0, "suppressed": 0,
                                                "codes": {}, "first": None, "last": None})
        if w["audited"] < self.burst:
            w["audited"] += 1
            return True, closed
        w["suppressed"] += 1
        w["codes"][code] = w["codes"].get(code, 0) + 1
        stamp = round(now, 3)
        w["first"] = w["first"] or stamp
        w["last"] = stamp
        return False, closed

    def expire(self, now: float | None = None) -> list[AuditEvent]:
        """Close the windows that are over; their summaries."""
        now = time.time() if now is None else now
        out = []
        for peer in [p for p, w in self._windows.items() if now - w["start"] >= self.window_s]:
            summary = self._summary(peer, self._windows.pop(peer))
            if summary is not None:
                out.append(summary)
        return out

    def flush(self) -> list[AuditEvent]:
        """Every open window's summary (on shutdown)."""
        out = [s for s in (self._summary(p, w) for p, w in self._windows.items()) if s is not None]
        self._windows.clear()
        return out
