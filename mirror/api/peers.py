"""GET /_mirror/flights/<digest>?offset=: another replica follows this one's fetch of a cold blob (redis:,
cache/peers.py). Not part of the registry API: a request must carry a fresh HMAC of the digest under
`http.secret`, which every replica shares."""

from aiohttp import web

from mirror.api.blobs import send_blob
from mirror.cache.flight import Flight
from mirror.errors import RegistryError
from mirror.names import parse_digest
from mirror.service import REGISTRY


async def peer_flight(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    digest = parse_digest(request.match_info["digest"])
    if not registry.peer_signed(str(digest), request.headers.get("X-Mirror-Peer", "")):
        raise RegistryError("DENIED", "not a request of a replica of this registry")
    offset = request.query.get("offset", "0")
    if not offset.isdigit():
        raise RegistryError("RANGE_INVALID", "offset must be a number of bytes")
    source = await registry.peer_source(digest)
    if source is None:
        raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {digest}")
    range_header = f"bytes={offset}-" if int(offset) else None
    if isinstance(source, Flight):
        await source.started.wait()
        if source.error is not None and not source.verified:
            raise RegistryError("UPSTREAM_UNAVAILABLE", str(source.error))
        return await send_blob(request, digest, source.size, range_header, source.read)
    stored = source
    return await send_blob(request, digest, stored.size, range_header,
                           lambda start, end: registry.read_blob(stored, start, end))
