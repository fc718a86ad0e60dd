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

from mirror.clock import Clock
from mirror.cluster import Cluster
from mirror.config import UpstreamConfig
from mirror.errors import RegistryError
from mirror.ledger import ops
from mirror.ledger.ledger import Ledger
from mirror.names import Digest
from mirror.registry import mediatypes
from mirror.registry.namespace import Route
from mirror.registry.stores import Manifest, ManifestStore
from mirror.registry.upstream import UpstreamAnswer, UpstreamNotFound, answering_as, translate

log = logging.getLogger("mirror.cache")


Filling = Callable[[Route], Awaitable[None]]  # Namespace.filling: before content is cached under a name
STALE = '110 - "Response is Stale"'
LEASE_SECONDS = 30.0  # one replica's upstream exchange for a manifest or tag: the others wait this long at most
FOLLOW_SECONDS = 0.05  # how often a waiting replica looks for the result
STALE_SHARED_SECONDS = 30.0  # after an upstream failure, how long every replica serves the tag stale
SHARED_TAG_MAX_SECONDS = 86400.0  # an immutable tag's record is kept a day (each replica's index keeps it too)


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
    def __init__(self, store: ManifestStore, ledger: Ledger, clock: Clock, filling: Filling,
                 cluster: Cluster | None = None) -> None:
        self.store = store
        self.ledger = ledger  # tags and when their upstream last confirmed them
        self.clock = clock
        self.filling = filling
        self.cluster = cluster  # replicas sharing one storage: one upstream exchange for all of them
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
        return await self._single_flight(route.local, digest,
                                         lambda: self._cluster_once(route, ("manifest", route.local, digest),
                                                                    lambda: self._stored(route, digest),
                                                                    lambda: self._fetch_digest(route, digest)))

    async def by_tag(self, route: Route, tag: str) -> Served:
        entry = await self.ledger.tag(route.local, tag)
        if entry is not None and self.clock.time() - entry.fetched_at < tag_ttl(route.proxy.config, tag):
            manifest = await self.store.get(route.local, entry.digest)
            if manifest is not None:
                return Served(manifest, "hit")
        return await self._single_flight(route.local, f"tag:{tag}",
                                         lambda: self._cluster_once(route, ("tag", route.local, tag),
                                                                    lambda: self._shared_tag(route, tag),
                                                                    lambda: self._revalidate_shared(route, tag)))

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

    async def _cluster_once(self, route: Route, what: tuple[str, ...], done: Callable[[], Awaitable[Served | None]],
                            work: Callable[[], Coroutine[None, None, Served]]) -> Served:
        """`work` (an upstream exchange) done once across the replicas: the one that gets the lease does
        it, the others wait for `done` to find its result (in shared storage, or the shared tag record),
        and take over if the lease holder dies (its lease expires)."""
        if self.cluster is None:
            return await work()
        while True:
            token = await self.cluster.lease(LEASE_SECONDS, *what)
            if token is not None:
                try:
                    found = await done()  # it may have been done between our look and the lease
                    return found if found is not None else await work()
                finally:
                    await self.cluster.release(token, *what)
            deadline = self.clock.monotonic() + LEASE_SECONDS
            while self.clock.monotonic() < deadline:
                await asyncio.sleep(FOLLOW_SECONDS)
                found = await done()
                if found is not None:
                    return found

    async def _stored(self, route: Route, digest: str) -> Served | None:
        manifest = await self.store.get(route.local, digest)
        return Served(manifest, "hit") if manifest is not None else None

    async def _shared_tag(self, route: Route, tag: str) -> Served | None:
        """What another replica's revalidation of the tag found, while it is fresh: no upstream exchange."""
        assert self.cluster is not None
        shared = await self.cluster.get("tag", route.local, tag)
        if shared is None or not isinstance(shared.get("digest"), str) or not isinstance(shared.get("at"), int | float):
            return None
        now = self.clock.time()
        if shared.get("stale") and now < shared["at"]:  # the upstream failed: serve stale, do not ask again
            manifest = await self.store.get(route.local, shared["digest"])
            return Served(manifest, "stale", STALE) if manifest is not None else None
        if now - shared["at"] >= tag_ttl(route.proxy.config, tag):
            return None
        manifest = await self.store.get(route.local, shared["digest"])
        if manifest is None:
            return None
        await self.ledger.record([ops.tag(route.local, tag, manifest.digest, shared["at"])], durable=False,
                                 share=False)  # the replica that revalidated journals it
        return Served(manifest, "hit")

    async def _revalidate_shared(self, route: Route, tag: str) -> Served:
        served = await self._revalidate(route, tag)
        if self.cluster is not None:
            now = self.clock.time()
            if served.cache == "stale":  # the others serve it stale too, without asking, for a while
                record = {"digest": served.manifest.digest, "at": now + STALE_SHARED_SECONDS, "stale": True}
                await self.cluster.put(record, STALE_SHARED_SECONDS, "tag", route.local, tag)
            else:
                ttl = tag_ttl(route.proxy.config, tag)
                record = {"digest": served.manifest.digest, "at": now}
                await self.cluster.put(record, min(ttl, SHARED_TAG_MAX_SECONDS), "tag", route.local, tag)
        return served

    async def _revalidate(self, route: Route, tag: str) -> Served:
        entry = await self.ledger.tag(route.local, tag)
        cached = await self.store.get(route.local, entry.digest) if entry else None
        if cached is None:  # the index is an accelerator: the tag file (an import, another replica) is the truth
            stored = await self.store.tag(route.local, tag)
            cached = await self.store.get(route.local, stored) if stored else None
        up = route.proxy.client
        try:
            if cached is not None:
                digest = await up.head_manifest(route.remote, tag)
                if digest == cached.digest:  # the tag file already says so: only the time is new
                    await self.ledger.record([ops.tag(route.local, tag, cached.digest, self.clock.time())],
                                             durable=False)
                    return Served(cached, "revalidated")
            else:
                digest = None
            # Fetch by the digest HEAD named, so a tag moving between HEAD and GET can't mix them.
            served = await self._fetch(route, digest, tag)
        except UpstreamNotFound as e:
            if entry is not None:  # the tag is gone upstream: forget it, keep the content by digest
                await self.store.delete_tag(route.local, tag)
            raise translate(e, "MANIFEST_UNKNOWN", f"{route.local}:{tag}") from None
        except UpstreamAnswer as e:  # failed, rate limited, or refusing us now: the cached copy stands in
            if cached is None:
                raise translate(e, "MANIFEST_UNKNOWN", f"{route.local}:{tag}") from None
            log.warning("serving stale %s:%s: %s", route.local, tag, e)
            return Served(cached, "stale", STALE)
        await self.store.set_tag(route.local, tag, served.manifest.digest, fetched=self.clock.time())
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
        await self.store.put(route.local, manifest, durable=False)
        return Served(manifest, "miss")


