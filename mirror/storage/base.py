"""The storage interface every backend implements, and the path checks they share.

Keys are '/'-separated relative paths made only by mirror/storage/paths.py. Blobs flow as
async iterators of chunks; nothing here reads a blob whole (get_bytes is for small records).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path


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
    """One async interface over every backend (see the contract tests in tests/storage/)."""

    name: str

    @abc.abstractmethod
    async def stat(self, key: str) -> Stat | None: ...

    @abc.abstractmethod
    def reader(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
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

    @abc.abstractmethod
    async def move(self, src: str, dst: str) -> None: ...

    @abc.abstractmethod
    async def usage(self, prefix: str) -> tuple[int, int]:
        """(objects, bytes) under `prefix`, for the storage gauges."""

    def local_path(self, key: str) -> Path | None:
        """A path on local disk holding the object, so it can go out with sendfile."""
        return None

    def redirect_url(self, key: str) -> str | None:
        """A short-lived URL clients can fetch the object from directly, where the backend has one."""
        return None

    async def check(self) -> None:
        """Fail at start, clearly, when the backend cannot be used (raises StorageUnavailable)."""
        return None

    @abc.abstractmethod
    def staging_dir(self) -> Path:
        """A local directory for files that `put_file` will take (same filesystem when possible)."""

    async def close(self) -> None:
        return None
