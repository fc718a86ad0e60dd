from aiohttp import web

from mirror import mediatypes
from mirror.api.context import route
from mirror.logs import CACHE
from mirror.names import parse_reference


async def get_manifest(request: web.Request) -> web.Response:
    """GET/HEAD /v2/<name>/manifests/<tag|digest>."""
    registry, r = route(request)
    reference = parse_reference(request.match_info["reference"])
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
    return web.Response(body=m.body, content_type=m.media_type, headers=headers)
