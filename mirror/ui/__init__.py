"""The web UI at /ui/ (config `ui.enabled`): repositories, tags, manifests, the cache overview and
deletes, server-rendered with Jinja2 (autoescaped: names, labels and annotations come from
untrusted images), served on the API's port behind the same auth.

`setup(app)` adds the routes, the templates and the catalog's lifecycle; `track` is the API
middleware that tells the catalog about pulls; the registry's stores tell it what changed in storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import AsyncIterator, Callable

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api import endpoints
from mirror.api.endpoints import Endpoint, get
from mirror.config import Config
from mirror.server.logs import REPOSITORY
from mirror.server.state import INDEX, STORAGE
from mirror.service import REGISTRY
from mirror.ui import guard, views
from mirror.ui.images import Images
from mirror.ui.snapshot import Catalog

NAME = "/ui/repo/{name:.+}"
ROUTES: list[Endpoint] = [
    *get("/ui", views.root, "ui", "ui"),
    *get("/ui/", views.repositories, "ui", "ui", name="ui_repositories"),
    *get("/ui/overview", views.overview, "ui", "ui", name="ui_overview"),
    *get("/ui/login", views.login, "ui", "ui", name="ui_login"),
    *get("/ui/static/{file}", views.static, "ui", "ui", name="ui_static"),
    *get("/ui/api/repositories", views.api_repositories, "ui", "ui"),
    *get("/ui/api/overview", views.api_overview, "ui", "ui"),
    *get(f"{NAME}/-/manifest/{{digest}}", views.manifest, "ui", "ui", name="ui_manifest"),
    *get(f"{NAME}/-/delete", views.confirm_delete, "ui", "ui", name="ui_confirm_delete"),
    Endpoint("POST", f"{NAME}/-/delete", views.delete, "ui", "ui", name="ui_delete"),
    *get(NAME, views.repository, "ui", "ui", name="ui_repository"),
]


def human_size(value: float | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def ago(at: float | None) -> str:
    if not at:
        return "never"
    seconds = max(0.0, time.time() - at)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds // length:.0f} {unit} ago"
    return "just now"


def timestamp(at: float | None) -> str:
    if not at:
        return ""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def created(value: str | None) -> str:
    """An image config's RFC 3339 `created`, to the second."""
    if not value:
        return "-"
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value[:40]
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(datetime.UTC)
    return parsed.strftime("%Y-%m-%d %H:%M:%S UTC" if parsed.tzinfo else "%Y-%m-%d %H:%M:%S")


def short(digest: str | None) -> str:
    return digest.split(":", 1)[-1][:12] if digest else ""


def percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f} %"


def setup(app: web.Application, config: Config) -> None:
    """Add the UI to `app` (call after the state's cleanup_ctx: the catalog needs the registry)."""
    filters: dict[str, Callable[..., str]] = {"size": human_size, "ago": ago, "timestamp": timestamp,
                                              "created": created, "short": short, "percent": percent}
    env = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("mirror.ui", "templates"), autoescape=True,
                               filters=filters)
    # `:` is a plain path character: digests stay readable in links (yarl quotes it)
    env.globals["url"] = lambda route, **parts: str(app.router[route].url_for(**parts)).replace("%3A", ":")
    app[guard.SECRET] = guard.secret(config.http.secret)
    endpoints.add(app, ROUTES)
    app.cleanup_ctx.append(_catalog)


async def _catalog(app: web.Application) -> AsyncIterator[None]:
    registry = app[REGISTRY]
    catalog = Catalog(app[STORAGE], app[INDEX], registry.classify, registry.upstream_of)
    registry.watch(catalog.changed)
    app[views.CATALOG] = catalog
    app[views.IMAGES] = Images(registry)
    task = asyncio.create_task(catalog.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@web.middleware
async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The catalog hears of every manifest GET (last pulled); what changes in storage it hears from the
    registry's stores (Registry.watch)."""
    response = await handler(request)
    found = endpoints.endpoint(request)
    if found is not None and found.area == "manifests" and request.method == "GET" and response.status == 200:
        request.app[views.CATALOG].pull(request[REPOSITORY], response.headers.get("Docker-Content-Digest", ""))
    return response
