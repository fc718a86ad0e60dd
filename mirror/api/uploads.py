"""Blob uploads: POST starts (or mounts, or takes a monolithic blob), PATCH appends, PUT finishes."""

from aiohttp import web

from mirror.api.request import REGISTRY, body, push_route
from mirror.auth import may
from mirror.errors import RegistryError
from mirror.names import Digest, parse_content_range, parse_digest, parse_name, parse_upload_id
from mirror.registry.namespace import Route
from mirror.registry.upload_sessions import range_headers
from mirror.server.logs import PUSHED_BYTES


def _session_headers(name: str, upload_id: str, size: int) -> dict[str, str]:
    return {"Location": f"/v2/{name}/blobs/uploads/{upload_id}", "Docker-Upload-UUID": upload_id,
            **range_headers(size)}


def _created(name: str, digest: Digest) -> web.Response:
    return web.Response(status=201, headers={"Location": f"/v2/{name}/blobs/{digest}",
                                             "Docker-Content-Digest": str(digest)})


def _digest_param(request: web.Request) -> Digest:
    value = request.query.get("digest")
    if not value:
        raise RegistryError("DIGEST_INVALID", "the digest query parameter is required")
    return parse_digest(value)


async def _mount_source(request: web.Request) -> Route | None:
    """The repository `from` names, resolved as a pull of it would be; None if it names none."""
    source = request.query.get("from")
    if not source:
        return None
    try:
        return await request.app[REGISTRY].resolve(parse_name(source), None)
    except RegistryError as e:
        if e.code == "NAME_INVALID":
            raise
        return None  # a name no upstream may serve here: a plain upload session, as the spec asks


async def start_upload(request: web.Request) -> web.Response:
    """POST /v2/<name>/blobs/uploads/[?digest=|?mount=&from=]."""
    registry, r = await push_route(request)
    mount = request.query.get("mount")
    if mount:
        digest = parse_digest(mount)
        source = await _mount_source(request)
        # A source the caller may not pull is not mountable (no leak whether it holds the blob).
        mountable = source is not None and may(request, source.local, source.private, "pull")
        if source is not None and mountable and await registry.mount(r, digest, source):
            return _created(r.local, digest)
        # Not mountable: a plain upload session, as the spec asks.
    elif "digest" in request.query:
        digest = _digest_param(request)
        request[PUSHED_BYTES] = await registry.monolithic_upload(r, digest, body(request))
        return _created(r.local, digest)
    upload_id = await registry.start_upload(r)
    return web.Response(status=202, headers=_session_headers(r.local, upload_id, 0))


async def upload_status(request: web.Request) -> web.Response:
    """GET /v2/<name>/blobs/uploads/<id>: where to resume."""
    registry, r = await push_route(request)
    upload_id = parse_upload_id(request.match_info["upload_id"])
    size = await registry.upload_size(r, upload_id)
    return web.Response(status=204, headers=_session_headers(r.local, upload_id, size))


async def upload_chunk(request: web.Request) -> web.Response:
    """PATCH /v2/<name>/blobs/uploads/<id>: one chunk (Content-Range) or a stream of the rest."""
    registry, r = await push_route(request)
    upload_id = parse_upload_id(request.match_info["upload_id"])
    start = None
    if "Content-Range" in request.headers:
        start, end = parse_content_range(request.headers["Content-Range"])
        if request.content_length is not None and request.content_length != end - start:
            raise RegistryError("RANGE_INVALID", "Content-Range does not match Content-Length")
    size = await registry.append_upload(r, upload_id, body(request), start)
    return web.Response(status=202, headers=_session_headers(r.local, upload_id, size))


async def finish_upload(request: web.Request) -> web.Response:
    """PUT /v2/<name>/blobs/uploads/<id>?digest=: the last chunk (optional), verify, commit."""
    registry, r = await push_route(request)
    upload_id = parse_upload_id(request.match_info["upload_id"])
    digest = _digest_param(request)
    has_body = bool(request.content_length) or request.headers.get("Transfer-Encoding") == "chunked"
    request[PUSHED_BYTES] = await registry.finish_upload(r, upload_id, digest, body(request) if has_body else None)
    return _created(r.local, digest)


async def cancel_upload(request: web.Request) -> web.Response:
    """DELETE /v2/<name>/blobs/uploads/<id>."""
    registry, r = await push_route(request)
    await registry.cancel_upload(r, parse_upload_id(request.match_info["upload_id"]))
    return web.Response(status=204)
