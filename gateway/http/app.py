"""The application factory: `create_app(settings) -> web.Application`.

Resources with a lifetime (HSM sessions, the signing pool, storage, the trust store, the client
cache) are opened and closed in `cleanup_ctx` generators, in that order, and closed in reverse:
the pool stops only after in-flight requests are drained, and storage closes last so the final
group commit lands. Tests pass their own `hsm` / `storage`, which the app then leaves open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.config import Settings
from gateway.http import keys
from gateway.http.admission import Admission
from gateway.http.auth import ClientCache, RefusalThrottle
from gateway.http.bodies import expect_continue
from gateway.http.metrics import Metrics
from gateway.http.middleware import (ParserErrorFilter, bypass_access_logger, context, guard,
                                     stamp_request_id)
from gateway.http.pool import WorkPool
from gateway.http.routes import Route, all_routes

log = logging.getLogger("gateway.http")


def create_app(settings: Settings, *, hsm: Any = None, storage: Any = None, trust: Any = None,
               workers: int | None = None, auth_cache_ttl_s: float = 1.0,
               routes: list[Route] | None = None) -> web.Application:
    """Build the gateway application. Nothing is opened until the app starts."""
    server = settings.server
    metrics = Metrics.create()
    # Responses aiohttp makes without the middlewares (requests its parser refuses, an unknown
    # Expect) get a request id, a JSON access line and a count here, and no traceback.
    protocol_log = logging.getLogger("gateway.http.protocol")
    if not any(isinstance(f, ParserErrorFilter) for f in protocol_log.filters):
        protocol_log.addFilter(ParserErrorFilter())
    app = web.Application(middlewares=[context, guard], client_max_size=server.max_body_bytes,
                          handler_args={"max_field_size": 16384, "keepalive_timeout": server.idle_timeout_s,
                                        "access_log_class": bypass_access_logger(metrics),
                                        "access_log": logging.getLogger("gateway.http.access"),
                                        "logger": protocol_log})
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics
    app[keys.STATE] = keys.ServerState()
    app.on_response_prepare.append(stamp_request_id)
    table = routes if routes is not None else all_routes()
    app[keys.ROUTE_TABLE] = {r.name: r for r in table}
    for route in table:
        added = app.router.add_route(route.method, route.path, route.handler, name=route.name,
                                     expect_handler=expect_continue)
        if route.method == "GET":
            # HEAD answers as GET without the body (load balancers, curl -I). On the same resource,
            # so it has the route's name and `guard` applies the same token and role checks.
            added.resource.add_route("HEAD", route.handler, expect_handler=expect_continue)

    app.cleanup_ctx.append(_storage_ctx(storage))
    app.cleanup_ctx.append(_hsm_ctx(hsm, workers))
    app.cleanup_ctx.append(_checkpointer_ctx)
    app.cleanup_ctx.append(_trust_ctx(trust))
    app.cleanup_ctx.append(_clients_ctx(auth_cache_ttl_s))
    app.cleanup_ctx.append(_loop_lag_ctx)
    app.on_shutdown.append(_start_draining)
    return app


async def _start_draining(app: web.Application) -> None:
    # Readiness turns 503 at once so a load balancer stops sending; in-flight requests finish.
    app[keys.STATE].draining = True
    log.info("draining", extra={"in_flight": app[keys.STATE].in_flight})


def _storage_ctx(given: Any):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if given is not None:
            app[keys.STORAGE] = given
            yield
            return
        from gateway.storage import open_storage

        storage = open_storage(app[keys.SETTINGS])
        await storage.open()
        app[keys.STORAGE] = storage
        try:
            yield
        finally:
            await storage.close()
    return ctx


def _hsm_ctx(given: Any, workers: int | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from gateway.signing.async_signer import AsyncSigner
        from gateway.signing.hsm import Hsm

        settings = app[keys.SETTINGS]
        loop = asyncio.get_running_loop()
        hsm = given if given is not None else await loop.run_in_executor(None, Hsm.open, settings)
        n = workers or settings.hsm.workers or hsm.size
        # Load the workers' compiled signing loop before the first request can queue behind it.
        await loop.run_in_executor(None, hsm.warm_up_batches)
        signer = AsyncSigner(hsm, workers=n, nice=settings.hsm.worker_nice)
        # (The queue and pool gauges are read at scrape time, in /metrics, not set per request.)
        admission = Admission(workers=signer.workers, queue_size=settings.server.queue_size,
                              deadline_s=settings.server.queue_deadline_ms / 1000,
                              retry_after_s=settings.server.retry_after_s)
        app[keys.HSM] = hsm
        app[keys.ADMISSION] = admission
        app[keys.POOL] = WorkPool(admission, signer)
        app[keys.STATE].ready_key = await loop.run_in_executor(None, _probe_key, hsm, settings)
        try:
            yield
        finally:
            await loop.run_in_executor(None, signer.close)
            if given is None:
                await loop.run_in_executor(None, hsm.close)
    return ctx


async def _checkpointer_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sign an audit checkpoint with the HSM audit key every N records or T seconds
    (`[audit] checkpoint_every_records`, `checkpoint_every_seconds`), and once more on the way out.

    21 CFR 1311.150 wants audit records protected from modification and deletion: the hash chain
    shows an edit, a signed checkpoint shows a rewrite of the chain itself.
    """
    from gateway.audit import AUDIT_KEY_LABEL, AuditKey, Checkpointer
    from gateway.signing.errors import HsmError

    settings = app[keys.SETTINGS]
    conf = settings.section("audit")
    loop = asyncio.get_running_loop()
    try:
        signer = await loop.run_in_executor(None, app[keys.HSM].signer, conf.get("key", AUDIT_KEY_LABEL))
    except HsmError as exc:
        log.warning("no audit key: audit checkpoints are not signed (%s)", exc)
        yield
        return
    checkpointer = Checkpointer(app[keys.STORAGE], AuditKey.from_signer(signer),
                                every_records=int(conf.get("checkpoint_every_records", 1000)),
                                every_seconds=float(conf.get("checkpoint_every_seconds", 300)))
    checkpointer.start()
    try:
        yield
    finally:
        await checkpointer.stop(final=True)


