"""Typed application state shared by the handlers."""

from __future__ import annotations

from aiohttp import web

from mirror.logs import REPOSITORY
from mirror.names import parse_name
from mirror.registry import Registry
from mirror.routing import Route

REGISTRY = web.AppKey("registry", Registry)


def route(request: web.Request) -> tuple[Registry, Route]:
    """The registry and the route for `{name}` (validated) with containerd's `?ns=`."""
    registry = request.app[REGISTRY]
    name = parse_name(request.match_info["name"])
    r = registry.route(name, request.query.get("ns"))
    request[REPOSITORY] = r.local
    return registry, r
