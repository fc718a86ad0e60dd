"""Build the aiohttp application: routes, middlewares, and the lifecycle of shared state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror import ui
from mirror.api import endpoints
from mirror.api.request import LIMITS, REGISTRY, ClientStalled
from mirror.api.table import ROUTES
from mirror.auth import GATE, Gate, authorize
from mirror.cache.blob_cache import BlobCache
from mirror.cache.eviction import Evictor
from mirror.cache.index import Index
from mirror.cache.manifest_cache import ManifestCache
from mirror.config import Config
from mirror.errors import RegistryError
from mirror.registry.namespace import Router, Upstream
from mirror.registry.stores import BlobStore, ManifestStore
from mirror.registry.upload_sessions import live_uploads
from mirror.registry.upstream import UpstreamClient
from mirror.server.limits import UploadLimiter
from mirror.server.logs import CACHE, REQUEST_ID, SERVED_BYTES
from mirror.server.metrics import Metrics
from mirror.server.notify import NOTIFIER, Notifier, events
from mirror.service import Registry
from mirror.storage import StorageUnavailable, open_storage
from mirror.storage.tier import HotTier

log = logging.getLogger("mirror")
CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
INDEX_FLUSH_SECONDS = 30.0
STORAGE_SCAN_SECONDS = 60.0
STAGING_IDLE_SECONDS = 3600.0
EVICTION_SECONDS = 600.0
EPOCH_CHECK_SECONDS = 2.0
METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"})
# aiohttp's default 64 KiB pauses the upstream socket every 128 KiB: cold blobs crawled at a
# quarter of what the link gives.
UPSTREAM_READ_BUFFER = 4 << 20


def _route_label(request: web.Request) -> str:
    """The API area that answered: a bounded label, never a name."""
    return endpoints.area(request) or "other"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request metrics. The duration ends when the handler is done: cold blobs are streamed by
    then, warm blob bodies go out by sendfile just after."""
    metrics = request.app[METRICS]
    route = _route_label(request)
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


# The classic text format every Prometheus 2.x scraper reads (prometheus-client 0.26 says 1.0.0).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(RegistryError("UNKNOWN", "internal server error"))


