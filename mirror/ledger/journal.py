"""The journal: how replicas on one storage learn each other's writes. Every write's ops go into a
record in storage (`_mirror/journal/<hour>/<minute>/<ms>-<replica>-<seq>`, layout.py), written by one
task per process in the order of the writes (records waiting while one is written go out together
as the next); each replica lists the minutes since it last looked and applies the records it has
not seen.

Visibility is bounded, not instant: a record is in storage within LAG of the time its name carries
(a write slower than half of that is written again under a later time; applying twice is harmless).
So a poll that lists at time T has seen every record older than T - LAG: the *horizon*, which a
replica keeps with its ledger and resumes from. Records are kept RETENTION; a replica behind by
more rebuilds its ledger from storage instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mirror.clock import Clock
from mirror.ledger.ops import Op
from mirror.storage import NotFound, Storage, layout
from mirror.storage.space import StorageFull

log = logging.getLogger("mirror.ledger")

LAG = 10.0  # seconds within which a record is readable by everyone (name time to visible)
RETENTION = 7 * 86400.0  # records are kept this long; a replica behind by more rebuilds
READS = 8  # records read at once while catching up
RETRY = (1.0, 30.0)  # a record storage refused is written again after this long, doubling up to the second
QUEUED = 100_000  # ops waiting to be written past which the oldest are dropped (a replica then verifies)


def now_ms(clock: Clock) -> int:
    return int(clock.time() * 1000)


def new_replica_id() -> str:
    """What names this process's records (a new one each start: replaying one's own records is harmless)."""
    return uuid.uuid4().hex[:12]


@dataclass
class Record:
    key: str
    ops: list[Op]
    replica: str


class JournalWriter:
    """This process's records, in write order, one PUT at a time with whatever queued meanwhile."""

    def __init__(self, storage: Storage, clock: Clock, replica: str, lag: float = LAG) -> None:
        self.storage = storage
        self.clock = clock
        self.replica = replica
        self.lag = lag
        self._seq = 0
        self._pending: list[tuple[list[Op], asyncio.Future[str] | None, int]] = []
        self._task: asyncio.Task[None] | None = None
        # told each key this process writes, with the tag its ops came with (the ledger generation)
        self.written: Callable[[str, int], None] = lambda key, tag: None
        self.failing = False  # storage refused the last record (it is being written again)
        self.put: Callable[[], None] = lambda: None  # told after each record is in storage

    async def append(self, ops: list[Op], *, wait: bool, tag: int = 0) -> str | None:
        """Queue `ops`; with `wait`, return once they are in storage (the key), else at once."""
        future = asyncio.get_running_loop().create_future() if wait else None
        self._pending.append((ops, future, tag))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future if future is not None else None

    async def _drain(self) -> None:
        """Write what is queued, in order. A record storage refuses (full, unreachable) fails the writes
        waiting for it and is written again later, before anything newer: the writes it describes
        happened, and the other replicas must learn of them."""
        delay = RETRY[0]
        while self._pending:
            batch, self._pending = self._pending, []
            ops = [op for group, _, _ in batch for op in group]
            try:
                key = await self._put(ops, {tag for _, _, tag in batch})
            except Exception as e:
                self.failing = True
                for _, future, _ in batch:
                    if future is not None and not future.done():
                        future.set_exception(e)
                kept = [(group, None, tag) for group, _, tag in batch]
                self._pending = kept + self._pending
                if sum(len(group) for group, _, _ in self._pending) > QUEUED:
                    log.error("journal: over %d ops not written; the oldest are dropped (the other replicas learn "
                              "of them at their next `mirror index rebuild`)", QUEUED)
                    self._pending = self._pending[len(self._pending) // 2:]
                # a full disk is said once, by storage (space.py): here it is only why the record waits
                log.log(logging.INFO if isinstance(e, StorageFull) else logging.WARNING,
                        "journal record of %d ops not written (%s): again in %.0fs", len(ops), e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY[1])
                continue
            delay, self.failing = RETRY[0], False
            self.put()
            for _, future, _ in batch:
                if future is not None and not future.done():
                    future.set_result(key)

    async def _put(self, ops: list[Op], tags: set[int]) -> str:
        body = await _encoded({"replica": self.replica, "ops": ops})
        while True:
            ms = now_ms(self.clock)
            self._seq += 1
            key = layout.journal_record(ms, self.replica, self._seq)
            for tag in tags:
                self.written(key, tag)
            await self.storage.put_bytes(key, body)
            if now_ms(self.clock) - ms < self.lag * 500:
                return key
            # Slow: readers may have passed its time already. The same ops again under a later one.
            log.warning("journal record %s took %.1fs to write; writing it again", key, (now_ms(self.clock) - ms) / 1e3)

    async def flush(self, seconds: float = 10.0) -> None:
        """Until what is queued is written, or storage refuses it, or `seconds` passed."""
        deadline = time.monotonic() + seconds
        while self._task is not None and not self._task.done() and not self.failing \
                and time.monotonic() < deadline:
            await asyncio.wait({self._task}, timeout=0.05)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


@dataclass
class Tail:
    """Where this replica's ledger stands in the journal: everything before `horizon` (ms) applied,
    and the records at or after it already applied by name."""

    horizon: int
    seen: set[str] = field(default_factory=set)


async def poll(storage: Storage, clock: Clock, tail: Tail, apply: Callable[[list[Record]], Awaitable[None]],
               lag: float = LAG, batch: int = 256, own: Callable[[str], bool] = lambda key: False) -> int:
    """Read the records written since `tail.horizon` that are not yet applied, and `apply` them in name
    (time) order, in batches; then move the horizon. Records `own` names (this process's, applied when
    written) are skipped unread. The number applied."""
    start = now_ms(clock)
    first_minute = tail.horizon // 60_000
    names: list[str] = []
    for hour in range(tail.horizon // 3_600_000, start // 3_600_000 + 1):
        minutes = [int(m) for m in await storage.list(layout.journal_hour(hour)) if m.isdigit()]
        for minute in sorted(m for m in minutes if m >= first_minute):
            prefix = layout.journal_minute(minute)
            for name in await storage.list(prefix):
                ms = layout.journal_time(name)
                key = f"{prefix}/{name}"
                if ms is not None and ms >= tail.horizon and key not in tail.seen:
                    if own(key):
                        tail.seen.add(key)
                    else:
                        names.append(key)
    applied = 0
    for i in range(0, len(names), batch):
        keys = names[i:i + batch]
        records = [r for r in await _read_all(storage, keys) if r is not None]
        await apply(records)
        tail.seen.update(keys)
        applied += len(records)
    horizon = max(tail.horizon, start - int(lag * 1000))
    tail.seen = {k for k in tail.seen if (layout.journal_time(k.rsplit("/", 1)[1]) or 0) >= horizon}
    tail.horizon = horizon
    return applied


async def _read_all(storage: Storage, keys: list[str]) -> list[Record | None]:
    limit = asyncio.Semaphore(READS)

    async def read(key: str) -> Record | None:
        async with limit:
            try:
                data = await storage.get_bytes(key)
                raw = json.loads(data) if len(data) < 4096 else await asyncio.to_thread(json.loads, data)
            except NotFound:
                return None  # pruned meanwhile
            except ValueError:
                log.warning("journal record %s is not JSON: skipped", key)
                return None
        ops = raw.get("ops") if isinstance(raw, dict) else None
        if not isinstance(ops, list):
            return None
        return Record(key, [op for op in ops if isinstance(op, list) and op and isinstance(op[0], str)],
                      str(raw.get("replica", "")))

    return list(await asyncio.gather(*(read(k) for k in keys)))


async def prune(storage: Storage, clock: Clock, retention: float = RETENTION) -> int:
    """Delete the hours of records older than `retention`."""
    oldest = int((clock.time() - retention) * 1000) // 3_600_000
    removed = 0
    for hour in await storage.list(layout.JOURNAL):
        if hour.isdigit() and int(hour) < oldest:
            await storage.delete(layout.journal_hour(int(hour)))
            removed += 1
    return removed


async def _encoded(doc: object) -> bytes:
    """JSON of a record; a large one (an eviction's chunk of deletes) in a worker, not on the loop."""
    small = len(doc["ops"]) < 64 if isinstance(doc, dict) else True
    encode = functools.partial(json.dumps, doc, separators=(",", ":"))
    return (encode() if small else await asyncio.to_thread(encode)).encode()


def record_time(key: str) -> int:
    return layout.journal_time(key.rsplit("/", 1)[1]) or 0


__all__ = ["LAG", "RETENTION", "JournalWriter", "Record", "Tail", "poll", "prune"]
