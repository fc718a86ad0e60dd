"""Deleting blobs another replica may be about to reference, safely.

A deletion pass (gc, eviction) decides from its ledger; a write on another replica that references a
blob (a push or mount linking it, a manifest naming it) may land meanwhile. Each side writes its own
flag in storage, then reads the other's:

- the write puts its journal record (journal.py), then looks for a pass under way (`_mirror/passes/`,
  one listing) and only then for a tombstone on each blob it references (`_mirror/condemned/`); a
  tombstone makes it wait until the pass is done with that blob (or past its deadline), then look
  whether the blob is still there, and fail if not (the client pushes it again);
- the pass puts its marker and a tombstone per blob, then waits until its ledger has applied every
  record written before the tombstones (the journal's horizon, or at once when no other process has
  a live heartbeat), spares what became needed meanwhile, deletes the rest before its deadline, and
  removes its tombstones.

Storage is strongly consistent (a filesystem, OSS), so at least one side sees the other: a write
that was told its blobs are there never loses them to a pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Iterable

from mirror.clock import Clock
from mirror.names import parse_digest
from mirror.storage import NotFound, Storage, layout

log = logging.getLogger("mirror.ledger")

DEADLINE = 120.0  # a pass deletes within this of condemning, or leaves the blob for the next one
SKEW = 2.0  # clock difference between replicas tolerated
STEP = 0.1  # how often a write waiting on a tombstone looks again
PUTS = 16  # tombstones written at once


async def still_there(storage: Storage, clock: Clock, digests: Iterable[str]) -> set[str]:
    """After a write's record is in the journal: the referenced blobs a pass deleted (the write must
    fail); waits while a pass is deciding about one of them. One listing when no pass runs."""
    wanted = sorted(set(digests))
    if not wanted or not await storage.list(layout.PASSES):
        return set()
    waiting: dict[str, float] = {}
    for digest in wanted:
        deadline = await _tombstone(storage, digest)
        if deadline is not None:
            waiting[digest] = deadline
    if not waiting:
        return set()
    log.info("a write waits for a deletion pass to decide about %d blobs it references", len(waiting))
    until = max(waiting.values()) + SKEW
    while waiting and clock.time() < until:
        await asyncio.sleep(STEP)
        for digest in list(waiting):
            if await _tombstone(storage, digest) is None:
                del waiting[digest]
    return {d for d in wanted if await storage.stat(layout.blob(parse_digest(d))) is None}


async def _tombstone(storage: Storage, digest: str) -> float | None:
    try:
        raw = json.loads(await storage.get_bytes(layout.condemned(parse_digest(digest))))
    except NotFound:
        return None
    except ValueError:
        return 0.0
    return float(raw.get("deadline", 0.0)) if isinstance(raw, dict) else 0.0


class Condemnation:
    """A pass's marker and tombstones, from `begin` until `end` (a context manager)."""

    def __init__(self, storage: Storage, clock: Clock, digests: list[str], seconds: float = DEADLINE) -> None:
        self.storage = storage
        self.clock = clock
        self.digests = digests
        self.id = uuid.uuid4().hex[:16]
        self.deadline = clock.time() + seconds
        self.body = json.dumps({"deadline": self.deadline, "pass": self.id}).encode()

    def in_time(self) -> bool:
        """Whether deleting now is still within the deadline writers wait for."""
        return self.clock.time() < self.deadline - SKEW - 1.0

    async def __aenter__(self) -> Condemnation:
        await self.storage.put_bytes(layout.deletion_pass(self.id), self.body)
        limit = asyncio.Semaphore(PUTS)

        async def put(digest: str) -> None:
            async with limit:
                await self.storage.put_bytes(layout.condemned(parse_digest(digest)), self.body)

        await asyncio.gather(*(put(d) for d in self.digests))
        return self

    async def __aexit__(self, *_: object) -> None:
        with contextlib.suppress(Exception):  # left behind, they expire: prune() removes them
            await self.storage.delete_many([layout.condemned(parse_digest(d)) for d in self.digests])
            await self.storage.delete(layout.deletion_pass(self.id))


async def prune(storage: Storage, clock: Clock) -> None:
    """Markers and tombstones of passes that died: past their deadline, they only cost writers a look."""
    expired = clock.time() - DEADLINE
    async for key, _ in storage.scan(layout.MIRROR + "/passes"):
        with contextlib.suppress(NotFound, ValueError):
            if float(json.loads(await storage.get_bytes(key)).get("deadline", 0)) < expired:
                await storage.delete(key)
    async for key, _ in storage.scan(layout.CONDEMNED):
        with contextlib.suppress(NotFound, ValueError):
            if float(json.loads(await storage.get_bytes(key)).get("deadline", 0)) < expired:
                await storage.delete(key)
