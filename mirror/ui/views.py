"""The UI's handlers, thin: parse the query, ask the catalog, the registry or the metrics, render
one template. Every page is server-rendered HTML (templates/, autoescaped); /ui/api/ answers the
same data as JSON."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from mirror.auth import GATE, Need, catalog_filter
from mirror.errors import RegistryError
from mirror.ledger import queries
from mirror.names import parse_digest, parse_name, parse_reference
from mirror.registry.namespace import Route
from mirror.server.state import CONFIG, LEDGER, METRICS
from mirror.service import REGISTRY
from mirror.ui import guard
from mirror.ui.images import Images, config_section
from mirror.ui.listing import Listing, Repository
from mirror.ui.overview import overview as read_overview

LISTING = web.AppKey("ui_listing", Listing)
IMAGES = web.AppKey("ui_images", Images)
STATIC = Path(__file__).with_name("static")
STATIC_FILES = frozenset({"ui.css", "ui.js", "favicon.svg"})
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
READY_WAIT = 5.0  # a request right after start waits this long for the ledger to be up to date
UNTAGGED_SHOWN = 200
TAGS_SHOWN = 2000  # a manifest page names at most this many tags pointing at it
# Scripts and styles from this origin only (no inline script can run), no framing, no sniffing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def render(request: web.Request, template: str, context: dict[str, Any], status: int = 200,
           headers: dict[str, str] | None = None) -> web.Response:
    caller = guard.caller(request)
    base = {"user": caller.user, "auth_on": guard.auth_on(request), "host": request.host,
            "login_available": _login_available(request), "path": request.path}
    response = aiohttp_jinja2.render_template(template, request, {**base, **context}, status=status)
    response.headers.update(SECURITY_HEADERS)
    response.headers.update(headers or {})
    return response


def _login_available(request: web.Request) -> bool:
    return request.app.get(GATE) is not None


def page(handler: Handler) -> Handler:
    """Registry errors as an HTML page with the error's status (401 keeps its challenge, so a
    browser asks for a registry user's credentials)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except RegistryError as e:
            return render(request, "error.html", {"error": e}, status=e.status, headers=e.headers)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _refuse(request: web.Request, name: str, action: str) -> RegistryError:
    """Not allowed: anonymous callers are asked to log in (401), known ones are refused (403)."""
    if guard.caller(request).user is None:
        headers = {}
        gate = request.app.get(GATE)
        if gate is not None:
            headers["WWW-Authenticate"] = gate.challenge(request, Need("ui"))
        return RegistryError("UNAUTHORIZED", f"log in to {action} {name}", headers=headers)
    return RegistryError("DENIED", f"{guard.caller(request).user} may not {action} {name}")


async def _repository(request: web.Request, action: str = "see") -> Route:
    """The repository a page is about: its storage name (registry/namespace.py decides what it is),
    and the caller may see it (or delete from it)."""
    name = parse_name(request.match_info["name"])
    await guard.prepare(request, name)
    if action == "delete" and not request.app[REGISTRY].deletes_enabled:
        raise RegistryError("UNSUPPORTED", "deletes are disabled (storage.delete.enabled)")
    route = await request.app[REGISTRY].resolve(name, None)
    if route.local != name:  # a spelling of another repository: pages are by storage name
        raise RegistryError("NAME_UNKNOWN", f"repository name not known to registry: {name}")
    allowed = guard.may_see(request, route) if action == "see" else guard.may_delete(request, route)
    if not allowed:
        raise _refuse(request, name, action)
    return route


def _int_param(request: web.Request, key: str, default: int, maximum: int) -> int:
    value = request.query.get(key, "")
    if not value:
        return default
    if not value.isdigit():
        raise RegistryError("PAGINATION_NUMBER_INVALID", f"{key} must be a positive number")
    return max(1, min(int(value), maximum))


# --- repositories ---------------------------------------------------------------------------------

SORTS = ("name", "size", "pulled")


