"""Which upstream serves a request, under which remote and local repository names.

containerd's `?ns=<registry>` picks by host, else a configured path prefix
(`/v2/quay.io/org/app/...`), else the default (first) upstream. Content of the default upstream
is stored under its own names (`library/alpine`); other upstreams under `<prefix>/<name>`, which
is also the name that pulls it again without `?ns=`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirror.config import UpstreamConfig
from mirror.errors import RegistryError
from mirror.names import parse_name
from mirror.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class Upstream:
    config: UpstreamConfig
    client: UpstreamClient
    local_prefix: str | None  # None for the default upstream


@dataclass(frozen=True, slots=True)
class Route:
    upstream: Upstream
    remote: str  # the name upstream
    local: str  # the name in storage, the catalog and tags


class Router:
    def __init__(self, upstreams: list[Upstream]) -> None:
        self.upstreams = upstreams
        self.default = upstreams[0] if upstreams else None
        self.by_host = {h: u for u in upstreams for h in u.config.hosts if h != "*"}
        self.any_host = next((u for u in upstreams if "*" in u.config.hosts), None)
        self.by_prefix = {p: u for u in upstreams for p in u.config.prefixes}

    @staticmethod
    def local_prefix(config: UpstreamConfig, is_default: bool) -> str | None:
        if is_default:
            return None
        return config.prefixes[0] if config.prefixes else config.name

    def route(self, name: str, ns: str | None) -> Route:
        """`name` is already a valid repository name."""
        if ns:
            up = self.by_host.get(ns) or self.any_host
            if up is None:
                raise RegistryError("NAME_UNKNOWN", f"no upstream is configured for ns={ns[:100]}")
            remote = name
        else:
            first, slash, rest = name.partition("/")
            up = self.by_prefix.get(first) if slash else None
            if up is not None:
                remote = rest
            elif self.default is not None:
                up, remote = self.default, name
            else:
                raise RegistryError("NAME_UNKNOWN", f"repository name not known to registry: {name}")
        if up.config.dockerhub and "/" not in remote:
            remote = f"library/{remote}"
        local = f"{up.local_prefix}/{remote}" if up.local_prefix else remote
        return Route(up, remote, parse_name(local))