def _probe_key(hsm: Any, settings: Settings) -> str | None:
    """The key the readiness probe signs with: `[server] ready_key` in extra, else the first key."""
    wanted = settings.section("readiness").get("key")
    if wanted:
        return str(wanted)
    found = hsm.list_keys()
    return found[0].label if found else None


def _trust_ctx(given: Any):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if given is not None:
            app[keys.TRUST] = given
        else:
            app[keys.TRUST] = await asyncio.get_running_loop().run_in_executor(
                None, load_trust, app[keys.SETTINGS])
        yield
    return ctx


def load_trust(settings: Settings) -> Any:
    """The trust store for verification: the CA bundle and the CRL directory of the home's PKI.

    None when there is no bundle yet (verification then answers 503 trust_unavailable).
    """
    from gateway.signing import validation

    bundle = settings.trust_bundle_path
    if not bundle.exists():
        log.warning("no trust bundle at %s: verification is unavailable, and keys sign without "
                    "their certificates being checked", bundle)
        return None
    return validation.load_trust(bundle, settings.pki_dir / "crl")


LAG_SAMPLE_S = 0.025


async def _loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sample the event loop's lag every 25 ms: under overload it is what admitted requests wait
    at every hop (request read, job done, commit done), so admission control counts it."""
    histogram = app[keys.METRICS].loop_lag
    loop = asyncio.get_running_loop()

    admission = app.get(keys.ADMISSION)

    async def sample() -> None:
        while True:
            due = loop.time() + LAG_SAMPLE_S
            await asyncio.sleep(LAG_SAMPLE_S)
            lag = max(0.0, loop.time() - due)
            histogram.observe(lag)
            if admission is not None:
                admission.record_loop_lag(lag)

    task = asyncio.create_task(sample(), name="loop-lag")
    try:
        yield
    finally:
        task.cancel()


def _clients_ctx(ttl_s: float):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from gateway.clients import authenticate

        storage = app[keys.STORAGE]

        async def lookup(token: str):
            return await authenticate(storage, token)

        app[keys.CLIENTS] = ClientCache(lookup, ttl_s=ttl_s)
        conf = app[keys.SETTINGS].section("audit")
        throttle = RefusalThrottle(burst=int(conf.get("refusal_burst", 20)),
                                   window_s=float(conf.get("refusal_window_s", 60)))
        app[keys.REFUSALS] = throttle

        async def expire() -> None:
            while True:
                await asyncio.sleep(throttle.window_s / 4)
                closed = throttle.expire()
                if closed:
                    try:
                        await storage.append_audit(*closed)
                    except Exception:  # noqa: BLE001 - keep summarising; the database may be back later
                        log.exception("could not write %d refusal summaries", len(closed))

        task = asyncio.create_task(expire(), name="refusal-summaries")
        try:
            yield
        finally:
            task.cancel()
            closed = throttle.flush()
            if closed:
                try:
                    await storage.append_audit(*closed)
                except Exception:  # noqa: BLE001 - the database is down at shutdown: say so, close the rest
                    log.exception("could not write %d refusal summaries at shutdown", len(closed))
    return ctx
