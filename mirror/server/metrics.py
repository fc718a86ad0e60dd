"""Every Prometheus metric, defined once.

One registry per application (tests run several in one process). Labels are bounded: routes,
methods, status classes, configured upstream names, fixed kinds and results; never a
repository name or digest. Every known label combination is created up front, so each series
exists (at 0) from the first scrape and no dashboard panel waits for its first event.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from mirror import __version__

ROUTES = ("base", "catalog", "tags", "manifests", "blobs", "uploads", "referrers", "metrics", "ui", "peers", "other")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
CACHE_RESULTS = ("hit", "miss", "revalidated", "stale", "private")
UPSTREAM_KINDS = ("manifest", "blob", "tags", "token", "other")
UPSTREAM_ERRORS = ("connect", "timeout", "5xx", "429", "denied", "digest")
STORAGE_OPERATIONS = ("stat", "reader", "writer", "commit", "get_bytes", "put_bytes", "put_file", "list", "delete",
                      "move", "scan")
disable_created_metrics()  # a `_created` twin for every counter series doubles the scrape for nothing

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self, upstreams: Iterable[str] = (), backend: str = "filesystem") -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        build = Gauge("mirror_build_info", "Version of mirror and Python, always 1.", ["version", "python"],
                      registry=r)
        build.labels(__version__, platform.python_version()).set(1)

        self.http_requests = Counter("mirror_http_requests", "HTTP requests answered.",
                                     ["route", "method", "status"], registry=r)
        self.http_duration = Histogram("mirror_http_request_duration_seconds",
                                       "Time to answer an HTTP request (headers and body).",
                                       ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_in_flight = Gauge("mirror_http_requests_in_flight", "HTTP requests being answered.",
                                    registry=r)

        self.cache_requests = Counter("mirror_cache_requests",
                                      "Manifest and blob requests by what the cache did: hit, miss (fetched "
                                      "upstream), revalidated (upstream confirmed), stale (upstream failed, "
                                      "cached copy served), private (pushed here).",
                                      ["kind", "result"], registry=r)
        self.served_bytes = Counter("mirror_served_bytes",
                                    "Manifest and blob bytes sent to clients, by where they came from.",
                                    ["kind", "source"], registry=r)

        self.upstream_requests = Counter("mirror_upstream_requests", "Requests sent to upstream registries.",
                                         ["upstream", "kind", "status"], registry=r)
        self.upstream_duration = Histogram("mirror_upstream_request_duration_seconds",
                                           "Time until an upstream answered (headers).",
                                           ["upstream", "kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("mirror_upstream_errors", "Upstream failures by reason.",
                                       ["upstream", "reason"], registry=r)
        self.upstream_retries = Counter("mirror_upstream_retries", "Upstream requests sent again.",
                                        ["upstream"], registry=r)
        self.upstream_bytes = Counter("mirror_upstream_received_bytes", "Blob bytes received from upstreams.",
                                      ["upstream"], registry=r)
        self.token_fetches = Counter("mirror_upstream_token_fetches", "Bearer tokens fetched from token servers.",
                                     ["upstream"], registry=r)
        self.ratelimit_limit = Gauge("mirror_upstream_ratelimit_limit",
                                     "The upstream's ratelimit-limit header (Docker Hub: pulls per window).",
                                     ["upstream"], registry=r)
        self.ratelimit_remaining = Gauge("mirror_upstream_ratelimit_remaining",
                                         "The upstream's ratelimit-remaining header.", ["upstream"], registry=r)
        self.upstream_backoff = Gauge("mirror_upstream_backoff_seconds",
                                      "Seconds until requests go to the upstream again after a 429.", ["upstream"],
                                      registry=r)

        self.flight_joiners = Counter("mirror_blob_flight_joiners",
                                      "Blob requests that joined an upstream fetch already in progress.",
                                      registry=r)
        self.flights_in_progress = Gauge("mirror_blob_flights_in_progress", "Upstream blob fetches in progress.",
                                         registry=r)

        self.storage_bytes = Gauge("mirror_storage_bytes", "Bytes of blobs (and manifests) in storage.",
                                   ["backend"], registry=r)
        self.storage_blobs = Gauge("mirror_storage_blobs", "Blobs (and manifests) in storage.",
                                   ["backend"], registry=r)
        self.evictions = Counter("mirror_cache_evictions", "Cached objects evicted to stay within the size cap.",
                                 ["kind"], registry=r)
        self.redis_up = Gauge("mirror_redis_up", "1 while Redis (redis:) answers and state is shared with the other "
                              "replicas; 0 while this replica works on its own.", registry=r)
        self.peer_follows = Counter("mirror_blob_peer_follows", "Cold blobs streamed from the replica fetching "
                                    "them (redis:), instead of from the upstream.", registry=r)
        self.peer_takeovers = Counter("mirror_blob_peer_takeovers", "Fetches taken over from a replica that died "
                                      "mid-fetch.", registry=r)
        self.redis_errors = Counter("mirror_redis_errors", "Calls to Redis that failed or timed out.", registry=r)
        self.loop_stall = Histogram("mirror_event_loop_stall_seconds",
                                    "How late a task that sleeps 10 ms wakes: the event loop held up by work on it "
                                    "(every request waits as long).", buckets=STALL_BUCKETS, registry=r)
        self.loop_stall_max = Gauge("mirror_event_loop_stall_max_seconds",
                                    "The longest the event loop was held up since start.", registry=r)
        self.cache_protected_bytes = Gauge("mirror_cache_protected_bytes",
                                           "Bytes of proxied content kept over cache.max_size because pulls of it "
                                           "are in progress (evicted as soon as they end).", registry=r)
        self.storage_duration = Histogram("mirror_storage_operation_duration_seconds",
                                          "Calls to remote storage (OSS), until answered (a read: its first bytes).",
                                          ["backend", "operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.storage_errors = Counter("mirror_storage_errors", "Remote storage calls that failed (after retries).",
                                      ["backend", "operation"], registry=r)
        self.hot_tier_bytes = Gauge("mirror_hot_tier_bytes", "Bytes of blobs on local disk in front of remote storage.",
                                    registry=r)
        self.storage_full = Gauge("mirror_storage_full",
                                  "1 while local storage refuses writes for lack of space (until one succeeds).",
                                  registry=r)
        self.storage_full_errors = Counter("mirror_storage_full_errors",
                                           "Writes refused for lack of space (pushes answered 507, fetches not kept).",
                                           registry=r)
        self.scrub_bytes = Counter("mirror_scrub_bytes", "Bytes of blobs and manifests the background scrub hashed.",
                                   registry=r)
        self.scrub_damaged = Counter("mirror_scrub_damaged",
                                     "Stored objects the scrub found damaged: cached (removed, fetched again) or "
                                     "private (quarantined).", ["kind"], registry=r)
        self.scrub_last_pass = Gauge("mirror_scrub_last_pass_timestamp_seconds",
                                     "When the last complete scrub pass ended (0: none yet).", registry=r)
        self.notifications_queued = Gauge("mirror_notifications_queued",
                                          "Events waiting (on disk) for a notification endpoint.", ["endpoint"],
                                          registry=r)
        self.notifications_sent = Counter("mirror_notifications_sent", "Events an endpoint accepted.", ["endpoint"],
                                          registry=r)
        self.notifications_failed = Counter("mirror_notifications_failed",
                                            "Deliveries that failed (retried later).", ["endpoint"], registry=r)
        self.notifications_dropped = Counter("mirror_notifications_dropped",
                                             "Oldest events dropped past an endpoint's queue_size.", ["endpoint"],
                                             registry=r)
        self.uploads_in_progress = Gauge("mirror_uploads_in_progress", "Blob uploads started and not finished.",
                                         registry=r)

        for route in ROUTES:
            for method in ("GET", "HEAD"):
                self.http_duration.labels(route, method)
                for status in STATUS_CLASSES:
                    self.http_requests.labels(route, method, status)
        for kind in ("manifest", "blob"):
            for result in CACHE_RESULTS:
                self.cache_requests.labels(kind, result)
            for source in ("cache", "upstream"):
                self.served_bytes.labels(kind, source)
            self.evictions.labels(kind)
        for kind in ("cached", "private"):
            self.scrub_damaged.labels(kind)
        for up in upstreams:
            for kind in UPSTREAM_KINDS:
                self.upstream_duration.labels(up, kind)
                for status in STATUS_CLASSES:
                    self.upstream_requests.labels(up, kind, status)
            for reason in UPSTREAM_ERRORS:
                self.upstream_errors.labels(up, reason)
            self.upstream_retries.labels(up)
            self.upstream_bytes.labels(up)
            self.token_fetches.labels(up)
            self.upstream_backoff.labels(up)
            # Unknown until the upstream sends the headers (only Docker Hub does): NaN, not 0 headroom.
            self.ratelimit_limit.labels(up).set(float("nan"))
            self.ratelimit_remaining.labels(up).set(float("nan"))
        self.storage_bytes.labels(backend)
        self.storage_blobs.labels(backend)
        if backend != "filesystem":
            for operation in STORAGE_OPERATIONS:
                self.storage_duration.labels(backend, operation)
                self.storage_errors.labels(backend, operation)
        self.backend = backend
        self.storage_changes = 0  # blobs added or removed here (storage_counted)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._cache_children: dict[tuple[str, str], tuple[Counter, Counter]] = {}

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Per-request counters through a dict of label children: `labels()` costs more than the
        rest of a cached manifest response."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.http_requests.labels(route, method, status_class(status)),
                self.http_duration.labels(route, method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def cache_done(self, kind: str, result: str, served: int | None) -> None:
        key = (kind, result)
        children = self._cache_children.get(key)
        if children is None:
            source = "upstream" if result == "miss" else "cache"
            children = self._cache_children[key] = (
                self.cache_requests.labels(kind, result), self.served_bytes.labels(kind, source))
        children[0].inc()
        if served:
            children[1].inc(served)

    def blob_added(self, size: int) -> None:
        """A new blob is in storage: the gauges move now, the ledger's totals keep them honest."""
        self.storage_changes += 1
        self.storage_blobs.labels(self.backend).inc()
        self.storage_bytes.labels(self.backend).inc(size)

    def blob_removed(self, size: int) -> None:
        self.storage_changes += 1
        self.storage_blobs.labels(self.backend).dec()
        self.storage_bytes.labels(self.backend).dec(size)

    def storage_counted(self, blobs: int, size: int, since: int) -> None:
        """The ledger's totals, read while `storage_changes` was `since`: set unless a blob came or went
        meanwhile (its move is in the gauges already, and perhaps not in what was read)."""
        if self.storage_changes == since:
            self.storage_blobs.labels(self.backend).set(blobs)
            self.storage_bytes.labels(self.backend).set(size)

    def storage_call(self, operation: str, seconds: float, failed: bool) -> None:
        if seconds:
            self.storage_duration.labels(self.backend, operation).observe(seconds)
        if failed:
            self.storage_errors.labels(self.backend, operation).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def status_class(status: int) -> str:
    return f"{status // 100}xx"
