"""Cached blobs: warm = in storage (sendfile when on local disk); cold = one upstream fetch per digest
(a Flight, flight.py) fanned out to every client while it is written, hashed and committed only if the
digest matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path

import aiohttp

from mirror.background import every
from mirror.cache.flight import DigestMismatch, Flight, FlightFailed
from mirror.cache.manifest_cache import Filling
from mirror.cache.peers import LEASE_SECONDS, Peers, stop
from mirror.names import Digest
from mirror.registry.namespace import Route
from mirror.registry.stores import BlobStore, StoredBlob
from mirror.registry.upstream import answering_as
from mirror.server.metrics import Metrics
from mirror.storage import Stat, layout

log = logging.getLogger("mirror.cache")
STAGING_IDLE_SECONDS = 3600.0


class BlobCache:
    def __init__(self, store: BlobStore, staging: Path, metrics: Metrics, filling: Filling,
                 peers: Peers | None = None) -> None:
        self.filling = filling
        self.peers = peers  # replicas sharing state (redis:): one upstream fetch per blob across them
        self.store = store
        self.staging = staging
        self.metrics = metrics
        self.flights: dict[str, Flight] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self, route: Route, digest: Digest) -> tuple[StoredBlob | Flight, str]:
        """A stored blob, or the Flight fetching it, and the cache result: `miss` only for the
        request that starts an upstream fetch (joining one in progress is a hit, counted apart)."""
        key = str(digest)
        stored = await self.store.find(route.local, digest)
        if stored is not None:
            return stored, "hit"
        flight = self.flights.get(key)
        if flight is not None and flight.route.local == route.local:
            return self._join(flight)
        st = await self.store.stat(digest) if flight is None else None
        if flight is not None or st is not None:
            # Stored for another repository: serve it here only if this repository's upstream has it.
            await self.head_upstream(route, digest)
            await self.filling(route)
            await self.store.link(route.local, digest, st, durable=False)
            stored = await self.store.find(route.local, digest)
            if stored is not None:
                return stored, "hit"
            flight = self.flights.get(key)
            if flight is not None:
                return self._join(flight)
        if self.peers is not None and self.peers.up:
            return await self._cluster_flight(route, digest)
        return self._start(route, digest), "miss"

    async def _cluster_flight(self, route: Route, digest: Digest) -> tuple[StoredBlob | Flight, str]:
        """Fetch it, if we get the lease; else follow the replica that fetches it (a hit: no upstream)."""
        assert self.peers is not None
        key = str(digest)
        token = await self.peers.claim(key)
        url = None if token is not None else await self.peers.holder(key)
        flight = self.flights.get(key)  # another request here may have started or followed it meanwhile
        if flight is not None:
            if token is not None:
                await self.peers.release(key, token)
            return self._join(flight)
        stored = await self.store.find(route.local, digest)  # the holder may have committed it meanwhile
        if stored is not None:
            if token is not None:
                await self.peers.release(key, token)
            return stored, "hit"
        if url is not None:
            self.metrics.peer_follows.inc()
            return self._start(route, digest, follow=url), "hit"
        return self._start(route, digest, lease=token), "miss"

    def _join(self, flight: Flight) -> tuple[Flight, str]:
        self.metrics.flight_joiners.inc()
        return flight, "hit"

    async def head(self, route: Route, digest: Digest) -> tuple[int | None, str]:
        """(size, cache result) without fetching the blob."""
        stored = await self.store.find(route.local, digest)
        if stored is not None:
            return stored.size, "hit"
        flight = self.flights.get(str(digest))
        if flight is not None and flight.route.local == route.local:
            await flight.started.wait()
            if flight.error is None:
                return flight.size, "miss"
        return await self.head_upstream(route, digest), "miss"

    async def head_upstream(self, route: Route, digest: Digest) -> int | None:
        with answering_as("BLOB_UNKNOWN", f"{route.local}@{digest}"):
            return await route.proxy.client.head_blob(route.remote, str(digest))

    def _start(self, route: Route, digest: Digest, follow: str | None = None, lease: str | None = None) -> Flight:
        """A flight from the upstream, or (`follow`) from the replica at that URL that fetches it."""
        key = str(digest)
        spool = self.staging / f"f-{digest.hex[:16]}-{uuid.uuid4().hex[:8]}"
        source: dict[str, str | None] = {"peer": follow, "lease": lease}
        upstream_bytes = self.metrics.upstream_bytes.labels(route.proxy.config.name)

        def received(n: int) -> None:
            if source["peer"] is None:
                upstream_bytes.inc(n)

        flight = Flight(digest, spool, route, self.store.storage.space, received)
        self.flights[key] = flight
        keeper: list[asyncio.Task[None]] = []
        if self.peers is not None and lease not in (None, "local"):
            keeper.append(asyncio.create_task(self.peers.keep(key, lease)))

        async def open_upstream(offset: int) -> aiohttp.ClientResponse:
            if source["peer"] is not None:
                resp = await self._from_peer(key, offset, source, keeper)
                if resp is not None:
                    return resp
            with answering_as("BLOB_UNKNOWN", f"{route.local}@{digest}"):
                resp = await route.proxy.client.open_blob(route.remote, key, offset)
            if offset == 0 and resp.content_length:
                self.store.expect(resp.content_length)
            return resp

        async def commit(spool: Path) -> None:
            await self.filling(route)  # the name holds cached content from now on (clients have the bytes)
            new = await self.store.stat(digest) is None  # the replica we followed may have committed it
            if new:
                await self.store.storage.put_file(layout.blob(digest), spool)
            await self.store.link(route.local, digest, Stat(flight.received, time.time()), durable=False, new=new)
            self.store.ledger.touch(key)

        async def run() -> None:
            upstream = route.proxy.config.name
            self.metrics.flights_in_progress.inc()
            try:
                # a follower may need a try for each holder it outlives, and one for the upstream
                await flight.run(open_upstream, commit, route.proxy.config.retries + (3 if follow else 0))
            finally:
                for task in keeper:
                    await stop(task)
                if self.peers is not None and source["lease"] is not None:
                    await self.peers.release(key, source["lease"])
                self.metrics.flights_in_progress.dec()
                if isinstance(flight.error, DigestMismatch):
                    self.metrics.upstream_errors.labels(upstream, "digest").inc()
                if self.flights.get(key) is flight:
                    del self.flights[key]

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flight

    async def _from_peer(self, key: str, offset: int, source: dict[str, str | None],
                         keeper: list[asyncio.Task[None]]) -> aiohttp.ClientResponse | None:
        """The followed replica's stream from `offset`; if it is gone, the next holder's, or None once we
        hold the lease ourselves (then the upstream, with Range, from what we have)."""
        assert self.peers is not None
        deadline = time.monotonic() + LEASE_SECONDS + 5
        while source["peer"] is not None:
            try:
                return await self.peers.open(source["peer"], key, offset)
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("the replica serving %s (%s) is gone (%s)", key, source["peer"], e)
            token = await self.peers.claim(key)
            if token is not None:
                log.warning("taking over the fetch of %s from the upstream at %d bytes", key, offset)
                source["peer"], source["lease"] = None, token
                if token != "local":
                    keeper.append(asyncio.create_task(self.peers.keep(key, token)))
                self.metrics.peer_takeovers.inc()
                return None
            if time.monotonic() > deadline:
                raise FlightFailed(f"no replica serves {key}, and its lease is held")
            source["peer"] = await self.peers.holder(key, wait=1.0) or source["peer"]
            await asyncio.sleep(0.5)
        return None

    async def clear_staging_forever(self) -> None:
        await every(STAGING_IDLE_SECONDS / 4, self.clear_staging)

    async def clear_staging(self) -> None:
        """Spool and temp files of a process that died: never complete, never visible. Only idle ones
        go: a live spool is written to continuously, and another process may share this root."""
        await asyncio.to_thread(_clear_idle, self.staging, time.time() - STAGING_IDLE_SECONDS)

    async def settle(self) -> None:
        """Wait until no fetch is in progress (every blob a client received is committed), for a server
        about to stop on purpose (prefetch); callers bound it with asyncio.timeout."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _clear_idle(staging: Path, cutoff: float) -> None:
    for leftover in staging.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
