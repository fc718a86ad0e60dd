"""Cached manifests: digest = immutable; tag = fresh for the upstream's tag TTL, then one HEAD
upstream (GET only when the digest changed); stale-if-error when the upstream fails.

Hot path: a tag hit is two dict lookups (tag index, manifest bodies in memory) and no I/O.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import logging
import math
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass

from mirror.cache.index import Index
from mirror.clock import Clock
from mirror.config import UpstreamConfig
from mirror.errors import RegistryError
from mirror.names import Digest
from mirror.registry import mediatypes
from mirror.registry.namespace import Route
from mirror.registry.stores import Manifest, ManifestStore
from mirror.registry.upstream import UpstreamAnswer, UpstreamNotFound, answering_as, translate

log = logging.getLogger("mirror.cache")


Filling = Callable[[Route], Awaitable[None]]  # Namespace.filling: before content is cached under a name


@dataclass(frozen=True, slots=True)
class Served:
    manifest: Manifest
    cache: str  # hit | miss | revalidated | stale | private
    warning: str | None = None


@functools.cache
def _tag_patterns(globs: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None


def tag_ttl(config: UpstreamConfig, tag: str) -> float:
    """How long a cached tag is served without asking upstream: `mutable_tags` every time,
    `immutable_tags` forever, the rest for `tag_ttl`."""
    mutable = _tag_patterns(config.mutable_tags)
    if mutable is not None and mutable.match(tag):
        return 0.0
    immutable = _tag_patterns(config.immutable_tags)
    if immutable is not None and immutable.match(tag):
        return math.inf
    return config.tag_ttl


class ManifestCache:
    def __init__(self, store: ManifestStore, index: Index, clock: Clock, filling: Filling) -> None:
        self.store = store
        self.index = index
        self.clock = clock
        self.filling = filling
        self._flights: dict[tuple[str, str], asyncio.Task[Served]] = {}

    # --- public --------------------------------------------------------------------------

    async def get(self, route: Route, reference: str | Digest) -> Served:
        if isinstance(reference, Digest):
            return await self.by_digest(route, str(reference))
        return await self.by_tag(route, reference)

    async def by_digest(self, route: Route, digest: str) -> Served:
        manifest = await self.store.get(route.local, digest)
        if manifest is not None:
            return Served(manifest, "hit")
        return await self._single_flight(route.local, digest, lambda: self._fetch_digest(route, digest))

    async def by_tag(self, route: Route, tag: str) -> Served:
        entry = self.index.tag(route.local, tag)
        if entry is not None and self.clock.time() - entry.fetched_at < tag_ttl(route.proxy.config, tag):
            manifest = await self.store.get(route.local, entry.digest)
            if manifest is not None:
                return Served(manifest, "hit")
        return await self._single_flight(route.local, f"tag:{tag}", lambda: self._revalidate(route, tag))

    # --- upstream ------------------------------------------------------------------------

    async def _single_flight(self, repository: str, key: str,
                             fetch: Callable[[], Coroutine[None, None, Served]]) -> Served:
        """One upstream exchange per (repository, reference); a client leaving never cancels it."""
        fkey = (repository, key)
        task = self._flights.get(fkey)
        if task is None:
            task = asyncio.create_task(fetch())
            self._flights[fkey] = task
            task.add_done_callback(lambda _t: self._flights.pop(fkey, None))
        return await asyncio.shield(task)

    async def _revalidate(self, route: Route, tag: str) -> Served:
        entry = self.index.tag(route.local, tag)
        cached = await self.store.get(route.local, entry.digest) if entry else None
        if cached is None:  # the index is an accelerator: the tag file (an import, another replica) is the truth
            stored = await self.store.tag(route.local, tag)
            cached = await self.store.get(route.local, stored) if stored else None
        up = route.proxy.client
        try:
            if cached is not None:
                digest = await up.head_manifest(route.remote, tag)
                if digest == cached.digest:
                    self.index.set_tag(route.local, tag, cached.digest, self.clock.time())
                    return Served(cached, "revalidated")
            else:
                digest = None
            # Fetch by the digest HEAD named, so a tag moving between HEAD and GET can't mix them.
            served = await self._fetch(route, digest, tag)
        except UpstreamNotFound as e:
            if entry is not None:  # the tag is gone upstream: forget it, keep the content by digest
                self.index.drop_tag(route.local, tag)
                await self.store.delete_tag(route.local, tag)
            raise translate(e, "MANIFEST_UNKNOWN", f"{route.local}:{tag}") from None
        except UpstreamAnswer as e:  # failed, rate limited, or refusing us now: the cached copy stands in
            if cached is None:
                raise translate(e, "MANIFEST_UNKNOWN", f"{route.local}:{tag}") from None
            log.warning("serving stale %s:%s: %s", route.local, tag, e)
            return Served(cached, "stale", '110 - "Response is Stale"')
        self.index.set_tag(route.local, tag, served.manifest.digest, self.clock.time())
        await self.store.set_tag(route.local, tag, served.manifest.digest)
        return served

    async def _fetch_digest(self, route: Route, digest: str) -> Served:
        with answering_as("MANIFEST_UNKNOWN", f"{route.local}@{digest}"):
            return await self._fetch(route, digest, None)

    async def _fetch(self, route: Route, digest: str | None, tag: str | None) -> Served:
        """GET by digest (or by tag when the digest is unknown), verify, store; the upstream's
        answers are the caller's to translate."""
        up = route.proxy.client
        reference = digest or tag
        assert reference is not None
        fetched = await up.fetch_manifest(route.remote, reference)
        expected = digest or fetched.digest
        algorithm = expected.split(":")[0] if expected and ":" in expected else "sha256"
        if algorithm not in ("sha256", "sha512"):
            algorithm = "sha256"
        actual = str(Digest.of(fetched.body, algorithm))
        if expected is not None and actual != expected:
            log.error("upstream %s sent a manifest for %s@%s whose digest is %s",
                      up.name, route.remote, reference, actual)
            raise RegistryError("UPSTREAM_UNAVAILABLE",
                                f"upstream sent a manifest that does not match digest {expected}")
        manifest = Manifest(actual, mediatypes.detect(fetched.body, fetched.media_type), fetched.body)
        await self.filling(route)  # only now: a name the upstream does not have is never marked a cache
        await self.store.put(route.local, manifest)
        return Served(manifest, "miss")