async def _listing(request: web.Request) -> dict[str, Any]:
    ledger = request.app[LEDGER]
    if not ledger.ready.is_set():
        await ledger.wait_ready(READY_WAIT)
    q = request.query.get("q", "").strip().lower()[:200]
    kind = request.query.get("kind", "")
    kind = kind if kind in ("private", "cached") else ""
    sort = request.query.get("sort", "name")
    sort = sort if sort in SORTS else "name"
    size = _int_param(request, "n", PAGE_SIZE, MAX_PAGE_SIZE)
    number = _int_param(request, "page", 1, 10**9)
    found = await request.app[LISTING].page(q, kind, sort, number, size, catalog_filter(request))
    return {**found, "q": q, "kind": kind, "sort": sort, "n": size, "ready": ledger.ready.is_set(),
            "error": ledger.error}


@page
async def repositories(request: web.Request) -> web.StreamResponse:
    """GET /ui/: every repository the caller may pull, filtered, sorted and paginated."""
    return render(request, "repositories.html", await _listing(request))


async def api_repositories(request: web.Request) -> web.StreamResponse:
    """GET /ui/api/repositories: the list page's data as JSON."""
    listing = await _listing(request)
    rows = [{**asdict(repo), "kind": repo.kind, "last_pulled": pulled} for repo, pulled in listing.pop("rows")]
    return web.json_response({**listing, "repositories": rows}, headers={"Cache-Control": "no-store"})


# --- one repository -------------------------------------------------------------------------------

def pull_commands(request: web.Request, name: str, tag: str, repo: Repository | None) -> dict[str, str]:
    """`docker pull` through the address the browser used; for Docker Hub names also the short form
    that dockerd's `registry-mirrors` sends here."""
    commands = {"direct": f"docker pull {request.host}/{name}:{tag}"}
    registry = request.app[REGISTRY]
    default = registry.default_upstream
    if repo is not None and not repo.private and default is not None and default.config.dockerhub \
            and repo.upstream == default.config.name:
        commands["mirrors"] = f"docker pull {name.removeprefix('library/')}:{tag}"
    return commands


@page
async def repository(request: web.Request) -> web.StreamResponse:
    """GET /ui/repo/<name>: tags (digest, size, created, platforms, last pulled), untagged manifests."""
    repo_route = await _repository(request)
    name = repo_route.local
    ledger, images = request.app[LEDGER], request.app[IMAGES]
    repo = await request.app[LISTING].repository(name)
    if repo is None:
        raise RegistryError("NAME_UNKNOWN", f"repository name not known to registry: {name}")
    size = _int_param(request, "n", PAGE_SIZE, MAX_PAGE_SIZE)
    pages = max(1, math.ceil(repo.tags / size))
    number = min(_int_param(request, "page", 1, 10**9), pages)
    tagged = await ledger.read(queries.tags_of, name, (number - 1) * size, size)
    untagged = await ledger.read(queries.manifests_of, name, True, UNTAGGED_SHOWN)
    pulled = await request.app[LISTING].pulled(name, sorted({d for _, d in tagged} | {d for d, _ in untagged}))
    rows = []
    for tag, digest in tagged:
        rows.append({"tag": tag, "digest": digest, "summary": await images.summary(name, digest),
                     "pulled": pulled.get(digest), "commands": pull_commands(request, name, tag, repo)})
    return render(request, "repository.html", {
        "name": name, "repo": repo, "rows": rows, "tag_count": repo.tags, "page": number, "pages": pages, "n": size,
        "untagged": [(d, pulled.get(d)) for d, _ in untagged], "may_delete": guard.may_delete(request, repo_route),
        "pulled": await request.app[LISTING].last_pulled(name), "deleted": request.query.get("deleted", "")[:300],
    })


@page
async def manifest(request: web.Request) -> web.StreamResponse:
    """GET /ui/repo/<name>/-/manifest/<digest>: layers, config, platforms, referrers."""
    repo_route = await _repository(request)
    name = repo_route.local
    digest = parse_digest(request.match_info["digest"])
    registry, ledger = request.app[REGISTRY], request.app[LEDGER]
    view = await request.app[IMAGES].view(name, str(digest))
    referrers = await registry.referrers(repo_route, digest, None)
    tags = [] if view.subject else (await ledger.read(queries.tags_pointing, name, view.digest))[:TAGS_SHOWN]
    pulled = await request.app[LISTING].pulled(name, [view.digest])
    return render(request, "manifest.html", {
        "name": name, "view": view, "config": config_section(view.image_config), "referrers": referrers,
        "tags": tags, "may_delete": guard.may_delete(request, repo_route), "pulled": pulled.get(view.digest),
    })


# --- delete ---------------------------------------------------------------------------------------

