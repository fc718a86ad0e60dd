"""Typed application state shared by the handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from mirror.config import LimitsConfig
from mirror.registry.namespace import Route
from mirror.server.logs import REPOSITORY
from mirror.service import REGISTRY, Registry

__all__ = ["LIMITS", "REGISTRY", "ROUTE", "ClientStalled", "body", "pull_route", "push_route", "route"]

log = logging.getLogger("mirror.api")
LIMITS = web.AppKey("limits", LimitsConfig)
ROUTE = web.RequestKey("route", Route)
BODY_CHUNK = 1 << 20


class ClientStalled(ConnectionResetError):
    """The client sent a request body too slowly (nothing, or a drip: less than limits.body_min_bytes
    in a limits.body_timeout): its connection is cut (what an upload received so far stays,
    reported by its Range)."""


async def route(request: web.Request) -> Route:
    """The repository `{name}` with containerd's `?ns=` resolves to, once per request (auth asks first)."""
    found = request.get(ROUTE)
    if found is None:
        found = request[ROUTE] = await request.app[REGISTRY].resolve(request.match_info["name"],
                                                                     request.query.get("ns"))
        request[REPOSITORY] = found.local
    return found


async def pull_route(request: web.Request) -> tuple[Registry, Route]:
    """The registry, and the repository a pull or a delete names."""
    return request.app[REGISTRY], await route(request)


async def push_route(request: web.Request) -> tuple[Registry, Route]:
    """The registry, and the private repository a push writes to (claimed if it is claimable);
    DENIED for every spelling of a pull-through cache."""
    registry = request.app[REGISTRY]
    r = await registry.resolve_for_push(request.match_info["name"], request.query.get("ns"))
    request[REPOSITORY] = r.local
    return registry, r


async def body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives, never whole in memory. Every limits.body_timeout must bring
    at least limits.body_min_bytes (and at least a byte): a body that stalls, or drips to hold a
    slot, is cut."""
    limits = request.app[LIMITS]
    window, least = limits.body_timeout, max(1, limits.body_min_bytes)
    loop = asyncio.get_running_loop()
    deadline, got = loop.time() + window, 0  # the current window, and what it brought
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk: bytes | None = await request.content.read(BODY_CHUNK)
        except TimeoutError:
            chunk = None  # the window ended while waiting
        if chunk == b"":
            return
        if chunk is not None:
            got += len(chunk)
            yield chunk
        if loop.time() >= deadline:
            if got < least:
                log.info("%s %s: %d body bytes in %.0fs from %s (limits.body_min_bytes %d), cutting",
                         request.method, request.path, got, window, request.remote, least)
                # the errors middleware cuts the connection once the handler kept what arrived
                raise ClientStalled(f"request body sent {got} bytes in {window:.0f}s, less than {least}")
            deadline, got = loop.time() + window, 0
