"""Scrubbing: every stored blob and manifest hashed against its digest, so rot is found before a
client is handed it.

What is damaged is taken out of what is served: cached content (pulled through) is removed, so the
next pull fetches it again; private content (pushed here, or referenced by a private manifest) is
quarantined under `layout.quarantined` (kept, never served) and the repositories that reference it
are reported, since only a push of the right bytes repairs it. `mirror scrub` runs one pass; the
server runs one every `scrub.interval`, at `scrub.rate` bytes a second.

A pass walks storage's blobs (reading them is its point), streamed; what the ledger knows decides
what a damaged one is (pinned by private content or not) and who links it, and hears of what was
taken out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from mirror.ledger import ops, queries
from mirror.ledger.ledger import Ledger
from mirror.names import Digest
from mirror.registry import integrity
from mirror.registry.integrity import Pace
from mirror.registry.stores import ManifestStore
from mirror.server.metrics import Metrics
from mirror.storage import Storage, layout
from mirror.storage.inventory import Progress

log = logging.getLogger("mirror.scrub")
FIRST_PASS_SECONDS = 600.0  # a server never scrubbed starts its first pass this long after start


@dataclass
class Damaged:
    digest: str
    size: int
    private: bool
    action: str  # removed (cached) | quarantined (private) | none (dry run)
    repositories: list[str]  # the repositories that link it


@dataclass
class ScrubResult:
    objects: int = 0  # blobs and manifests hashed
    bytes: int = 0
    seconds: float = 0.0
    damaged: list[Damaged] = field(default_factory=list)
    vanished: int = 0  # removed (gc, eviction) between the walk and their turn

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


class Scrubber:
    """Passes over storage. `reads` is where bytes are read from (past a hot tier, so a pass does
    not flush it); changes go through `storage`."""

    def __init__(self, storage: Storage, ledger: Ledger, *, reads: Storage | None = None,
                 manifests: ManifestStore | None = None, metrics: Metrics | None = None) -> None:
        self.storage = storage
        self.reads = reads or storage
        self.ledger = ledger
        self.manifests = manifests  # the server's: what memory holds of a removed manifest goes too
        self.metrics = metrics

    async def run(self, *, dry_run: bool = False, pace: Pace | None = None,
                  progress: Progress | None = None) -> ScrubResult:
        result = ScrubResult()
        start = time.monotonic()
        if progress is not None:
            progress.set_description("scrubbing")
            progress.reset(total=(await self.ledger.totals()).bytes)
        async for key, st in self.storage.scan(layout.BLOBS):
            parsed = layout.parse(key)
            if parsed is None or parsed.kind != layout.BLOB or parsed.digest is None:
                continue
            d, digest = parsed.digest, str(parsed.digest)
            ok = await integrity.intact(self.reads, key, d, pace)
            if ok is False:  # replaced meanwhile (a re-push)? Judge what is there now.
                now = await self.storage.stat(key)
                if now is None or now != st:
                    ok = await integrity.intact(self.reads, key, d, pace)
            if progress is not None:
                progress.update(st.size)
            if ok is None:
                result.vanished += 1
                continue
            result.objects += 1
            result.bytes += st.size
            if self.metrics is not None:
                self.metrics.scrub_bytes.inc(st.size)
            if not ok:
                links, _ = await self.ledger.read(queries.users, digest)
                pinned = (await self.ledger.read(queries.blob_state, digest))[2]
                damaged = Damaged(digest, st.size, pinned, "none", sorted({name for name, _ in links}))
                if not dry_run:
                    await self._take_out(d, damaged)
                result.damaged.append(damaged)
        result.seconds = time.monotonic() - start
        log.info("scrub: %d objects (%d bytes) in %.1fs, %d damaged%s", result.objects, result.bytes, result.seconds,
                 len(result.damaged), " (dry run)" if dry_run else "")
        return result

    async def _take_out(self, digest: Digest, damaged: Damaged) -> None:
        if damaged.private:
            await self.storage.move(layout.blob(digest), layout.quarantined(digest))
            damaged.action = "quarantined"
            log.error("scrub: private blob %s (%d bytes) does not match its digest: quarantined; push it again to "
                      "%s", digest, damaged.size, ", ".join(damaged.repositories) or "the repository that had it")
        else:
            await self.storage.delete(layout.blob(digest))
            damaged.action = "removed"
            log.error("scrub: cached blob %s (%d bytes) does not match its digest: removed, the next pull fetches "
                      "it again", digest, damaged.size)
        await self.ledger.record([ops.blob_gone(str(digest))], durable=False)
        if self.manifests is not None:
            self.manifests.forget(str(digest))
        if self.metrics is not None:
            self.metrics.blob_removed(damaged.size)
            self.metrics.scrub_damaged.labels("private" if damaged.private else "cached").inc()

    async def run_forever(self, interval: float, rate: float | None) -> None:
        """A pass every `interval` at `rate` bytes a second; the last pass's end is kept in the
        ledger, so a restart does not start over."""
        await self.ledger.ready.wait()
        last = await self.ledger.scrubbed_at()
        if self.metrics is not None and last is not None:
            self.metrics.scrub_last_pass.set(last)
        while True:
            last = await self.ledger.scrubbed_at()
            wait = min(FIRST_PASS_SECONDS, interval) if last is None else last + interval - time.time()
            await asyncio.sleep(max(0.0, wait))
            try:
                await self.run(pace=Pace(rate))
            except Exception:
                log.exception("scrub pass failed")
                await asyncio.sleep(min(interval, FIRST_PASS_SECONDS))
                continue
            finished = time.time()
            await self.ledger.scrub_finished(finished)
            if self.metrics is not None:
                self.metrics.scrub_last_pass.set(finished)
