"""A bounded local copy of blobs in front of a remote backend (OSS), so warm pulls go out by
sendfile from local disk and a replica keeps serving what it holds while the backend is down.

Only blob-store keys are kept: they are immutable, so a local copy is never stale. Everything
else (tags, links, upload state) is shared between replicas and always read from the backend.
Least recently used blobs go first once the tier passes its size; a file's mtime records its
last use, so the order survives a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiofiles

from mirror.storage import layout, migrate
from mirror.storage.base import Stat, Storage, Writer
from mirror.storage.filesystem import FilesystemStorage
from mirror.storage.space import StorageFull

log = logging.getLogger("mirror.storage")
LOW_WATERMARK = 0.9  # evict down to this share of the size, so eviction is not per blob
TOUCH_SECONDS = 60.0  # how stale a file's mtime may get before a hit refreshes it


class HotTier(Storage):
    def __init__(self, backend: Storage, directory: Path, max_size: int) -> None:
        self.backend = backend
        self.name = backend.name
        self.space = backend.space
        # Copies that may be lost: not synced, and a full local disk only means no copy.
        self.local = FilesystemStorage(directory, durable=False)
        self.max_size = max_size
        self.size = 0
        self._files: OrderedDict[str, int] = OrderedDict()  # key -> size, least recently used first
        self._load()

    def _load(self) -> None:
        moved = migrate.local_blobs(self.local)
        if moved:
            log.info("hot tier: moved %d blobs from mirror's old layout to registry:2's", moved)
        for key, st in sorted(self.local.walk(layout.BLOBS), key=lambda entry: entry[1].mtime):
            self._files[key] = st.size
            self.size += st.size
        self._evict()

    # --- the local copies ----------------------------------------------------------------------

    def _hit(self, key: str) -> Path | None:
        if key not in self._files:
            return None
        path = self.local.path(key)
        self._files.move_to_end(key)
        try:
            if time.time() - os.stat(path).st_mtime > TOUCH_SECONDS:
                os.utime(path)
        except FileNotFoundError:  # removed behind our back: forget it
            self.size -= self._files.pop(key)
            return None
        return path

    async def _keep(self, key: str, source: Path) -> None:
        """Take a verified local file as the copy of `key` (none when the local disk is full)."""
        size = os.stat(source).st_size
        if size > self.max_size:
            os.unlink(source)
            return
        try:
            await self.local.put_file(key, source)
        except StorageFull:
            os.unlink(source)
            return
        self.size += size - self._files.pop(key, 0)
        self._files[key] = size
        self._evict()

    async def _keep_bytes(self, key: str, data: bytes) -> None:
        temp = self._temp()
        try:
            temp.write_bytes(data)  # small: manifests
        except OSError:  # the local disk is full: no copy
            temp.unlink(missing_ok=True)
            return
        await self._keep(key, temp)

    def _forget(self, key: str) -> None:
        size = self._files.pop(key, None)
        if size is not None:
            self.size -= size
            self.local.path(key).unlink(missing_ok=True)

    def _evict(self) -> None:
        if self.size <= self.max_size:
            return
        target = self.max_size * LOW_WATERMARK
        while self._files and self.size > target:
            key, size = self._files.popitem(last=False)
            self.size -= size
            self.local.path(key).unlink(missing_ok=True)
        log.info("hot tier: evicted down to %d bytes", self.size)

    def _temp(self) -> Path:
        return self.local.staging_dir() / f"t-{uuid.uuid4().hex}"

    # --- the Storage interface ------------------------------------------------------------------

    def local_path(self, key: str) -> Path | None:
        return self._hit(key)

    def staging_dir(self) -> Path:
        return self.local.staging_dir()

    def redirect_url(self, key: str) -> str | None:
        return self.backend.redirect_url(key)

    def bulk(self) -> Storage:
        return self.backend

    async def check(self) -> None:
        await self.backend.check()

    async def stat(self, key: str) -> Stat | None:
        if key in self._files:
            st = await self.local.stat(key)
            if st is not None:
                return st
        return await self.backend.stat(key)

    async def reader(self, key: str, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        hit = self._hit(key) is not None
        if hit or not layout.is_blob(key) or offset or length is not None:
            source = self.local if hit else self.backend
            async with contextlib.aclosing(source.reader(key, offset, length)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        # A whole blob read from the backend: keep a copy on the way, if it arrives whole and the
        # local disk has room for it (a full disk only means no copy: the read goes on).
        temp = self._temp()
        copy: Any = None
        try:
            with contextlib.suppress(OSError):
                copy = await aiofiles.open(temp, "wb")
            async with contextlib.aclosing(self.backend.reader(key)) as chunks:
                async for chunk in chunks:  # aclosing: a reader that stops early lets go of the backend now
                    if copy is not None:
                        try:
                            await copy.write(chunk)
                        except OSError:
                            await _closed(copy)
                            copy = None
                    yield chunk
            if copy is not None:
                try:
                    await copy.close()
                except OSError:
                    copy = None
                else:
                    await self._keep(key, temp)
        finally:
            if copy is not None:
                await _closed(copy)
            temp.unlink(missing_ok=True)

    async def writer(self, key: str, append: bool = False) -> Writer:
        return await self.backend.writer(key, append)  # new blobs reach the tier on first read

    async def get_bytes(self, key: str) -> bytes:
        if self._hit(key) is not None:
            return await self.local.get_bytes(key)
        data = await self.backend.get_bytes(key)
        if layout.is_blob(key):
            await self._keep_bytes(key, data)
        return data

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self.backend.put_bytes(key, data)
        if layout.is_blob(key):
            await self._keep_bytes(key, data)

    async def put_file(self, key: str, source: Path) -> None:
        if not layout.is_blob(key):
            await self.backend.put_file(key, source)
            return
        # A second name for the same inode: the backend takes `source`, the tier keeps the bytes.
        copy = self._temp()
        os.link(source, copy)
        try:
            await self.backend.put_file(key, source)
            await self._keep(key, copy)
        finally:
            copy.unlink(missing_ok=True)

    async def list(self, prefix: str) -> list[str]:
        return await self.backend.list(prefix)

    def scan(self, prefix: str) -> AsyncIterator[tuple[str, Stat]]:
        return self.backend.scan(prefix)

    async def delete(self, key: str) -> None:
        await self.backend.delete(key)
        for cached in [k for k in self._files if k == key or k.startswith(key + "/")]:
            self._forget(cached)

    async def delete_many(self, keys: Sequence[str]) -> None:
        await self.backend.delete_many(keys)
        for key in keys:
            self._forget(key)

    async def move(self, src: str, dst: str) -> None:
        await self.backend.move(src, dst)
        self._forget(src)
        self._forget(dst)  # replaced: a copy of what was there before is no copy of it

    async def close(self) -> None:
        await self.backend.close()



async def _closed(file: Any) -> None:
    """Close a local copy whose writes failed (the disk is full)."""
    with contextlib.suppress(OSError):
        await file.close()
