"""Counters match what happened (in-process, scripted upstream over HTTP)."""

from __future__ import annotations

import asyncio
import platform

from aiohttp.test_utils import TestClient, TestServer

from mirror import __version__
from tests.conftest import MirrorFactory
from tests.scripted_upstream import ScriptedUpstream
from tests.support.clock import ManualClock
from tests.test_cache import BLOB, image


async def scrape(client: TestClient) -> dict[str, float]:
    r = await client.get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in (await r.text()).splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert not any(k.endswith("_created") or "_created{" in k for k in samples)
    return samples


def labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(kv.items())) + "}"  # as the exposition sorts them


async def test_cold_then_warm_pull_counts(upstream: tuple[ScriptedUpstream, TestServer], mirror: MirrorFactory) -> None:
    script, _ = upstream
    _, blob = image(script)
    config = next(d for d in script.blobs if d != blob)
    client = await mirror()
    for _ in range(2):
        assert (await client.get("/v2/app/manifests/latest")).status == 200
        for d in (config, blob):
            r = await client.get(f"/v2/app/blobs/{d}")
            assert r.status == 200 and await r.read() == script.blobs[d]
    s = await scrape(client)
    assert s["mirror_cache_requests_total" + labels(kind="blob", result="miss")] == 2
    assert s["mirror_cache_requests_total" + labels(kind="blob", result="hit")] == 2
    assert s["mirror_cache_requests_total" + labels(kind="manifest", result="miss")] == 1
    assert s["mirror_cache_requests_total" + labels(kind="manifest", result="hit")] == 1
    assert s["mirror_upstream_requests_total" + labels(kind="blob", status="2xx", upstream="hub")] == 2
    blob_bytes = len(BLOB) + len(script.blobs[config])
    assert s["mirror_served_bytes_total" + labels(kind="blob", source="upstream")] == blob_bytes
    assert s["mirror_served_bytes_total" + labels(kind="blob", source="cache")] == blob_bytes
    assert s["mirror_upstream_received_bytes_total" + labels(upstream="hub")] == blob_bytes
    assert s["mirror_http_requests_total" + labels(route="blobs", method="GET", status="2xx")] == 4
    assert s["mirror_http_requests_in_flight"] == 1  # this scrape
    assert s[f'mirror_build_info{{python="{platform.python_version()}",version="{__version__}"}}'] == 1


async def test_single_flight_joiners_and_stale(upstream: tuple[ScriptedUpstream, TestServer],
                                               mirror: MirrorFactory, clock: ManualClock) -> None:
    script, _ = upstream
    _, blob = image(script)
    script.slow = 0.002
    client = await mirror(tag_ttl="5m")
    bodies = await asyncio.gather(*(client.get(f"/v2/app/blobs/{blob}") for _ in range(4)))
    assert all(r.status == 200 for r in bodies)
    for r in bodies:
        await r.read()
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    clock.advance(301)
    script.status = 503
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    s = await scrape(client)
    assert s["mirror_blob_flight_joiners_total"] == 3
    assert s["mirror_blob_flights_in_progress"] == 0
    assert s["mirror_cache_requests_total" + labels(kind="manifest", result="stale")] == 1
    assert s["mirror_upstream_errors_total" + labels(reason="5xx", upstream="hub")] >= 1
    assert s["mirror_upstream_retries_total" + labels(upstream="hub")] >= 1


async def test_ratelimit_headers_become_gauges(upstream: tuple[ScriptedUpstream, TestServer],
                                               mirror: MirrorFactory) -> None:
    script, _ = upstream
    image(script)
    client = await mirror()
    s = await scrape(client)
    assert s["mirror_upstream_ratelimit_remaining" + labels(upstream="hub")] != \
        s["mirror_upstream_ratelimit_remaining" + labels(upstream="hub")]  # NaN: not known yet
    script.headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"}
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    s = await scrape(client)
    assert s["mirror_upstream_ratelimit_limit" + labels(upstream="hub")] == 100
    assert s["mirror_upstream_ratelimit_remaining" + labels(upstream="hub")] == 76
