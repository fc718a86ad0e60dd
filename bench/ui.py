"""The web UI's repository list with thousands of repositories.

    python -m bench.ui                   # 5,000 repositories, 1,000 requests per row
    python -m bench.ui --quick           # 1,000 repositories, 200 requests per row

Seeds --repositories repositories straight into a filesystem storage root (the layout of
mirror/storage/paths.py: half private `team/...`, half cached `library/...`, two tags each),
starts `mirror serve` on it, waits for the UI's catalog snapshot, then sends --requests GETs of
each list page (the first page, a filtered page, a later page, sorted by size) at concurrency 1
and --concurrency, every response checked (200, the expected rows). Prints one table of p50/p99
latency (request sent .. body read) and requests per second; the goal is p99 < 200 ms. Results
also go to bench/results/ui.json. Only 127.0.0.1 is ever contacted (the configured upstream is
a dead loopback port the list page never asks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import procs
from tests.support.catalog_seed import seed_repositories

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_P99_MS = 200.0
ROW = re.compile(r'class="repo" href="/ui/repo/')


def pages(count: int) -> list[tuple[str, str, int]]:
    """(label, path, rows expected) of the pages measured."""
    matching = sum(1 for i in range(count) if "app-01" in f"team/app-{i:05d}" and i % 2 == 0)
    return [
        ("first page", "/ui/", 50),
        ("filter q=app-01", "/ui/?q=app-01", min(50, matching)),
        ("page 40", "/ui/?page=40", 50 if count >= 2000 else (count - 1) % 50 + 1),
        ("sort=size", "/ui/?sort=size", 50),
    ]


async def wait_catalog(base: str, count: int, limit: float) -> float:
    """Seconds until the UI's catalog lists all `count` repositories."""
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() - t0 < limit:
            async with s.get(f"{base}/ui/api/repositories?n=1") as r:
                if r.status == 200:
                    data = await r.json()
                    if data["ready"] and data["all"] == count:
                        return time.perf_counter() - t0
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the UI catalog did not list {count} repositories within {limit:.0f}s")


async def measure(base: str, path: str, expected_rows: int, requests: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    queue = list(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)

    async def worker(s: aiohttp.ClientSession) -> None:
        while queue:
            queue.pop()
            t0 = time.perf_counter()
            async with s.get(base + path) as r:
                body = await r.text()
            latencies.append(time.perf_counter() - t0)
            if r.status != 200 or len(ROW.findall(body)) != expected_rows:
                raise RuntimeError(f"{path}: status {r.status}, {len(ROW.findall(body))} rows, not {expected_rows}")

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
        for _ in range(min(20, requests)):  # warm: templates compiled, connections open
            async with s.get(base + path) as r:
                await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(latencies), "concurrency": concurrency, "seconds": round(wall, 2),
            "rps": round(len(latencies) / wall, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
            "max_ms": round(latencies[-1] * 1000, 2)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repositories", type=int)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    count = args.repositories or (1000 if args.quick else 5000)
    requests = args.requests or (200 if args.quick else 1000)
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp:
        work = Path(tmp)
        root = work / "mirror" / "data"
        t0 = time.perf_counter()
        seed_repositories(root, count)
        log(f"seeded {count} repositories in {time.perf_counter() - t0:.1f}s")
        config = {"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
                  "proxy": {"remoteurl": "http://127.0.0.1:9"}, "private": {"patterns": ["team/**"]},
                  "storage": {"filesystem": {"rootdirectory": str(root)}}}
        mirror = procs.start_mirror(work / "mirror", config)
        try:
            catalog_s = asyncio.run(wait_catalog(mirror.url, count, 300))
            built = [e.get("msg", "") for e in mirror.log_lines() if e.get("logger") == "mirror.ui"]
            log(f"catalog ready {catalog_s:.1f}s after start: {built[-1] if built else '?'}")
            rows = []
            for label, path, expected in pages(count):
                for concurrency in (1, args.concurrency):
                    result = asyncio.run(measure(mirror.url, path, expected, requests, concurrency))
                    rows.append({"page": label, "path": path, **result})
                    log(f"{label} c={concurrency}: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
                        f"{result['rps']} req/s")
        finally:
            mirror.stop()
    worst = max(r["p99_ms"] for r in rows)
    print(f"\nUI list page, {count:,} repositories, {requests:,} requests per row (mirror {mirror.url})\n")
    print("| page | concurrency | p50 ms | p99 ms | max ms | req/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['page']} | {r['concurrency']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['rps']:,} |")
    verdict = "met" if worst < GOAL_P99_MS else "MISSED"
    print(f"\ngoal p99 < {GOAL_P99_MS:.0f} ms: {verdict} (worst p99 {worst} ms); catalog ready {catalog_s:.1f}s "
          f"after start")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ui.json").write_text(json.dumps({"repositories": count, "requests": requests, "rows": rows,
                                                 "catalog_ready_seconds": round(catalog_s, 2),
                                                 "goal_p99_ms": GOAL_P99_MS, "worst_p99_ms": worst}, indent=2))
    return 0 if worst < GOAL_P99_MS else 1


if __name__ == "__main__":
    sys.exit(main())
