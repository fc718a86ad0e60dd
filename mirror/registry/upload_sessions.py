"""Blob uploads (push): sessions live in storage so any process can continue one; bytes stream
to storage and through a resumable hash as they arrive; a blob appears only once its digest
has verified. Nothing of an upload is ever held in memory."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mirror.background import every
from mirror.errors import RegistryError
from mirror.ledger import ops, queries
from mirror.ledger.ledger import Ledger
from mirror.names import Digest
from mirror.registry.hashstate import ResumableHash
from mirror.registry.stores import BlobStore
from mirror.storage import NotFound, Stat, Storage, layout

log = logging.getLogger("mirror.uploads")


@dataclass(frozen=True, slots=True)
class UploadInfo:
    repository: str
    upload_id: str
    started: float
    active: float  # when it last received bytes (its files' latest mtime): an abandoned one stays old


class Uploads:
    def __init__(self, storage: Storage, blobs: BlobStore, ledger: Ledger) -> None:
        self.storage = storage
        self.blobs = blobs
        self.ledger = ledger
        self._hashes: dict[str, ResumableHash] = {}  # this process's view; storage has the saved one
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self, repository: str) -> str:
        upload_id = uuid.uuid4().hex
        started = float(int(time.time()))  # startedat says it to the second (RFC 3339, as registry:2)
        await self.storage.put_bytes(layout.upload_started(repository, upload_id), layout.started_at(started))
        # gc on any replica keeps what is younger than the oldest upload in progress
        await self.ledger.record([ops.upload(repository, upload_id, started)], durable=True)
        return upload_id

    async def size(self, repository: str, upload_id: str) -> int:
        """Bytes received so far; BLOB_UPLOAD_UNKNOWN for an unknown (or finished) upload."""
        if await self.storage.stat(layout.upload_started(repository, upload_id)) is None:
            raise RegistryError("BLOB_UPLOAD_UNKNOWN", f"blob upload {upload_id} unknown to registry")
        st = await self.storage.stat(layout.upload_data(repository, upload_id))
        return st.size if st else 0

    async def append(self, repository: str, upload_id: str, chunks: AsyncIterator[bytes],
                     start: int | None = None) -> int:
        """Add a chunk; `start` (from Content-Range) must be where the upload stands."""
        async with self._lock(upload_id):
            size = await self.size(repository, upload_id)
            if start is not None and start != size:
                raise RegistryError("RANGE_INVALID", f"chunk starts at {start}, upload has {size} bytes",
                                    headers=range_headers(size))
            return await self._append(repository, upload_id, size, chunks)

    async def _append(self, repository: str, upload_id: str, size: int, chunks: AsyncIterator[bytes]) -> int:
        hasher = await self._hasher(repository, upload_id, size)
        writer = await self.storage.writer(layout.upload_data(repository, upload_id), append=True)
        try:
            async for chunk in chunks:
                await writer.write(chunk)
                hasher.update(chunk)
        finally:
            # Keep what arrived even when the client went away: it resumes from the reported Range.
            await writer.commit()
            if hasher.size == writer.size:
                self._hashes[upload_id] = hasher
                saved = hasher.saved()
                if saved is not None:  # one per offset, as registry:2: the upload's deletion takes them all
                    await self.storage.put_bytes(layout.hashstate(repository, upload_id, hasher.algorithm,
                                                                  hasher.size), saved)
            else:
                self._hashes.pop(upload_id, None)
        return writer.size

    async def finish(self, repository: str, upload_id: str, digest: Digest,
                     chunks: AsyncIterator[bytes] | None) -> int:
        """The last chunk (if any), then verify and commit the blob (its size); DIGEST_INVALID cancels."""
        async with self._lock(upload_id):
            size = await self.size(repository, upload_id)
            if chunks is not None:
                size = await self._append(repository, upload_id, size, chunks)
            hasher = await self._hasher(repository, upload_id, size, digest.algorithm)
            if hasher.hexdigest() != digest.hex:
                await self._delete(repository, upload_id)
                raise RegistryError("DIGEST_INVALID", f"uploaded content does not match digest {digest}")
            # Verified bytes always replace a stored copy: it may be damaged, and a re-push is the
            # usual repair (a rename here, not a read of the old copy to find out).
            new = await self.blobs.stat(digest) is None
            if size == 0:
                await self.storage.put_bytes(layout.blob(digest), b"")
            else:
                await self.storage.move(layout.upload_data(repository, upload_id), layout.blob(digest))
            await self._delete(repository, upload_id)
            await self.blobs.link(repository, digest, Stat(size, time.time()), durable=True, new=new)
            return size

    async def monolithic(self, repository: str, digest: Digest, chunks: AsyncIterator[bytes]) -> int:
        """POST ?digest= with the whole blob: an atomic write committed only if the digest matches
        (replacing a stored copy, which may be damaged)."""
        new = await self.blobs.stat(digest) is None
        hasher = digest.hasher()
        writer = await self.storage.writer(layout.blob(digest))
        async with writer:
            async for chunk in chunks:
                hasher.update(chunk)
                await writer.write(chunk)
            if hasher.hexdigest() != digest.hex:
                await writer.cancel()
                raise RegistryError("DIGEST_INVALID", f"uploaded content does not match digest {digest}")
            await writer.commit()
        await self.blobs.link(repository, digest, Stat(writer.size, time.time()), durable=True, new=new)
        return writer.size

    async def cancel(self, repository: str, upload_id: str) -> None:
        async with self._lock(upload_id):
            await self.size(repository, upload_id)
            await self._delete(repository, upload_id)

    async def purge_forever(self, age: float, interval: float, dry_run: bool) -> None:
        """storage.maintenance.uploadpurging, as registry:2: at start, then every `interval`."""
        async def purge() -> None:
            await self.purge(time.time() - age, dry_run=dry_run)

        await every(interval, purge)

    async def purge(self, older_than: float, dry_run: bool = False) -> list[UploadInfo]:
        """Remove uploads started before `older_than` (epoch seconds), as the ledger knows them."""
        await self.ledger.ready.wait()
        stale = [UploadInfo(*row, row[2]) for row in await self.ledger.read(queries.uploads_before, older_than)]
        for u in stale:
            log.info("purging abandoned upload %s/%s%s", u.repository, u.upload_id, " (dry run)" if dry_run else "")
            if not dry_run:
                await self._delete(u.repository, u.upload_id)
        return stale

    async def _hasher(self, repository: str, upload_id: str, size: int, algorithm: str = "sha256") -> ResumableHash:
        """The hash of the first `size` bytes: from memory, else from the saved state nearest below
        `size` (ours or registry:2's) and the bytes after it, else by reading them all."""
        h = self._hashes.get(upload_id)
        if h is not None and h.size == size and h.algorithm == algorithm:
            return h
        h = await self._saved_hash(repository, upload_id, size, algorithm) or ResumableHash(algorithm)
        if size > h.size:
            async for chunk in self.storage.reader(layout.upload_data(repository, upload_id), h.size, size - h.size):
                h.update(chunk)
        return h

    async def _saved_hash(self, repository: str, upload_id: str, size: int, algorithm: str) -> ResumableHash | None:
        prefix = layout.hashstates(repository, upload_id, algorithm)
        offsets = sorted((int(o) for o in await self.storage.list(prefix) if o.isdigit() and int(o) <= size),
                         reverse=True)
        for offset in offsets[:2]:  # the newest, or the one before if it was cut short
            try:
                h = ResumableHash.restore(await self.storage.get_bytes(
                    layout.hashstate(repository, upload_id, algorithm, offset)))
            except NotFound:
                continue
            if h is not None and h.size == offset:
                return h
        return None

    async def _delete(self, repository: str, upload_id: str) -> None:
        self._hashes.pop(upload_id, None)
        self._locks.pop(upload_id, None)  # a holder keeps its object; later callers find the upload gone
        await self.storage.delete(layout.upload(repository, upload_id))
        await self.ledger.record([ops.upload_gone(repository, upload_id)], durable=False)

    def _lock(self, upload_id: str) -> asyncio.Lock:
        if len(self._locks) > 10_000:  # ids of uploads abandoned or never started
            self._locks = {k: v for k, v in self._locks.items() if v.locked()}
        return self._locks.setdefault(upload_id, asyncio.Lock())


def range_headers(size: int) -> dict[str, str]:
    """`Range: 0-<last byte>` as clients expect it (`0-0` for an empty upload, as distribution)."""
    return {"Range": f"0-{max(size - 1, 0)}"}


async def live_uploads(storage: Storage, ledger: Ledger, activity: bool = False) -> list[UploadInfo]:
    """Every upload in progress on any replica (the ledger's), with its start time and, with `activity`,
    when it last received bytes (a listing of its files each: uploads in progress are few)."""
    found = []
    for repository, upload_id, started in await ledger.read(queries.uploads_before, math.inf):
        active = started
        if activity:
            async for _, st in storage.scan(layout.upload(repository, upload_id)):
                active = max(active, st.mtime)
        found.append(UploadInfo(repository, upload_id, started, active))
    return found
