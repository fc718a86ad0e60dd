import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from aiohttp import web

from mirror.api.request import pull_route
from mirror.cache.flight import Flight, FlightFailed
from mirror.errors import RegistryError
from mirror.names import Digest, parse_digest, parse_range
from mirror.server.logs import CACHE, SERVED_BYTES
from mirror.storage import NotFound, StorageFull, StorageUnavailable

log = logging.getLogger("mirror.api")


def _headers(digest: Digest) -> dict[str, str]:
    return {"Docker-Content-Digest": str(digest), "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes"}


async def get_blob(request: web.Request) -> web.StreamResponse:
    """GET/HEAD /v2/<name>/blobs/<digest>: sendfile from local disk, a stream from remote storage (or a
    redirect to it), the shared Flight when cold."""
    registry, r = await pull_route(request)
    digest = parse_digest(request.match_info["digest"])
    if request.method == "HEAD":
        size, request[CACHE] = await registry.blob_head(r, digest)
        headers = _headers(digest)
        if size is not None:
            headers["Content-Length"] = str(size)
        return web.Response(headers=headers)

    source, request[CACHE] = await registry.blob(r, digest)
    range_header = request.headers.get("Range")
    if isinstance(source, Flight):
        await source.started.wait()
        if source.error is not None and not source.verified:  # failed already: an error, not a short body
            raise _as_registry_error(source.error)
        return await send_blob(request, digest, source.size, range_header, source.read)
    if source.path is not None:
        start, end = parse_range(range_header, source.size) if range_header else (0, source.size)
        request[SERVED_BYTES] = end - start  # parse_range: a clear OCI error before FileResponse's own 416
        return web.FileResponse(source.path, headers=_headers(digest))
    url = registry.redirect_url(source)
    if url is not None:
        return web.Response(status=307, headers={"Location": url, "Docker-Content-Digest": str(digest)})
    stored = source
    return await send_blob(request, digest, stored.size, range_header,
                       lambda start, end: registry.read_blob(stored, start, end))


async def send_blob(request: web.Request, digest: Digest, size: int | None, range_header: str | None,
                read: Callable[[int, int | None], AsyncIterator[bytes | memoryview]]) -> web.StreamResponse:
    """Stream `read(start, end)` as the body; a failure once headers are out cuts the connection."""
    start, end, status = 0, size, 200
    headers = _headers(digest)
    if range_header and size is not None:
        start, end = parse_range(range_header, size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    chunks = read(start, end)
    try:
        try:
            chunk = await anext(chunks, b"")  # a failure before any byte is still an OCI error
        except NotFound:
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {digest}") from None
        except FlightFailed as e:
            raise _as_registry_error(e.__cause__ if isinstance(e.__cause__, Exception) else e) from None
        resp = web.StreamResponse(status=status, headers=headers)
        if end is not None:
            resp.content_length = end - start
        await resp.prepare(request)
        request[SERVED_BYTES] = 0
        try:
            while chunk:
                await resp.write(chunk)
                request[SERVED_BYTES] += len(chunk)
                chunk = await anext(chunks, b"")
        except (FlightFailed, StorageUnavailable, NotFound) as e:
            # Headers are gone: the only honest signal left is to cut the connection short. A full
            # disk was logged once already: not again per client.
            level = logging.INFO if isinstance(e.__cause__, StorageFull) else logging.WARNING
            log.log(level, "cutting %s for %s: %s", request.path, request.remote, e)
            if request.transport is not None:
                request.transport.abort()
            return resp  # already prepared: aiohttp finds the connection closed and logs it as sent
        await resp.write_eof()
        return resp
    finally:
        if isinstance(chunks, AsyncGenerator):  # let go of the flight or the storage stream now
            await chunks.aclose()


async def delete_blob(request: web.Request) -> web.Response:
    """DELETE /v2/<name>/blobs/<digest>: this repository no longer serves the blob (gc frees it)."""
    registry, r = await pull_route(request)
    await registry.delete_blob(r, parse_digest(request.match_info["digest"]))
    return web.Response(status=202)


def _as_registry_error(error: Exception) -> RegistryError:
    if isinstance(error, RegistryError):
        return error
    if isinstance(error, StorageFull):
        return RegistryError("STORAGE_FULL", f"{error} (this blob cannot be cached now)",
                             headers={"Retry-After": "60"})
    return RegistryError("UPSTREAM_UNAVAILABLE", str(error))