def _target(form: Any) -> tuple[str, str]:
    """("tag", tag) or ("digest", digest) from the query or the form, validated."""
    tag, digest = str(form.get("tag", "")), str(form.get("digest", ""))
    if bool(tag) == bool(digest):
        raise RegistryError("UNSUPPORTED", "name one tag or one digest to delete")
    if digest:
        return "digest", str(parse_digest(digest))
    parsed = parse_reference(tag)
    if not isinstance(parsed, str):
        raise RegistryError("TAG_INVALID", f"a digest is not a tag: {tag[:130]!r}")
    return "tag", parsed


@page
async def confirm_delete(request: web.Request) -> web.StreamResponse:
    """GET /ui/repo/<name>/-/delete?tag=|digest=: what would go, and the form that does it."""
    name = (await _repository(request, "delete")).local
    kind, reference = _target(request.query)
    registry = request.app[REGISTRY]
    if kind == "tag":
        digest = await registry.tag(name, reference)
        if digest is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {name}:{reference}")
        also: list[str] = []
    else:
        digest = reference
        if await registry.stored_manifest(name, digest) is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {name}@{digest}")
        also = await request.app[LEDGER].read(queries.tags_pointing, name, digest)
    return render(request, "confirm.html", {"name": name, "kind": kind, "reference": reference, "digest": digest,
                                            "also": also, "token": guard.token(request, name, reference)})


@page
async def delete(request: web.Request) -> web.StreamResponse:
    """POST /ui/repo/<name>/-/delete: only from this origin, with the confirm page's token and box."""
    if not guard.same_origin(request):
        raise RegistryError("DENIED", "refused: the form was not sent from a page of this mirror (Origin/Referer)")
    route = await _repository(request, "delete")
    name = route.local
    form = await request.post()
    kind, reference = _target(form)
    if not guard.token_ok(request, name, reference, str(form.get("token", ""))):
        raise RegistryError("DENIED", "refused: the confirmation token is missing or not for this delete")
    if form.get("confirm") != "yes":
        raise RegistryError("UNSUPPORTED", "tick the confirmation box to delete")
    registry = request.app[REGISTRY]
    await registry.delete_manifest(route, parse_digest(reference) if kind == "digest" else reference)
    what = f"{name}@{reference}" if kind == "digest" else f"{name}:{reference}"
    location = request.app.router["ui_repository"].url_for(name=name).with_query(deleted=what)
    raise web.HTTPSeeOther(location)


# --- overview, login, static ----------------------------------------------------------------------

@page
async def overview(request: web.Request) -> web.StreamResponse:
    """GET /ui/overview: the cache's numbers from the same Metrics object /metrics renders."""
    data = read_overview(request.app[METRICS], request.app[CONFIG])
    listed = (await request.app[LISTING].page("", "", "name", 1, 1, catalog_filter(request)))["all"]
    return render(request, "overview.html", {"o": data, "repositories": listed})


async def api_overview(request: web.Request) -> web.StreamResponse:
    """GET /ui/api/overview: the overview's numbers as JSON."""
    return web.json_response(read_overview(request.app[METRICS], request.app[CONFIG]),
                             headers={"Cache-Control": "no-store"})


@page
async def login(request: web.Request) -> web.StreamResponse:
    """GET /ui/login: 401 and the Basic challenge until the browser sends a registry user's credentials
    (then it sends them with every /ui/ page). With token auth the mirror asks the token realm for a
    token with them, as `docker login` does (auth/login.py)."""
    gate = request.app.get(GATE)
    if gate is None or guard.caller(request).user is not None:
        raise web.HTTPSeeOther(request.app.router["ui_repositories"].url_for())
    raise RegistryError("UNAUTHORIZED", "log in with your registry username and password",
                        headers={"WWW-Authenticate": gate.challenge(request, Need("ui"))})


async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently(request.app.router["ui_repositories"].url_for())


async def static(request: web.Request) -> web.StreamResponse:
    """GET /ui/static/<file>: the stylesheet and the copy button's script, nothing from elsewhere."""
    file = request.match_info["file"]
    if file not in STATIC_FILES:
        raise RegistryError("NOT_FOUND", f"no such file: {file[:100]}")
    return web.FileResponse(STATIC / file, headers={"Cache-Control": "public, max-age=3600",
                                                    "X-Content-Type-Options": "nosniff"})
