"""The one object the rest of mirror asks about what storage holds, and tells what it wrote.

Opening is O(1): the ledger file of this machine's local directory (`cache.index`), as it was left.
In the background (`run`) it then catches up with the journal, or, when it has none yet, is too far
behind, or its format changed, rebuilds from a walk of storage while the server serves; `ready` is
set once it is complete and caught up, and the readers that need the whole picture (the catalog,
eviction, gc, the gauges) wait for it.

Files: `ledger-<generation>.sqlite` and `ledger.current` naming the generation in use. A rebuild
writes the next generation beside the one in use and then points at it; every process using the
directory notices within POLL and switches, replaying the journal from where the rebuild started.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mirror.clock import SYSTEM, Clock
from mirror.cluster import Cluster
from mirror.config import Config
from mirror.ledger import fence, journal, ops, queries, rebuild, schema
from mirror.ledger.database import Database
from mirror.ledger.rebuild import Progress
from mirror.names import parse_digest
from mirror.registry.namespace import adopted_kind, configured_private
from mirror.storage import Storage, layout
from mirror.storage.space import StorageFull

log = logging.getLogger("mirror.ledger")
T = TypeVar("T")

POLL = 1.0  # seconds between looks at the journal (and at the generation in use)
FLUSH = 30.0  # seconds between writes of the batched last-use and pull times
PRUNE = 3600.0  # seconds between prunes of the journal
CONDEMN = 5000  # blobs one pass marker lists (fence.py)
DELETE = 500  # blobs deleted per storage call (and per journal record)
TAGS_REMEMBERED = 100_000
BACKLOG = 1_000_000  # ops kept in memory while the ledger's disk refuses writes; past it, a rebuild
POINTER = "ledger.current"

Listener = Callable[[Sequence[ops.Op] | None], None]  # foreign ops applied (None: everything may have changed)


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    fetched_at: float  # when the upstream last confirmed it (0: never, revalidate)


@dataclass(frozen=True, slots=True)
class BlobState:
    digest: str
    size: int | None
    used: float | None
    pinned: bool
    reached: bool
    linked: float | None


def fingerprint(*parts: object) -> str:
    """What a configuration decides about kinds (private patterns, upstreams), as one value."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def for_config(config: Config, storage: Storage, clock: Clock = SYSTEM) -> Ledger:
    """The ledger of this machine's local directory (`cache.index`) for `config`'s storage."""
    has_upstreams = bool(config.upstreams)
    return Ledger(config.cache.index_dir(config.storage), storage,
                  configured_private(config.private, has_upstreams),
                  fingerprint(config.private.patterns, has_upstreams), clock)


