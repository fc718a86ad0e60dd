"""Client for one upstream registry: token dance, credentials, redirects, retries.

One aiohttp ClientSession is shared by every upstream; each UpstreamClient keeps its own
tokens. Errors come out as three exception types the cache layer decides on:
UpstreamNotFound / UpstreamDenied are answers (the upstream said no), UpstreamError is a
failure (unreachable, 5xx, 429) after which cached content may be served stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import random
import re
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from mirror.clock import SYSTEM, Clock
from mirror.cluster import Cluster
from mirror.config import UpstreamConfig
from mirror.errors import CODES, RegistryError
from mirror.registry import jsondoc
from mirror.registry.manifest_schema import MAX_MANIFEST, read_manifest
from mirror.server.metrics import Metrics, status_class

log = logging.getLogger("mirror.upstream")

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES)
MAX_REDIRECTS = 5
MAX_TAG_PAGES = 50
RETRY_STATUSES = frozenset({500, 502, 503, 504})
BACKOFF_FIRST = 60.0  # seconds without requests after a 429 that says nothing of when to retry
BACKOFF_MAX = 3600.0


class UpstreamAnswer(Exception):
    """What an upstream request ended in, when it did not give us what we asked for."""


class UpstreamError(UpstreamAnswer):
    """The upstream failed (unreachable, timeout, 5xx, 429): cached content may be served stale."""

    def __init__(self, upstream: str, message: str, status: int | None = None,
                 retry_after: str | None = None) -> None:
        super().__init__(f"upstream {upstream}: {message}")
        self.upstream = upstream
        self.status = status
        self.retry_after = retry_after


class UpstreamNotFound(UpstreamAnswer):
    """The upstream answered 404."""


class UpstreamDenied(UpstreamAnswer):
    """The upstream answered 401/403 even with our credentials."""


def translate(answer: UpstreamAnswer, unknown: str, what: str) -> RegistryError:
    """The one place an upstream's answer becomes the OCI error a client gets when nothing cached
    stands in: `unknown` (MANIFEST_UNKNOWN, BLOB_UNKNOWN, NAME_UNKNOWN) for a 404, DENIED for a
    401/403, TOOMANYREQUESTS with the remaining Retry-After for a 429, else UPSTREAM_UNAVAILABLE."""
    if isinstance(answer, UpstreamNotFound):
        return RegistryError(unknown, f"{CODES[unknown].message}: {what}")
    if isinstance(answer, UpstreamDenied):
        return RegistryError("DENIED", str(answer))
    assert isinstance(answer, UpstreamError)
    if answer.status == 429:
        headers = {"Retry-After": answer.retry_after} if answer.retry_after else {}
        return RegistryError("TOOMANYREQUESTS", str(answer), headers=headers)
    return RegistryError("UPSTREAM_UNAVAILABLE", str(answer))


@contextlib.contextmanager
def answering_as(unknown: str, what: str) -> Iterator[None]:
    """`translate` whatever the upstream answers inside the block."""
    try:
        yield
    except UpstreamAnswer as e:
        raise translate(e, unknown, what) from None


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    body: bytes
    media_type: str | None
    digest: str | None  # Docker-Content-Digest as the upstream sent it


@dataclass(slots=True)
class _Token:
    value: str
    expires: float


_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="…",service="…",scope="…"` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {m.group(1).lower(): m.group(2) or m.group(3) or "" for m in _PARAM.finditer(rest)}


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds or an HTTP date (RFC 9110), bounded to BACKOFF_MAX."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 1.0), BACKOFF_MAX)


def _kind(path: str) -> str:
    for marker, kind in (("/manifests/", "manifest"), ("/blobs/", "blob"), ("/tags/", "tags")):
        if marker in path:
            return kind
    return "other"


class UpstreamClient:
    def __init__(self, config: UpstreamConfig, session: aiohttp.ClientSession,
                 metrics: Metrics | None = None, max_manifest: int = MAX_MANIFEST, clock: Clock = SYSTEM) -> None:
        self.clock = clock
        self.cluster: Cluster | None = None  # replicas sharing state (share())
        self._shared: set[asyncio.Task[None]] = set()
        self.config = config
        self.max_manifest = max_manifest
        self.name = config.name
        self.metrics = metrics or Metrics([config.name])
        self.base = URL(config.url)
        self.session = session
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.read_timeout
        )
        self._basic = (
            aiohttp.encode_basic_auth(config.username, config.password or "")
            if config.username is not None else None
        )
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        self._uses_basic = False
        self.backoff_until = 0.0  # monotonic: after a 429 no request goes out before this
        self._backoff = 0.0  # the last back-off, doubled while 429s keep coming
        self.metrics.upstream_backoff.labels(self.name).set_function(self.backoff_remaining)

    def backoff_remaining(self) -> float:
        return max(0.0, self.backoff_until - self.clock.monotonic())

    def share(self, cluster: Cluster) -> None:
        """Hear another replica's back-off (and the one in force when we join), and tell them ours."""
        self.cluster = cluster

        def heard(event: dict[str, Any]) -> None:
            if event.get("upstream") == self.name and isinstance(event.get("until"), int | float):
                self._follow(float(event["until"]))

        async def joined() -> None:
            found = await cluster.get("backoff", self.name)
            if found is not None and isinstance(found.get("until"), int | float):
                self._follow(float(found["until"]))

        cluster.on("backoff", heard)
        cluster.joined(joined)

    def _follow(self, until: float) -> None:
        """Another replica was told to back off until `until` (wall time)."""
        self.backoff_until = max(self.backoff_until, self.clock.monotonic() + until - self.clock.time())

    def _share(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(call)
        self._shared.add(task)
        task.add_done_callback(self._shared.discard)

    # --- public calls ----------------------------------------------------------------------

    async def fetch_manifest(self, name: str, reference: str) -> FetchedManifest:
        async with await self.request("GET", name, f"manifests/{reference}",
                                      {"Accept": MANIFEST_ACCEPT}) as resp:
            self._check(resp)
            body = await read_manifest(resp.content.iter_chunked(65536), resp.content_length, self.max_manifest)
            if body is None:
                raise UpstreamError(self.name, f"manifest larger than {self.max_manifest} bytes")
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip() or None
            return FetchedManifest(body, media_type, resp.headers.get("Docker-Content-Digest"))

    async def head_manifest(self, name: str, reference: str) -> str | None:
        """The digest the upstream has for `reference` (None if it does not say)."""
        async with await self.request("HEAD", name, f"manifests/{reference}",
                                      {"Accept": MANIFEST_ACCEPT}) as resp:
            self._check(resp)
            return resp.headers.get("Docker-Content-Digest")

    async def head_blob(self, name: str, digest: str) -> int | None:
        async with await self.request("HEAD", name, f"blobs/{digest}") as resp:
            self._check(resp)
            return resp.content_length

    async def open_blob(self, name: str, digest: str, offset: int = 0) -> aiohttp.ClientResponse:
        """A streaming response for the blob from `offset` (status checked); the caller releases it."""
        headers = {"Range": f"bytes={offset}-"} if offset else None
        resp = await self.request("GET", name, f"blobs/{digest}", headers)
        try:
            self._check(resp)
            if offset and resp.status != 206:
                raise UpstreamError(self.name, f"asked to resume at {offset}, got status {resp.status}")
        except BaseException:
            resp.release()
            raise
        return resp

    async def serves(self, name: str) -> bool:
        """Whether the upstream has repository `name` (one tags/list request). A repository it does not
        have answers 404, or 401 on Docker Hub; a failure raises UpstreamError."""
        try:
            async with await self.request("GET", name, "tags/list?n=1") as resp:
                self._check(resp)
                return True
        except (UpstreamNotFound, UpstreamDenied):
            return False

    async def tags(self, name: str) -> list[str]:
        """Every tag of `name`, following the upstream's Link pagination (bounded)."""
        tags: list[str] = []
        suffix = "tags/list"
        for _ in range(MAX_TAG_PAGES):
            async with await self.request("GET", name, suffix) as resp:
                self._check(resp)
                try:
                    body = jsondoc.loads(await resp.read())
                    tags.extend(t for t in body.get("tags") or [] if isinstance(t, str))
                except (ValueError, AttributeError):
                    raise UpstreamError(self.name, "tags/list answered with invalid JSON") from None
                link = resp.headers.get("Link", "")
            m = re.match(r'\s*<([^>]+)>\s*;\s*rel="?next"?', link)
            if not m:
                break
            nxt = URL(m.group(1))
            suffix = f"tags/list?{nxt.query_string}"
        return tags

    # --- the request machinery --------------------------------------------------------------

    async def request(self, method: str, name: str, suffix: str,
                      headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        """Send with auth, retries on connect errors and 5xx, and redirects followed safely."""
        url = URL(f"{self.base}/v2/{name}/{suffix}", encoded="?" in suffix)
        scope = f"repository:{name}:pull"
        wait = self.backoff_remaining()
        if wait > 0:  # rate limited: asking again now would only count against the limit
            raise UpstreamError(self.name, f"rate limited (429), backing off for {wait:.0f}s", status=429,
                                retry_after=str(math.ceil(wait)))
        delay = 0.2
        for attempt in range(1, self.config.retries + 1):
            last = attempt == self.config.retries
            try:
                resp = await self._authorized(method, url, scope, headers or {})
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
                reason = "timeout" if isinstance(e, TimeoutError) else "connect"
                self.metrics.upstream_errors.labels(self.name, reason).inc()
                if last:
                    raise UpstreamError(self.name, f"{method} {url.path}: {type(e).__name__}: {e}") from None
                log.warning("upstream %s: %s %s failed (%s), retrying", self.name, method, url.path, e)
            else:
                if resp.status not in RETRY_STATUSES or last:
                    return resp
                resp.release()
                log.warning("upstream %s: %s %s answered %s, retrying",
                            self.name, method, url.path, resp.status)
            self.metrics.upstream_retries.labels(self.name).inc()
            await asyncio.sleep(delay * (1 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    async def _authorized(self, method: str, url: URL, scope: str,
                          headers: dict[str, str]) -> aiohttp.ClientResponse:
        auth = self._auth_header(scope)
        resp = await self._send(method, url, headers, auth)
        if resp.status != 401:
            return resp
        challenge = resp.headers.get("WWW-Authenticate", "")
        resp.release()
        scheme, params = parse_challenge(challenge)
        if scheme == "bearer" and params.get("realm"):
            auth = await self._token(params, scope)
        elif scheme == "basic" and self._basic is not None:
            self._uses_basic = True
            auth = self._basic
        else:
            raise UpstreamDenied(f"upstream {self.name} requires authentication ({challenge or 'no challenge'})")
        return await self._send(method, url, headers, auth)

    def _auth_header(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token and token.expires > self.clock.monotonic():
            return f"Bearer {token.value}"
        return self._basic if self._uses_basic else None

    async def _send(self, method: str, url: URL, headers: dict[str, str],
                    auth: str | None) -> aiohttp.ClientResponse:
        origin = url.origin()
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if auth and url.origin() == origin:  # never hand a registry token to a CDN
                h["Authorization"] = auth
            start = time.perf_counter()
            resp = await self.session.request(method, url, headers=h, allow_redirects=False,
                                              timeout=self.timeout)
            kind = _kind(url.path)
            self.metrics.upstream_duration.labels(self.name, kind).observe(time.perf_counter() - start)
            self.metrics.upstream_requests.labels(self.name, kind, status_class(resp.status)).inc()
            self._note_ratelimit(resp)
            if resp.status == 429:
                self._back_off(resp.headers.get("Retry-After"))
            elif self._backoff and resp.status < 400:
                self._backoff = 0.0
            if resp.status not in (301, 302, 303, 307, 308) or "Location" not in resp.headers:
                return resp
            url = resp.url.join(URL(resp.headers["Location"], encoded=True))
            resp.release()
            if resp.status == 303:
                method = "GET"
        raise UpstreamError(self.name, f"more than {MAX_REDIRECTS} redirects for {url.path}")

    async def _token(self, params: dict[str, str], scope: str) -> str:
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:  # one token request per scope, however many clients are waiting
            cached = self._tokens.get(scope)
            if cached and cached.expires > self.clock.monotonic():
                return f"Bearer {cached.value}"
            query = {"scope": params.get("scope") or scope}
            if params.get("service"):
                query["service"] = params["service"]
            headers = {"Authorization": self._basic} if self._basic else {}
            self.metrics.token_fetches.labels(self.name).inc()
            try:
                async with self.session.get(URL(params["realm"]).update_query(query), headers=headers,
                                            timeout=self.timeout) as resp:
                    self.metrics.upstream_requests.labels(self.name, "token", status_class(resp.status)).inc()
                    if resp.status in (401, 403):
                        raise UpstreamDenied(f"upstream {self.name}: token server refused our credentials")
                    if resp.status != 200:
                        raise UpstreamError(self.name, f"token server answered {resp.status}",
                                            status=resp.status)
                    body: dict[str, Any] = jsondoc.loads(await resp.read())
            except (aiohttp.ClientError, TimeoutError) as e:
                raise UpstreamError(self.name, f"token server: {type(e).__name__}: {e}") from None
            except ValueError:
                raise UpstreamError(self.name, "token server answered with invalid JSON") from None
            value = body.get("token") or body.get("access_token")
            if not isinstance(value, str):
                raise UpstreamError(self.name, "token server answered without a token")
            lifetime = body.get("expires_in")
            lifetime = float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else 60.0
            # Renew a little early so a token never expires between our check and the upstream's.
            self._tokens[scope] = _Token(value, self.clock.monotonic() + max(lifetime - 10, lifetime / 2))
            return f"Bearer {value}"

    def _note_ratelimit(self, resp: aiohttp.ClientResponse) -> None:
        for header, gauge in (("ratelimit-limit", self.metrics.ratelimit_limit),
                              ("ratelimit-remaining", self.metrics.ratelimit_remaining)):
            value = resp.headers.get(header)
            if value:
                try:  # Docker Hub: "100;w=21600"
                    gauge.labels(self.name).set(float(value.split(";")[0]))
                except ValueError:
                    pass

    def _back_off(self, retry_after: str | None) -> None:
        """No requests until the upstream's Retry-After, else for a minute, doubling while 429s keep
        coming (Docker Hub sends none: its limit is a sliding 6-hour window)."""
        seconds = _retry_after_seconds(retry_after)
        if seconds is None:
            seconds = min(BACKOFF_MAX, self._backoff * 2 if self._backoff else BACKOFF_FIRST)
        self._backoff = seconds
        self.backoff_until = self.clock.monotonic() + seconds
        if self.cluster is not None:  # every replica stops asking, not just this one
            until = self.clock.time() + seconds
            self.cluster.publish("backoff", {"upstream": self.name, "until": until})
            self._share(self.cluster.put({"until": until}, seconds, "backoff", self.name))
        log.warning("upstream %s: rate limited (429), no requests for %.0fs", self.name, seconds)

    def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status in (200, 206):
            return
        reason = {401: "denied", 403: "denied", 429: "429"}.get(resp.status, "5xx" if resp.status >= 500 else None)
        if reason:
            self.metrics.upstream_errors.labels(self.name, reason).inc()
        if resp.status == 404:
            raise UpstreamNotFound(f"upstream {self.name}: not found")
        if resp.status in (401, 403):
            raise UpstreamDenied(f"upstream {self.name} denied access ({resp.status})")
        if resp.status == 429:
            raise UpstreamError(self.name, "rate limited (429)", status=429,
                                retry_after=resp.headers.get("Retry-After"))
        raise UpstreamError(self.name, f"answered {resp.status}", status=resp.status)
