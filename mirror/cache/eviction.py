"""Keeping the cache within its disk. Proxied content unused for `proxy.ttl` is removed, and once
proxied content passes `cache.high_watermark` of `cache.max_size` the least recently used of it
goes until it is under `cache.low_watermark`. Pushed (private) content never counts and is never
evicted. Protected is only what is being served right now: blobs being fetched (a Flight), and the
blobs a manifest served within `cache.min_idle` references that have not been fetched since (the
pull that manifest started is under way). Deleting a file a client is still reading does not cut
that client (the open file stays readable), so nothing else needs protecting. When protection
keeps the cache over its cap, that is said once and the next pass comes as soon as it ends.

Everything a pass needs is in the ledger (mirror/ledger/): the unpinned blobs in last-use order (an
index: a pass reads its victims and stops, whatever storage holds; private content is never read),
the totals, what recent manifests reference. Last use is the last access (batched), else the blob's
mtime. The server runs passes in the background, at once when a new blob takes usage past the high
watermark, and at once when a write finds the disk full: that pass treats what storage holds as the
cap, so least recently used proxied content goes down to the low watermark of it (cached content is
what a full disk can spare; private content never goes). The deletes go through the ledger's fence
(a push on another replica that references a victim meanwhile keeps it).

With replicas on Redis, one of them evicts at a time (a lease, renewed while its pass runs; the
others skip theirs and look again soon), and a pass also reads the last uses every replica has
written there in the last seconds: a manifest served on another replica protects what its pull
has not fetched yet, and a blob served elsewhere since the ledger last heard is not taken for
unused (the journal brings last uses only every ledger.FLUSH).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mirror.clock import SYSTEM, Clock
from mirror.cluster import Cluster
from mirror.ledger import journal, ops, queries
from mirror.ledger.ledger import FLUSH, BlobState, Ledger
from mirror.registry.stores import ManifestStore
from mirror.server.metrics import Metrics
from mirror.storage.inventory import Progress

log = logging.getLogger("mirror.cache")
EVICTION_SECONDS = 600.0
RECHECK_SECONDS = 30.0
PLAN_CHUNK = 1000  # candidates read from the index per step
PASS_CHUNK = 5000  # victims planned, then deleted, at a time: what a pass holds stays bounded
LEASE_SECONDS = 30.0  # the cluster's eviction lease, renewed every third of it while a pass runs
BUSY_RETRY = 5.0  # another replica holds the lease: look again this soon


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


@dataclass(frozen=True, slots=True)
class Victim:
    digest: str
    size: int
    used: float
    expired: bool
    manifest: bool
    tags: int


Cursor = tuple[float, int]  # a place in the unpinned index: (last use, id)


def plan(conn: sqlite3.Connection, ttl: float | None, now: float, target: int | None, usage: int,
         protected: set[str], after: Cursor, limit: int,
         elsewhere: dict[str, float] | None = None) -> tuple[list[Victim], Cursor | None]:
    """Least recently used first, from `after`: what has expired, then what takes usage down to
    `target`, at most `limit`; stops at the first candidate neither applies to (everything after it
    was used more recently still). A candidate `elsewhere` says was used later than the ledger knows
    (on another replica) is passed over: its place in the order is later. The victims, and where the
    next chunk starts (None: done)."""
    victims: list[Victim] = []
    elsewhere = elsewhere or {}
    while rows := queries.unpinned(conn, after, PLAN_CHUNK):
        for digest, size, used, blob_id in rows:
            if len(victims) >= limit:
                return victims, after
            after = (used, blob_id)
            if digest in protected or elsewhere.get(digest, -math.inf) > (used or 0.0):
                continue
            expired = ttl is not None and now - (used or 0.0) > ttl
            if not expired and (target is None or usage <= target):
                return victims, None
            links, tags = queries.users(conn, digest)
            victims.append(Victim(digest, size, used or 0.0, expired, any(k == ops.REVISION for _, k in links),
                                  len(tags)))
            usage -= size
    return victims, None


def pulls_in_progress(conn: sqlite3.Connection, now: float, min_idle: float,
                      elsewhere: dict[str, float] | None = None) -> dict[str, tuple[float, int]]:
    """The manifests served within `min_idle` (here, or on another replica by `elsewhere`'s last uses),
    and the blobs they reference that have not been used since (their pulls are under way), each with
    when that protection ends and its size."""
    elsewhere = elsewhere or {}
    served_at = dict(queries.served_since(conn, now - min_idle))
    for digest, at in elsewhere.items():  # blobs too: those with no children protect nothing more
        if at >= now - min_idle:
            served_at[digest] = max(at, served_at.get(digest, -math.inf))
    kept: dict[str, tuple[float, int]] = {}
    for manifest, served in served_at.items():
        size, _, pinned, _, _ = queries.blob_state(conn, manifest)
        children = queries.children(conn, manifest)
        if manifest in elsewhere and (pinned or not children):
            continue  # a blob, a private manifest, or one this ledger does not hold
        until = served + min_idle
        kept[manifest] = (until, size or 0)
        pending = [children]
        while pending:
            for child, used in pending.pop():
                if child in kept or max(used or 0.0, elsewhere.get(child, -math.inf)) >= served:
                    continue  # already protected, or fetched since the manifest was served
                kept[child] = (until, queries.blob_state(conn, child)[0] or 0)
                pending.append(queries.children(conn, child))  # an index's child manifests, and theirs
    return kept


class Evictor:
    """One eviction pass at a time over the ledger (and through it, storage)."""

    def __init__(self, ledger: Ledger, manifests: ManifestStore, metrics: Metrics,
                 in_use: Callable[[], Iterable[str]] = tuple, max_size: int | None = None, ttl: float | None = None,
                 min_idle: float = 30.0, high: float = 0.95, low: float = 0.85, clock: Clock = SYSTEM,
                 cluster: Cluster | None = None) -> None:
        self.ledger = ledger
        self.manifests = manifests
        self.metrics = metrics
        self.in_use = in_use  # digests being fetched right now
        self.max_size, self.ttl, self.min_idle, self.high, self.low = max_size, ttl, min_idle, high, low
        self.usage: int | None = None  # proxied bytes: from the last pass plus what arrived since
        self.clock = clock
        self.cluster = cluster
        self.wake = asyncio.Event()
        self.over_cap = False  # the last pass left the cache over its cap because pulls were in progress
        self._next_due: float | None = None  # wall time the protection that kept it over ends
        self._pressed = False  # a write found the disk full: the next pass makes room
        self._lock = asyncio.Lock()

    def grew(self, size: int, committed: bool) -> None:
        """Storage grew (or a blob is on its way): past the high watermark, the background pass
        runs now, so a large cold blob makes its room while it streams in."""
        if self.max_size is None:
            return
        if self.usage is None or self._lock.locked():
            self.wake.set()  # a pass under way may have counted without it: the next one counts again
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
        """Once the ledger is ready: a pass, then every EVICTION_SECONDS, as soon as a new blob passes the
        high watermark or a write finds the disk full (only those, without a cap or a TTL), or as soon as
        the protection that kept the cache over its cap ends. Between passes the ledger's totals are
        looked at every RECHECK_SECONDS (one read): what other replicas added counts too."""
        await self.ledger.ready.wait()
        last = -math.inf
        while True:
            due = self.clock.monotonic() - last >= EVICTION_SECONDS or self.wake.is_set() or await self._over()
            busy = False
            if due and (self.configured or self._pressed):
                last = self.clock.monotonic()
                try:
                    busy = await self.run_shared() is None
                except Exception:
                    log.exception("eviction pass failed")
            wait = BUSY_RETRY if busy else RECHECK_SECONDS
            if self._next_due is not None:
                wait = min(wait, max(0.1, self._next_due - self.clock.time()))
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that comes as
            # the event is set, and shutdown would wait forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.wake.wait()

    async def run_shared(self, **pass_settings: Any) -> EvictionResult | None:
        """A pass, unless another replica is running one (None): with Redis, one replica evicts at a
        time. Its lease is renewed while the pass runs; lost (Redis gone a while), the pass goes on:
        the fence keeps two passes safe, the lease only keeps them from doing the same work twice."""
        cluster = self.cluster
        if cluster is None:
            return await self.run(**pass_settings)
        token = await cluster.lease(LEASE_SECONDS, "evict")
        if token is None:
            log.debug("eviction: another replica is running a pass")
            return None

        async def renew() -> None:
            while True:
                await asyncio.sleep(LEASE_SECONDS / 3)
                if not await cluster.renew(token, LEASE_SECONDS, "evict"):
                    log.warning("eviction: the cluster's lease was lost during a pass")
                    return

        renewing = asyncio.create_task(renew())
        try:
            return await self.run(**pass_settings)
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            await cluster.release(token, "evict")

    async def _over(self) -> bool:
        """Past the high watermark by the ledger's count (which another replica's fills move too)."""
        if self.max_size is None:
            return False
        self.usage = (await self.ledger.totals()).unpinned_bytes
        return self.usage > self.max_size * self.high

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
            await self.ledger.flush()  # access times batched in memory count too
            totals = await self.ledger.totals()
            proxied = totals.unpinned_bytes
            result = EvictionResult(usage_before=totals.bytes, kept_private=totals.private_blobs)
            elsewhere = await self._used_elsewhere(now)
            pulling = await self.ledger.read(pulls_in_progress, now, self.min_idle, elsewhere)
            protected = set(self.in_use()) | pulling.keys()
            result.kept_recent = len(protected)
            target = int(max_size * self.low) if max_size is not None and proxied > max_size * self.high else None
            if pressed:  # a full disk caps proxied content at what it holds
                target = min(target if target is not None else proxied, int(proxied * self.low))
            if progress is not None:
                progress.set_description("evicting")
            planned: dict[str, Victim] = {}  # the chunk under way

            def keep(state: BlobState) -> bool:  # asked again once no other replica's write can be missed
                return state.pinned or (state.used or 0.0) > planned[state.digest].used \
                    or state.digest in set(self.in_use())

            def removed(state: BlobState) -> None:
                victim = planned[state.digest]
                self._count(result, victim)
                self.manifests.forget(victim.digest)
                self.metrics.blob_removed(victim.size)
                self.metrics.evictions.labels("manifest" if victim.manifest else "blob").inc()

            cursor: Cursor | None = (-math.inf, 0)
            while cursor is not None:  # a chunk at a time: a pass of any size holds one chunk
                usage = proxied - result.evicted_bytes
                victims, cursor = await self.ledger.read(plan, ttl, now, target, usage, protected, cursor, PASS_CHUNK,
                                                         elsewhere)
                planned.clear()
                planned.update((v.digest, v) for v in victims)
                if dry_run:
                    for v in victims:
                        self._count(result, v)
                else:
                    await self.ledger.remove(list(planned), keep, progress, removed)
            result.usage_after = result.usage_before - result.evicted_bytes
            result.proxied_after = proxied - result.evicted_bytes
            if not dry_run:
                self.usage = result.proxied_after
            if result.evicted:
                log.info("evicted %d objects (%d bytes, %d expired): storage %d -> %d bytes%s%s", len(result.evicted),
                         result.evicted_bytes, result.expired, result.usage_before, result.usage_after,
                         " (dry run)" if dry_run else "", " to make room on a full disk" if pressed else "")
            self._say_if_over(result, max_size, pulling, dry_run)
            return result

    async def _used_elsewhere(self, now: float) -> dict[str, float]:
        """Last uses on any replica the ledger may not have heard yet (with Redis): those of the last
        min_idle, or of one journal flush and its lag, whichever is longer."""
        if self.cluster is None:
            return {}
        return await self.cluster.recent_uses(now - max(self.min_idle, FLUSH + journal.LAG))

    @staticmethod
    def _count(result: EvictionResult, victim: Victim) -> None:
        result.evicted.append(victim.digest)
        result.evicted_bytes += victim.size
        result.expired += victim.expired
        result.manifests += victim.manifest
        result.dropped_tags += victim.tags

    def _say_if_over(self, result: EvictionResult, max_size: int | None, pulling: dict[str, tuple[float, int]],
                     dry_run: bool) -> None:
        """Past the cap only because pulls are in progress: say so once, and come back when they end."""
        over = max_size is not None and result.proxied_after > max_size * self.high
        held = {d: until for d, (until, size) in pulling.items() if size}
        if over and held:
            result.protected_until = min(held.values())
        if dry_run:
            return
        self._next_due = result.protected_until
        held_bytes = sum(size for _, size in pulling.values())
        if over and held and not self.over_cap:
            log.warning("proxied content (%d bytes) stays over cache.max_size %d: %d bytes are pulls in progress; "
                        "evicting them as soon as those pulls end", result.proxied_after, max_size, held_bytes)
        self.over_cap = bool(over and held)
        self.metrics.cache_protected_bytes.set(held_bytes if over else 0)