class Ledger:
    def __init__(self, directory: str | Path, storage: Storage, configured_private: Callable[[str], bool],
                 kinds: str = "", clock: Clock = SYSTEM, *, lag: float = journal.LAG, poll: float = POLL) -> None:
        self.directory = Path(directory)
        self.storage = storage
        self.configured_private = configured_private
        self.kinds = schema.Kinds(configured_private)  # and what unmarked content is: read at open
        self.fingerprint = kinds  # of what configured_private decides: kinds are recomputed when it moves
        self.clock = clock
        self.lag = lag  # how late a record may become readable (journal.LAG)
        self.poll_seconds = poll
        self.replica = journal.new_replica_id()
        self.writer = journal.JournalWriter(storage, clock, self.replica, lag)
        self.writer.written = self._written
        self.passes = fence.Passes(storage, clock)
        self.db: Database | None = None
        self.generation = 0
        self.tail = journal.Tail(0)
        self.ready = asyncio.Event()
        self.needs_rebuild = False
        self.rebuilding = False
        self.error: str | None = None
        self._own: set[str] = set()  # journal keys this process applied to the generation in use
        self._used: dict[str, float] = {}
        self._pulled: dict[tuple[str, str], float] = {}
        self._pulled_repos: dict[str, float] = {}
        self._tags: dict[tuple[str, str], TagEntry | None] = {}
        self._listeners: list[Listener] = []
        self._catching_up = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._backlog: list[ops.Op] = []  # ops the ledger's disk refused (full), applied once it takes them
        self._wake = asyncio.Event()  # another replica wrote a record (redis): look now, not at the next poll
        self._cluster: Cluster | None = None

    # --- files -----------------------------------------------------------------------------------------

    def _path(self, generation: int) -> Path:
        return self.directory / f"ledger-{generation}.sqlite"

    def _pointed(self) -> int | None:
        try:
            return int((self.directory / POINTER).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _point(self, generation: int) -> None:
        temp = self.directory / f"{POINTER}.{os.getpid()}"
        temp.write_text(str(generation))
        os.replace(temp, self.directory / POINTER)

    def _next_generation(self) -> int:
        """A generation number no process has taken (its file created exclusively)."""
        generation = max([self._pointed() or 0, *self._generations()]) + 1
        while True:
            try:
                with open(self._path(generation), "x"):
                    return generation
            except FileExistsError:
                generation += 1

    def _generations(self) -> list[int]:
        found = []
        for path in self.directory.glob("ledger-*.sqlite"):
            with contextlib.suppress(ValueError):
                found.append(int(path.stem.split("-", 1)[1]))
        return found

    def _remove(self, generation: int) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self._path(generation)}{suffix}").unlink(missing_ok=True)

    # --- opening ---------------------------------------------------------------------------------------

    async def open(self) -> Ledger:
        """The ledger as this machine left it (O(1)); `run` or `prepare` bring it up to date."""
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        self.kinds = schema.Kinds(self.configured_private, await adopted_kind(self.storage))
        generation = self._pointed()
        if generation is None or not self._path(generation).exists():
            generation = self._next_generation()
            await asyncio.to_thread(self._point, generation)
        db = await Database(self._path(generation), self.kinds).open()
        state = await db.write(self._state)
        if not state[1] and not await self._holds_anything():
            state = await db.write(self._empty)  # a new storage: nothing to read, complete as it is
        self._use(generation, db, state)
        return self

    async def _holds_anything(self) -> bool:
        return bool(await self.storage.list(layout.BLOBS) or await self.storage.list(layout.REPOSITORIES))

    def _empty(self, conn: Any) -> tuple[int, int, object, str]:
        schema.set_meta(conn, "horizon", journal.now_ms(self.clock) - int(self.lag * 1000))
        schema.set_meta(conn, "complete", 1)
        return self._state(conn)

    def _state(self, conn: Any) -> tuple[int, int, object, str]:
        horizon = int(str(schema.get_meta(conn, "horizon", 0) or 0))
        complete = int(str(schema.get_meta(conn, "complete", 0) or 0))
        version = schema.get_meta(conn, "version")
        kinds = str(schema.get_meta(conn, "kinds", ""))
        fingerprint = f"{self.fingerprint}/{self.kinds.adopted}"
        if kinds != fingerprint:  # the configuration's private patterns moved: every kind again
            conn.execute("UPDATE repos SET kind = mirror_kind(name, marks, layers + manifests > 0) "
                         "WHERE kind != mirror_kind(name, marks, layers + manifests > 0)")
            schema.set_meta(conn, "kinds", fingerprint)
        return horizon, complete, version, kinds

    def _use(self, generation: int, db: Database, state: tuple[int, int, object, str]) -> None:
        horizon, complete, version, _ = state
        old = self.db
        self.db, self.generation = db, generation
        self._own = set()
        self._tags.clear()
        self.tail = journal.Tail(horizon)
        too_old = horizon < journal.now_ms(self.clock) - (journal.RETENTION - 3600) * 1000
        self.needs_rebuild = not complete or version != schema.VERSION or too_old
        if old is not None:
            for listener in self._listeners:
                listener(None)
            task = asyncio.create_task(self._close_later(old))  # requests under way finish on it
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_later(self, db: Database) -> None:
        await asyncio.sleep(5.0)
        await db.close()

    async def prepare(self, progress: Progress | None = None) -> None:
        """Up to date now (a command's start): rebuilt if need be, else caught up."""
        if self.needs_rebuild:
            await self.rebuild(progress)
        else:
            await self.catch_up()
        self.ready.set()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        if not self.writer.failing:  # storage refusing records (full): what is queued is lost, said already
            await self.writer.flush()
        await self.writer.stop()
        for task in list(self._closing):
            task.cancel()
        if self.db is not None:
            await self.db.close()
            self.db = None

    # --- keeping up --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Background: rebuild or catch up, then follow the journal, flush times, beat, prune."""
        while not self.ready.is_set():
            try:
                await self.prepare()
            except (sqlite3.OperationalError, StorageFull) as e:  # a full disk: said in one line, tried again
                self.error = str(e) or type(e).__name__
                log.warning("the ledger could not be brought up to date (%s); trying again", self.error)
                await asyncio.sleep(10 * self.poll_seconds)
            except Exception as e:
                self.error = str(e) or type(e).__name__
                log.exception("the ledger could not be brought up to date; trying again")
                await asyncio.sleep(10 * self.poll_seconds)
        self.error = None
        flushed = pruned = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):  # not wait_for: it can swallow a cancellation (3.11)
                async with asyncio.timeout(self.poll_seconds):
                    await self._wake.wait()
            self._wake.clear()
            if self.needs_rebuild and not self.ready.is_set():
                await self._quietly(self.prepare)
            await self._quietly(self._follow_generation)
            await self._quietly(self._apply_backlog)
            await self._quietly(self.catch_up)
            if time.monotonic() - flushed >= FLUSH:
                flushed = time.monotonic()
                await self._quietly(self.flush)
            if time.monotonic() - pruned >= PRUNE:
                pruned = time.monotonic()
                await self._quietly(self.prune)

    @staticmethod
    async def _quietly(job: Callable[[], Awaitable[Any]]) -> None:
        try:
            await job()
        except Exception:
            log.exception("ledger: %s failed", getattr(job, "__name__", job))

    async def prune(self) -> None:
        await journal.prune(self.storage, self.clock)
        await fence.prune(self.storage, self.clock)

    async def _follow_generation(self) -> None:
        """Another process (`mirror index rebuild`) pointed at a new generation: use it."""
        pointed = self._pointed()
        if pointed is None or pointed == self.generation or not self._path(pointed).exists() or self.rebuilding:
            return
        db = await Database(self._path(pointed), self.kinds).open()
        self._use(pointed, db, await db.write(self._state))
        log.info("ledger: now generation %d (rebuilt by another process)", pointed)
        await self.catch_up()

    async def catch_up(self) -> int:
        """Apply the other processes' journal records written since the horizon."""
        async with self._catching_up:
            db = self.db
            assert db is not None, "ledger not open"
            before = self.tail.horizon

            async def apply(records: list[journal.Record]) -> None:
                if records:
                    await self._apply(db, [op for r in records for op in r.ops])
                    for record in records:
                        self._heard(record.ops)

            applied = await journal.poll(self.storage, self.clock, self.tail, apply, self.lag,
                                         own=self._own.__contains__)
            if (applied or self.tail.horizon - before > 60_000) and not self._backlog:
                with contextlib.suppress(sqlite3.OperationalError):  # kept in memory; written next time
                    await db.write(schema.set_meta, "horizon", self.tail.horizon)
            self._own = {k for k in self._own if journal.record_time(k) >= self.tail.horizon}
            return applied

    def _heard(self, applied: Sequence[ops.Op]) -> None:
        for op in applied:
            if op[0] in ("tag", "-tag", "fetched"):
                self._tags.pop((op[1], op[2]), None)
        for listener in self._listeners:
            listener(applied)

    def share(self, cluster: Cluster) -> None:
        """With redis: each record written is announced, and the others look at the journal at once
        (the poll stays, for when redis is away)."""
        self.writer.put = lambda: cluster.publish("journal", {})
        cluster.on("journal", lambda event: self._wake.set())
        self._cluster = cluster  # and last uses, at once: the journal has them only every FLUSH

    def on_change(self, listener: Listener) -> None:
        """`listener` hears the ops of other processes once applied (to forget what memory holds of them)."""
        self._listeners.append(listener)

    async def rebuild(self, progress: Progress | None = None) -> None:
        """A new generation from a walk of storage (the server keeps serving from the one in use), then
        the journal replayed from where the walk began."""
        self.rebuilding = True
        try:
            generation = await asyncio.to_thread(self._next_generation)
            path = self._path(generation)
            await asyncio.to_thread(self._remove, generation)  # the placeholder: a fresh file
            began = journal.now_ms(self.clock) - int(self.lag * 1000)
            log.info("ledger: rebuilding from storage (generation %d)", generation)
            t0 = time.perf_counter()
            previous = self.db.path if self.db is not None else None
            await rebuild.build(self.storage, path, self.kinds, began, previous, progress)
            db = await Database(path, self.kinds).open()
            state = await db.write(self._state)
            await asyncio.to_thread(self._point, generation)
            old = self.generation
            self._use(generation, db, state)
            await self.writer.flush()  # what was written meanwhile is in the journal: the catch-up applies it
            await self.catch_up()
            if old and old != generation:
                await asyncio.sleep(0)
                await asyncio.to_thread(self._remove_later, old)
            log.info("ledger: rebuilt from storage in %.1fs", time.perf_counter() - t0)
        finally:
            self.rebuilding = False

    def _remove_later(self, generation: int) -> None:
        """The previous generation's file: other processes holding it open keep reading until they switch."""
        self._remove(generation)

    # --- writes --------------------------------------------------------------------------------------------

    def _written(self, key: str, generation: int) -> None:
        """A record this process applied to `generation` before writing it: the tail skips it there."""
        if generation == self.generation:
            self._own.add(key)

    async def record(self, changes: list[ops.Op], *, durable: bool, share: bool = True) -> set[str]:
        """What a write changed: into this process's ledger now, and into the journal for the others
        (unless `share` is off: what another replica journals itself). `durable` (a write that must
        not be lost: pushes, mounts, deletes by clients) waits for the record to be in storage and for
        any deletion pass to decide about the blobs it references; it returns those a pass deleted
        meanwhile (the write must fail). Cached fills don't wait."""
        if not changes:
            return set()
        db = self.db
        assert db is not None, "ledger not open"
        await self._apply(db, changes)
        for op in changes:
            if op[0] in ("tag", "-tag", "fetched"):
                self._tags.pop((op[1], op[2]), None)
        if not share:
            return set()
        key = await self.writer.append(changes, wait=durable, tag=self.generation)
        if not durable or key is None:
            return set()
        return await self.passes.still_there(ops.referenced(changes))

    async def _apply(self, db: Database, changes: list[ops.Op]) -> None:
        """Into the ledger, after what its disk refused before (in order); refused again, kept in memory:
        the write it describes is done, and the ledger must not hold the request up (a delete on a full
        disk must work)."""
        if self._backlog:
            self._backlog += changes
            await self._apply_backlog()
            return
        try:
            await db.write(ops.apply, changes)
        except sqlite3.OperationalError as e:
            self._refused(changes, e)

    async def _apply_backlog(self) -> None:
        db = self.db
        if not self._backlog or db is None:
            return
        pending, self._backlog = self._backlog, []
        try:
            await db.write(ops.apply, pending)
        except sqlite3.OperationalError as e:
            self._refused(pending, e)
            return
        log.info("ledger: %d ops its disk refused are applied", len(pending))

    def _refused(self, changes: list[ops.Op], error: Exception) -> None:
        if not self._backlog:
            log.warning("ledger write refused (%s): kept in memory and applied once its disk takes writes", error)
        self._backlog = changes + self._backlog if self._backlog else changes
        if len(self._backlog) > BACKLOG:
            log.error("ledger: over %d ops refused: dropped; it is rebuilt from storage once writes work", BACKLOG)
            self._backlog = []
            self.needs_rebuild = True
            self.ready.clear()

    def touch(self, digest: str) -> None:
        """A blob or manifest was served (eviction's order): batched, written every FLUSH seconds (and
        with redis, told to the other replicas' eviction within a second)."""
        at = self._used[digest] = self.clock.time()
        if self._cluster is not None:
            self._cluster.used(digest, at)

    def pulled(self, repository: str, digest: str) -> None:
        """A manifest GET was answered (the UI's last pulled): batched like touches."""
        self._pulled[(repository, digest)] = self._pulled_repos[repository] = self.clock.time()

    def last_pulled(self, repository: str, digest: str | None, flushed: float | None) -> float | None:
        """A pull time as the UI shows it: the one not flushed yet, else the ledger's (`flushed`)."""
        if digest is None:
            pending = self._pulled_repos.get(repository)
        else:
            pending = self._pulled.get((repository, digest))
        return max(pending or 0.0, flushed or 0.0) or None

    async def flush(self) -> None:
        """The batched times into the ledger (and the journal: other replicas' eviction order)."""
        used, self._used = self._used, {}
        pulled, self._pulled = self._pulled, {}
        self._pulled_repos = {}
        changes = ([ops.used(used)] if used else []) + ([ops.pulled(pulled)] if pulled else [])
        if changes and self.db is not None:
            await self.record(changes, durable=False)

    # --- reads ---------------------------------------------------------------------------------------------

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` (a query of queries.py, or a pass's planner) in the reading thread."""
        db = self.db
        assert db is not None, "ledger not open"
        return await db.read(fn, *args)

    async def wait_ready(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.ready.wait()
        return self.ready.is_set()

    async def tag(self, repository: str, name: str) -> TagEntry | None:
        """A tag's digest and revalidation time: from memory when hot (the request path), else one read."""
        key = (repository, name)
        try:
            return self._tags[key]
        except KeyError:
            pass
        found = await self.read(queries.tag, repository, name)
        entry = TagEntry(*found) if found else None
        if len(self._tags) >= TAGS_REMEMBERED:
            self._tags.clear()
        self._tags[key] = entry
        return entry

    async def totals(self) -> queries.Totals:
        return await self.read(queries.totals)

    async def scrubbed_at(self) -> float | None:
        """When this machine's last complete scrub pass ended (None: never)."""
        at = await self.read(queries.meta, "scrubbed_at")
        return None if at is None else float(str(at))

    async def scrub_finished(self, at: float) -> None:
        db = self.db
        assert db is not None, "ledger not open"
        await db.write(schema.set_meta, "scrubbed_at", at)

    # --- deleting ------------------------------------------------------------------------------------------

    async def remove(self, digests: Iterable[str], keep: Callable[[BlobState], bool],
                     progress: Progress | None = None,
                     removed: Callable[[BlobState], None] = lambda state: None) -> list[str]:
        """Delete blobs with the links and tags that name them, safely beside other replicas (fence.py):
        behind a pass's marker, `keep` asked again once every record written before it is applied."""
        done: list[str] = []
        pending = list(digests)
        for i in range(0, len(pending), CONDEMN):
            part = pending[i:i + CONDEMN]
            async with fence.Condemnation(self.storage, self.clock, part) as condemned:
                await self._settle(condemned)
                states = await self.read(_states, part)
                victims = [s for s in states if s.size is not None and not keep(s)]
                for j in range(0, len(victims), DELETE):
                    if not condemned.in_time():
                        log.warning("deletion pass out of time: %d blobs left for the next one", len(victims) - j)
                        break
                    chunk = victims[j:j + DELETE]
                    await self._delete(chunk)
                    done += [s.digest for s in chunk]
                    for state in chunk:
                        removed(state)
                    if progress is not None:
                        progress.update(len(chunk))
        return done

    async def _settle(self, condemned: fence.Condemnation) -> None:
        """Every record written before the pass's marker, applied: one look at the journal after it.
        A write that looked for passes before the marker was there had its record in storage before
        that (it writes, then looks), and storage lists what was written before (OSS and filesystems
        do); one that looks after finds the marker and waits (fence.py). Its own writes are in the
        ledger before they look."""
        await self.catch_up()

    async def _delete(self, victims: list[BlobState]) -> None:
        """Tags and links first (a request in between finds no link and fetches again, never a dangling
        one), then the blobs; then what changed, into the ledger and the journal."""
        named = await self.read(_users, [s.digest for s in victims])
        keys, entries, changes = [], [], []
        for state, (links, tags) in zip(victims, named, strict=True):
            digest = parse_digest(state.digest)
            for repo, tag in tags:  # a tag and its index of past targets, as registry:2 deletes one
                entries.append(layout.tag_entry(repo, tag))
                changes.append(ops.untag(repo, tag))
            for repo, kind in links:
                keys.append(layout.layer(repo, digest) if kind == schema.LAYER else layout.revision(repo, digest))
                changes.append(ops.unlink(repo, state.digest, kind))
        for entry in entries:  # few: the tags of evicted manifests
            await self.storage.delete(entry)
        await self.storage.delete_many(keys)
        await self.storage.delete_many([layout.blob(parse_digest(s.digest)) for s in victims])
        await self.record(changes + [ops.blob_gone(s.digest) for s in victims], durable=False)


def _states(conn: Any, digests: list[str]) -> list[BlobState]:
    return [BlobState(d, *queries.blob_state(conn, d)) for d in digests]


def _users(conn: Any, digests: list[str]) -> list[tuple[list[tuple[str, int]], list[tuple[str, str]]]]:
    return [queries.users(conn, d) for d in digests]
