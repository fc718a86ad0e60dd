"""Authentication (htpasswd or token, as registry:2) and our access rules, decided per request by
one middleware from the route table: which resource and action a request needs, who the caller
is, and whether that caller may. Handlers never look at credentials; two of them ask here:
cross-repository mounts (may the caller pull `from`?) and the catalog (which names may it see?).

Answers: no or bad credentials -> 401 UNAUTHORIZED with the scheme's challenge; a caller who is
known but may not -> 403 DENIED (with token auth also a challenge carrying
error="insufficient_scope", as RFC 6750 asks, so the client knows which scope it lacked).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api.endpoints import endpoint
from mirror.api.request import route
from mirror.auth.access import AccessRules
from mirror.auth.htpasswd import Htpasswd
from mirror.auth.login import CATALOG, Credentials, LoginFailed, RealmUnavailable, TokenLogin
from mirror.auth.token import Grants, InvalidToken, TokenVerifier
from mirror.config import Config
from mirror.errors import RegistryError
from mirror.names import parse_name
from mirror.server.logs import USER

log = logging.getLogger("mirror.auth")

# What the token must grant for each of our actions (distribution asks pull and push for pushes).
TOKEN_ACTIONS = {"pull": ("pull",), "push": ("pull", "push"), "delete": ("delete",)}
EMPTY_BASIC = "Og=="  # base64(":"): skopeo and podman send it after a Basic challenge when they have no credentials


@dataclass(frozen=True, slots=True)
class Caller:
    user: str | None  # None: did not authenticate
    grants: Grants | None = None  # token auth: what the token allows


ANONYMOUS = Caller(None)
CALLER = web.RequestKey("caller", Caller)
LOGIN = web.RequestKey("ui_login", Credentials)  # a UI caller's Basic credentials under token auth (this request)


@dataclass(frozen=True, slots=True)
class Need:
    """What a request needs: `base` (any authenticated caller: /v2/, /metrics), `catalog`, `ui`
    (nothing: the UI asks `may` per repository), or an `action` on a repository: `name` is its
    storage name, the one every spelling resolves to (registry/namespace.py), which the rules judge."""

    kind: str
    name: str = ""
    action: str = ""
    spelled: str = ""  # the name as the URL has it (what a token server was asked for)
    proxied: bool = False  # a pull-through cache (anonymous_pull applies)

    def scope(self) -> str:
        if self.kind == "catalog":
            return "registry:catalog:*"
        if self.kind == "repository":
            return f"repository:{self.name}:{','.join(TOKEN_ACTIONS[self.action])}"
        return ""


async def need(request: web.Request) -> Need | None:
    """The resource and action of a request, from the endpoint it matched (None: no route, 404). A pull
    or delete is judged on the repository the name resolves to; a push writes to the name as spelled
    (registry/namespace.py refuses every proxied spelling before anything is written)."""
    found = endpoint(request)
    if found is None or found.action == "peer":  # a replica's signed request: its handler checks it
        return None
    if found.action in ("pull", "delete"):
        r = await route(request)
        return Need("repository", r.local, found.action, request.match_info["name"], proxied=not r.private)
    if found.action == "push":
        name = parse_name(request.match_info["name"])
        return Need("repository", name, "push", name)
    return Need(found.action)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class Gate:
    """The per-request decision: authenticate, then authorize against the token and the rules."""

    def __init__(self, config: Config) -> None:
        assert config.auth is not None
        self.htpasswd = Htpasswd(config.auth.htpasswd.path) if config.auth.htpasswd else None
        self.realm_name = config.auth.htpasswd.realm if config.auth.htpasswd else ""
        self.token_config = config.auth.token
        self.tokens = TokenVerifier(config.auth.token) if config.auth.token else None
        self.login = TokenLogin(self.tokens) if self.tokens else None
        self.rules = AccessRules(config.access)

    # --- who ----------------------------------------------------------------------------------

    async def authenticate(self, request: web.Request, need: Need) -> Caller:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.strip().partition(" ")
        scheme = scheme.lower()
        if self.tokens is not None:
            if need.kind == "ui" and scheme == "basic" and credentials.strip() not in ("", EMPTY_BASIC):
                return await self._ui_login(request, need, credentials.strip())
            if scheme != "bearer" or not credentials.strip():
                return ANONYMOUS
            try:
                grants = self.tokens.verify(credentials.strip())
            except InvalidToken as e:
                raise self.unauthorized(request, need, str(e), "invalid_token") from None
            # A token for nobody (what token servers give clients without credentials) is anonymous:
            # the access section alone decides what anonymous clients may do.
            return Caller(grants.subject, grants) if grants.subject else ANONYMOUS
        assert self.htpasswd is not None
        credentials = credentials.strip()
        if scheme != "basic" or credentials == EMPTY_BASIC:
            return ANONYMOUS
        try:
            user = await self.htpasswd.check_basic(credentials)
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
            raise self.unauthorized(request, need, "malformed Basic credentials") from None
        if user is None:
            log.info("authentication failed from %s", request.remote)
            raise self.unauthorized(request, need, "invalid username or password")
        return Caller(user)

    async def _ui_login(self, request: web.Request, need: Need, encoded: str) -> Caller:
        """A browser's Basic credentials for the UI under token auth: the realm's token for them."""
        assert self.login is not None
        try:
            credentials = Credentials.from_basic(encoded)
            grants = await self.login.grants(self.realm(request), credentials, (CATALOG,))
        except ValueError:
            raise self.unauthorized(request, need, "malformed Basic credentials") from None
        except LoginFailed as e:
            raise self.unauthorized(request, need, str(e)) from None
        except RealmUnavailable as e:
            log.warning("UI login: %s", e)
            raise RegistryError("UNAVAILABLE", f"cannot log in now: {e}") from None
        request[LOGIN] = credentials
        return Caller(credentials.user, grants)

    async def prepare(self, request: web.Request, name: str) -> None:
        """Before the UI decides about repository `name`: a token-auth login's grants for it (pull, delete)."""
        credentials, caller = request.get(LOGIN), request.get(CALLER, ANONYMOUS)
        if credentials is None or self.login is None or caller.grants is None:
            return
        scope = f"repository:{name}:{','.join(('pull', *TOKEN_ACTIONS['delete']))}"
        try:
            more = await self.login.grants(self.realm(request), credentials, (scope,))
        except (LoginFailed, RealmUnavailable) as e:
            raise RegistryError("UNAVAILABLE", f"cannot ask the token realm about {name}: {e}") from None
        access = {**caller.grants.access, **more.access}
        request[CALLER] = Caller(caller.user, Grants(caller.user or "", access, min(caller.grants.expires,
                                                                                  more.expires)))

    # --- may they -----------------------------------------------------------------------------

    def authorize(self, request: web.Request, caller: Caller, need: Need) -> None:
        if need.kind == "ui":
            return
        if need.kind == "repository":
            if not self.token_allows(caller, need):
                raise self.denied(request, need, f"the token does not grant {need.scope()}")
            if not self.rules_allow(caller, need):
                if caller.user is None:
                    raise self.unauthorized(request, need, "authentication required")
                raise self.denied(request, need, f"{caller.user or 'this token'} may not {need.action} {need.name}")
            return
        if caller.user is None:
            raise self.unauthorized(request, need, "authentication required")
        if need.kind == "catalog" and caller.grants is not None and \
                not caller.grants.allows("registry", "catalog", "*"):
            raise self.denied(request, need, "the token does not grant registry:catalog:*")

    def token_allows(self, caller: Caller, need: Need) -> bool:
        """A token names what its server was asked for: the storage name, or for a cache also the name
        as spelled (`docker.io/library/alpine`); a private repository only by its own name."""
        grants = caller.grants
        if caller.user is None or grants is None:
            return True  # htpasswd, or no token: the rules decide
        names = {need.name, need.spelled} if need.proxied and need.spelled else {need.name}
        return any(all(grants.allows("repository", n, a) for a in TOKEN_ACTIONS[need.action]) for n in names)

    def rules_allow(self, caller: Caller, need: Need) -> bool:
        if caller.user is not None and not self.rules.config.rules:
            return True  # registry:2: an authenticated user may do anything
        return self.rules.allows(caller.user, need.name, need.action, proxied=need.proxied)

    def may(self, request: web.Request, name: str, private: bool, action: str) -> bool:
        """The same decision without raising, for a repository already resolved (a mount's source, a
        UI page): its storage name, and whether it is private."""
        caller = request.get(CALLER, ANONYMOUS)
        need = Need("repository", name, action, name, proxied=not private)
        return self.token_allows(caller, need) and self.rules_allow(caller, need)

    def listed(self, request: web.Request, name: str, private: bool) -> bool:
        """Whether a catalog row (the UI's list) shows repository `name` to the caller: a token lists what
        registry:catalog:* and the rules allow (a token without it sees what anonymous does)."""
        caller = request.get(CALLER, ANONYMOUS)
        if caller.grants is not None and not caller.grants.allows("registry", "catalog", "*"):
            caller = ANONYMOUS
        return self.rules_allow(caller, Need("repository", name, "pull", name, proxied=not private))

    def catalog_filter(self, request: web.Request) -> Callable[[str, bool], bool] | None:
        """Which catalog names (storage names, and whether private) the caller may pull; None: all of them."""
        caller = request.get(CALLER, ANONYMOUS)
        if caller.grants is not None and not caller.grants.allows("registry", "catalog", "*"):
            caller = ANONYMOUS  # a token that does not list the catalog (a UI login's) sees what anonymous does
        if caller.user is not None and not self.rules.config.rules:
            return None
        rules, user = self.rules, caller.user
        return lambda name, private: rules.allows(user, name, "pull", proxied=not private)

    # --- answers ------------------------------------------------------------------------------

    def realm(self, request: web.Request) -> str:
        """The token realm, as the Bearer challenge names it."""
        t = self.token_config
        assert t is not None
        if t.autoredirect:  # as distribution: the realm follows the Host the client used
            scheme = request.headers.get("X-Forwarded-Proto") or "https"
            return f"{scheme}://{request.host}{t.autoredirectpath}"
        return t.realm

    def challenge(self, request: web.Request, need: Need, error: str | None = None) -> str:
        if self.token_config is None:
            return f'Basic realm="{_quote(self.realm_name)}"'
        if need.kind == "ui":  # browsers log in with a username and password; the mirror gets the token
            return f'Basic realm="{_quote(self.token_config.service)}"'
        value = f'Bearer realm="{_quote(self.realm(request))}",service="{_quote(self.token_config.service)}"'
        if need.scope():
            value += f',scope="{_quote(need.scope())}"'
        if error:
            value += f',error="{error}"'
        return value

    def unauthorized(self, request: web.Request, need: Need, message: str, error: str | None = None) -> RegistryError:
        return RegistryError("UNAUTHORIZED", message,
                             headers={"WWW-Authenticate": self.challenge(request, need, error)})

    def denied(self, request: web.Request, need: Need, message: str) -> RegistryError:
        headers = {}
        if self.token_config is not None:
            headers["WWW-Authenticate"] = self.challenge(request, need, "insufficient_scope")
        return RegistryError("DENIED", message, headers=headers)

    async def close(self) -> None:
        if self.login is not None:
            await self.login.close()


GATE = web.AppKey("gate", Gate)


@web.middleware
async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate and authorize every request before its handler runs."""
    gate = request.app[GATE]
    required = await need(request)
    if required is None:
        return await handler(request)
    caller = await gate.authenticate(request, required)
    if caller.user is not None:
        request[USER] = caller.user
    gate.authorize(request, caller, required)
    request[CALLER] = caller
    return await handler(request)


def may(request: web.Request, name: str, private: bool, action: str) -> bool:
    """May the caller do `action` on a resolved repository (a mount's source, a UI page)? Always, without auth."""
    gate = request.app.get(GATE)
    return gate is None or gate.may(request, name, private, action)


def listed(request: web.Request, name: str, private: bool) -> bool:
    """Whether the caller's catalog (the UI's list) shows this resolved repository. Always, without auth."""
    gate = request.app.get(GATE)
    return gate is None or gate.listed(request, name, private)


def catalog_filter(request: web.Request) -> Callable[[str, bool], bool] | None:
    """What the catalog may show this caller (None: everything, without auth)."""
    gate = request.app.get(GATE)
    return None if gate is None else gate.catalog_filter(request)
