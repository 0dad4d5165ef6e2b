"""The route table: every endpoint, who may call it, what it accepts and what it can answer.

One table drives the router, the authentication/role middleware, the content-type and body checks
and the OpenAPI document, so the documentation cannot drift from what the server enforces.
Domain modules add their own `Route` lists (gateway/http/<domain>.py) to `ROUTE_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ROLES: tuple[str, ...] = ("purchaser", "supplier", "prescriber_app", "pharmacy", "compliance", "admin")
ANY_ROLE: frozenset[str] = frozenset(ROLES)
PUBLIC: frozenset[str] = frozenset()  # no authentication at all

XML_TYPES: tuple[str, ...] = ("application/xml", "text/xml")
JSON_TYPES: tuple[str, ...] = ("application/json",)
ANY_TYPE: tuple[str, ...] = ("*/*",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "query" | "path"
    description: str
    required: bool = False
    enum: tuple[str, ...] = ()
    schema_type: str = "string"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    name: str
    handler: Handler
    summary: str
    roles: frozenset[str]  # PUBLIC: no token needed; otherwise the roles allowed
    body_types: tuple[str, ...] = ()  # accepted request content types; () means no body
    params: tuple[Param, ...] = ()
    responses: dict[int, dict[str, Any]] = field(default_factory=dict)  # status -> OpenAPI response
    errors: tuple[str, ...] = ()  # error codes this route may answer besides the common ones
    tags: tuple[str, ...] = ()
    admitted: bool = False  # runs on the bounded signing/verification pool

    @property
    def public(self) -> bool:
        return not self.roles


# Modules that contribute routes: each has `ROUTES: list[Route]`.
ROUTE_MODULES: tuple[str, ...] = (
    "gateway.http.ops",
    "gateway.http.documents",
    "gateway.http.csos",
    "gateway.http.prescriptions",
    "gateway.http.som",
)


def all_routes() -> list[Route]:
    routes: list[Route] = []
    for name in ROUTE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a domain whose HTTP module has not landed
            if exc.name != name:
                raise
            continue
        routes.extend(module.ROUTES)
    names = [r.name for r in routes]
    if len(names) != len(set(names)):
        raise RuntimeError(f"duplicate route names: {sorted(n for n in names if names.count(n) > 1)}")
    return routes
