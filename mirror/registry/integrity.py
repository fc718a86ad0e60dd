"""Whether stored bytes still match their digest: hashing an object as it is in storage, off the
event loop and at a pace, for mounts, re-pushes and the scrub (cache/scrub.py). A digest is the
name of bytes; a stored copy whose bytes no longer hash to its name (bit rot, a bad disk, a hand
that edited it) must never be served, linked or kept as if it were good."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import IO

from mirror.names import Digest
from mirror.storage import NotFound, Storage

CHUNK = 4 << 20


class Pace:
    """At most `rate` bytes a second on average since the start (None: as fast as storage reads)."""

    def __init__(self, rate: float | None = None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.bytes = 0

    async def took(self, n: int) -> None:
        self.bytes += n
        if self.rate:
            ahead = self.bytes / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                await asyncio.sleep(ahead)


def _hash_some(f: IO[bytes], hasher: object, size: int) -> int:
    data = f.read(size)
    hasher.update(data)  # type: ignore[attr-defined]
    return len(data)


async def stored_digest(storage: Storage, key: str, algorithm: str, pace: Pace | None = None) -> str | None:
    """The hex digest of the object at `key` as storage holds it; None if it is not there."""
    hasher = Digest(algorithm, "").hasher()
    path = storage.local_path(key)
    if path is not None:  # local disk: read and hash in one worker call per chunk
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            return None
        with f:
            while n := await asyncio.to_thread(_hash_some, f, hasher, CHUNK):
                if pace is not None:
                    await pace.took(n)
        return hasher.hexdigest()
    try:
        async with contextlib.aclosing(storage.reader(key)) as chunks:
            async for chunk in chunks:
                await asyncio.to_thread(hasher.update, chunk)  # hashlib releases the GIL
                if pace is not None:
                    await pace.took(len(chunk))
    except NotFound:
        return None
    return hasher.hexdigest()


async def intact(storage: Storage, key: str, digest: Digest, pace: Pace | None = None) -> bool | None:
    """Whether the object at `key` hashes to `digest`; None if it is not there."""
    found = await stored_digest(storage, key, digest.algorithm, pace)
    return None if found is None else found == digest.hex
