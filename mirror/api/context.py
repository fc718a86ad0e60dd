"""Typed application state shared by the handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from mirror.logs import REPOSITORY
from mirror.registry import Registry
from mirror.routing import Route

REGISTRY = web.AppKey("registry", Registry)


def route(request: web.Request) -> tuple[Registry, Route]:
    """The registry and the route for `{name}` (validated) with containerd's `?ns=`."""
    registry = request.app[REGISTRY]
    r = registry.route(request.match_info["name"], request.query.get("ns"))
    request[REPOSITORY] = r.local
    return registry, r


async def push_route(request: web.Request) -> tuple[Registry, Route]:
    """As `route`, for requests that write: DENIED for names that are pull-through caches."""
    registry = request.app[REGISTRY]
    r = await registry.route_for_push(request.match_info["name"], request.query.get("ns"))
    request[REPOSITORY] = r.local
    return registry, r


def body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives, never whole in memory."""
    return request.content.iter_chunked(1 << 20)
