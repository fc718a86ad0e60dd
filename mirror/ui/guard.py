"""Who may see and delete what in the UI, and the CSRF defence of its one form.

The auth middleware authenticates UI requests like any other (bad credentials: 401) but lets
anonymous callers through; these helpers then ask the same Gate the API uses: a repository is
shown to those who may pull it, its delete buttons to those who may delete it (and only with
`storage.delete.enabled`). A delete is a POST that must come from a page of this origin (its
`Origin`, else its `Referer`, names the Host it was sent to) and carry a token only the confirm
page hands out: an HMAC over the user, repository and reference with a per-process key, so a
token neither works for another user or another object, nor can another site read one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aiohttp import web
from yarl import URL

from mirror.auth import ANONYMOUS, CALLER, GATE, Caller, may
from mirror.registry.namespace import Route
from mirror.service import REGISTRY

SECRET = web.AppKey("ui_secret", bytes)


def caller(request: web.Request) -> Caller:
    found: Caller = request.get(CALLER, ANONYMOUS)
    return found


def auth_on(request: web.Request) -> bool:
    return request.app.get(GATE) is not None


async def prepare(request: web.Request, name: str) -> None:
    """Before deciding about repository `name`: with token auth, what a logged-in user's token grants on it."""
    gate = request.app.get(GATE)
    if gate is not None:
        await gate.prepare(request, name)


def may_see(request: web.Request, route: Route) -> bool:
    return may(request, route.local, route.private, "pull")


def may_delete(request: web.Request, route: Route) -> bool:
    """Deletes are for private repositories (a cache's content goes by eviction)."""
    return request.app[REGISTRY].deletes_enabled and route.private and may(request, route.local, True, "delete")


def secret(configured: str | None) -> bytes:
    """The key of the delete tokens: `http.secret` (the same on every replica behind one load
    balancer, as registry:2 asks), else random per process (a restart voids open confirm pages)."""
    if configured:
        return hashlib.sha256(b"mirror ui delete form\0" + configured.encode()).digest()
    return secrets.token_bytes(32)


def token(request: web.Request, name: str, reference: str) -> str:
    user = caller(request).user or ""
    message = "\0".join((user, name, reference)).encode()
    return hmac.new(request.app[SECRET], message, hashlib.sha256).hexdigest()


def token_ok(request: web.Request, name: str, reference: str, sent: str) -> bool:
    return hmac.compare_digest(token(request, name, reference), sent)


def same_origin(request: web.Request) -> bool:
    """The POST came from a page served by this host: its Origin (every current browser sends one
    with a POST), else its Referer, names the Host the request was sent to. Neither: refused."""
    for header in ("Origin", "Referer"):
        value = request.headers.get(header)
        if value is None:
            continue
        if value == "null":
            return False
        try:
            authority = URL(value).raw_authority
        except ValueError:
            return False
        return bool(authority) and authority.lower() == request.host.lower()
    return False
