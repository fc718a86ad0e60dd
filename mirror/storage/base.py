"""The storage interface every backend implements, and the path checks they share.

Keys are '/'-separated relative paths made only by mirror/storage/layout.py. Blobs flow as
async iterators of chunks; nothing here reads a blob whole (get_bytes is for small records).
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mirror.storage.space import Space

T = TypeVar("T")


class NotFound(Exception):
    """The key does not exist."""


class StorageUnavailable(Exception):
    """The backend failed (down, refusing our credentials, ...): clients get 503 UNAVAILABLE."""


@dataclass(frozen=True, slots=True)
class Stat:
    size: int
    mtime: float


class Writer(abc.ABC):
    """A write that is invisible until `commit()`; `cancel()` leaves nothing behind."""

    size: int = 0

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def commit(self) -> None: ...

    @abc.abstractmethod
    async def cancel(self) -> None: ...

    async def __aenter__(self) -> Writer:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            await self.cancel()


def check_key(key: str) -> str:
    """Refuse keys that could escape the storage root, whatever a caller let through."""
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(part in ("", ".", "..") for part in key.split("/"))
    ):
        raise ValueError(f"invalid storage key: {key!r}")
    return key


class Storage(abc.ABC):
    """One async interface over every backend (see the contract tests in tests/storage/).

    A write that returns is durable: on the filesystem its data and the directory entry that makes
    it visible are synced; on OSS the PUT (or the multipart completion) has been answered. A write
    refused for lack of local space raises StorageFull (space.py)."""

    name: str
    space: Space  # whether local storage has room (shared by the wrappers of one backend)

    @abc.abstractmethod
    async def stat(self, key: str) -> Stat | None: ...

    @abc.abstractmethod
    def reader(self, key: str, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        """Chunks of the object from `offset`; raises NotFound."""

    @abc.abstractmethod
    async def writer(self, key: str, append: bool = False) -> Writer:
        """A new object, visible at commit; or with `append`, more bytes at the end of an existing
        (or new) object, kept as written even if the writer is abandoned: for upload data, which
        is never served and whose size tells the client where to resume."""

    @abc.abstractmethod
    async def get_bytes(self, key: str) -> bytes:
        """A small object whole (tags, links, manifests); raises NotFound."""

    @abc.abstractmethod
    async def put_bytes(self, key: str, data: bytes) -> None:
        """Replace a small object atomically."""

    @abc.abstractmethod
    async def put_file(self, key: str, source: Path) -> None:
        """Move a finished local file (already verified) into storage atomically."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[str]:
        """Names of the direct children of `prefix` (sorted; [] when absent)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete an object or everything under a prefix; absent is not an error."""

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete objects (not prefixes) in bulk, off the event loop; absent ones are not an error.
        Backends with a batch call override this (eviction and gc delete thousands at a time)."""
        for key in keys:
            await self.delete(key)

    @abc.abstractmethod
    async def move(self, src: str, dst: str) -> None: ...

    @abc.abstractmethod
    def scan(self, prefix: str) -> AsyncIterator[tuple[str, Stat]]:
        """Every object under `prefix`, at any depth, with its stat (in no particular order)."""

    def local_path(self, key: str) -> Path | None:
        """A path on local disk holding the object, so it can go out with sendfile."""
        return None

    def redirect_url(self, key: str) -> str | None:
        """A short-lived URL clients can fetch the object from directly, where the backend has one."""
        return None

    def bulk(self) -> Storage:
        """The storage to read everything once from (a scrub): past a cache in front of it, which
        such a read would only flush."""
        return self

    async def check(self) -> None:
        """Fail at start, clearly, when the backend cannot be used (raises StorageUnavailable)."""
        return None

    @abc.abstractmethod
    def staging_dir(self) -> Path:
        """A local directory for files that `put_file` will take (same filesystem when possible)."""

    async def close(self) -> None:
        return None


Observer = Callable[[str, float, bool], None]  # (operation, seconds, failed)


class Observed(Storage):
    """A backend with every call timed and its failures counted, for the metrics of a remote
    backend. A read is timed to its first bytes (the rest is the client's pace); a missing key
    is an answer, not a failure."""

    def __init__(self, backend: Storage, observe: Observer) -> None:
        self.backend = backend
        self.name = backend.name
        self.space = backend.space
        self.observe = observe

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        start = time.perf_counter()
        failed = False
        try:
            return await call
        except NotFound:
            raise
        except Exception:
            failed = True
            raise
        finally:
            self.observe(operation, time.perf_counter() - start, failed)

    async def stat(self, key: str) -> Stat | None:
        return await self._timed("stat", self.backend.stat(key))

    async def reader(self, key: str, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(self.backend.reader(key, offset, length)) as chunks:
            first = await self._timed("reader", anext(chunks, b""))
            if first:
                yield first
                try:
                    async for chunk in chunks:
                        yield chunk
                except Exception:
                    self.observe("reader", 0.0, True)
                    raise

    async def writer(self, key: str, append: bool = False) -> Writer:
        return _ObservedWriter(await self._timed("writer", self.backend.writer(key, append)), self)

    async def get_bytes(self, key: str) -> bytes:
        return await self._timed("get_bytes", self.backend.get_bytes(key))

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._timed("put_bytes", self.backend.put_bytes(key, data))

    async def put_file(self, key: str, source: Path) -> None:
        await self._timed("put_file", self.backend.put_file(key, source))

    async def list(self, prefix: str) -> list[str]:
        return await self._timed("list", self.backend.list(prefix))

    async def delete(self, key: str) -> None:
        await self._timed("delete", self.backend.delete(key))

    async def delete_many(self, keys: Sequence[str]) -> None:
        await self._timed("delete", self.backend.delete_many(keys))

    async def move(self, src: str, dst: str) -> None:
        await self._timed("move", self.backend.move(src, dst))

    async def scan(self, prefix: str) -> AsyncIterator[tuple[str, Stat]]:
        start = time.perf_counter()
        try:
            async for entry in self.backend.scan(prefix):
                yield entry
        except Exception:
            self.observe("scan", time.perf_counter() - start, True)
            raise
        self.observe("scan", time.perf_counter() - start, False)

    def local_path(self, key: str) -> Path | None:
        return self.backend.local_path(key)

    def redirect_url(self, key: str) -> str | None:
        return self.backend.redirect_url(key)

    async def check(self) -> None:
        await self.backend.check()

    def staging_dir(self) -> Path:
        return self.backend.staging_dir()

    async def close(self) -> None:
        await self.backend.close()


class _ObservedWriter(Writer):
    """Writes and the commit of a remote write, counted like the calls of Observed."""

    def __init__(self, inner: Writer, observed: Observed) -> None:
        self.inner = inner
        self.observed = observed
        self.size = inner.size

    async def write(self, data: bytes) -> None:
        try:
            await self.inner.write(data)
        except Exception:
            self.observed.observe("writer", 0.0, True)
            raise
        self.size = self.inner.size

    async def commit(self) -> None:
        await self.observed._timed("commit", self.inner.commit())

    async def cancel(self) -> None:
        await self.inner.cancel()
