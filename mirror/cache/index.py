"""The local index in diskcache: tag -> (digest, fetched_at), blob -> last access (for eviction),
repository and manifest -> last pulled (for the web UI).

An accelerator only: storage holds the truth (tag files, links), so the index can be deleted
and rebuilt. Reads go through a dict so the hot path never touches sqlite; blob access times
are batched in memory and flushed in the background instead of one sqlite write per hit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import diskcache

from mirror.background import every
from mirror.clock import SYSTEM, Clock


@dataclass(slots=True)
class TagEntry:
    digest: str
    fetched_at: float  # when upstream last confirmed this digest (0 = never: revalidate)


FLUSH_SECONDS = 30.0


class Index:
    def __init__(self, directory: str, clock: Clock = SYSTEM) -> None:
        self.db = diskcache.Cache(directory, eviction_policy="none", size_limit=2**62)
        self.clock = clock
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

    def set_tag(self, repository: str, tag: str, digest: str, fetched_at: float) -> None:
        self._tags[(repository, tag)] = TagEntry(digest, fetched_at)
        self.db.set(("tag", repository, tag), (digest, fetched_at))

    def drop_tag(self, repository: str, tag: str) -> None:
        self._tags[(repository, tag)] = None
        self.db.delete(("tag", repository, tag))

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
        with self.db.transact():
            for digest in digests:
                self.db.delete(("access", digest))

    def epoch(self) -> int:
        """Bumped by commands that change storage behind a running server (`mirror evict`, `index
        rebuild`): a server seeing it move forgets what it remembers in memory."""
        return int(self.db.get("epoch", 0))

    def bump_epoch(self) -> None:
        self.db.incr("epoch")

    def epoch_moved(self) -> bool:
        """Whether a command bumped the epoch since we last looked (then memory may name gone objects)."""
        epoch = self.epoch()
        moved, self._epoch = epoch != self._epoch, epoch
        return moved

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
        if pending or pulled:
            with self.db.transact():
                for digest, at in pending.items():
                    self.db.set(("access", digest), at)
                for key, at in pulled.items():
                    self.db.set(("pulled", *key), at)

    async def flush(self) -> None:
        """Write the batched access and pull times, in a thread (an SQLite transaction)."""
        await asyncio.to_thread(self._write, *self._take_pending())

    async def flush_forever(self) -> None:
        await every(FLUSH_SECONDS, self.flush, first=False)

    def close(self) -> None:
        self._write(*self._take_pending())
        self.db.close()