# What a proxied pull answers when the upstream does not know the name (Docker Hub: DENIED).
NOT_UPSTREAM = frozenset({"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "DENIED"})


@web.middleware
async def late_private(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A pull of a name the upstream does not know, that became private elsewhere (another replica
    pushed it, or an import), is answered as private: once, after a storage check."""
    try:
        return await handler(request)
    except RegistryError as e:
        name = request.match_info.get("name")
        if (e.code not in NOT_UPSTREAM or name is None or request.method not in ("GET", "HEAD")
                or not await request.app[REGISTRY].became_private(name, request.query.get("ns"))):
            raise
    return await handler(request)


def _on_prepare(config: Config) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    extra = {name: ", ".join(values) for name, values in config.http.headers.items()}

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
        if REQUEST_ID in request:
            response.headers["X-Request-Id"] = request[REQUEST_ID]
        for name, value in extra.items():
            response.headers.setdefault(name, value)

    return on_prepare


async def _state(app: web.Application) -> AsyncIterator[None]:
    """Open storage, index, the upstream session and the caches; close them on shutdown."""
    config = app[CONFIG]
    metrics = app[METRICS]
    storage = open_storage(config, metrics.storage_call)
    try:
        await storage.check()
    except BaseException:
        await storage.close()
        raise
    if isinstance(storage, HotTier):
        tier = storage
        metrics.hot_tier_bytes.set_function(lambda: tier.size)
    index = Index(config.cache.index_dir(config.storage))
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
        auto_decompress=False,  # blob bytes must reach the hash exactly as the upstream sent them
        read_bufsize=UPSTREAM_READ_BUFFER,
        headers={"User-Agent": "mirror/0.1"},
    )
    upstreams = [
        Upstream(up, UpstreamClient(up, session, metrics, config.limits.manifest_size), Router.local_prefix(up, i == 0))
        for i, up in enumerate(config.upstreams)
    ]
    blob_store = BlobStore(storage, index, metrics)
    manifest_store = ManifestStore(storage, config.cache.memory, blob_store.added)
    blob_cache = BlobCache(blob_store, storage.staging_dir(), metrics)
    registry = Registry(storage, Router(upstreams, config.private), index, manifest_store, blob_store,
                        ManifestCache(manifest_store, index), blob_cache, config.storage.delete_enabled,
                        config.storage.redirect)
    await registry.load_private_names()
    app[REGISTRY] = registry
    cache = config.cache
    evictor = Evictor(storage, index, manifest_store, blob_store, registry.router.is_private,
                      in_use=lambda: blob_cache.flights.keys(), max_size=cache.max_size, ttl=cache.content_ttl,
                      min_idle=cache.min_idle, high=cache.high_watermark, low=cache.low_watermark)
    blob_store.on_growth = evictor.grew

    async def purge_uploads() -> None:
        purging = config.storage.uploadpurging
        await registry.uploads.purge(time.time() - purging.age, dry_run=purging.dryrun)

    async def scan_storage() -> None:
        blobs, size = await storage.usage("blobs")
        metrics.storage_blobs.labels(storage.name).set(blobs)
        metrics.storage_bytes.labels(storage.name).set(size)
        metrics.uploads_in_progress.set(len(await live_uploads(storage)))

    async def flush_index() -> None:
        index.flush()

    epoch = index.epoch()

    async def notice_storage_changes() -> None:
        nonlocal epoch
        if index.epoch() != epoch:  # `mirror evict` or `index rebuild` ran: memory may name gone objects
            epoch = index.epoch()
            log.info("storage changed behind the server (mirror evict or index rebuild): re-reading it")
            index.forget_memory()
            manifest_store.forget_memory()
            blob_store.forget_memory()

    async def clear_staging() -> None:
        await asyncio.to_thread(_clear_staging, storage.staging_dir())

    # Listing a whole bucket costs a request per 1,000 blobs: remote storage is counted less often.
    scan_seconds = STORAGE_SCAN_SECONDS * (1 if storage.name == "filesystem" else 10)
    tasks = [_every(scan_seconds, scan_storage), _every(INDEX_FLUSH_SECONDS, flush_index, first=False),
             _every(EPOCH_CHECK_SECONDS, notice_storage_changes, first=False),
             _every(STAGING_IDLE_SECONDS / 4, clear_staging)]
    if cache.max_size is not None or cache.content_ttl is not None:
        tasks.append(asyncio.create_task(_evict_forever(evictor)))
    if config.storage.uploadpurging.enabled:
        tasks.append(_every(config.storage.uploadpurging.interval, purge_uploads))
    metrics_runner = await _metrics_listener(config, metrics)
    notifier = app.get(NOTIFIER)
    if notifier is not None:
        notifier.start(session)
    try:
        yield
    finally:
        if notifier is not None:
            await notifier.close()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Fetches under way finish and commit (their clients already have the bytes), within bounds.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.http.draintimeout):
                await blob_cache.settle()
        await blob_cache.close()
        await session.close()
        index.close()
        await storage.close()


async def _evict_forever(evictor: Evictor) -> None:
    """A pass at start, then every EVICTION_SECONDS or as soon as a new blob passes the high watermark."""
    while True:
        try:
            await evictor.run()
        except Exception:
            log.exception("eviction pass failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(evictor.wake.wait(), EVICTION_SECONDS)


def _every(seconds: float, job: Callable[[], Awaitable[None]], first: bool = True) -> asyncio.Task[None]:
    """Run `job` now (if `first`) and every `seconds`; a failure is logged and the next run comes."""

    async def loop() -> None:
        if not first:
            await asyncio.sleep(seconds)
        while True:
            try:
                await job()
            except Exception:
                log.exception("background job %s failed", job.__name__)
            await asyncio.sleep(seconds)

    return asyncio.create_task(loop())


async def _metrics_listener(config: Config, metrics: Metrics) -> web.AppRunner | None:
    """`metrics.addr`: /metrics on a listener of its own, e.g. reachable only inside the cluster."""
    if not config.metrics.enabled or config.metrics.addr is None:
        return None
    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get(config.metrics.path, metrics_endpoint)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = config.metrics.addr
    await web.TCPSite(runner, host or None, port).start()
    return runner


def _clear_staging(staging: Path) -> None:
    """Spool and temp files of a process that died: never complete, never visible. Only idle ones
    go: a live spool is written to continuously, and another process may share this root."""
    cutoff = time.time() - STAGING_IDLE_SECONDS
    for leftover in staging.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def create_app(config: Config) -> web.Application:
    """The app for `config`. With auth, reading the htpasswd file or the token root bundle may
    fail here (HtpasswdError, TokenSetupError)."""
    middlewares = [observe, errors]
    gate = Gate(config) if config.auth is not None else None
    if gate is not None:
        middlewares.append(authorize)
    if config.limits.uploads_per_client:
        middlewares.append(UploadLimiter(config.limits.uploads_per_client).middleware)
    if config.ui.enabled:
        middlewares.append(ui.track)
    notify = any(not e.disabled for e in config.notifications.endpoints)
    if notify:
        middlewares.append(events)
    middlewares.append(late_private)  # inside auth: a caller who may not pull costs no storage check
    app = web.Application(middlewares=middlewares, client_max_size=4 << 20)
    if gate is not None:
        app[GATE] = gate
    app[CONFIG] = config
    app[LIMITS] = config.limits
    app[METRICS] = Metrics([u.name for u in config.upstreams], backend="oss" if config.storage.oss else "filesystem")
    if notify:
        app[NOTIFIER] = Notifier(config, config.cache.local_dir(config.storage) / "_events", app[METRICS])
    endpoints.add(app, ROUTES)
    if config.metrics.enabled and config.metrics.addr is None:
        endpoints.add(app, endpoints.get(config.metrics.path, metrics_endpoint, "metrics", "base"))
    app.on_response_prepare.append(_on_prepare(config))
    app.cleanup_ctx.append(_state)
    if config.ui.enabled:
        ui.setup(app, config, app[METRICS])  # after _state: the UI's catalog reads the registry
    return app
