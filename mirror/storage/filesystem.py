"""Filesystem backend: a directory tree in the layout of design.md, written atomically."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from pathlib import Path

import aiofiles
import aiofiles.os

from mirror.storage.base import NotFound, Stat, Storage, Writer, check_key

CHUNK = 1 << 20
SCAN_CHUNK = 2000  # entries a scan hands over per thread hop: memory stays bounded, the loop free


class _LocalFileWriter(Writer):
    file: aiofiles.threadpool.binary.AsyncBufferedIOBase | None = None

    async def write(self, data: bytes) -> None:
        assert self.file is not None, "writer is closed"
        await self.file.write(data)
        self.size += len(data)

    async def _close(self) -> None:
        if self.file is not None:
            await self.file.close()
            self.file = None


class FileWriter(_LocalFileWriter):
    """A new object: written under _staging, renamed into place at commit."""

    def __init__(self, storage: FilesystemStorage, key: str) -> None:
        self.storage = storage
        self.key = key
        self.temp = storage.staging_dir() / f"w-{uuid.uuid4().hex}"

    async def open(self) -> FileWriter:
        self.file = await aiofiles.open(self.temp, "wb")
        return self

    async def commit(self) -> None:
        assert self.file is not None, "writer is closed"
        await self._close()
        await self.storage.put_file(self.key, self.temp)

    async def cancel(self) -> None:
        await self._close()
        self.temp.unlink(missing_ok=True)


class AppendWriter(_LocalFileWriter):
    """More bytes at the end of an object, in place (upload data)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self) -> AppendWriter:
        await aiofiles.os.makedirs(self.path.parent, exist_ok=True)
        self.file = await aiofiles.open(self.path, "ab")
        self.size = await self.file.tell()
        return self

    async def commit(self) -> None:
        if self.file is not None:
            await self.file.flush()
            await asyncio.to_thread(os.fsync, self.file.fileno())
        await self._close()

    async def cancel(self) -> None:
        await self._close()  # what was written stays: the client resumes from it


class FilesystemStorage(Storage):
    name = "filesystem"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self._staging = self.root / "_staging"
        self._staging.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def staging_dir(self) -> Path:
        return self._staging

    async def stat(self, key: str) -> Stat | None:
        try:
            st = os.stat(self.path(key))  # a cached metadata lookup: cheaper inline than a thread hop
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Stat(st.st_size, st.st_mtime)

    async def reader(self, key: str, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        try:
            f = await aiofiles.open(self.path(key), "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        try:
            await f.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                chunk = await f.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            await f.close()

    async def writer(self, key: str, append: bool = False) -> Writer:
        if append:
            return await AppendWriter(self.path(key)).open()
        check_key(key)
        return await FileWriter(self, key).open()

    async def get_bytes(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self.path(key).read_bytes)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(key) from None

    async def put_bytes(self, key: str, data: bytes) -> None:
        # One thread call: a cancelled caller cannot leave the file half-open.
        await asyncio.to_thread(self._put_bytes, self.path(key), data)

    def _put_bytes(self, dest: Path, data: bytes) -> None:
        temp = self._staging / f"p-{uuid.uuid4().hex}"
        try:
            temp.write_bytes(data)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, dest)
        finally:
            temp.unlink(missing_ok=True)

    async def put_file(self, key: str, source: Path) -> None:
        dest = self.path(key)
        await aiofiles.os.makedirs(dest.parent, exist_ok=True)
        # rename within one filesystem is atomic: readers see the old object or the new, never half.
        await aiofiles.os.replace(source, dest)

    async def list(self, prefix: str) -> list[str]:
        try:
            return sorted(await aiofiles.os.listdir(self.path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def walk(self, prefix: str) -> Iterator[tuple[str, Stat]]:
        """scan(), blocking: every file below `prefix` with its stat."""
        for dirpath, _, files in os.walk(self.path(prefix)):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                yield os.path.relpath(path, self.root), Stat(st.st_size, st.st_mtime)

    async def scan(self, prefix: str) -> AsyncIterator[tuple[str, Stat]]:
        walker = self.walk(prefix)
        while chunk := await asyncio.to_thread(lambda: [*itertools.islice(walker, SCAN_CHUNK)]):
            for entry in chunk:
                yield entry

    async def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            if path.is_dir():
                await asyncio.to_thread(shutil.rmtree, path)
            else:
                path.unlink()
        except FileNotFoundError:
            pass

    async def delete_many(self, keys: Sequence[str]) -> None:
        paths = [self.path(key) for key in keys]

        def unlink_all() -> None:
            for path in paths:
                path.unlink(missing_ok=True)

        await asyncio.to_thread(unlink_all)

    async def move(self, src: str, dst: str) -> None:
        source = self.path(src)
        if not source.exists():
            raise NotFound(src)
        await self.put_file(dst, source)
