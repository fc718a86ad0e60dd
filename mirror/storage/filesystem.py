"""Filesystem backend: a directory tree in the layout of layout.py, written atomically and durably.

A new object is written under _staging, synced, renamed into place, and its directory synced:
once a write returns, a power cut keeps it (what a 201 or 202 promises). Writes refused for lack
of space raise StorageFull and mark the space full (space.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from pathlib import Path

import aiofiles
import aiofiles.os

from mirror.storage.base import NotFound, Stat, Storage, Writer, check_key
from mirror.storage.space import Space, is_full

CHUNK = 1 << 20
SCAN_CHUNK = 2000  # entries a scan hands over per thread hop: memory stays bounded, the loop free
# File data is synced with fdatasync (the data and the size that reads need, not the times); the
# directory that names it with fsync, after the rename.


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` durable (a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class _LocalFileWriter(Writer):
    storage: FilesystemStorage
    key: str
    file: aiofiles.threadpool.binary.AsyncBufferedIOBase | None = None

    async def write(self, data: bytes) -> None:
        assert self.file is not None, "writer is closed"
        with self.storage.room(self.key):
            await self.file.write(data)
        self.size += len(data)

    async def _sync_and_close(self) -> None:
        """Flush and fsync (if the storage is durable), then close."""
        assert self.file is not None
        try:
            with self.storage.room(self.key):
                await self.file.flush()
                if self.storage.durable:
                    await asyncio.to_thread(os.fdatasync, self.file.fileno())
        finally:
            await self._close()

    async def _close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            with contextlib.suppress(OSError):  # a failed flush was reported by write or commit
                await file.close()


class FileWriter(_LocalFileWriter):
    """A new object: written under _staging, synced and renamed into place at commit."""

    def __init__(self, storage: FilesystemStorage, key: str) -> None:
        self.storage = storage
        self.key = key
        self.temp = storage.staging_dir() / f"w-{uuid.uuid4().hex}"

    async def open(self) -> FileWriter:
        with self.storage.room(self.key):
            self.file = await aiofiles.open(self.temp, "wb")
        return self

    async def commit(self) -> None:
        assert self.file is not None, "writer is closed"
        try:
            await self._sync_and_close()
            await asyncio.to_thread(self.storage.place, self.temp, self.storage.path(self.key), self.key)
        finally:
            self.temp.unlink(missing_ok=True)

    async def cancel(self) -> None:
        await self._close()
        self.temp.unlink(missing_ok=True)


class AppendWriter(_LocalFileWriter):
    """More bytes at the end of an object, in place (upload data); synced at commit, and the new
    file's directory entry too."""

    def __init__(self, storage: FilesystemStorage, key: str) -> None:
        self.storage = storage
        self.key = key
        self.path = storage.path(key)
        self.created = False

    async def open(self) -> AppendWriter:
        with self.storage.room(self.key):
            await asyncio.to_thread(self.storage.makedirs, self.path.parent)
            self.created = not self.path.exists()
            self.file = await aiofiles.open(self.path, "ab")
        self.size = await self.file.tell()
        return self

    async def commit(self) -> None:
        if self.file is None:
            return
        await self._sync_and_close()
        if self.created and self.storage.durable:
            await asyncio.to_thread(fsync_dir, self.path.parent)
            self.created = False

    async def cancel(self) -> None:
        await self._close()  # what was written stays: the client resumes from it


class FilesystemStorage(Storage):
    name = "filesystem"

    def __init__(self, root: str | Path, space: Space | None = None, durable: bool = True) -> None:
        self.root = Path(root).resolve()
        self.space = space or Space()
        self.durable = durable  # False for copies that may be lost (the hot tier)
        self._staging = self.root / "_staging"
        self._staging.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def room(self, key: str) -> Iterator[None]:
        """A write of `key`: lack of space becomes StorageFull (and the space full); success, room."""
        try:
            yield
        except OSError as e:
            if is_full(e):
                raise self.space.refuse(key, e) from None
            raise
        self.space.wrote()

    def makedirs(self, path: Path) -> None:
        """mkdir -p; when durable, each new directory's entry is synced in its parent."""
        missing = []
        while not path.is_dir():
            missing.append(path)
            path = path.parent
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):
                directory.mkdir()
            if self.durable:
                fsync_dir(directory.parent)

    def place(self, source: Path, dest: Path, key: str) -> None:
        """Rename a finished (synced) file over `dest`: atomic, then made durable (blocking)."""
        with self.room(key):
            self.makedirs(dest.parent)
            # rename within one filesystem is atomic: readers see the old object or the new, never half.
            os.replace(source, dest)
            if self.durable:
                fsync_dir(dest.parent)

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
            return await AppendWriter(self, key).open()
        check_key(key)
        return await FileWriter(self, key).open()

    async def get_bytes(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self.path(key).read_bytes)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(key) from None

    async def put_bytes(self, key: str, data: bytes) -> None:
        # One thread call: a cancelled caller cannot leave the file half-open.
        await asyncio.to_thread(self._put_bytes, key, data)

    def _put_bytes(self, key: str, data: bytes) -> None:
        dest = self.path(key)
        temp = self._staging / f"p-{uuid.uuid4().hex}"
        try:
            with self.room(key), open(temp, "wb") as f:
                f.write(data)
                f.flush()
                if self.durable:
                    os.fdatasync(f.fileno())
            self.place(temp, dest, key)
        finally:
            temp.unlink(missing_ok=True)

    async def put_file(self, key: str, source: Path) -> None:
        dest = self.path(key)

        def sync_and_place() -> None:
            if self.durable:
                fsync_file(source)  # the caller may not have: cheap when it did
            self.place(source, dest, key)

        await asyncio.to_thread(sync_and_place)

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
        """Each object, and the directory that held only it (a blob's `<hex>/`, a link's): what
        registry:2's garbage collector removes with a blob."""
        def unlink_all() -> None:  # paths built in the thread too: thousands of them are loop time
            for key in keys:
                path = self.path(key)
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # not empty, or gone: left as it is
                    path.parent.rmdir()

        await asyncio.to_thread(unlink_all)

    async def move(self, src: str, dst: str) -> None:
        source = self.path(src)
        if not source.exists():
            raise NotFound(src)
        # Sources are durable already (upload data is synced at every commit): the rename is what is new.
        await asyncio.to_thread(self.place, source, self.path(dst), dst)
