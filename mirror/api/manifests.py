from aiohttp import web

from mirror.api.request import LIMITS, body, pull_route, push_route
from mirror.errors import RegistryError
from mirror.names import Digest, parse_reference
from mirror.registry import mediatypes
from mirror.registry.manifest_schema import read_manifest
from mirror.server.logs import CACHE, PUSHED_BYTES, SERVED_BYTES


def _existing_reference(value: str) -> str | Digest:
    """The reference of a manifest to read or delete: one that is neither a tag nor a digest names
    no manifest, so it is unknown (404), as the spec's conformance suite asks; only a PUT, which
    would create it, answers TAG_INVALID or DIGEST_INVALID."""
    try:
        return parse_reference(value)
    except RegistryError:
        raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {value[:200]!r}") from None


async def get_manifest(request: web.Request) -> web.Response:
    """GET/HEAD /v2/<name>/manifests/<tag|digest>."""
    registry, r = await pull_route(request)
    reference = _existing_reference(request.match_info["reference"])
    accept = mediatypes.accepted(request.headers.getall("Accept", []))
    served = await registry.manifest(r, reference, accept)
    request[CACHE] = served.cache
    m = served.manifest
    etag = f'"{m.digest}"'
    headers = {"Docker-Content-Digest": m.digest, "ETag": etag}
    if served.warning:
        headers["Warning"] = served.warning
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    if request.method == "GET":
        request[SERVED_BYTES] = len(m.body)
    return web.Response(body=m.body, content_type=m.media_type, headers=headers)


async def put_manifest(request: web.Request) -> web.Response:
    """PUT /v2/<name>/manifests/<tag|digest>."""
    registry, r = await push_route(request)
    reference = parse_reference(request.match_info["reference"])
    limit = request.app[LIMITS].manifest_size
    manifest = await read_manifest(body(request), request.content_length, limit)  # stalls and drips are cut
    if manifest is None:
        raise RegistryError("TOO_LARGE", f"manifests are limited to {limit} bytes (limits.manifest_size)")
    pushed = await registry.put_manifest(r, reference, manifest, request.headers.get("Content-Type"))
    request[PUSHED_BYTES] = len(manifest)
    headers = {"Location": f"/v2/{r.local}/manifests/{pushed.digest}", "Docker-Content-Digest": pushed.digest}
    if pushed.subject:
        headers["OCI-Subject"] = pushed.subject
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    """DELETE /v2/<name>/manifests/<digest> (the manifest) or <tag> (the tag only)."""
    registry, r = await pull_route(request)
    await registry.delete_manifest(r, _existing_reference(request.match_info["reference"]))
    return web.Response(status=202)
