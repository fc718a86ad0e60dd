"""Aliyun OSS backend (oss2): every object in one bucket, under `storage.oss.rootdirectory`.

oss2 blocks, so each call runs in a bounded thread pool. Blobs stream both ways in chunks; a
write goes up as a multipart upload of `chunksize` parts, invisible until it completes (a small
one as one PUT). Transient failures (connection errors, 5xx) are retried; everything else but a
missing key becomes StorageUnavailable, which clients see as 503 UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiofiles
import oss2
import oss2.exceptions
import oss2.models

from mirror.config import OssConfig
from mirror.storage.base import NotFound, Stat, Storage, StorageUnavailable, Writer, check_key
from mirror.storage.space import Space

log = logging.getLogger("mirror.storage")
logging.getLogger("oss2").setLevel(logging.WARNING)  # it logs every error answer at info; we log what matters
T = TypeVar("T")

THREADS = 16  # bounds both the pool and oss2's connection pool
READ_CHUNK = 1 << 20
TIMEOUT = 60.0  # oss2 uses one number for connect and each read
ATTEMPTS = 3
MIN_PART = 100 << 10  # OSS refuses smaller parts, except the last
PARTS_IN_FLIGHT = 2  # per writer: the next part fills while two go up
REDIRECT_SECONDS = 20 * 60  # signed URLs, as registry:2's


def _drained(fn: Callable[..., T]) -> Callable[..., T]:
    """oss2 builds some results from headers alone and never reads the XML body: read it, or the
    connection stays checked out of the pool until the result is garbage."""

    def call(*args: Any, **kwargs: Any) -> T:
        result = fn(*args, **kwargs)
        result.resp.read()  # type: ignore[attr-defined]
        return result

    return call


def _transient(e: Exception) -> bool:
    if isinstance(e, oss2.exceptions.OssError):
        status: int = e.status
        return status < 0 or status >= 500 or status == 429  # -2: connection failed
    return isinstance(e, OSError)  # a read cut mid-stream (requests/urllib3 errors are OSErrors)


class OssStorage(Storage):
    name = "oss"
    copy_limit = 1 << 30  # CopyObject's limit; larger objects are copied part by part,
    copy_part = 512 << 20  # this much a part (UploadPartCopy takes up to 5 GiB)

    def __init__(self, config: OssConfig, staging: Path) -> None:
        self.config = config
        self.prefix = f"{config.rootdirectory}/" if config.rootdirectory else ""
        self.chunksize = config.chunksize
        self.space = Space()  # the bucket never fills; its local staging files may
        self._staging = staging
        staging.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="oss")
        session = oss2.Session(pool_size=THREADS)
        if config.skipverify:
            session.session.verify = False
        # CRC checks off: blobs are verified by their sha256 digests, and oss2 computes CRC64 in Python.
        self.bucket = oss2.Bucket(oss2.Auth(config.accesskeyid, config.accesskeysecret), config.url,
                                  config.bucket, session=session, connect_timeout=TIMEOUT, enable_crc=False)
        self.write_headers: dict[str, str] = {}
        if config.encrypt:
            self.write_headers["x-oss-server-side-encryption"] = "KMS" if config.encryptionkeyid else "AES256"
            if config.encryptionkeyid:
                self.write_headers["x-oss-server-side-encryption-key-id"] = config.encryptionkeyid

    def key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def staging_dir(self) -> Path:
        return self._staging

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One blocking oss2 call in the pool, as it is (no retry, no translation)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def call(self, key: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """An idempotent oss2 call: retried while transient; NotFound or StorageUnavailable after."""
        for attempt in range(ATTEMPTS):
            try:
                return await self.run(fn, *args, **kwargs)
            except oss2.exceptions.OssError as e:
                if attempt + 1 < ATTEMPTS and _transient(e):
                    await asyncio.sleep(0.1 * 3**attempt)
                    continue
                raise self.translate(e, key) from None
        raise AssertionError("unreachable")

    def translate(self, e: Exception, key: str) -> Exception:
        if isinstance(e, oss2.exceptions.OssError):
            if e.status == 404 and e.code not in ("NoSuchBucket",):
                return NotFound(key)
            what = f"{e.code or e.status}: {e.message or e.body!s:.200}" if e.status > 0 else str(e)[:300]
        else:
            what = str(e)[:300]
        return StorageUnavailable(f"OSS bucket {self.config.bucket!r} ({self.config.url}): {what}")

    async def check(self) -> None:
        try:
            await self.call("", self.bucket.list_objects, prefix=self.prefix, max_keys=1)
        except (StorageUnavailable, NotFound) as e:
            raise StorageUnavailable(f"cannot use OSS bucket {self.config.bucket!r} in region "
                                     f"{self.config.region!r} at {self.config.url}: {e}") from None

    async def stat(self, key: str) -> Stat | None:
        try:
            head = await self.call(key, self.bucket.head_object, self.key(key))
        except NotFound:
            return None
        return Stat(int(head.content_length), float(head.last_modified))

    async def reader(self, key: str, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        end = None if length is None else offset + length
        pos, attempt = offset, 0
        if end is not None and pos >= end:
            if await self.stat(key) is None:
                raise NotFound(key)
            return
        while True:
            result = await self.call(key, self._open, self.key(key), pos, end)
            if result is None:
                return  # the range starts at or past the end
            try:
                while end is None or pos < end:
                    chunk = await self.run(result.read, READ_CHUNK if end is None else min(READ_CHUNK, end - pos))
                    if not chunk:
                        return
                    pos += len(chunk)
                    yield chunk
                return
            except Exception as e:  # a cut stream resumes from `pos` with a new ranged GET
                attempt += 1
                if attempt >= ATTEMPTS or not _transient(e):
                    raise self.translate(e, key) from None
                log.warning("OSS read of %s cut at %d, resuming: %s", key, pos, e)
            finally:
                result.resp.response.close()

    def _open(self, key: str, start: int, end: int | None) -> oss2.models.GetObjectResult | None:
        byte_range = (start, None if end is None else end - 1) if start or end is not None else None
        try:
            # standard: a range past the end is 416, not the whole object (OSS's legacy answer)
            return self.bucket.get_object(key, byte_range=byte_range, headers={"x-oss-range-behavior": "standard"})
        except oss2.exceptions.ServerError as e:
            if e.status == 416:
                return None
            raise

    async def writer(self, key: str, append: bool = False) -> Writer:
        writer = MultipartWriter(self, key, keep=append)
        if append:
            await writer.continue_existing()
        return writer

    async def get_bytes(self, key: str) -> bytes:
        return await self.call(key, lambda: self.bucket.get_object(self.key(key)).read())

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self.call(key, self.bucket.put_object, self.key(key), data, headers=self.write_headers)

    async def put_file(self, key: str, source: Path) -> None:
        writer = await self.writer(key)
        async with writer, aiofiles.open(source, "rb") as f:
            while chunk := await f.read(self.chunksize):
                await writer.write(chunk)
            await writer.commit()
        os.unlink(source)

    async def _keys(self, prefix: str, delimiter: str = "") -> list[oss2.models.SimplifiedObjectInfo]:
        def listing() -> list[oss2.models.SimplifiedObjectInfo]:
            return list(oss2.ObjectIterator(self.bucket, prefix=prefix, delimiter=delimiter, max_keys=1000))

        return await self.call(prefix, listing)

    async def list(self, prefix: str) -> list[str]:
        base = self.key(prefix) + "/"
        names = {info.key[len(base):].rstrip("/") for info in await self._keys(base, "/")}
        names.discard("")
        return sorted(names)

    async def scan(self, prefix: str) -> AsyncIterator[tuple[str, Stat]]:
        """Page by page (a LIST per 1,000 keys): a walk of a large bucket never sits in memory whole."""
        full, marker = self.key(prefix) + "/", ""
        while True:
            page = await self.call(prefix, self.bucket.list_objects, prefix=full, marker=marker, max_keys=1000)
            for info in page.object_list:
                yield info.key[len(self.prefix):], Stat(int(info.size), float(info.last_modified))
            if not page.is_truncated:
                return
            marker = page.next_marker

    async def delete(self, key: str) -> None:
        full = self.key(key)
        await self.call(key, self.bucket.delete_object, full)
        await self._delete_keys(key, [info.key for info in await self._keys(full + "/")])

    async def delete_many(self, keys: Sequence[str]) -> None:
        await self._delete_keys(keys[0] if keys else "", [self.key(k) for k in keys])

    async def _delete_keys(self, what: str, full_keys: Sequence[str]) -> None:
        for i in range(0, len(full_keys), 1000):  # DeleteMultipleObjects takes 1000 at a time
            await self.call(what, self.bucket.batch_delete_objects, full_keys[i:i + 1000])

    async def move(self, src: str, dst: str) -> None:
        st = await self.stat(src)
        if st is None:
            raise NotFound(src)
        if st.size <= self.copy_limit:
            await self.call(src, _drained(self.bucket.copy_object), self.bucket.bucket_name, self.key(src),
                            self.key(dst), headers=self.write_headers)
        else:
            writer = MultipartWriter(self, dst, keep=False)
            async with writer:
                await writer.copy_from(self.key(src), st.size)
                await writer.commit()
        await self.call(src, self.bucket.delete_object, self.key(src))

    def redirect_url(self, key: str) -> str:
        return str(self.bucket.sign_url("GET", self.key(key), REDIRECT_SECONDS, slash_safe=True))

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class MultipartWriter(Writer):
    """A new object as a multipart upload (one PUT when it stays under a part), or with `keep`,
    more bytes after an existing object: its bytes become the first parts by a server-side copy,
    and whatever was written is committed even when the writer is abandoned (upload data)."""

    def __init__(self, storage: OssStorage, name: str, keep: bool) -> None:
        self.storage = storage
        self.name = name
        self.key = storage.key(name)
        self.keep = keep
        self.upload_id: str | None = None
        self.parts: list[oss2.models.PartInfo] = []
        self.buffer = bytearray()
        self.base = 0  # bytes already in the object when appending
        self.copied = False
        self.in_flight: set[asyncio.Task[None]] = set()
        self.done = False

    async def continue_existing(self) -> None:
        st = await self.storage.stat(self.name)
        if st is None:
            return
        self.base = self.size = st.size
        if st.size < MIN_PART:  # too small to be a part of its own: it rides in the first new part
            self.buffer += await self.storage.get_bytes(self.name)
            self.copied = True

    async def write(self, data: bytes) -> None:
        assert not self.done, "writer is closed"
        self.buffer += data
        self.size += len(data)
        while len(self.buffer) >= self.storage.chunksize:
            part = bytes(self.buffer[:self.storage.chunksize])
            del self.buffer[:self.storage.chunksize]
            await self._send(part)

    async def _start(self) -> str:
        if self.upload_id is None:
            result = await self.storage.call(self.name, self.storage.bucket.init_multipart_upload, self.key,
                                             headers=self.storage.write_headers)
            self.upload_id = str(result.upload_id)
            if self.base and not self.copied:
                self.copied = True
                await self.copy_from(self.key, self.base)
        return self.upload_id

    async def copy_from(self, source: str, size: int) -> None:
        """Parts that are ranges of `source`, copied inside OSS."""
        upload_id = await self._start()
        bucket = self.storage.bucket
        for start in range(0, size, self.storage.copy_part):
            number = len(self.parts) + 1
            end = min(start + self.storage.copy_part, size) - 1
            result = await self.storage.call(self.name, _drained(bucket.upload_part_copy), bucket.bucket_name, source,
                                             (start, end), self.key, upload_id, number)
            self.parts.append(oss2.models.PartInfo(number, result.etag))

    async def _send(self, data: bytes) -> None:
        upload_id = await self._start()
        number = len(self.parts) + 1
        info = oss2.models.PartInfo(number, "")
        self.parts.append(info)
        while len(self.in_flight) >= PARTS_IN_FLIGHT:
            finished, self.in_flight = await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                task.result()  # a failed part fails the write

        async def upload() -> None:
            result = await self.storage.call(self.name, self.storage.bucket.upload_part, self.key, upload_id,
                                             number, data)
            info.etag = result.etag

        self.in_flight.add(asyncio.create_task(upload()))

    async def commit(self) -> None:
        if self.done:
            return
        if self.size == self.base and self.keep:
            self.done = True  # nothing new: the object stays as it is
            return
        copy_pending = self.base > 0 and not self.copied
        if self.upload_id is None and not copy_pending:
            await self.storage.call(self.name, self.storage.bucket.put_object, self.key, bytes(self.buffer),
                                    headers=self.storage.write_headers)
        else:
            if self.buffer:
                await self._send(bytes(self.buffer))
            self.buffer.clear()
            await asyncio.gather(*self.in_flight)
            self.in_flight.clear()
            await self.storage.call(self.name, _drained(self.storage.bucket.complete_multipart_upload), self.key,
                                    self.upload_id, self.parts)
        self.done = True

    async def cancel(self) -> None:
        if self.done:
            return
        if self.keep:
            try:
                await self.commit()  # an abandoned upload keeps what arrived: the client resumes from it
                return
            except (StorageUnavailable, NotFound) as e:
                log.warning("could not keep the bytes written to %s: %s", self.key, e)
        self.done = True
        for task in self.in_flight:
            task.cancel()
        await asyncio.gather(*self.in_flight, return_exceptions=True)
        self.buffer.clear()
        if self.upload_id is not None:
            try:
                await self.storage.call(self.name, self.storage.bucket.abort_multipart_upload, self.key, self.upload_id)
            except (StorageUnavailable, NotFound) as e:  # left for the bucket's lifecycle rule (README)
                log.warning("could not abort the multipart upload of %s: %s", self.key, e)
