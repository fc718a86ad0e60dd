"""A cold blob fetched once across replicas (redis:). The replica that gets a blob's lease fetches it
from the upstream, as a Flight; the others follow that flight: they stream the same bytes from it as
they arrive, over an internal endpoint signed with `http.secret` (api/peers.py), hash and spool them
like any flight (verification and the hold-back of the last bytes apply to them too), and if the
holder dies (its stream breaks and its lease lapses) one of them takes the lease and goes on from the
upstream, with Range, from what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import socket
import time

import aiohttp
from yarl import URL

from mirror.cluster import Cluster
from mirror.config import Config

log = logging.getLogger("mirror.cache")
LEASE_SECONDS = 10.0  # a holder that stops renewing (dead) loses its lease this long after
RENEW_SECONDS = 3.0
SIGNED_SECONDS = 60.0  # a signed request is good this long
HEADER = "X-Mirror-Peer"
PATH = "/_mirror/flights/{digest}"


def advertised(config: Config) -> str:
    """The URL other replicas reach this one at: http.advertise, else this host's name and port."""
    if config.http.advertise:
        return config.http.advertise.rstrip("/")
    host = config.http.host if config.http.host not in ("", "0.0.0.0", "::") else socket.gethostname()
    scheme = "https" if config.http.tls else "http"
    return f"{scheme}://{host}:{config.http.port}"


def sign(secret: bytes, digest: str, expires: int) -> str:
    mac = hmac.new(secret, f"{digest}:{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def signed(secret: bytes, digest: str, value: str, now: float) -> bool:
    """Whether `value` (the HEADER of a peer's request) is ours for `digest` and still good."""
    expires, _, _ = value.partition(".")
    if not expires.isdigit() or int(expires) < now:
        return False
    return hmac.compare_digest(value, sign(secret, digest, int(expires)))


class Peers:
    """This replica's side of cluster-wide flights: leases, who holds one, and streams from the holder."""

    def __init__(self, cluster: Cluster, session: aiohttp.ClientSession, advertise: str, secret: bytes) -> None:
        self.cluster = cluster
        self.session = session
        self.advertise = advertise
        self.secret = secret

    @property
    def up(self) -> bool:
        return self.cluster.up

    async def claim(self, digest: str) -> str | None:
        """The lease to fetch `digest` from the upstream (then others are told where to follow), or None."""
        token = await self.cluster.lease(LEASE_SECONDS, "flight", digest)
        if token is not None:
            await self.cluster.put({"url": self.advertise}, LEASE_SECONDS * 6, "flight", digest)
        return token

    async def holder(self, digest: str, wait: float = 1.0) -> str | None:
        """Where the replica holding the lease on `digest` serves it (it writes that just after its lease)."""
        deadline = time.monotonic() + wait
        while True:
            found = await self.cluster.get("flight", digest)
            url = found.get("url") if found else None
            if isinstance(url, str) and url != self.advertise:
                return url
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)

    async def keep(self, digest: str, token: str) -> None:
        """Renew the lease while the fetch runs (cancel this when it ends)."""
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            if not await self.cluster.renew(token, LEASE_SECONDS, "flight", digest):
                log.warning("lost the lease on fetching %s: another replica may fetch it too", digest)
                return

    async def release(self, digest: str, token: str) -> None:
        await self.cluster.release(token, "flight", digest)

    async def open(self, url: str, digest: str, offset: int) -> aiohttp.ClientResponse:
        """The holder's stream of `digest` from `offset` (status checked; the caller releases it)."""
        target = URL(url + PATH.format(digest=digest)).with_query(offset=str(offset))
        headers = {HEADER: sign(self.secret, digest, int(time.time() + SIGNED_SECONDS))}
        resp = await self.session.get(target, headers=headers, timeout=aiohttp.ClientTimeout(sock_connect=2,
                                                                                             sock_read=30))
        if resp.status not in (200, 206):
            resp.release()
            raise aiohttp.ClientConnectionError(f"peer {url} answered {resp.status} for {digest}")
        return resp


async def stop(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
