"""The middlewares every request passes: request metrics, errors as OCI JSON, the late private check;
and the headers every answer carries."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api.endpoints import area
from mirror.api.request import ROUTE, ClientStalled
from mirror.config import Config
from mirror.errors import RegistryError
from mirror.registry.namespace import NameNowPrivate
from mirror.server.logs import CACHE, REQUEST_ID, SERVED_BYTES
from mirror.server.state import METRICS, STORAGE
from mirror.storage import StorageFull, StorageUnavailable
from mirror.storage.space import is_full

log = logging.getLogger("mirror")
METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"})
# The classic text format every Prometheus 2.x scraper reads (prometheus-client 0.26 says 1.0.0).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FULL_RETRY_SECONDS = "60"  # a full disk is freed by eviction, gc or an operator: not in a second


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request metrics, labelled by the endpoint's area (bounded, never a name). The duration ends
    when the handler is done: cold blobs are streamed by then, warm blob bodies go out by sendfile
    just after."""
    metrics = request.app[METRICS]
    route = area(request) or "other"
    method = request.method if request.method in METHODS else "OTHER"
    metrics.http_in_flight.inc()
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        metrics.http_in_flight.dec()
        metrics.request_done(route, method, status, time.perf_counter() - start)
        cache = request.get(CACHE)
        # A blob HEAD fetches nothing: counting it would make one HEAD+GET two misses.
        if cache is not None and route in ("manifests", "blobs") and not (route == "blobs" and method == "HEAD"):
            metrics.cache_done(route[:-1], cache, request.get(SERVED_BYTES))


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def error_response(error: RegistryError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as one OCI error body: ours, the router's, or an unexpected one."""
    request[REQUEST_ID] = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    try:
        return await handler(request)
    except RegistryError as e:
        return error_response(e)
    except web.HTTPMethodNotAllowed:
        return error_response(RegistryError("UNSUPPORTED", f"{request.method} is not supported on "
                                                           f"{request.path[:200]}"))
    except web.HTTPNotFound:
        return error_response(RegistryError("NOT_FOUND", f"no API endpoint at {request.path[:200]}"))
    except StorageUnavailable as e:
        log.error("storage failed on %s %s: %s", request.method, request.path, e)
        return error_response(RegistryError("UNAVAILABLE", "storage backend unavailable, try again later"))
    except StorageFull as e:  # logged once by storage/space.py, not per request
        return storage_full(e)
    except ConnectionResetError as e:
        # The client went away mid-request (or stalled, and is cut now): nothing to answer, nothing
        # wrong here. Whatever an upload received so far is kept and reported by its Range.
        if isinstance(e, ClientStalled):
            if request.transport is not None:
                request.transport.abort()
        else:
            log.info("client went away during %s %s", request.method, request.path)
        return web.Response(status=499, reason="Client Closed Request")
    except (asyncio.CancelledError, web.HTTPException):
        raise
    except Exception as e:
        if is_full(e):  # a local write outside the storage interface
            assert isinstance(e, OSError)
            return storage_full(request.app[STORAGE].space.refuse(request.path, e))
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(RegistryError("UNKNOWN", "internal server error"))


def storage_full(error: StorageFull) -> web.Response:
    return error_response(RegistryError("STORAGE_FULL", str(error), headers={"Retry-After": FULL_RETRY_SECONDS}))


@web.middleware
async def resolve_again(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A name resolved as proxied that a push claimed elsewhere meanwhile: answer the request again from
    the start, auth included, as the private repository it now is (once: private is final)."""
    try:
        return await handler(request)
    except NameNowPrivate:
        if request.method not in ("GET", "HEAD"):
            raise
        request.pop(ROUTE, None)
        return await handler(request)


def on_prepare(config: Config) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """The headers every answer carries: the API version, the request id, `http.headers`."""
    extra = {name: ", ".join(values) for name, values in config.http.headers.items()}

    async def prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
        if REQUEST_ID in request:
            response.headers["X-Request-Id"] = request[REQUEST_ID]
        for name, value in extra.items():
            response.headers.setdefault(name, value)

    return prepare
