"""Replicas sharing state through a real redis-server (redis:): one revalidation of a tag and one fetch
of a manifest across them, a 429 seen by one pausing all, a claim known to all at once, one eviction
pass at a time over the last uses every replica wrote, and a replica that keeps serving on its own
while Redis is gone, and rejoins."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror.cache.eviction import Evictor
from mirror.service import REGISTRY
from tests.scripted_upstream import ScriptedUpstream
from tests.support.clock import ManualClock
from tests.support.procs import free_port
from tests.support.redis import REDIS_SERVER, RedisServer
from tests.test_cache import image

pytestmark = pytest.mark.e2e  # a real redis-server process


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not os.path.exists(REDIS_SERVER):
        if os.environ.get("CI") == "true":
            pytest.fail("missing tools: redis-server (scripts/test.sh installs it)")
        pytest.skip("missing tools: redis-server")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
async def replicas(registry: Callable[..., Any], upstream: tuple[ScriptedUpstream, TestServer],
                   redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`make(n)` -> n mirrors on one storage root, sharing state on the test's redis-server."""
    _, server = upstream

    async def make(n: int = 2, cache: dict[str, Any] | None = None, **up: Any) -> list[TestClient]:
        settings = {"name": "hub", "url": str(server.make_url("")), "hosts": ["docker.io"], "dockerhub": True,
                    "tag_ttl": "5m", "retries": 1, **up}
        made = []
        for _ in range(n):
            port = free_port()  # where the others follow its fetches: known before it starts
            made.append(await registry(
                root=tmp_path / "data", port=port, upstreams=[settings],
                # no drain on close: a replica closed mid-fetch goes as one that died would
                http={"secret": "shared by the replicas", "advertise": f"http://127.0.0.1:{port}",
                      "draintimeout": "0s"},
                redis={"addr": redis_server.addr, "dialtimeout": "200ms", "readtimeout": "200ms",
                       "writetimeout": "200ms"}, **({"cache": cache} if cache else {})))
        for client in made:
            await until(_redis_is(client, 1.0), "replicas joined")
        return made

    yield make


async def metric(client: TestClient, name: str) -> float | None:
    text = (await (await client.get("/metrics")).read()).decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return None


