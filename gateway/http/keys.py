"""Typed application keys: the resources an app holds for its lifetime."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.http.admission import Admission
    from gateway.http.auth import ClientCache
    from gateway.http.metrics import Metrics
    from gateway.http.pool import WorkPool
    from gateway.http.routes import Route


@dataclass
class ServerState:
    """Mutable, loop-thread-only state of one server process."""

    draining: bool = False
    in_flight: int = 0
    ready_key: str | None = None  # the HSM key the readiness probe signs with
    extra: dict[str, Any] = field(default_factory=dict)


SETTINGS = web.AppKey("settings", "Settings")
HSM = web.AppKey("hsm", object)
STORAGE = web.AppKey("storage", object)
TRUST = web.AppKey("trust", object)
POOL = web.AppKey("pool", "WorkPool")
ADMISSION = web.AppKey("admission", "Admission")
METRICS = web.AppKey("metrics", "Metrics")
CLIENTS = web.AppKey("clients", "ClientCache")
REFUSALS = web.AppKey("refusals", "RefusalThrottle")
ROUTE_TABLE = web.AppKey("route_table", dict)
STATE = web.AppKey("state", ServerState)

# Per-request values set by the middlewares.
REQUEST_ID = web.RequestKey("request_id", str)
CLIENT = web.RequestKey("client", object)  # gateway.storage.base.Client, set by `guard`
ROUTE = web.RequestKey("route", object)  # gateway.http.routes.Route
# The client sent `Expect: 100-continue` and has not been told to send its body yet
# (gateway.http.bodies sends the 100 when a handler reads the body).
EXPECTS_CONTINUE = web.RequestKey("expects_continue", bool)
