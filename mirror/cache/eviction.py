"""Keeping the cache within its disk. Proxied content unused for `proxy.ttl` is removed, and past
`cache.high_watermark` of `cache.max_size` the least recently used proxied content goes until
usage is under `cache.low_watermark`. Pushed (private) content is never evicted, nor anything
used within `cache.min_idle`: a manifest served that recently keeps everything it references, so
an image being pulled keeps its layers.

Last use comes from the index (batched access times), else the object's mtime. One pass walks
storage once (`Census`); the server runs passes in the background, and at once when a new blob
takes usage past the high watermark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mirror.cache.index import Index
from mirror.names import Digest, parse_digest
from mirror.registry.stores import BlobStore, ManifestStore, manifest_refs
from mirror.storage import Storage, inventory, layout
from mirror.storage.base import Stat
from mirror.storage.inventory import Inventory, Progress

log = logging.getLogger("mirror.cache")
EVICTION_SECONDS = 600.0
YIELD_EVERY = 32  # evictions between turns of the event loop


@dataclass
class Census:
    """Eviction's view of one inventory walk: which content is private (linked by a private
    repository, or referenced by a private manifest) and who links the rest."""

    inventory: Inventory
    private: set[str] = field(default_factory=set)  # digests private content needs
    repositories: dict[str, bool] = field(default_factory=dict)  # name -> private
    layer_links: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # digest -> proxied repos
    revisions: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # digest -> proxied repos
    tags: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))  # -> (repo, tag)

    @property
    def blobs(self) -> dict[str, Stat]:
        return self.inventory.blobs

    @property
    def total(self) -> int:
        return self.inventory.total


async def take_census(storage: Storage, is_private: Callable[[str], bool],
                      progress: Progress | None = None) -> Census:
    """One walk of storage, then the digests cached tags point to (a read per proxied tag) and the
    closure of what private manifests reference."""
    census = Census(await inventory.take(storage, progress=progress))
    for name, repo in census.inventory.repositories.items():
        private = census.repositories[name] = repo.marked_private or is_private(name)
        if private:
            census.private |= repo.linked
            continue
        for digest in repo.layers:
            census.layer_links[digest].append(name)
        for digest in repo.manifests:
            census.revisions[digest].append(name)
        for tag in repo.tags:
            target = await inventory.tag_target(storage, name, tag)
            if target is not None:
                census.tags[target].append((name, tag))
    # What a private manifest references is private too (an index's children, shared layers).
    pending = [parse_digest(d) for d in census.private if d in census.blobs]
    while pending:
        for ref in await manifest_refs(storage, pending.pop()):
            if str(ref) not in census.private:
                census.private.add(str(ref))
                pending.append(ref)
    return census


@dataclass
class EvictionResult:
    usage_before: int = 0
    usage_after: int = 0
    evicted: list[str] = field(default_factory=list)
    evicted_bytes: int = 0
    expired: int = 0  # of `evicted`: unused for longer than the TTL
    manifests: int = 0  # of `evicted`: manifests (their tags dropped too)
    dropped_tags: int = 0
    kept_private: int = 0
    kept_recent: int = 0


class Evictor:
    """One eviction pass at a time over storage, the stores and the index."""

    def __init__(self, storage: Storage, index: Index, manifests: ManifestStore, blobs: BlobStore,
                 is_private: Callable[[str], bool], in_use: Callable[[], Iterable[str]] = tuple,
                 max_size: int | None = None, ttl: float | None = None, min_idle: float = 600.0,
                 high: float = 0.95, low: float = 0.85) -> None:
        self.storage = storage
        self.index = index
        self.manifests = manifests
        self.blobs = blobs
        self.is_private = is_private
        self.in_use = in_use  # digests being fetched right now
        self.max_size, self.ttl, self.min_idle, self.high, self.low = max_size, ttl, min_idle, high, low
        self.usage: int | None = None  # bytes in storage: from the last census plus what arrived since
        self.wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._times: dict[str, float] = {}  # last use by digest, read once per pass

    def grew(self, size: int, committed: bool) -> None:
        """Storage grew (or a blob is on its way): past the high watermark, the background pass
        runs now, so a large cold blob makes its room while it streams in."""
        if self.usage is None:
            return
        if committed:
            self.usage += size
        if self.max_size is not None and self.usage + (0 if committed else size) > self.max_size * self.high:
            self.wake.set()

    async def run_forever(self) -> None:
        """A pass at start, then every EVICTION_SECONDS or as soon as a new blob passes the high watermark."""
        while True:
            try:
                await self.run()
            except Exception:
                log.exception("eviction pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), EVICTION_SECONDS)

    async def run(self, *, ttl: float | None = None, max_size: int | None = None, dry_run: bool = False,
                  now: float | None = None, progress: Progress | None = None) -> EvictionResult:
        """One pass: expire what is older than `ttl`, then LRU down to the low watermark of `max_size`
        (both default to the configured ones)."""
        ttl = self.ttl if ttl is None else ttl
        max_size = self.max_size if max_size is None else max_size
        async with self._lock:
            self.wake.clear()
            now = time.time() if now is None else now
            census = await take_census(self.storage, self.is_private, progress=progress)
            self._times = await asyncio.to_thread(self.index.flushed_access_times)
            self._times.update(self.index.pending)
            result = EvictionResult(usage_before=census.total)
            protected = self._protected(census, now, result)
            protected |= await self._referenced_by_recent_manifests(census, now)
            candidates = sorted((self._last_use(d, census), d) for d in census.blobs if d not in protected)
            # Only past the high watermark does size evict, and then down to the low one.
            target = max_size * self.low if max_size is not None and census.total > max_size * self.high else None
            usage = census.total
            victims: list[str] = []
            for last_use, digest in candidates:  # least recently used first
                expired = ttl is not None and now - last_use > ttl
                if not expired and (target is None or usage <= target):
                    break  # everything after this was used more recently still
                victims.append(digest)
                usage -= census.blobs[digest].size
                result.expired += expired
            if progress is not None:
                progress.set_description("evicting")
                progress.reset(total=len(victims))
            for i, digest in enumerate(victims):
                await self._evict(digest, census, result, dry_run)
                if progress is not None:
                    progress.update()
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # filesystem deletes never wait: let requests through
            if victims and not dry_run:
                await asyncio.to_thread(self.index.drop_access, victims)  # one transaction, off the loop
            result.usage_after = census.total - result.evicted_bytes
            if not dry_run:
                self.usage = result.usage_after
            if victims:
                log.info("evicted %d objects (%d bytes, %d expired): storage %d -> %d bytes%s", len(victims),
                         result.evicted_bytes, result.expired, result.usage_before, result.usage_after,
                         " (dry run)" if dry_run else "")
            if max_size is not None and result.usage_after > max_size:
                log.warning("storage holds %d bytes, over cache.max_size %d: the rest is private or in use",
                            result.usage_after, max_size)
            return result

    def _last_use(self, digest: str, census: Census) -> float:
        return self._times.get(digest) or census.blobs[digest].mtime

    def _protected(self, census: Census, now: float, result: EvictionResult) -> set[str]:
        protected = set(census.private) | set(self.in_use())
        result.kept_private = len(census.private & census.blobs.keys())
        recent = {d for d in census.blobs if now - self._last_use(d, census) < self.min_idle}
        result.kept_recent = len(recent - protected)
        return protected | recent

    async def _referenced_by_recent_manifests(self, census: Census, now: float) -> set[str]:
        """A manifest served within `min_idle` keeps what it references: its pull is under way."""
        kept: set[str] = set()
        pending = [parse_digest(d) for d in census.revisions
                   if d in census.blobs and now - self._last_use(d, census) < self.min_idle]
        while pending:
            for ref in await manifest_refs(self.storage, pending.pop()):
                if str(ref) not in kept:
                    kept.add(str(ref))
                    pending.append(ref)
        return kept

    async def _evict(self, digest: str, census: Census, result: EvictionResult, dry_run: bool) -> None:
        size = census.blobs[digest].size
        result.evicted.append(digest)
        result.evicted_bytes += size
        is_manifest = digest in census.revisions
        result.manifests += is_manifest
        result.dropped_tags += len(census.tags.get(digest, ()))
        if dry_run:
            return
        d = Digest(*digest.split(":", 1))
        # Links first: a request in between finds no link and fetches again, never a dangling one.
        for repository, tag in census.tags.get(digest, ()):
            self.index.drop_tag(repository, tag)
            await self.manifests.delete_tag(repository, tag)
        for repository in census.revisions.get(digest, ()):
            await self.manifests.unlink(repository, d)
        for repository in census.layer_links.get(digest, ()):
            await self.blobs.unlink(repository, d)
        self.manifests.forget(digest)
        await self.storage.delete(layout.blob_entry(d))
        self.index.pending.pop(digest, None)
        self.blobs.metrics.blob_removed(size)
        self.blobs.metrics.evictions.labels("manifest" if is_manifest else "blob").inc()
