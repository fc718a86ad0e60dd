"""Keeping the cache within its disk. Proxied content unused for `proxy.ttl` is removed, and once
proxied content passes `cache.high_watermark` of `cache.max_size` the least recently used of it
goes until it is under `cache.low_watermark`. Pushed (private) content never counts and is never
evicted. Protected is only what is being served right now: blobs being fetched (a Flight), and the
blobs a manifest served within `cache.min_idle` references that have not been fetched since (the
pull that manifest started is under way). Deleting a file a client is still reading does not cut
that client (the open file stays readable), so nothing else needs protecting. When protection
keeps the cache over its cap, that is said once and the next pass comes as soon as it ends.

Last use comes from the index (batched access times), else the object's mtime. One pass walks
storage once (`Census`); the server runs passes in the background, at once when a new blob
takes usage past the high watermark, and at once when a write finds the disk full: that pass
treats what storage holds as the cap, so least recently used proxied content goes down to the
low watermark of it (cached content is what a full disk can spare; private content never goes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mirror.cache.index import Index
from mirror.clock import SYSTEM, Clock
from mirror.names import Digest, parse_digest
from mirror.registry import namespace
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
    adopted = await namespace.adopted_kind(storage)
    for name, repo in census.inventory.repositories.items():
        # registry/namespace.py's rule: patterns, markers, and content without a marker is private
        # (cached in a registry:2 pull-through cache's root)
        private = census.repositories[name] = \
            namespace.classify(is_private(name), repo.marks, bool(repo.linked), adopted) == namespace.PRIVATE
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
    kept_recent: int = 0  # protected: a pull in progress, or a fetch
    proxied_after: int = 0  # bytes of proxied content left (what the cap is about)
    protected_until: float | None = None  # when protection keeping the cache over its cap ends


class Evictor:
    """One eviction pass at a time over storage, the stores and the index."""

    def __init__(self, storage: Storage, index: Index, manifests: ManifestStore, blobs: BlobStore,
                 is_private: Callable[[str], bool], in_use: Callable[[], Iterable[str]] = tuple,
                 max_size: int | None = None, ttl: float | None = None, min_idle: float = 30.0,
                 high: float = 0.95, low: float = 0.85, clock: Clock = SYSTEM) -> None:
        self.storage = storage
        self.index = index
        self.manifests = manifests
        self.blobs = blobs
        self.is_private = is_private
        self.in_use = in_use  # digests being fetched right now
        self.max_size, self.ttl, self.min_idle, self.high, self.low = max_size, ttl, min_idle, high, low
        self.usage: int | None = None  # bytes in storage: from the last census plus what arrived since
        self.clock = clock
        self.wake = asyncio.Event()
        self.over_cap = False  # the last pass left the cache over its cap because pulls were in progress
        self._next_due: float | None = None  # wall time the protection that kept it over ends
        self._pressed = False  # a write found the disk full: the next pass makes room
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

    def pressure(self) -> None:
        """A write found the disk full: make room now."""
        self._pressed = True
        self.wake.set()

    @property
    def configured(self) -> bool:
        """Whether passes have anything to do without pressure (a size cap or a TTL)."""
        return self.max_size is not None or self.ttl is not None

    async def run_forever(self) -> None:
        """A pass at start, then every EVICTION_SECONDS, as soon as a new blob passes the high watermark
        or a write finds the disk full (only those, without a cap or a TTL), or as soon as the protection
        that kept the cache over its cap ends."""
        while True:
            if self.configured or self._pressed:
                try:
                    await self.run()
                except Exception:
                    log.exception("eviction pass failed")
            wait = EVICTION_SECONDS
            if self._next_due is not None:
                wait = min(wait, max(0.1, self._next_due - self.clock.time()))
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see notify.py's sender
                async with asyncio.timeout(wait):
                    await self.wake.wait()

    async def run(self, *, ttl: float | None = None, max_size: int | None = None, dry_run: bool = False,
                  now: float | None = None, progress: Progress | None = None) -> EvictionResult:
        """One pass: expire what is older than `ttl`, then LRU down to the low watermark of `max_size`
        (both default to the configured ones)."""
        ttl = self.ttl if ttl is None else ttl
        max_size = self.max_size if max_size is None else max_size
        async with self._lock:
            self.wake.clear()
            pressed, self._pressed = self._pressed, False
            now = self.clock.time() if now is None else now
            census = await take_census(self.storage, self.is_private, progress=progress)
            self._times = await asyncio.to_thread(self.index.flushed_access_times)
            self._times.update(self.index.pending)
            result = EvictionResult(usage_before=census.total)
            result.kept_private = len(census.private & census.blobs.keys())
            pulling = await self._pulls_in_progress(census, now)
            protected = census.private | set(self.in_use()) | pulling.keys()
            result.kept_recent = len(protected - census.private)
            candidates = sorted((self._last_use(d, census), d) for d in census.blobs if d not in protected)
            # Only proxied content counts: past the high watermark it goes, down to the low one; a full
            # disk caps it at what it holds.
            proxied = sum(st.size for d, st in census.blobs.items() if d not in census.private)
            target = max_size * self.low if max_size is not None and proxied > max_size * self.high else None
            if pressed:
                target = min(target if target is not None else proxied, proxied * self.low)
            usage = proxied
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
            result.proxied_after = proxied - result.evicted_bytes
            if not dry_run:
                self.usage = result.proxied_after
            if victims:
                log.info("evicted %d objects (%d bytes, %d expired): storage %d -> %d bytes%s%s", len(victims),
                         result.evicted_bytes, result.expired, result.usage_before, result.usage_after,
                         " (dry run)" if dry_run else "", " to make room on a full disk" if pressed else "")
            self._say_if_over(result, max_size, pulling, census, dry_run)
            return result

    def _say_if_over(self, result: EvictionResult, max_size: int | None, pulling: dict[str, float],
                     census: Census, dry_run: bool) -> None:
        """Past the cap only because pulls are in progress: say so once, and come back when they end."""
        over = max_size is not None and result.proxied_after > max_size * self.high
        held = {d: until for d, until in pulling.items() if d in census.blobs}
        if over and held:
            result.protected_until = min(held.values())
        if dry_run:
            return
        self._next_due = result.protected_until
        if over and held and not self.over_cap:
            log.warning("proxied content (%d bytes) stays over cache.max_size %d: %d bytes are pulls in progress; "
                        "evicting them as soon as those pulls end", result.proxied_after, max_size,
                        sum(census.blobs[d].size for d in held))
        self.over_cap = bool(over and held)
        self.blobs.metrics.cache_protected_bytes.set(sum(census.blobs[d].size for d in held) if over else 0)

    def _last_use(self, digest: str, census: Census) -> float:
        return self._times.get(digest) or census.blobs[digest].mtime

    async def _pulls_in_progress(self, census: Census, now: float) -> dict[str, float]:
        """The manifests served within `min_idle`, and the blobs they reference that have not been fetched
        since (their pulls are under way), each with when that protection ends."""
        kept: dict[str, float] = {}
        for manifest in census.revisions:
            served = self._times.get(manifest)
            if manifest not in census.blobs or served is None or now - served >= self.min_idle:
                continue
            until = served + self.min_idle
            kept[manifest] = until  # and the manifest itself: its blobs' protection hangs on it
            pending = [parse_digest(manifest)]
            while pending:
                for ref in await manifest_refs(self.storage, pending.pop()):
                    d = str(ref)
                    if d in kept or (self._times.get(d) or 0.0) >= served:
                        continue  # already protected, or fetched since the manifest was served
                    kept[d] = until
                    pending.append(ref)  # an index's child manifests, and what they reference
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
