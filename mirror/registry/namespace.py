"""Which upstream serves a request, under which remote and local repository names, or whether
the repository is private (hosted here, never looked up upstream).

containerd's `?ns=<registry>` naming an upstream's host picks it. Otherwise a private name
(matching `private.patterns`, or pushed to before) is served from storage only; else a configured
path prefix (`/v2/quay.io/org/app/...`) picks an upstream, else the default (first) one. With no
upstreams at all every repository is private, as in a plain registry:2. Content of the default upstream
is stored under its own names (`library/alpine`); other upstreams under `<prefix>/<name>`, which
is also the name that pulls it again without `?ns=`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mirror.config import PrivateConfig, UpstreamConfig
from mirror.errors import RegistryError
from mirror.names import parse_name
from mirror.registry.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class Upstream:
    config: UpstreamConfig
    client: UpstreamClient
    local_prefix: str | None  # None for the default upstream


@dataclass(frozen=True, slots=True)
class Route:
    upstream: Upstream | None  # None: a private repository
    remote: str  # the name upstream
    local: str  # the name in storage, the catalog and tags

    @property
    def private(self) -> bool:
        return self.upstream is None

    @property
    def proxy(self) -> Upstream:
        assert self.upstream is not None, f"{self.local} is private"
        return self.upstream


def glob_to_regex(pattern: str) -> str:
    """`*` matches within one name component, `**` across components."""
    out = []
    for part in re.split(r"(\*\*|\*)", pattern):
        out.append("[^/]*" if part == "*" else ".*" if part == "**" else re.escape(part))
    return "".join(out)


@functools.cache
def _patterns(globs: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(f"(?:{glob_to_regex(g)})" for g in globs)) if globs else None


def configured_private(config: PrivateConfig, has_upstreams: bool) -> Callable[[str], bool]:
    """Whether the configuration alone makes a name private (`private.patterns`, or no upstream at
    all); names pushed to carry a marker in storage besides."""
    patterns = _patterns(config.patterns)

    def is_private(name: str) -> bool:
        return not has_upstreams or (patterns is not None and patterns.fullmatch(name) is not None)

    return is_private


def local_prefix(config: UpstreamConfig, is_default: bool) -> str | None:
    """Where a non-default upstream's content is stored: `<prefix>/<name>`."""
    if is_default:
        return None
    return config.prefixes[0] if config.prefixes else config.name


def upstream_of(upstreams: Sequence[UpstreamConfig], name: str) -> str | None:
    """Which configured upstream a cached repository's storage name comes from."""
    for i, up in enumerate(upstreams):
        prefix = local_prefix(up, i == 0)
        if prefix and name.startswith(prefix + "/"):
            return up.name
    return upstreams[0].name if upstreams else None


class Router:
    def __init__(self, upstreams: list[Upstream], private: PrivateConfig | None = None,
                 known_private: set[str] | None = None) -> None:
        self.upstreams = upstreams
        config = private or PrivateConfig()
        self.claim_on_push = config.claim_on_push
        self._configured_private = configured_private(config, bool(upstreams))
        self.known_private = known_private if known_private is not None else set()
        self._routes: dict[tuple[str, str | None], Route] = {}  # the hot path: one dict lookup
        self.default = upstreams[0] if upstreams else None
        self.by_host = {h: u for u in upstreams for h in u.config.hosts if h != "*"}
        self.any_host = next((u for u in upstreams if "*" in u.config.hosts), None)
        self.by_prefix = {p: u for u in upstreams for p in u.config.prefixes}

    def is_private(self, name: str) -> bool:
        return name in self.known_private or self._configured_private(name)

    def upstream_of(self, name: str) -> str | None:
        return upstream_of([u.config for u in self.upstreams], name)

    def add_private(self, name: str) -> None:
        self.known_private.add(name)
        self._routes.clear()

    def route(self, name: str, ns: str | None) -> Route:
        """The route for a request's raw name (validated here, once per distinct name)."""
        key = (name, ns)
        route = self._routes.get(key)
        if route is None:
            route = self._route(parse_name(name), ns)
            if len(self._routes) >= 100_000:
                self._routes.clear()
            self._routes[key] = route
        return route

    def _route(self, name: str, ns: str | None) -> Route:
        up: Upstream | None
        if ns and ns in self.by_host:
            up, remote = self.by_host[ns], name
        elif self.is_private(name):
            return Route(None, name, name)
        elif ns:
            up, remote = self.any_host, name
            if up is None:
                raise RegistryError("NAME_UNKNOWN", f"no upstream is configured for ns={ns[:100]}")
        else:
            first, slash, rest = name.partition("/")
            up, remote = (self.by_prefix.get(first), rest) if slash else (None, name)
            if up is None:
                up, remote = self.default, name
            if up is None:
                raise RegistryError("NAME_UNKNOWN", f"repository name not known to registry: {name}")
        if up.config.dockerhub and "/" not in remote:
            remote = f"library/{remote}"
        allowed = _patterns(up.config.repositories)
        if allowed is not None and not allowed.fullmatch(remote):
            raise RegistryError("DENIED", f"{remote} is not among the repositories mirrored from {up.config.name}")
        local = f"{up.local_prefix}/{remote}" if up.local_prefix else remote
        return Route(up, remote, parse_name(local))
