"""The local index in diskcache: tag -> (digest, fetched_at), blob -> last access (for eviction),
repository and manifest -> last pulled (for the web UI).

An accelerator only: storage holds the truth (tag files, links), so the index can be deleted
and rebuilt. Reads go through a dict so the hot path never touches sqlite; blob access times
are batched in memory and flushed in the background instead of one sqlite write per hit.

Because it is only an accelerator, a write that fails (a full disk) is logged once and skipped,
never the failure of what asked for it (a DELETE, an eviction); and an index that cannot even be
opened on a full disk is replaced by one in memory until the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import diskcache

from mirror.background import every
from mirror.clock import SYSTEM, Clock

log = logging.getLogger("mirror.cache")
FULL_BYTES = 1 << 20  # a filesystem with less free than this is full for sqlite's purposes
WRITE_ERRORS = (sqlite3.Error, diskcache.Timeout, OSError)


@dataclass(slots=True)
class TagEntry:
    digest: str
    fetched_at: float  # when upstream last confirmed this digest (0 = never: revalidate)


FLUSH_SECONDS = 30.0


class _InMemory(dict[Any, Any]):
    """What the index keeps when it cannot be opened on a full disk: memory only, until a restart."""

    def set(self, key: Any, value: Any) -> None:
        self[key] = value

    def delete(self, key: Any) -> None:
        self.pop(key, None)

    def iterkeys(self) -> Iterator[Any]:
        return iter(list(self))

    def transact(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def incr(self, key: Any) -> None:
        self[key] = self.get(key, 0) + 1

    def close(self) -> None:
        return None


def _disk_full(directory: str) -> bool:
    path = directory
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < FULL_BYTES


def _open(directory: str, required: bool) -> Any:
    try:
        return diskcache.Cache(directory, eviction_policy="none", size_limit=2**62)
    except WRITE_ERRORS as e:
        if required or not _disk_full(directory):
            raise
        log.warning("index %s cannot be opened on a full disk (%s): running with an index in memory "
                    "until the next start (storage holds the truth)", directory, e)
        return _InMemory()


class Index:
    def __init__(self, directory: str, clock: Clock = SYSTEM, required: bool = False) -> None:
        """`required`: an index that cannot be opened is an error, even on a full disk (rebuild)."""
        self.db = _open(directory, required)
        self.clock = clock
        self._write_failed = False
        self._epoch = self.epoch()
        self._tags: dict[tuple[str, str], TagEntry | None] = {}
        self._access: dict[str, float] = {}
        self._pulled: dict[tuple[str, ...], float] = {}  # (repository,) or (repository, digest) -> time

    def tag(self, repository: str, tag: str) -> TagEntry | None:
        key = (repository, tag)
        try:
            return self._tags[key]
        except KeyError:
            pass
        raw = self.db.get(("tag", repository, tag))
        entry = TagEntry(*raw) if raw else None
        if len(self._tags) > 100_000:  # bound the read-through dict; sqlite still has them all
            self._tags.clear()
        self._tags[key] = entry
        return entry

    def _try(self, write: Callable[[], object]) -> None:
        """One write to sqlite; a failure is logged once (until one succeeds) and skipped."""
        try:
            write()
        except WRITE_ERRORS as e:
            if not self._write_failed:
                self._write_failed = True
                log.warning("index write failed (%s): skipped, and again until one succeeds; the index is an "
                            "accelerator, storage holds the truth", e)
            return
        self._write_failed = False

    def set_tag(self, repository: str, tag: str, digest: str, fetched_at: float) -> None:
        self._tags[(repository, tag)] = TagEntry(digest, fetched_at)
        self._try(lambda: self.db.set(("tag", repository, tag), (digest, fetched_at)))

    def drop_tag(self, repository: str, tag: str) -> None:
        self._tags[(repository, tag)] = None
        self._try(lambda: self.db.delete(("tag", repository, tag)))

    def touch_blob(self, digest: str) -> None:
        self._access[digest] = self.clock.time()

    def last_access(self, digest: str) -> float | None:
        """When a blob (or manifest) was last served: pending in memory, else flushed."""
        at = self._access.get(digest)
        if at is None:
            at = self.db.get(("access", digest))
        return at

    def _flushed(self, kind: str) -> dict[tuple[Any, ...], float]:
        """Every flushed (kind, ...) -> time entry (many small sqlite reads: call it in a thread)."""
        times = {}
        for key in self.db.iterkeys():
            if isinstance(key, tuple) and key and key[0] == kind:
                at = self.db.get(key)
                if at is not None:
                    times[tuple(key[1:])] = float(at)
        return times

    def flushed_access_times(self) -> dict[str, float]:
        """Every flushed access time (call it in a thread; add `pending`)."""
        return {key[0]: at for key, at in self._flushed("access").items()}

    @property
    def pending(self) -> dict[str, float]:
        """Access times not flushed yet (the loop's own: read them on the loop)."""
        return self._access

    def pulled(self, repository: str, digest: str, at: float | None = None) -> None:
        """A client pulled `digest` from `repository` (a manifest GET): batched like blob access."""
        now = self.clock.time() if at is None else at
        self._pulled[(repository,)] = now
        self._pulled[(repository, digest)] = now

    def pulled_times(self) -> dict[tuple[str, ...], float]:
        """Every flushed pull time (call it in a thread), then add `pending_pulls`."""
        return self._flushed("pulled")

    @property
    def pending_pulls(self) -> dict[tuple[str, ...], float]:
        return self._pulled

    def drop_access(self, digests: list[str]) -> None:
        """Forget the access times of evicted objects (flushed ones: pop pending ones on the loop)."""
        def drop() -> None:
            with self.db.transact():
                for digest in digests:
                    self.db.delete(("access", digest))

        self._try(drop)

    def epoch(self) -> int:
        """Bumped by commands that change storage behind a running server (`mirror evict`, `index
        rebuild`): a server seeing it move forgets what it remembers in memory."""
        return int(self.db.get("epoch", 0))

    def bump_epoch(self) -> None:
        self._try(lambda: self.db.incr("epoch"))

    def epoch_moved(self) -> bool:
        """Whether a command bumped the epoch since we last looked (then memory may name gone objects)."""
        epoch = self.epoch()
        moved, self._epoch = epoch != self._epoch, epoch
        return moved

    def scrubbed_at(self) -> float | None:
        """When the server's last complete scrub pass ended (None: never)."""
        at = self.db.get("scrubbed_at")
        return None if at is None else float(at)

    def scrub_finished(self, at: float) -> None:
        self._try(lambda: self.db.set("scrubbed_at", at))

    def clear(self) -> None:
        """Forget everything (`mirror index rebuild` refills it from storage)."""
        self._tags.clear()
        self._access.clear()
        self._pulled.clear()
        epoch = self.epoch()
        self.db.clear()
        self.db.set("epoch", epoch + 1)

    def forget_memory(self) -> None:
        self._tags.clear()

    def _take_pending(self) -> tuple[dict[str, float], dict[tuple[str, ...], float]]:
        """The batches to write, swapped out on the loop (requests keep adding to new ones)."""
        pending, self._access = self._access, {}
        pulled, self._pulled = self._pulled, {}
        return pending, pulled

    def _write(self, pending: dict[str, float], pulled: dict[tuple[str, ...], float]) -> None:
        def write() -> None:
            with self.db.transact():
                for digest, at in pending.items():
                    self.db.set(("access", digest), at)
                for key, at in pulled.items():
                    self.db.set(("pulled", *key), at)

        if pending or pulled:
            self._try(write)  # a batch that fails is lost: eviction then goes by older times

    async def flush(self) -> None:
        """Write the batched access and pull times, in a thread (an SQLite transaction)."""
        await asyncio.to_thread(self._write, *self._take_pending())

    async def flush_forever(self) -> None:
        await every(FLUSH_SECONDS, self.flush, first=False)

    def close(self) -> None:
        self._write(*self._take_pending())
        with contextlib.suppress(*WRITE_ERRORS):  # a checkpoint on a full disk: sqlite recovers at the next open
            self.db.close()
