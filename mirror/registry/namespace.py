"""The namespace: which repository a request names, and what that repository is here. The one place
that decides; routing, the caches, auth, the UI and the commands all ask here.

A request's name, containerd's `?ns=` and a configured path prefix resolve to one **storage name**
(the name in storage, the catalog, the UI and the access rules) and a kind:

- **private**: hosted here; pushed to, never looked up upstream. By configuration (`private.patterns`,
  or no upstream at all), or by a `private` marker in storage (a claim: the first push to a name, an
  import, or content found in storage that this mirror did not pull through, e.g. a registry:2 root
  adopted as is).
- **proxied**: pulled through from one upstream, under a remote name. A `cached` marker is written
  before the first content is, so a name that holds cached content is never claimed by a push.

The decision is made on the storage name every spelling resolves to (`alpine`, `library/alpine`,
`docker.io/library/alpine`, `library/alpine?ns=docker.io` are one repository), before any cache,
auth rule, page or command looks at it. A name seen for the first time is looked up in storage
(its markers) before it is served; `private` and `cached` are final and remembered, an unmarked
name is remembered for OPEN_SECONDS only, and what is read from storage under it is vouched for
(its markers read again) before it is served. A claim waits CLAIM_SETTLE_SECONDS before it is
acknowledged, so no replica still takes the name as unmarked when anything is pushed to it; a
claim and a cache fill racing each other write their marker, then look for the other's, so at most
one of them wins.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mirror.clock import SYSTEM, Clock
from mirror.cluster import Cluster
from mirror.config import PrivateConfig, UpstreamConfig
from mirror.errors import RegistryError
from mirror.names import parse_name
from mirror.registry.upstream import UpstreamClient, UpstreamError
from mirror.storage import Storage, inventory, layout

log = logging.getLogger("mirror.namespace")

PRIVATE, CACHED, OPEN = "private", "cached", "open"
OPEN_SECONDS = 0.5  # how long an unmarked name is taken as unmarked without looking again
CLAIM_SETTLE_SECONDS = 2 * OPEN_SECONDS  # every replica has looked again by then (with a margin)
REMEMBERED = 100_000  # names whose kind is kept in memory (dropping one costs a look-up)


class NameNowPrivate(RegistryError):
    """A name resolved as proxied turned out to be claimed by a push elsewhere: the request is answered
    again from the start, as a private repository's (server/middleware.py `resolve_again`)."""

    def __init__(self, name: str) -> None:
        super().__init__("UNAVAILABLE", f"{name} just became a private repository; try again",
                         headers={"Retry-After": "1"})
        self.name = name


@dataclass(frozen=True, slots=True)
class Upstream:
    config: UpstreamConfig
    client: UpstreamClient
    local_prefix: str | None  # None for the default upstream


@dataclass(frozen=True, slots=True)
class Route:
    upstream: Upstream | None  # None: a private repository
    remote: str  # the name upstream
    local: str  # the storage name: storage, the catalog, tags, the UI and the access rules use it
    marked: bool = True  # proxied: the name carries its `cached` marker (else it is written on the first fill)

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
    """Whether the configuration alone makes a name private (`private.patterns`, or no upstream at all)."""
    patterns = _patterns(config.patterns)

    def is_private(name: str) -> bool:
        return not has_upstreams or (patterns is not None and patterns.fullmatch(name) is not None)

    return is_private


def classify(configured: bool, marks: set[str], has_content: bool, adopted: str = "private") -> str:
    """The kind a storage name's markers (and content) make it: the rule every reader of storage
    shares (the server, eviction, `du`, the UI's list). Content with no marker was not pulled
    through by this mirror (a registry:2 root adopted as is): private, so never evicted or shadowed;
    `adopted` is CACHED only for a root registry:2 ran as a pull-through cache (`adopted_kind`),
    which holds nothing but what its upstream served."""
    if configured or layout.PRIVATE_MARK in marks:
        return PRIVATE
    if layout.CACHED_MARK in marks:
        return CACHED
    return adopted if has_content else OPEN


async def adopted_kind(storage: Storage) -> str:
    """What unmarked content in this root is: CACHED where registry:2's pull-through cache left its
    `scheduler-state.json` (it takes no pushes), else PRIVATE."""
    return CACHED if await inventory.was_pull_through_cache(storage) else PRIVATE


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


