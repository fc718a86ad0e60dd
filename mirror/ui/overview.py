"""The cache overview: hit ratio, bytes from cache vs upstream, storage against the cap, upstream
health and rate-limit headroom, read from the app's `Metrics` through prometheus-client's own
`collect()`, so every number is the one `/metrics` shows at the same moment."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from mirror.config import Config
from mirror.server.metrics import CACHE_RESULTS, Metrics

HIT_RESULTS = ("hit", "revalidated", "stale")  # answered from the cache (stale: upstream failed)


def samples(metric: MetricWrapperBase, suffix: str = "") -> list[tuple[dict[str, str], float]]:
    """(labels, value) of a metric's series, as the exposition renders them (`_total` of counters)."""
    out = []
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == family.name + suffix:
                out.append((dict(sample.labels), float(sample.value)))
    return out


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def overview(metrics: Metrics, config: Config) -> dict[str, Any]:
    """Everything the overview page (and /ui/api/overview) shows: plain numbers, None = unknown."""
    requests: dict[str, dict[str, float]] = {kind: dict.fromkeys(CACHE_RESULTS, 0.0) for kind in ("manifest", "blob")}
    for labels, value in samples(metrics.cache_requests, "_total"):
        requests.setdefault(labels["kind"], {})[labels["result"]] = value
    cache = {}
    for kind, results in requests.items():
        hits = sum(results.get(r, 0.0) for r in HIT_RESULTS)
        proxied = hits + results.get("miss", 0.0)
        cache[kind] = {**results, "hit_ratio": hits / proxied if proxied else None}
    served: dict[str, dict[str, float]] = defaultdict(lambda: {"cache": 0.0, "upstream": 0.0})
    for labels, value in samples(metrics.served_bytes, "_total"):
        served[labels["kind"]][labels["source"]] = value
    from_cache = sum(v["cache"] for v in served.values())
    from_upstream = sum(v["upstream"] for v in served.values())

    storage_bytes = sum(v for _, v in samples(metrics.storage_bytes))
    storage_blobs = sum(v for _, v in samples(metrics.storage_blobs))
    max_size = config.cache.max_size
    upstreams: dict[str, dict[str, Any]] = {
        up.name: {"url": up.url, "requests": defaultdict(float), "errors": {}, "retries": 0.0, "backoff_seconds": 0.0,
                  "ratelimit_limit": None, "ratelimit_remaining": None, "received_bytes": 0.0}
        for up in config.upstreams}

    def each(metric: MetricWrapperBase, suffix: str = "") -> list[tuple[dict[str, Any], dict[str, str], float]]:
        return [(upstreams[labels["upstream"]], labels, value) for labels, value in samples(metric, suffix)
                if labels.get("upstream") in upstreams]

    for up, labels, value in each(metrics.upstream_requests, "_total"):
        up["requests"][labels["status"]] += value
    for up, labels, value in each(metrics.upstream_errors, "_total"):
        up["errors"][labels["reason"]] = value
    for up, _, value in each(metrics.upstream_retries, "_total"):
        up["retries"] = value
    for up, _, value in each(metrics.upstream_bytes, "_total"):
        up["received_bytes"] = value
    for up, _, value in each(metrics.upstream_backoff):
        up["backoff_seconds"] = value
    for up, _, value in each(metrics.ratelimit_limit):
        up["ratelimit_limit"] = _finite(value)
    for up, _, value in each(metrics.ratelimit_remaining):
        up["ratelimit_remaining"] = _finite(value)
    for up in upstreams.values():
        up["requests"] = dict(up["requests"])
        up["error_total"] = sum(up["errors"].values())
        limit, remaining = up["ratelimit_limit"], up["ratelimit_remaining"]
        up["ratelimit_share"] = remaining / limit if limit and remaining is not None else None
        up["healthy"] = up["backoff_seconds"] == 0
    evictions = {labels["kind"]: value for labels, value in samples(metrics.evictions, "_total")}
    return {
        "cache": cache,
        "served_bytes": {k: dict(v) for k, v in served.items()},
        "served_from_cache": from_cache,
        "served_from_upstream": from_upstream,
        "served_cache_share": from_cache / (from_cache + from_upstream) if from_cache + from_upstream else None,
        "storage": {"backend": metrics.backend, "bytes": storage_bytes, "blobs": storage_blobs, "max_size": max_size,
                    "used_share": storage_bytes / max_size if max_size else None,
                    "high_watermark": config.cache.high_watermark, "low_watermark": config.cache.low_watermark},
        "evictions": evictions,
        "uploads_in_progress": samples(metrics.uploads_in_progress)[0][1],
        "flights_in_progress": samples(metrics.flights_in_progress)[0][1],
        "upstreams": upstreams,
    }
