"""Replicas that behave as one cache: the state they share on Redis (registry:2's `redis:` keys).

Without `redis:` there is no Cluster and every replica is its own cache, as before. With it, the
replicas serving one storage share leases (one of them fetches, revalidates or evicts at a time),
small records (a tag's last revalidation, an upstream's back-off) and events (a name claimed). The
owners of those rules (cache/, registry/upstream.py, registry/namespace.py) ask here; this module
only moves bytes to and from Redis.

Every call is best effort, bounded by the configured timeouts: with Redis unreachable a replica
works on its own (said once in the log, `mirror_redis_up` 0) and rejoins when Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mirror.background import every
from mirror.config import Config, RedisConfig
from mirror.server.metrics import Metrics

log = logging.getLogger("mirror.cluster")
T = TypeVar("T")
Handler = Callable[[dict[str, Any]], None]
RECONNECT_SECONDS = 1.0
USES_FLUSH = 1.0  # seconds between writes of the last uses other replicas' eviction reads
USES_KEPT = 300.0  # seconds a last use stays in Redis: far past ledger.FLUSH plus the journal's lag
FAILURES = (RedisError, OSError, TimeoutError)
# Release a lease only if it is still ours (a lease that expired may be someone else's by now).
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"


def scope(config: Config) -> str:
    """What the replicas sharing state share: their storage (the bucket and prefix, or the root)."""
    oss = config.storage.oss
    where = f"oss:{oss.url}/{oss.bucket}/{oss.rootdirectory}" if oss else f"fs:{config.storage.rootdirectory}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]


class Cluster:
    """One replica's connection to the shared state; `run()` keeps it (subscriptions, reconnects)."""

    def __init__(self, config: RedisConfig, scope: str, metrics: Metrics) -> None:
        host, _, port = config.addr.rpartition(":")
        self.redis = aioredis.Redis(
            host=host.strip("[]") or "127.0.0.1", port=int(port), db=config.db, password=config.password,
            socket_connect_timeout=config.dialtimeout, socket_timeout=max(config.readtimeout, config.writetimeout),
            max_connections=config.maxactive, health_check_interval=int(config.idletimeout),
            ssl=config.tls, ssl_certfile=config.certificate,
            ssl_keyfile=config.key, ssl_ca_certs=config.clientcas[0] if config.clientcas else None)
        self.timeout = max(config.readtimeout, config.writetimeout)
        self.prefix = f"mirror:{scope}:"
        self.replica = uuid.uuid4().hex[:12]
        self.metrics = metrics
        self.up = False
        self._handlers: dict[str, list[Handler]] = {}
        self._joined: list[Callable[[], Awaitable[None]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._uses: dict[str, float] = {}
        metrics.redis_up.set(0)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # --- being up, or not ------------------------------------------------------------------------

    def _state(self, up: bool, why: object = None) -> None:
        if up != self.up:
            if up:
                log.info("redis reachable: sharing state with the other replicas")
            else:
                log.warning("redis unreachable (%s): working on our own until it answers again", why)
        self.up = up
        self.metrics.redis_up.set(1 if up else 0)

    async def _call(self, call: Callable[[], Awaitable[T]], default: T) -> T:
        """A Redis call, or `default` when Redis is down or does not answer in time (said once)."""
        if not self.up:
            return default
        try:
            async with asyncio.timeout(self.timeout):
                return await call()
        except FAILURES as e:
            self.metrics.redis_errors.inc()
            self._state(False, e)
            return default

    # --- records ---------------------------------------------------------------------------------

    async def get(self, *parts: str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self.redis.get(self.key(*parts)), None)
        try:
            found = json.loads(raw) if raw else None
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    async def put(self, record: dict[str, Any], ttl: float, *parts: str) -> None:
        await self._call(lambda: self.redis.set(self.key(*parts), json.dumps(record), px=max(1, int(ttl * 1000))),
                         None)

    async def lease(self, ttl: float, *parts: str) -> str | None:
        """A lease on `parts` for `ttl` seconds: its token if we got it, None if another replica holds
        it. Without Redis every replica holds its own leases (each is its own cache)."""
        if not self.up:
            return "local"
        token = f"{self.replica}-{uuid.uuid4().hex[:8]}"
        got = await self._call(lambda: self.redis.set(self.key("lease", *parts), token, nx=True, px=int(ttl * 1000)),
                              None)
        if got is None and not self.up:
            return "local"
        return token if got else None

    async def renew(self, token: str, ttl: float, *parts: str) -> bool:
        """Keep a lease we hold for `ttl` more seconds; False if it is not ours any more."""
        if token == "local":
            return True
        renewed = await self._call(lambda: self.redis.eval(RENEW, 1, self.key("lease", *parts), token,
                                                           str(int(ttl * 1000))), None)
        return renewed is None or bool(renewed)  # Redis gone: nobody else can hold it either

    async def release(self, token: str, *parts: str) -> None:
        if token != "local":
            await self._call(lambda: self.redis.eval(RELEASE, 1, self.key("lease", *parts), token), 0)

    # --- access times ------------------------------------------------------------------------------

    def used(self, digest: str, at: float) -> None:
        """A blob or manifest was served here: into the one sorted set every replica's eviction reads
        within USES_FLUSH (a request never waits on Redis). The ledger's journal carries last uses too,
        but only every ledger.FLUSH: this is what eviction on another replica could not know yet."""
        if self.up:
            self._uses[digest] = at

    async def _flush_uses(self) -> None:
        uses, self._uses = self._uses, {}
        if not uses:
            return
        key = self.key("access")
        newest = max(uses.values())

        async def add() -> None:
            pipe = self.redis.pipeline(transaction=False)
            items = list(uses.items())
            for i in range(0, len(items), 1000):
                pipe.zadd(key, dict(items[i:i + 1000]), gt=True)  # replicas flushing in any order: latest wins
            pipe.zremrangebyscore(key, "-inf", newest - USES_KEPT)  # what every ledger has heard by now
            await pipe.execute()

        await self._call(add, None)

    async def recent_uses(self, since: float) -> dict[str, float]:
        """Every digest served on any replica since `since` (wall time), with its last use (nothing
        while Redis is away: each replica evicts by what its ledger knows)."""

        async def read() -> dict[str, float]:
            found: list[tuple[bytes, float]] = await self.redis.zrangebyscore(self.key("access"), since, "+inf",
                                                                              withscores=True)  # type: ignore[assignment]
            return {digest.decode(): float(at) for digest, at in found}

        return await self._call(read, {})

    # --- events ------------------------------------------------------------------------------------

    def on(self, channel: str, handler: Handler) -> None:
        """`handler` hears every event on `channel` another replica publishes (never our own)."""
        self._handlers.setdefault(channel, []).append(handler)

    def joined(self, callback: Callable[[], Awaitable[None]]) -> None:
        """`callback` runs each time Redis becomes reachable (to read what was published meanwhile)."""
        self._joined.append(callback)

    def publish(self, channel: str, event: dict[str, Any]) -> None:
        """Fire and forget: a request never waits on Redis for an event."""
        if not self.up:
            return
        message = json.dumps({**event, "_from": self.replica})
        task = asyncio.create_task(self._call(lambda: self.redis.publish(self.key(channel), message), 0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        """Subscribe and dispatch; reconnect after a failure, every RECONNECT_SECONDS."""
        await asyncio.gather(self._listen(), every(RECONNECT_SECONDS, self._ping, first=False),
                             every(USES_FLUSH, self._flush_uses, first=False))

    async def _ping(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.redis.ping()
        except FAILURES as e:
            self._state(False, e)

    async def _listen(self) -> None:
        while True:
            channels = {self.key(c): c for c in self._handlers}
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self.timeout):
                    await self.redis.ping()
                    if channels:
                        await pubsub.subscribe(*channels)
                self._state(True)
                for callback in self._joined:
                    await callback()
                while self.up:
                    message = await pubsub.get_message(timeout=RECONNECT_SECONDS)
                    if message is not None:
                        self._dispatch(channels.get(message["channel"].decode(), ""), message["data"])
            except FAILURES as e:
                self._state(False, e)
            finally:
                with contextlib.suppress(*FAILURES):
                    await pubsub.aclose()
            await asyncio.sleep(RECONNECT_SECONDS)

    def _dispatch(self, channel: str, data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict) or event.get("_from") == self.replica:
            return
        for handler in self._handlers.get(channel, ()):
            try:
                handler(event)
            except Exception:
                log.exception("handling a %s event from another replica failed", channel)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(*FAILURES):
            await self.redis.aclose()