class Namespace:
    """Resolves names for every request, and keeps what storage says of each name."""

    def __init__(self, upstreams: list[Upstream], private: PrivateConfig, storage: Storage,
                 clock: Clock = SYSTEM) -> None:
        self.upstreams = upstreams
        self.config = private
        self.storage = storage
        self.clock = clock
        self.configured_private = configured_private(private, bool(upstreams))
        self.default = upstreams[0] if upstreams else None
        self.by_host = {h: u for u in upstreams for h in u.config.hosts if h != "*"}
        self.any_host = next((u for u in upstreams if "*" in u.config.hosts), None)
        self.by_prefix = {p: u for u in upstreams for p in u.config.prefixes}
        self._kinds: dict[str, tuple[str, float]] = {}  # storage name -> (kind, trusted until)
        self._served_upstream: dict[str, bool] = {}  # claim_on_push=auto: does the upstream serve the name
        self._claims: dict[str, asyncio.Lock] = {}
        self._marked: set[str] = set()  # private names known to carry their marker
        self.cluster: Cluster | None = None  # replicas told of markers at once (share())
        # the ledger hears of every marker written or removed: (name, mark, written)
        self.recorded: Callable[[str, str, bool], Awaitable[None]] | None = None
        self.adopted: str | None = None  # adopted_kind() of the root, read once

    def upstream_of(self, name: str) -> str | None:
        return upstream_of([u.config for u in self.upstreams], name)

    # --- what a name is ---------------------------------------------------------------------------

    async def kind(self, name: str) -> str:
        """PRIVATE, CACHED or OPEN for a storage name: memory, else its markers in storage."""
        if self.configured_private(name):
            return PRIVATE
        known = self._kinds.get(name)
        if known is not None and (known[0] != OPEN or known[1] > self.clock.monotonic()):
            return known[0]
        start = self.clock.monotonic()  # trusted from before the look-up: a claim after it waits longer
        marks = await inventory.marks(self.storage, name)
        unmarked = False
        if not marks and await inventory.has_content(self.storage, name):
            # Content, and no mark when we looked before it: a fill on another replica writes its mark
            # first, then content, so it may have done both in between. Only marks read after the
            # content say it is unmarked.
            marks = await inventory.marks(self.storage, name)
            unmarked = not marks
        if unmarked:
            if self.adopted is None:
                self.adopted = await adopted_kind(self.storage)
            kind = self.adopted
            await self._mark(name, layout.PRIVATE_MARK if kind == PRIVATE else layout.CACHED_MARK)  # once
            log.info("%s holds content this mirror did not pull through: %s from now on", name,
                     "private" if kind == PRIVATE else "cached (registry:2's pull-through cache stored it)")
        else:
            kind = classify(False, marks, False)
        self._remember(name, kind, start)
        return kind

    async def is_private(self, name: str) -> bool:
        return await self.kind(name) == PRIVATE

    def _remember(self, name: str, kind: str, since: float) -> None:
        if len(self._kinds) >= REMEMBERED:
            self._kinds.clear()
        self._kinds[name] = (kind, since + OPEN_SECONDS if kind == OPEN else float("inf"))

    async def _mark(self, name: str, mark: str) -> None:
        await self.storage.put_bytes(layout.marker(name, mark), b"")
        if self.recorded is not None:
            await self.recorded(name, mark, True)
        if self.cluster is not None:  # every replica knows at once (they would look within OPEN_SECONDS)
            self.cluster.publish("names", {"name": name, "mark": mark})

    async def _unmark(self, name: str, mark: str) -> None:
        await self.storage.delete(layout.marker(name, mark))
        if self.recorded is not None:
            await self.recorded(name, mark, False)

    def share(self, cluster: Cluster) -> None:
        self.cluster = cluster

        def heard(event: dict[str, Any]) -> None:
            name, mark = event.get("name"), event.get("mark")
            if isinstance(name, str) and mark in (layout.PRIVATE_MARK, layout.CACHED_MARK):
                self._remember(name, PRIVATE if mark == layout.PRIVATE_MARK else CACHED, 0.0)

        cluster.on("names", heard)

    # --- reads --------------------------------------------------------------------------------------

    async def resolve(self, name: str, ns: str | None) -> Route:
        """The repository a pull (or a delete) names: its storage name, private or proxied."""
        parse_name(name)
        up, remote = self._spelled(name, ns)
        if up is None:  # an unprefixed name: the default upstream's, unless it is private as written
            if self.default is None or await self.is_private(name):
                return Route(None, name, name)
            up, remote = self.default, name
        if up.config.dockerhub and "/" not in remote:
            remote = f"library/{remote}"
        local = parse_name(f"{up.local_prefix}/{remote}" if up.local_prefix else remote)
        kind = await self.kind(local)
        if kind == PRIVATE:  # every spelling of a private name is that private repository
            return Route(None, local, local)
        allowed = _patterns(up.config.repositories)
        if allowed is not None and not allowed.fullmatch(remote):
            raise RegistryError("DENIED", f"{remote} is not among the repositories mirrored from {up.config.name}")
        return Route(up, remote, local, marked=kind == CACHED)

    def _spelled(self, name: str, ns: str | None) -> tuple[Upstream | None, str]:
        """The upstream a spelling names outright (`?ns=`, a path prefix), with the rest of the name."""
        if ns:
            up = self.by_host.get(ns) or self.any_host
            if up is None:
                raise RegistryError("NAME_UNKNOWN", f"no upstream is configured for ns={ns[:100]}")
            return up, name
        first, slash, rest = name.partition("/")
        up = self.by_prefix.get(first) if slash else None
        return (up, rest) if up is not None else (None, name)

    async def filling(self, route: Route) -> None:
        """Before the first cached content is written under a proxied name: its `cached` marker, unless a
        claim got there first (then the name is private, and the fill is refused)."""
        if route.marked or route.private:
            return
        if await self.kind(route.local) == CACHED:
            return
        await self._mark(route.local, layout.CACHED_MARK)
        if layout.PRIVATE_MARK in await inventory.marks(self.storage, route.local):
            await self._unmark(route.local, layout.CACHED_MARK)
            self._kinds.pop(route.local, None)
            raise RegistryError("UNAVAILABLE", f"{route.local} was just claimed as a private repository; try again",
                                headers={"Retry-After": "1"})
        self._remember(route.local, CACHED, 0.0)

    async def vouch(self, route: Route) -> None:
        """After reading from storage under a proxied name not known to be a cache: was it claimed
        meanwhile (by a push on another replica)? Then what was read is not this route's to serve."""
        if route.private or route.marked:
            return
        marks = await inventory.marks(self.storage, route.local)
        if layout.PRIVATE_MARK in marks:
            self._remember(route.local, PRIVATE, 0.0)
            raise NameNowPrivate(route.local)
        if layout.CACHED_MARK in marks:
            self._remember(route.local, CACHED, 0.0)

    # --- pushes -------------------------------------------------------------------------------------

    async def resolve_for_push(self, name: str, ns: str | None) -> Route:
        """The private repository a push, a mount or an upload writes to, claiming the name if it is
        claimable; DENIED for every spelling of a pull-through cache."""
        parse_name(name)
        up, _ = self._spelled(name, ns)
        if up is not None:
            raise RegistryError("DENIED", f"{name}{f'?ns={ns[:100]}' if ns else ''} names a repository of upstream "
                                          f"{up.config.name}; push to a name of your own")
        kind = await self.kind(name)
        if kind == PRIVATE:
            if name not in self._marked:  # pushed to once, private whatever the patterns say later
                await self._mark(name, layout.PRIVATE_MARK)
                self._marked.add(name)
            return Route(None, name, name)
        if kind == CACHED:
            raise RegistryError("DENIED", f"{name} holds content pulled through from upstream "
                                          f"{self._default_name()}: it is not for pushes (list private names in "
                                          f"private.patterns)")
        lock = self._claims.setdefault(name, asyncio.Lock())
        async with lock:  # one claim per name at a time in this process; markers order the others
            if await self.kind(name) != PRIVATE:
                await self._claim(name)
        self._claims.pop(name, None)
        return Route(None, name, name)

    def _default_name(self) -> str:
        return self.default.config.name if self.default else "-"

    async def _claim(self, name: str) -> None:
        mode = self.config.claim_on_push
        if mode == "false":
            raise RegistryError("DENIED", f"{name} is not a private repository here (private.patterns lists them; "
                                          f"private.claim_on_push: auto lets pushes claim new names)")
        if mode == "auto" and await self._upstream_serves(name):
            raise RegistryError("DENIED", f"{name} is served by upstream {self._default_name()}: a push must not "
                                          f"shadow it (to host it here anyway, list it in private.patterns)")
        await self._mark(name, layout.PRIVATE_MARK)
        marks = await inventory.marks(self.storage, name)
        if layout.CACHED_MARK in marks:
            await self._unmark(name, layout.PRIVATE_MARK)
            self._kinds.pop(name, None)
            raise RegistryError("DENIED", f"{name} was just filled from upstream {self._default_name()}: it is a "
                                          f"pull-through cache")
        log.info("%s claimed as a private repository by a push", name)
        self._marked.add(name)
        # Every replica forgets the name as unmarked within OPEN_SECONDS: wait for that, then acknowledge.
        await asyncio.sleep(CLAIM_SETTLE_SECONDS)
        self._remember(name, PRIVATE, 0.0)

    async def _upstream_serves(self, name: str) -> bool:
        """claim_on_push: auto asks whether the default upstream serves `name` as mirror clients ask for it,
        once per name. With Docker Hub a one-component name is never asked for (clients ask for
        `library/<name>`); a name the upstream does not have answers 404, or 401 on Docker Hub."""
        up = self.default
        if up is None or (up.config.dockerhub and "/" not in name):
            return False
        known = self._served_upstream.get(name)
        if known is None:
            try:
                known = await up.client.serves(name)
            except UpstreamError as e:
                raise RegistryError("UNAVAILABLE", f"cannot tell whether upstream {up.config.name} serves {name} "
                                                   f"({e}); try again, or list it in private.patterns",
                                    headers={"Retry-After": "10"}) from None
            if len(self._served_upstream) >= REMEMBERED:
                self._served_upstream.clear()
            self._served_upstream[name] = known
        return known
