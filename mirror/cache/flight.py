"""A Flight: one upstream read of one blob, fanned out to every client while it is written, hashed and
committed only if the digest matches."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from mirror.errors import RegistryError
from mirror.names import Digest
from mirror.registry.namespace import Route
from mirror.storage.space import Space, StorageFull, is_full

log = logging.getLogger("mirror.cache")

READ_CHUNK = 1 << 20
BATCH = 256 << 10  # upstream bytes are handed on in batches of this size
MAX_UNWRITTEN = 64  # batches received but not yet on disk: beyond this the fetch waits (16 MiB)
RING_BYTES = 8 << 20  # recent batches kept in memory for readers that keep up


class FlightFailed(Exception):
    """The upstream transfer broke or its bytes did not match the digest."""


class DigestMismatch(FlightFailed):
    """The upstream sent bytes whose digest is not the one asked for."""


OpenUpstream = Callable[[int], Awaitable[aiohttp.ClientResponse]]
Commit = Callable[[Path], Awaitable[None]]


def _hash_and_write(hasher: Any, fd: int, data: bytes, offset: int) -> None:
    hasher.update(data)  # hashlib releases the GIL: this thread runs beside the event loop
    write_all(fd, data, offset)


def write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite all of `data`. A disk at the brim writes part of it and says so in the count (the
    next write fails): ignoring the count left a hole of zeros in a spool whose hash, taken from
    the bytes received, still matched, once space came back for the writes after it."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[written:], offset + written


class Flight:
    """One upstream read of one blob, fanned out to N readers and one storage commit.

    The event loop only receives: each batch goes into an in-memory window that readers who keep
    up are served from, and into a bounded queue that a worker thread hashes and writes to a spool
    file, in order; readers who fall behind the window read the spool. A slow reader never slows
    the fetch and a leaving reader never cancels it. Readers are held back from the newest batch
    until the digest has verified: on a mismatch no client ever holds a complete body with wrong
    bytes, and their connections are cut. The spool is committed after that.

    A failure of any part ends the flight for everyone at once: the writer failing (disk full)
    fails the readers and closes the upstream response, the receiver stops, and the spool goes.
    """

    def __init__(self, digest: Digest, spool: Path, route: Route, space: Space,
                 on_receive: Callable[[int], None] = lambda n: None) -> None:
        self.digest = digest
        self.spool = spool
        self.route = route
        self.space = space
        self.on_receive = on_receive
        try:
            self.fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            if is_full(e):
                raise space.refuse(str(digest), e) from None
            raise
        self.size: int | None = None
        self.received = 0  # bytes from upstream so far
        self.readable = 0  # readers may read below this
        self.written = 0  # bytes in the spool file
        self.verified = False  # the digest matched: everything is readable
        self.done = False  # committed to storage
        self.error: Exception | None = None
        self.started = asyncio.Event()  # size known, or failed before the first byte
        self._progress = asyncio.Event()
        self._window: deque[tuple[int, bytes]] = deque()
        self._window_bytes = 0
        self._readers = 0
        self._finished = False
        self._response: aiohttp.ClientResponse | None = None  # the upstream read under way
        self._write_error: Exception | None = None

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def run(self, open_upstream: OpenUpstream, commit: Commit, attempts: int) -> None:
        try:
            await self._fetch(open_upstream, attempts)
            self.readable = self.received
            self.verified = True
            self._notify()
            await commit(self.spool)  # storage syncs it: durable before it is named complete
            self.done = True
        except Exception as e:
            error = self._write_error or e  # what broke first: the disk, not the read it cut short
            self._fail(error)
            if not isinstance(error, RegistryError | FlightFailed | StorageFull):
                log.exception("blob fetch %s failed", self.digest)
        except asyncio.CancelledError:
            self._fail(FlightFailed("server shutting down"))
            raise
        finally:
            self._finished = True
            self.started.set()
            self._notify()
            self._maybe_close()

    def _fail(self, error: Exception) -> None:
        """End the flight for every reader now (those holding verified bytes finish reading them)."""
        if self.error is None:
            self.error = error
        self._window.clear()
        with contextlib.suppress(FileNotFoundError):
            self.spool.unlink()
        if self._response is not None:
            self._response.close()  # the upstream connection goes, whatever the receiver waits on
        self._notify()

    def _writer_done(self, writer: asyncio.Task[None]) -> None:
        """The writer ended: if it failed, the flight ends now (also called by whoever notices first)."""
        if self._write_error is not None or writer.cancelled() or writer.exception() is None:
            return
        error = writer.exception()
        assert isinstance(error, Exception)
        if is_full(error):
            assert isinstance(error, OSError)
            error = self.space.refuse(str(self.digest), error)
        self._write_error = error
        self._fail(error)

    async def _fetch(self, open_upstream: OpenUpstream, attempts: int) -> None:
        hasher = self.digest.hasher()
        queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(MAX_UNWRITTEN)
        writer = asyncio.create_task(self._write_all(queue, hasher))
        writer.add_done_callback(self._writer_done)
        try:
            resp = self._response = await open_upstream(0)
            self.size = resp.content_length
            self.started.set()
            pending: list[bytes] = []  # joined once per batch: one copy, not two
            pending_size = 0
            for attempt in range(1, attempts + 1):
                try:
                    async with resp:
                        async for chunk in resp.content.iter_chunked(BATCH):
                            pending.append(chunk)
                            pending_size += len(chunk)
                            if pending_size >= BATCH:
                                await self._receive(b"".join(pending), queue, writer)
                                pending, pending_size = [], 0
                    self._check(writer)  # a response closed by a writer failure reads as a short end
                    break
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as e:
                    self._check(writer)
                    if attempt == attempts or self.size is None:
                        raise FlightFailed(f"upstream transfer of {self.digest} broke: {e}") from None
                    await self._receive(b"".join(pending), queue, writer)
                    pending, pending_size = [], 0
                    log.warning("upstream transfer of %s broke at %d bytes (%s), resuming",
                                self.digest, self.received, e)
                    resp = self._response = await open_upstream(self.received)
            await self._receive(b"".join(pending), queue, writer)
            await self._put(queue, None, writer)
            await writer
        finally:
            writer.cancel()
            if self._response is not None:
                self._response.close()
                self._response = None
        if self.size is not None and self.received != self.size:
            raise FlightFailed(f"upstream sent {self.received} of {self.size} bytes of {self.digest}")
        if hasher.hexdigest() != self.digest.hex:
            log.error("upstream sent bytes for %s that do not match its digest", self.digest)
            raise DigestMismatch(f"upstream sent bytes that do not match {self.digest}")

    async def _receive(self, data: bytes, queue: asyncio.Queue[tuple[int, bytes] | None],
                       writer: asyncio.Task[None]) -> None:
        if not data:
            return
        self._check(writer)
        offset = self.received
        self._window.append((offset, data))
        self._window_bytes += len(data)
        self.readable = offset  # release what came before; hold back this batch
        self.received += len(data)
        self.on_receive(len(data))
        self._notify()
        await self._put(queue, (offset, data), writer)

    def _check(self, writer: asyncio.Task[None]) -> None:
        """Raise what stopped the writer, if it stopped: nothing more is fetched."""
        if writer.done():
            self._writer_done(writer)  # before its callback runs, maybe: the same translation
        if self._write_error is not None:
            raise self._write_error

    async def _put(self, queue: asyncio.Queue[tuple[int, bytes] | None], item: tuple[int, bytes] | None,
                   writer: asyncio.Task[None]) -> None:
        """Hand a batch to the writer; waits while the disk is MAX_UNWRITTEN batches behind, but
        never for a writer that has failed (it takes nothing more: the queue would stay full)."""
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        put = asyncio.ensure_future(queue.put(item))
        try:
            await asyncio.wait((put, writer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            put.cancel()
        if not put.done() or put.cancelled():
            self._check(writer)
            raise FlightFailed(f"the spool writer of {self.digest} stopped")

    async def _write_all(self, queue: asyncio.Queue[tuple[int, bytes] | None], hasher: Any) -> None:
        while (item := await queue.get()) is not None:
            offset, data = item
            await asyncio.to_thread(_hash_and_write, hasher, self.fd, data, offset)
            self.written = offset + len(data)
            # Keep a window of recent batches for readers that keep up; the rest is on disk.
            while self._window and self._window_bytes - len(self._window[0][1]) >= RING_BYTES \
                    and self._window[0][0] + len(self._window[0][1]) <= self.written:
                self._window_bytes -= len(self._window.popleft()[1])

    def _from_window(self, pos: int, limit: int) -> memoryview | None:
        for offset, data in self._window:
            if offset <= pos < offset + len(data):
                return memoryview(data)[pos - offset:min(limit, offset + len(data)) - offset]
        return None

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes | memoryview]:
        """Bytes [start, end) as they become readable; raises FlightFailed if the fetch fails
        (before the digest verified: after that, a failed commit lets readers finish)."""
        self._readers += 1
        try:
            pos = start
            while end is None or pos < end:
                if self.error is not None and not self.verified:
                    raise FlightFailed(str(self.error)) from self.error
                limit = self.readable if end is None else min(self.readable, end)
                if pos < limit:
                    data = self._from_window(pos, limit)
                    if data is None:  # fell behind the window: the bytes are on disk
                        data = memoryview(await asyncio.to_thread(
                            os.pread, self.fd, min(READ_CHUNK, limit - pos), pos))
                        if not data:
                            raise FlightFailed(f"spool of {self.digest} ended early")
                    pos += len(data)
                    yield data
                elif self.verified:
                    return
                else:
                    await self._progress.wait()
        finally:
            self._readers -= 1
            self._maybe_close()

    def _maybe_close(self) -> None:
        if self._finished and self._readers == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


