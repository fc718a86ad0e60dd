"""Build the aiohttp application: the route table, the middlewares, and the lifecycle of what requests
share. Storage, the ledger, the upstream session and the registry service (with the background jobs
of what it owns) are each opened by one cleanup_ctx step, so a step that fails to start releases
what the steps before it opened, and shutdown closes them in reverse."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from mirror import __version__, ui
from mirror.api import endpoints
from mirror.api.request import LIMITS
from mirror.api.table import ROUTES
from mirror.auth import GATE, Gate, authorize
from mirror.clock import SYSTEM, Clock
from mirror.cluster import Cluster, scope
from mirror.config import Config
from mirror.ledger.ledger import for_config
from mirror.registry.namespace import configured_private
from mirror.server import loop
from mirror.server.limits import UploadLimiter
from mirror.server.metrics import Metrics
from mirror.server.middleware import errors, metrics_endpoint, observe, on_prepare, resolve_again
from mirror.server.notify import NOTIFIER, Notifier, events
from mirror.server.state import CLOCK, CLUSTER, CONFIG, LEDGER, METRICS, SESSION, STORAGE
from mirror.service import REGISTRY, Registry
from mirror.storage import migrate, open_storage
from mirror.storage.tier import HotTier

# aiohttp's default 64 KiB pauses the upstream socket every 128 KiB: cold blobs crawled at a
# quarter of what the link gives.
UPSTREAM_READ_BUFFER = 4 << 20


async def _storage(app: web.Application) -> AsyncIterator[None]:
    metrics, config = app[METRICS], app[CONFIG]
    storage = open_storage(config, metrics.storage_call)
    try:
        await storage.check()
        await migrate.run(storage, configured_private(config.private, bool(config.upstreams)))
        if isinstance(storage, HotTier):
            tier = storage
            metrics.hot_tier_bytes.set_function(lambda: tier.size)
        space = storage.space
        metrics.storage_full.set_function(lambda: float(space.full))
        space.on_refused.append(metrics.storage_full_errors.inc)
        app[STORAGE] = storage
        yield
    finally:
        await storage.close()


async def _ledger(app: web.Application) -> AsyncIterator[None]:
    """What storage holds, on this machine (`cache.index`): opened as it was left (O(1)); the registry
    brings it up to date in the background."""
    ledger = await for_config(app[CONFIG], app[STORAGE], app[CLOCK]).open()
    try:
        app[LEDGER] = ledger
        yield
    finally:
        await ledger.close()


async def _session(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
        auto_decompress=False,  # blob bytes must reach the hash exactly as the upstream sent them
        read_bufsize=UPSTREAM_READ_BUFFER,
        headers={"User-Agent": f"mirror/{__version__}"},
    )
    try:
        app[SESSION] = session
        yield
    finally:
        await session.close()


async def _cluster(app: web.Application) -> AsyncIterator[None]:
    """redis: the state this replica shares with the others on the same storage."""
    config = app[CONFIG]
    assert config.redis is not None
    cluster = Cluster(config.redis, scope(config), app[METRICS])
    try:
        app[CLUSTER] = cluster
        yield
    finally:
        await cluster.close()


async def _registry(app: web.Application) -> AsyncIterator[None]:
    registry = Registry(app[CONFIG], app[STORAGE], app[LEDGER], app[SESSION], app[METRICS], app[CLOCK],
                        app.get(CLUSTER))
    app[REGISTRY] = registry
    async with registry.running():
        yield


async def _notifier(app: web.Application) -> AsyncIterator[None]:
    notifier = app[NOTIFIER]
    notifier.start(app[SESSION])
    try:
        yield
    finally:
        await notifier.close()


async def _metrics_listener(app: web.Application) -> AsyncIterator[None]:
    """`metrics.addr`: /metrics on a listener of its own, e.g. reachable only inside the cluster."""
    config = app[CONFIG].metrics
    assert config.addr is not None
    side = web.Application()
    side[METRICS] = app[METRICS]
    side.router.add_get(config.path, metrics_endpoint)
    runner = web.AppRunner(side, access_log=None)
    await runner.setup()
    try:
        host, port = config.addr
        await web.TCPSite(runner, host or None, port).start()
        yield
    finally:
        await runner.cleanup()


def create_app(config: Config, clock: Clock = SYSTEM) -> web.Application:
    """The app for `config`. With auth, reading the htpasswd file or the token root bundle may
    fail here (HtpasswdError, TokenSetupError)."""
    middlewares = [observe, errors, resolve_again]
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
    app = web.Application(middlewares=middlewares, client_max_size=4 << 20)
    if gate is not None:
        app[GATE] = gate

        async def close_gate(_: web.Application) -> None:
            await gate.close()  # the UI login's session to the token realm

        app.on_cleanup.append(close_gate)
    app[CONFIG] = config
    app[CLOCK] = clock
    app[LIMITS] = config.limits
    metrics = app[METRICS] = Metrics([u.name for u in config.upstreams],
                                     backend="oss" if config.storage.oss else "filesystem")
    endpoints.add(app, ROUTES)
    if config.metrics.enabled and config.metrics.addr is None:
        endpoints.add(app, endpoints.get(config.metrics.path, metrics_endpoint, "metrics", "base"))
    app.on_response_prepare.append(on_prepare(config))
    app.cleanup_ctx.extend([loop.watched, _storage, _ledger, _session, *([_cluster] if config.redis else []),
                            _registry])
    if notify:
        app[NOTIFIER] = Notifier(config, config.cache.local_dir(config.storage) / "_events", metrics)
        app.cleanup_ctx.append(_notifier)
    if config.metrics.enabled and config.metrics.addr is not None:
        app.cleanup_ctx.append(_metrics_listener)
    if config.ui.enabled:
        ui.setup(app, config)  # after _registry: the UI reads the registry and the ledger
    return app
