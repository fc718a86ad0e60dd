"""Replicas on one storage root: mirror's, sharing state on Redis, against distribution's proxies.

    python -m bench.replicas            # 1 GiB blob, 3 rounds
    python -m bench.replicas --quick    # 256 MiB blob, 1 round, 3 s wrk

Both kinds run three processes on one filesystem root in front of one upstream distribution: three
`mirror serve` with `redis:` (a redis-server on loopback, no persistence) and three distribution
proxies (`proxy.remoteurl`; distribution's `redis:` caches blob descriptors only, so it is left out).
Measured for each kind, the kinds interleaved:
- cold: 12 concurrent pulls of a ~200 MiB multi-layer image spread over the three (4 each), on an
  empty root: seconds, and the upstream's GETs per blob and per manifest from its access log;
- first bytes of one cold big blob: asked of replica A, then of B and C once A's first byte arrived
  (the winner's and the followers' time to first byte, and when all three have it);
- warm: manifests by digest (3 wrk processes of one thread, 16 connections each) and the big blob
  (6 curls at once), all against one replica, then spread over the three.
Every pulled byte is checked against its digest. Prints a table and writes
bench/results/replicas.json. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import measure
from bench.measure import MANIFEST_ACCEPT, BenchError
from bench.seed import push_big_blob_image

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20
MB = 1_000_000
KINDS = ("mirror", "distribution")
QUIET = {"level": "warn", "accesslog": {"disabled": True}}

sys.path.insert(0, str(ROOT))
from tests.support import images as support_images  # noqa: E402
from tests.support import procs  # noqa: E402
from tests.support.redis import RedisServer  # noqa: E402


@dataclass(frozen=True)
class Params:
    blob_mib: int
    rounds: int
    wrk_seconds: float
    pulls: int = 12
    curls: int = 6


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Replicas:
    """Three processes of one kind on one new, empty root."""

    def __init__(self, kind: str, work: Path, upstream: str, redis: RedisServer, count: int = 3) -> None:
        self.kind = kind
        root = work / "root"
        self.handles: list[procs.Mirror | procs.Distribution] = []
        for i in range(count):
            if kind == "mirror":
                port = procs.free_port()
                config = {"log": QUIET, "proxy": {"remoteurl": upstream},
                          "storage": {"filesystem": {"rootdirectory": str(root)}},
                          "cache": {"index": str(work / f"index-{i}")},
                          "http": {"secret": "bench", "advertise": f"http://127.0.0.1:{port}"},
                          "redis": {"addr": redis.addr}}
                self.handles.append(procs.start_mirror(work / f"replica-{i}", config, port=port, name=f"mirror-{i}"))
            else:
                self.handles.append(procs.start_distribution(
                    work / f"replica-{i}", {"log": QUIET, "proxy": {"remoteurl": upstream}}, root=root,
                    name=f"distribution-{i}"))

    @property
    def urls(self) -> list[str]:
        return [h.url for h in self.handles]

    def stop(self) -> None:
        for h in self.handles:
            h.stop()


def upstream_gets(upstream: procs.Distribution, since: int) -> dict[str, list[int]]:
    """GETs the upstream answered, per blob and per manifest (by digest; tags apart)."""
    blobs: dict[str, int] = {}
    manifests: dict[str, int] = {}
    for e in upstream.requests("GET", since=since):
        if "/blobs/sha256:" in e.route:
            blobs[e.route] = blobs.get(e.route, 0) + 1
        elif "/manifests/" in e.route:
            manifests[e.route] = manifests.get(e.route, 0) + 1
    return {"blobs": sorted(blobs.values()), "manifests": sorted(manifests.values())}


def cold(replicas: Replicas, image: measure.Image, upstream: procs.Distribution, pulls: int) -> dict[str, Any]:
    mark = upstream.mark()

    async def all_pulls() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(measure.pull(replicas.urls[i % len(replicas.urls)], image) for i in range(pulls)))
        return time.perf_counter() - t0

    seconds = asyncio.run(all_pulls())
    time.sleep(1.0)  # distribution writes an access line when a request ends: let the last ones land
    gets = upstream_gets(upstream, mark)
    return {"seconds": round(seconds, 2), "upstream_gets": gets,
            "per_blob": round(sum(gets["blobs"]) / max(1, len(image.blobs)), 2),
            "per_manifest": round(sum(gets["manifests"]) / max(1, len(image.manifests)), 2)}


async def first_bytes(urls: list[str], repo: str, digest: str, size: int) -> dict[str, Any]:
    """GET the cold blob from urls[0]; when its first byte is in, from the others. Seconds to each one's
    first byte (from its own request), and until all have the whole blob, verified."""
    ttfb: dict[int, float] = {}
    first = asyncio.Event()
    t0 = time.perf_counter()

    async def get(i: int, session: aiohttp.ClientSession) -> None:
        start = time.perf_counter()
        got = 0
        hasher = hashlib.sha256()
        async with session.get(f"{urls[i]}/v2/{repo}/blobs/{digest}") as resp:
            if resp.status != 200:
                raise BenchError(f"GET {urls[i]} {digest}: {resp.status}")
            async for chunk in resp.content.iter_chunked(1 << 20):
                if i not in ttfb:
                    ttfb[i] = time.perf_counter() - start
                    first.set()
                hasher.update(chunk)
                got += len(chunk)
        if got != size or "sha256:" + hasher.hexdigest() != digest:
            raise BenchError(f"{urls[i]}: {got} bytes of {size}, or not {digest}")

    async with aiohttp.ClientSession(timeout=measure._timeout(600), auto_decompress=False) as s:
        winner = asyncio.create_task(get(0, s))
        await asyncio.wait_for(first.wait(), 120)
        await asyncio.gather(winner, *(get(i, s) for i in range(1, len(urls))))
    return {"winner_ms": round(ttfb[0] * 1000, 1),
            "followers_ms": [round(ttfb[i] * 1000, 1) for i in range(1, len(urls))],
            "all_done_seconds": round(time.perf_counter() - t0, 2)}


def warm_manifests(urls: list[str], repo: str, digest: str, seconds: float) -> float:
    """Three wrk processes (one thread, 16 connections each) at once, one per url: summed req/s."""
    def one(url: str) -> measure.WrkResult:
        return measure.wrk(f"{url}/v2/{repo}/manifests/{digest}", seconds, 1, 16, {"Accept": MANIFEST_ACCEPT})

    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(one, urls))
    for r in results:
        if r.non_2xx or sum(r.socket_errors.values()):
            raise BenchError(f"wrk: {r.non_2xx} non-2xx, socket errors {r.socket_errors}")
    return round(sum(r.requests_per_s for r in results), 1)


def warm_blob(urls: list[str], repo: str, digest: str, size: int, curls: int) -> float:
    """`curls` curls at once spread over urls: MB/s in all."""
    per = [curls // len(urls) + (i < curls % len(urls)) for i in range(len(urls))]
    timeout = max(60.0, size / (20 * MB) * curls)
    with ThreadPoolExecutor(len(urls)) as pool:
        rates = list(pool.map(lambda a: measure.concurrent_curl(f"{a[0]}/v2/{repo}/blobs/{digest}", a[1], size,
                                                                timeout), zip(urls, per, strict=True)))
    return round(sum(rates) / MB, 1)


def params(argv: list[str] | None) -> tuple[Params, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--blob-mib", type=int)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args(argv)
    p = Params(blob_mib=a.blob_mib or (256 if a.quick else 1024), rounds=a.rounds or (1 if a.quick else 3),
               wrk_seconds=3.0 if a.quick else 8.0)
    return p, a


def main(argv: list[str] | None = None) -> int:
    p, args = params(argv)
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-replicas-"))
    # the upstream keeps its access log: the GETs per blob are counted from it
    upstream = procs.start_distribution(work / "upstream", {"log": {"level": "warn"}}, name="upstream")
    redis = RedisServer(work / "redis").start()
    results: dict[str, Any] = {"params": p.__dict__, "rounds": []}
    try:
        layout = support_images.build_big(work / "images" / "big")
        support_images.seed(layout, upstream.host, "library/big")
        image = asyncio.run(measure.resolve_image(upstream.url, "library/big", layout.tag))
        size = p.blob_mib * MiB
        log(f"seeded library/big ({image.blob_bytes / MiB:.0f} MiB, {len(image.blobs)} blobs); pushing a "
            f"{p.blob_mib} MiB blob")
        for r in range(p.rounds):
            sample: dict[str, Any] = {}
            for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                # A new blob per round and kind: every replica set starts cold on it.
                _, layer = asyncio.run(push_big_blob_image(upstream.url, "library/huge", f"r{r}{kind}", size,
                                                           seed=r * 2 + KINDS.index(kind) + 1))
                where = work / f"{kind}-{r}"
                replicas = Replicas(kind, where, upstream.url, redis)
                try:
                    if kind == "mirror":
                        wait_joined(replicas)
                    s: dict[str, Any] = {"cold": cold(replicas, image, upstream, p.pulls)}
                    s["first_bytes"] = asyncio.run(first_bytes(replicas.urls, "library/huge", layer, size))
                    digest = image.manifests[-1]
                    s["manifests_rps"] = {
                        "one": warm_manifests([replicas.urls[0]] * 3, image.repo, digest, p.wrk_seconds),
                        "three": warm_manifests(replicas.urls, image.repo, digest, p.wrk_seconds)}
                    s["blob_MBps"] = {"one": warm_blob(replicas.urls[:1], "library/huge", layer, size, p.curls),
                                      "three": warm_blob(replicas.urls, "library/huge", layer, size, p.curls)}
                    sample[kind] = s
                    log(f"round {r + 1} {kind}: " + json.dumps(s))
                finally:
                    replicas.stop()
                    shutil.rmtree(where, ignore_errors=True)
            results["rounds"].append(sample)
    finally:
        redis.stop()
        upstream.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replicas.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results["rounds"]))
    return 0


def wait_joined(replicas: Replicas) -> None:
    deadline = time.monotonic() + 15
    for url in replicas.urls:
        while "mirror_redis_up 1.0" not in procs.http("GET", f"{url}/metrics").body.decode():
            if time.monotonic() > deadline:
                raise BenchError(f"{url} did not join Redis")
            time.sleep(0.1)


def table(rounds: list[dict[str, Any]]) -> str:
    def med(kind: str, get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(r[kind]) for r in rounds)

    rows: list[tuple[str, Callable[[dict[str, Any]], float], str]] = [
        ("upstream GETs per blob, 12 cold pulls over 3", lambda s: s["cold"]["per_blob"], "{:.2f}"),
        ("upstream GETs per manifest, same pulls", lambda s: s["cold"]["per_manifest"], "{:.2f}"),
        ("12 cold pulls over 3, seconds", lambda s: s["cold"]["seconds"], "{:.2f}"),
        ("cold big blob: first byte, replica A (ms)", lambda s: s["first_bytes"]["winner_ms"], "{:.0f}"),
        ("cold big blob: first byte, B and C (ms)", lambda s: statistics.median(s["first_bytes"]["followers_ms"]),
         "{:.0f}"),
        ("cold big blob: all three done (s)", lambda s: s["first_bytes"]["all_done_seconds"], "{:.2f}"),
        ("warm manifests, 1 replica (req/s)", lambda s: s["manifests_rps"]["one"], "{:.0f}"),
        ("warm manifests, 3 replicas (req/s)", lambda s: s["manifests_rps"]["three"], "{:.0f}"),
        ("warm manifests, 3 vs 1", lambda s: s["manifests_rps"]["three"] / s["manifests_rps"]["one"], "{:.2f}"),
        ("warm blob, 1 replica (MB/s)", lambda s: s["blob_MBps"]["one"], "{:.0f}"),
        ("warm blob, 3 replicas (MB/s)", lambda s: s["blob_MBps"]["three"], "{:.0f}"),
        ("warm blob, 3 vs 1", lambda s: s["blob_MBps"]["three"] / s["blob_MBps"]["one"], "{:.2f}"),
    ]
    out = [f"medians of {len(rounds)} round(s)", "", "| | mirror (redis) | distribution | mirror / distribution |",
           "|---|---|---|---|"]
    for label, get, fmt in rows:
        m, d = med("mirror", get), med("distribution", get)
        out.append(f"| {label} | {fmt.format(m)} | {fmt.format(d)} | {m / d:.2f} |" if d else
                   f"| {label} | {fmt.format(m)} | {fmt.format(d)} | |")
    return "\n".join(out)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, subprocess.SubprocessError) as e:
        print(f"bench failed: {e}", file=sys.stderr)
        sys.exit(1)
