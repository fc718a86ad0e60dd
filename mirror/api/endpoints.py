"""Routes as data: every endpoint names its API area and the action it needs. Auth, limits,
notifications, metrics and the UI read these off the matched route (`endpoint(request)`), never
off handler modules or paths.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import AbstractRoute

AREAS = ("base", "catalog", "tags", "manifests", "blobs", "uploads", "referrers", "metrics", "ui", "peers")
# What auth asks of the caller: an action on the repository in `{name}`, or one of the others.
ACTIONS = ("pull", "push", "delete", "catalog", "base", "ui", "peer")  # peer: signed by a replica, not a user


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    area: str
    action: str
    name: str | None = None  # for url_for (the UI's links)

    def __post_init__(self) -> None:
        assert self.area in AREAS and self.action in ACTIONS, self


def get(path: str, handler: Handler, area: str, action: str, name: str | None = None) -> list[Endpoint]:
    """GET and its HEAD (aiohttp would add the HEAD route unnamed, without our data)."""
    return [Endpoint("GET", path, handler, area, action, name), Endpoint("HEAD", path, handler, area, action)]


ENDPOINTS = web.AppKey("endpoints", dict[AbstractRoute, Endpoint])


def add(app: web.Application, endpoints: Iterable[Endpoint]) -> None:
    table = app.setdefault(ENDPOINTS, {})
    for e in endpoints:
        route = app.router.add_route(e.method, e.path, e.handler, name=e.name)
        table[route] = e


def endpoint(request: web.Request) -> Endpoint | None:
    """The endpoint that matched, or None (no route: a 404 or 405 follows)."""
    info = request.match_info
    if info.http_exception is not None:
        return None
    return request.app[ENDPOINTS].get(info.route)


def area(request: web.Request) -> str | None:
    found = endpoint(request)
    return found.area if found is not None else None
