"""Deleting blobs another replica may be about to reference, safely.

A deletion pass (gc, eviction) decides from its ledger; a write on another replica that references a
blob (a push or mount linking it, a manifest naming it) may land meanwhile. Each side writes its own
flag in storage, then reads the other's:

- the write puts its journal record (journal.py), then lists the passes under way (`_mirror/passes/`,
  one listing, empty but for the seconds a pass takes); a pass whose list of blobs names one it
  references makes it wait until that pass is over (or past its deadline), then look whether the
  blob is still there, and fail if not (the client pushes it again);
- the pass puts its marker, which lists the blobs it condemns, then reads the journal once more and
  applies what came since its last look, spares what became needed meanwhile, deletes the rest
  before its deadline, and removes its marker.

Storage is strongly consistent (a filesystem, OSS: what was written is read and listed after), so at
least one side sees the other: a write that looked for passes before the marker was written had its
record written before that, and the pass's last look at the journal reads it; a write that looks
after finds the marker. A write that was told its blobs are there never loses them to a pass. A
pass's list never changes, so each process reads a marker once.
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
STEP = 0.1  # how often a write waiting on a pass looks again
KNOWN = 1000  # passes whose lists a process keeps (they are few at a time, and each short-lived)


class Passes:
    """This process's view of the passes under way: their lists, read once each."""

    def __init__(self, storage: Storage, clock: Clock) -> None:
        self.storage = storage
        self.clock = clock
        self._lists: dict[str, tuple[float, frozenset[str]]] = {}  # pass id -> (deadline, digests)

    async def _read(self, pass_id: str) -> tuple[float, frozenset[str]] | None:
        found = self._lists.get(pass_id)
        if found is not None:
            return found
        try:
            raw = json.loads(await self.storage.get_bytes(layout.deletion_pass(pass_id)))
        except NotFound:
            return None  # over meanwhile
        except ValueError:
            raw = {}
        found = (float(raw.get("deadline", 0.0)), frozenset(raw.get("digests", ()))) if isinstance(raw, dict) \
            else (0.0, frozenset())
        if len(self._lists) >= KNOWN:
            self._lists.clear()
        self._lists[pass_id] = found
        return found

    async def still_there(self, digests: Iterable[str]) -> set[str]:
        """After a write's record is in the journal: the referenced blobs a pass deleted (the write must
        fail); waits while a pass that condemned one of them is under way. One listing when none is."""
        wanted = set(digests)
        if not wanted:
            return set()
        running = await self.storage.list(layout.PASSES)
        if not running:
            return set()
        waiting: dict[str, float] = {}
        for pass_id in running:
            found = await self._read(pass_id)
            if found is not None and found[1] & wanted:
                waiting[pass_id] = found[0]
        if not waiting:
            return set()
        log.info("a write waits for %d deletion passes that condemned blobs it references", len(waiting))
        until = max(waiting.values()) + SKEW
        while self.clock.time() < until:
            running = await self.storage.list(layout.PASSES)
            if not set(waiting) & set(running):
                break
            await asyncio.sleep(STEP)
        condemned = set().union(*(self._lists.get(p, (0.0, frozenset()))[1] for p in waiting))
        return {d for d in wanted & condemned if await self.storage.stat(layout.blob(parse_digest(d))) is None}


class Condemnation:
    """A pass's marker, from `begin` until `end` (a context manager): the blobs it may delete."""

    def __init__(self, storage: Storage, clock: Clock, digests: list[str], seconds: float = DEADLINE) -> None:
        self.storage = storage
        self.clock = clock
        self.digests = digests
        self.id = f"{int(clock.time() * 1000):013d}-{uuid.uuid4().hex[:12]}"
        self.deadline = clock.time() + seconds
        self.key = layout.deletion_pass(self.id)

    def in_time(self) -> bool:
        """Whether deleting now is still within the deadline writers wait for."""
        return self.clock.time() < self.deadline - SKEW - 1.0

    async def __aenter__(self) -> Condemnation:
        doc = {"deadline": self.deadline, "digests": self.digests}
        body = await asyncio.to_thread(lambda: json.dumps(doc, separators=(",", ":")).encode())
        await self.storage.put_bytes(self.key, body)
        return self

    async def __aexit__(self, *_: object) -> None:
        with contextlib.suppress(Exception):  # left behind, it expires: prune() removes it
            await self.storage.delete(self.key)


async def prune(storage: Storage, clock: Clock) -> None:
    """Markers of passes that died: past their deadline, they only cost writers a look."""
    expired = clock.time() - DEADLINE - SKEW
    for pass_id in await storage.list(layout.PASSES):
        with contextlib.suppress(NotFound, ValueError):
            key = layout.deletion_pass(pass_id)
            if float(json.loads(await storage.get_bytes(key)).get("deadline", 0)) < expired:
                await storage.delete(key)
