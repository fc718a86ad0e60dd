"""Three `mirror serve` replicas on one storage (a shared filesystem root, and the project's OSS server)
sharing state on a real redis-server: cold pulls spread across them fetch each blob and manifest
from the upstream once; followers get their first bytes within a second; the replica that fetches
SIGKILLed mid-fetch leaves its followers to finish, correctly; a tag's TTL passing under load from
all of them costs one HEAD; Redis stopped and started again under load fails no pull."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import require
from tests.support.clients import skopeo_copy
from tests.support.images import Layout, sha256_digest
from tests.support.ossserver import OssServer
from tests.support.procs import Distribution, Mirror, free_port, http, mirror_config, wait_for
from tests.support.redis import REDIS_SERVER, RedisServer
from tests.support.registry import MANIFEST_ACCEPT, check_oci_copy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    require(REDIS_SERVER)
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def start_replicas(mirror_factory: Callable[..., Mirror], upstream: Distribution, redis: RedisServer, tmp_path: Path,
                   oss: OssServer | None = None, count: int = 3, **proxy: Any) -> list[Mirror]:
    replicas = []
    for i in range(count):
        port = free_port()
        config = mirror_config(upstream.url, **proxy)
        config["http"] = {"secret": "the replicas' shared secret", "advertise": f"http://127.0.0.1:{port}"}
        config["redis"] = {"addr": redis.addr, "dialtimeout": "300ms", "readtimeout": "300ms",
                           "writetimeout": "300ms"}
        local = tmp_path / f"replica-{i}-local"
        if oss is not None:
            config["storage"] = {"oss": {"accesskeyid": oss.key_id, "accesskeysecret": oss.key_secret,
                                         "region": "oss-test", "bucket": oss.bucket, "endpoint": oss.endpoint,
                                         "secure": False, "rootdirectory": "cluster"}}
            config["cache"] = {"directory": str(local)}
        else:
            config["storage"] = {"filesystem": {"rootdirectory": str(tmp_path / "shared-root")}}
            config["cache"] = {"index": str(local / "index")}
        replicas.append(mirror_factory(config, port=port, name=f"replica-{i}"))
    for r in replicas:
        wait_for(redis_up(r, 1.0), 15, f"{r.proc.name} to join")
    return replicas


def metric(mirror: Mirror, name: str) -> float | None:
    for line in http("GET", f"{mirror.url}/metrics").body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return None


def redis_up(mirror: Mirror, value: float) -> Callable[[], bool]:
    return lambda: metric(mirror, "mirror_redis_up") == value


def manifest_gets(upstream: Distribution, since: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in upstream.requests("GET", "/manifests/", since=since):
        counts[e.route] = counts.get(e.route, 0) + 1
    return counts


@pytest.mark.parametrize("backend", ["filesystem", "oss"])
def test_cold_pulls_across_replicas_fetch_each_object_once(
        mirror_factory: Callable[..., Mirror], upstream: Distribution, redis_server: RedisServer,
        layouts: dict[str, Layout], tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    oss = request.getfixturevalue("oss") if backend == "oss" else None
    replicas = start_replicas(mirror_factory, upstream, redis_server, tmp_path, oss)
    mark = upstream.mark()
    errors: list[str] = []

    def pull(i: int) -> None:
        replica = replicas[i % len(replicas)]
        out = tmp_path / f"pull-{i}"
        try:
            skopeo_copy(f"docker://{replica.host}/library/multi:latest", f"oci:{out}:latest", "--all")
            check_oci_copy(out, layouts["multi"])
        except Exception as e:
            errors.append(f"pull {i} via {replica.proc.name}: {e}")

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(180)
    assert not errors, errors
    blob_gets: dict[str, int] = {}
    for e in upstream.blob_gets(since=mark):
        blob_gets[e.route] = blob_gets.get(e.route, 0) + 1
    assert blob_gets and set(blob_gets.values()) == {1}, blob_gets
    manifests = manifest_gets(upstream, mark)
    by_digest = {k: n for k, n in manifests.items() if "/manifests/sha256:" in k}
    assert by_digest and set(by_digest.values()) == {1}, manifests
    assert manifests.get("/v2/library/multi/manifests/latest", 0) <= 1, manifests


def ttfb(url: str, first_byte: dict[str, float], name: str) -> tuple[float, bytes]:
    """Seconds to the first body byte of a GET (also put in `first_byte` as soon as it is known), and the
    whole body."""
    start = time.perf_counter()
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=120) as r:
        first = r.read(1)
        first_byte[name] = elapsed = time.perf_counter() - start
        return elapsed, first + r.read()


def test_followers_get_first_bytes_at_once_and_finish_when_the_fetching_replica_is_killed(
        mirror_factory: Callable[..., Mirror], upstream: Distribution, redis_server: RedisServer,
        layouts: dict[str, Layout], tmp_path: Path) -> None:
    a, b, c = start_replicas(mirror_factory, upstream, redis_server, tmp_path)
    big = layouts["big"].image().layers[0]
    url = f"/v2/library/big/blobs/{big.digest}"
    results: dict[str, tuple[float, bytes]] = {}
    first_byte: dict[str, float] = {}

    def get(name: str, replica: Mirror) -> None:
        try:
            results[name] = ttfb(replica.url + url, first_byte, name)
        except Exception as e:
            results[name] = (-1.0, repr(e).encode())

    mark = upstream.mark()
    winner = threading.Thread(target=get, args=("a", a))
    winner.start()
    wait_for(lambda: upstream.blob_gets(big.digest, since=mark) != [], 30, "A's fetch upstream")
    followers = [threading.Thread(target=get, args=(n, r)) for n, r in (("b", b), ("c", c))]
    for th in followers:
        th.start()
    wait_for(lambda: sum(metric(r, "mirror_blob_peer_follows_total") or 0 for r in (b, c)) >= 2, 30,
             "B and C to follow A")
    a.proc.kill()  # SIGKILL: its lease is never released, it lapses
    for th in (winner, *followers):
        th.join(180)
    for name in ("b", "c"):
        seconds, body = results[name]
        assert sha256_digest(body) == big.digest, (name, len(body))
        assert 0 <= seconds < 1.0, f"{name}'s first byte after {seconds:.2f}s"
    assert len(upstream.blob_gets(big.digest, since=mark)) <= 2  # A's, and at most one takeover
    print(f"\ntime to first byte: the fetching replica {first_byte.get('a', -1) * 1000:.0f} ms, "
          f"followers {first_byte['b'] * 1000:.0f} ms and {first_byte['c'] * 1000:.0f} ms")


def test_a_tag_expiring_under_load_is_revalidated_once_for_all(
        mirror_factory: Callable[..., Mirror], upstream: Distribution, redis_server: RedisServer,
        tmp_path: Path) -> None:
    replicas = start_replicas(mirror_factory, upstream, redis_server, tmp_path, tag_ttl="2s")
    path = "/v2/library/small/manifests/latest"
    for r in replicas:
        assert http("GET", r.url + path, {"Accept": MANIFEST_ACCEPT}).status == 200
    mark = upstream.mark()
    start = time.monotonic()
    while time.monotonic() - start < 7.0:  # three and a half TTLs, every replica asking all the time
        for r in replicas:
            assert http("GET", r.url + path, {"Accept": MANIFEST_ACCEPT}).status == 200
    heads = len(upstream.requests("HEAD", "/library/small/manifests/latest", since=mark))
    assert 1 <= heads <= 4, heads  # one per expiry across the replicas (three or four in 7 s), not one each


def test_redis_stopped_and_started_under_load_fails_no_pull(
        mirror_factory: Callable[..., Mirror], upstream: Distribution, redis_server: RedisServer,
        layouts: dict[str, Layout], tmp_path: Path) -> None:
    replicas = start_replicas(mirror_factory, upstream, redis_server, tmp_path)
    stop = threading.Event()
    failures: list[str] = []
    pulls = [0]

    def load() -> None:
        i = 0
        while not stop.is_set():
            replica = replicas[i % len(replicas)]
            i += 1
            out = tmp_path / f"load-{i}"
            try:
                skopeo_copy(f"docker://{replica.host}/library/small:latest", f"oci:{out}:latest")
                pulls[0] += 1
            except Exception as e:
                failures.append(f"via {replica.proc.name}: {e}")

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1.0)
        redis_server.stop()
        for r in replicas:
            wait_for(redis_up(r, 0.0), 15, "replicas to notice")
        time.sleep(1.0)
        redis_server.start()
        for r in replicas:
            wait_for(redis_up(r, 1.0), 15, "replicas to rejoin")
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(120)
    assert not failures, failures
    assert pulls[0] >= 3