async def until(check: Callable[[], Awaitable[bool]], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_one_revalidation_and_one_fetch_across_replicas(
        replicas: Callable[..., Any], upstream: tuple[ScriptedUpstream, TestServer], clock: ManualClock) -> None:
    script, _ = upstream
    m, _ = image(script)
    a, b, c = await replicas(3)
    # a cold manifest by digest, asked on every replica at once: one GET upstream
    answers = await asyncio.gather(*(r.get(f"/v2/app/manifests/{m}") for r in (a, b, c) for _ in range(3)))
    assert {x.status for x in answers} == {200}
    assert script.calls[f"GET /v2/library/app/manifests/{m}"] == 1
    # the tag, cold on all: one exchange upstream; then every replica serves it from cache
    answers = await asyncio.gather(*(r.get("/v2/app/manifests/latest") for r in (a, b, c) for _ in range(3)))
    assert {x.status for x in answers} == {200}
    exchanges = sum(n for k, n in script.calls.items() if k.endswith("/manifests/latest"))
    assert exchanges == 1, dict(script.calls)
    # the TTL passes on every replica at once: one HEAD upstream revalidates it for all of them
    clock.advance(301)
    answers = await asyncio.gather(*(r.get("/v2/app/manifests/latest") for r in (a, b, c) for _ in range(3)))
    assert {x.status for x in answers} == {200}
    assert script.calls["HEAD /v2/library/app/manifests/latest"] == 1


async def test_a_429_on_one_replica_pauses_every_replica(
        replicas: Callable[..., Any], upstream: tuple[ScriptedUpstream, TestServer], clock: ManualClock) -> None:
    script, _ = upstream
    image(script)
    image(script, repo="library/other")
    a, b = await replicas(2)
    assert (await a.get("/v2/app/manifests/latest")).status == 200
    script.status, script.retry_after = 429, "60"
    assert (await a.get("/v2/other/manifests/latest")).status == 429
    seen = sum(script.calls.values())
    await until(_backing_off(b), "B to hear of A's back-off")
    r = await b.get("/v2/other/manifests/latest")
    assert r.status == 429 and 0 < int(r.headers["Retry-After"]) <= 60
    assert sum(script.calls.values()) == seen, "B asked the upstream during A's back-off"


def _backing_off(client: TestClient) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        value = await metric(client, "mirror_upstream_backoff_seconds")
        return value is not None and value > 0

    return check


async def test_a_claim_is_known_to_every_replica_at_once(
        replicas: Callable[..., Any], upstream: tuple[ScriptedUpstream, TestServer]) -> None:
    script, _ = upstream
    a, b = await replicas(2)
    assert (await b.get("/v2/someone/app/manifests/v1")).status == 404  # B has seen the name, unclaimed
    seen = script.calls["GET /v2/someone/app/manifests/v1"]
    claim = asyncio.create_task(a.post("/v2/someone/app/blobs/uploads/"))  # acknowledged after a settle
    await asyncio.sleep(0.2)  # well within the half second B would otherwise take the name as unclaimed
    # B knows already: the name is private, so its answer comes from storage, never from the upstream
    r = await b.get("/v2/someone/app/manifests/v1")
    assert r.status == 404 and (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert script.calls["GET /v2/someone/app/manifests/v1"] == seen
    assert (await claim).status == 202


async def test_without_redis_each_replica_serves_on_its_own_and_rejoins(
        replicas: Callable[..., Any], upstream: tuple[ScriptedUpstream, TestServer],
        redis_server: RedisServer) -> None:
    script, _ = upstream
    m, blob = image(script)
    a, b = await replicas(2)
    redis_server.stop()
    for r in (a, b):
        assert (await r.get("/v2/app/manifests/latest")).status == 200
        assert (await r.get(f"/v2/app/blobs/{blob}")).status == 200
        await until(_redis_is(r, 0.0), "redis_up 0")
    redis_server.start()
    for r in (a, b):
        await until(_redis_is(r, 1.0), "redis_up 1 again")
    assert (await a.get(f"/v2/app/manifests/{m}")).status == 200


def _redis_is(client: TestClient, value: float) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await metric(client, "mirror_redis_up") == value

    return check


async def test_a_cold_blob_is_fetched_once_and_streamed_to_the_other_replicas(
        replicas: Callable[..., Any], upstream: tuple[ScriptedUpstream, TestServer]) -> None:
    script, _ = upstream
    data = os.urandom(4 << 20)
    blob = script.add_blob(data)
    script.add_manifest("library/big", "latest", {"schemaVersion": 2, "layers": [{"digest": blob, "size": len(data)}]})
    script.slow = 0.002  # a fetch that lasts a while: everyone arrives while it runs
    a, b, c = await replicas(3)
    answers = await asyncio.gather(*(r.get(f"/v2/big/blobs/{blob}") for r in (a, b, c) for _ in range(3)))
    bodies = [await x.read() for x in answers]
    assert {x.status for x in answers} == {200} and all(body == data for body in bodies)
    assert script.calls[f"GET /v2/library/big/blobs/{blob}"] == 1
    follows = [await metric(r, "mirror_blob_peer_follows_total") for r in (a, b, c)]
    assert sum(f or 0 for f in follows) == 2, follows  # the two replicas that did not get the lease


async def test_a_fetch_is_taken_over_when_its_replica_goes(
        replicas: Callable[..., Any], upstream: tuple[ScriptedUpstream, TestServer]) -> None:
    script, _ = upstream
    data = os.urandom(4 << 20)
    blob = script.add_blob(data)
    script.slow = 0.01
    a, b = await replicas(2)
    first = asyncio.create_task(a.get(f"/v2/big/blobs/{blob}"))
    await until(_fetching(script, blob), "A's fetch to start")
    second = asyncio.create_task(b.get(f"/v2/big/blobs/{blob}"))
    await until(_following(b), "B to follow A")
    # A's fetch dies mid-way (its flights cancelled, as a replica that dies takes them): B takes over from
    # the upstream, from what it has
    await a.app[REGISTRY]._blob_cache.close()
    r = await second
    assert r.status == 200 and await r.read() == data
    assert script.calls[f"GET /v2/library/big/blobs/{blob}"] == 2  # A's, and B's ranged one
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert await metric(b, "mirror_blob_peer_takeovers_total") == 1


def _fetching(script: ScriptedUpstream, blob: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return script.calls[f"GET /v2/library/big/blobs/{blob}"] >= 1
    return check


def _following(client: TestClient) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await metric(client, "mirror_blob_peer_follows_total") or 0) >= 1
    return check


async def test_one_eviction_pass_at_a_time_over_the_last_uses_of_every_replica(
        replicas: Callable[..., Any], upstream: tuple[ScriptedUpstream, TestServer], clock: ManualClock) -> None:
    script, _ = upstream
    images = {}
    for name in ("kept", "gone"):
        config_bytes, layer_bytes = f'{{"image":"{name}"}}'.encode(), name.encode() * 1000
        config, layer = script.add_blob(config_bytes), script.add_blob(layer_bytes)
        body = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                           "size": len(config_bytes)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer,
                            "size": len(layer_bytes)}]}
        images[name] = (script.add_manifest(f"library/{name}", "latest", body), config, layer)
    a, b = await replicas(2, cache={"min_idle": "30s"})
    for name, (_, config, layer) in images.items():  # both pulled whole through A
        assert (await a.get(f"/v2/{name}/manifests/latest")).status == 200
        for blob in (config, layer):
            assert (await (await a.get(f"/v2/{name}/blobs/{blob}")).read())
    clock.advance(120)  # long idle; then a pull of `kept` starts on B: its manifest, no blob yet
    assert (await b.get("/v2/kept/manifests/latest")).status == 200
    evictor_a: Evictor = a.app[REGISTRY].evictor
    evictor_b: Evictor = b.app[REGISTRY].evictor
    assert evictor_a.cluster is not None and evictor_b.cluster is not None
    kept = images["kept"][0]

    async def told() -> bool:
        return kept in await evictor_a.cluster.recent_uses(clock.time() - 5)  # type: ignore[union-attr]

    await until(told, "B's last use of the manifest in Redis")
    # B is evicting: A's pass is skipped, nothing removed
    token = await evictor_b.cluster.lease(30, "evict")
    assert token is not None
    assert await evictor_a.run_shared(max_size=1) is None
    assert (await a.head(f"/v2/gone/blobs/{images['gone'][2]}")).status == 200
    await evictor_b.cluster.release(token, "evict")
    # then A's pass: B's pull in progress keeps `kept` (A's ledger has not heard of it: journal flushes
    # come every 30 s), while `gone`, unused anywhere, goes whole
    result = await evictor_a.run_shared(max_size=1)
    assert result is not None
    assert set(result.evicted) == set(images["gone"]), result.evicted
    for blob in images["kept"][1:]:
        assert (await b.get(f"/v2/kept/blobs/{blob}")).status == 200
    assert script.calls[f"GET /v2/library/kept/blobs/{images['kept'][2]}"] == 1  # served from the cache
