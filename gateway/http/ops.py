"""Operations endpoints: liveness, readiness, metrics and the OpenAPI document. No token needed."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from gateway.http import keys
from gateway.http.errors import ApiError
from gateway.http.metrics import CONTENT_TYPE_LATEST
from gateway.http.routes import PUBLIC, Route


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready = not draining, a real HSM signature verifies, and a database write commits."""
    app = request.app
    retry = app[keys.SETTINGS].server.retry_after_s
    if app[keys.STATE].draining:
        raise ApiError("shutting_down", retry_after_s=retry)
    checks: dict[str, str] = {}
    label = app[keys.STATE].ready_key
    if label is None:
        raise ApiError("hsm_unavailable", "no key on the token to probe with", retry_after_s=retry)
    try:
        # Through the pool like any signature, but without the queueing deadline: a probe that
        # waits behind real work is still an honest answer.
        await app[keys.POOL].run(app[keys.HSM].probe, label, deadline_s=5.0)
        checks["hsm"] = "ok"
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the code says which
        if getattr(exc, "code", "") in ("queue_full", "queue_deadline"):
            raise
        code = "hsm_login_failed" if getattr(exc, "code", "") == "hsm_login_failed" else "hsm_unavailable"
        raise ApiError(code, f"HSM probe failed: {exc}", retry_after_s=retry,
                       details={"checks": checks}) from exc
    try:
        await asyncio.wait_for(app[keys.STORAGE].health_check(), 5.0)
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - whatever the database says, it is not ready
        raise ApiError("database_unavailable", f"database write failed: {type(exc).__name__}: {exc}",
                       retry_after_s=retry, details={"checks": checks}) from exc
    return web.json_response({"status": "ready", "checks": checks})


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    admission = app[keys.ADMISSION]
    app[keys.METRICS].set_pool_gauges(admission.busy, admission.queued)
    # The exposition format's version travels in the media type (Prometheus 3 asks for it).
    return web.Response(body=app[keys.METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    from gateway.http.openapi import build_openapi  # the document is built once per app

    doc = request.app[keys.STATE].extra.get("openapi")
    if doc is None:
        doc = json.dumps(build_openapi(list(request.app[keys.ROUTE_TABLE].values())), indent=1).encode()
        request.app[keys.STATE].extra["openapi"] = doc
    return web.Response(body=doc, content_type="application/json")


_TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}

ROUTES: list[Route] = [
    Route("GET", "/healthz", "healthz", healthz, "Liveness: the process answers.", PUBLIC,
          responses={200: {"description": "alive", "schema": {"type": "object"}}}, tags=("operations",)),
    Route("GET", "/readyz", "readyz", readyz,
          "Readiness: a real HSM signature (verified with the public key) and a database write.",
          PUBLIC, responses={200: {"description": "ready", "schema": {"type": "object"}}},
          errors=("hsm_unavailable", "hsm_login_failed", "database_unavailable", "shutting_down", "queue_full",
                  "queue_deadline"),
          tags=("operations",)),
    Route("GET", "/metrics", "metrics", metrics, "Prometheus metrics (text exposition format).",
          PUBLIC, responses={200: {"description": "metrics", **_TEXT}}, tags=("operations",)),
    Route("GET", "/v1/openapi.json", "openapi", openapi, "This OpenAPI 3.1 document.", PUBLIC,
          responses={200: {"description": "the OpenAPI document", "schema": {"type": "object"}}},
          tags=("operations",)),
]
