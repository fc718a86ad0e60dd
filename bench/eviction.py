"""Eviction cost: a mirror started on a storage root far over its `cache.max_size`.

    python -m bench.eviction                 # 10,000 cached blobs (~330 MiB), about 30 s
    python -m bench.eviction --quick         # 2,000 blobs, shorter idle measurements
    python -m bench.eviction --py-spy        # also where the event loop's time went in the pass

A filesystem storage root is seeded directly, in the mirror's own layout (mirror.storage.paths):
--blobs proxied blobs of --min-kib..--max-kib random bytes over --repos proxied repositories
(library/r0 ..), each with one image manifest, its revision link, a `latest` tag and a layer link
per blob (two base layers shared by every repository), and a pushed repository `team/app` (its
private marker) whose blobs must all survive, two of them shared with the oldest proxied one.
Last use is the blob mtime (the index holds no access times yet): repository rK was used before
r(K+1), the newest is the one hammered below, team/app is older than proxy.ttl and older than all.

Then `python -m mirror serve` starts on that root with `cache.max_size` at --cap-share of what
was seeded and `min_idle: 0s`: its first eviction pass, at start, takes storage from past the high
watermark (95% of the cap) to under the low one (85%). From the moment it is spawned, --clients
aiohttp clients GET two manifests by digest in a loop, half the private team/app one, half the
newest proxied one (which is not evicted), each request timed, until the pass logs
"evicted N objects"; then the same clients again on the idle server for --idle-seconds, and wrk
(C, --latency) for the idle server's capacity. The upstream is a counting HTTP server on loopback:
every request it gets is a failure of the cache (none expected).

Reported: the pass's duration (from the "listening" log line to the "evicted" one, both the
mirror's own timestamps), objects and bytes evicted, storage before and after against the cap,
upstream requests, whether every private blob survived, whether the least recently used went
first, whether any link or tag was left pointing at an evicted blob; and manifest latency
(p50/p99/max, req/s, the longest time no response arrived) during the pass and idle.
With --py-spy, py-spy records the mirror (raw stacks next to the JSON) and the call paths the
event loop thread spent the pass in are printed; it slows the mirror, so its other numbers are off.
Writes bench/results/eviction.json. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp

from bench import measure
from bench.measure import MANIFEST_ACCEPT, BenchError, CpuMeter
from mirror.names import Digest
from mirror.storage import layout
from tests.support import procs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
NOISY = 0.10  # share of the machine's CPU taken by others worth a warning (as in bench.run)
KiB = 1 << 10
MiB = 1 << 20
DAY = 86400.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
PRIVATE_REPO = "team/app"
BASE_LAYERS = 2  # of the proxied blobs: linked from every proxied repository
SHARED_WITH_PRIVATE = 2  # of the oldest proxied repository's blobs: team/app references them too
EVICTED = re.compile(r"evicted (\d+) objects \((\d+) bytes, (\d+) expired\): storage (\d+) -> (\d+) bytes")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Params:
    quick: bool
    blobs: int
    repos: int
    min_kib: int
    max_kib: int
    cap_share: float
    clients: int
    idle_seconds: float
    wrk_seconds: float
    pass_timeout: float
    seed: int


def params(args: argparse.Namespace) -> Params:
    q = args.quick
    return Params(quick=q, blobs=args.blobs or (2000 if q else 10_000), repos=args.repos, min_kib=args.min_kib,
                  max_kib=args.max_kib, cap_share=args.cap_share, clients=args.clients,
                  idle_seconds=args.idle_seconds or (2 if q else 5), wrk_seconds=2 if q else 5,
                  pass_timeout=args.pass_timeout, seed=args.seed)


# --- the storage root ---------------------------------------------------------------------------


@dataclass
class Seeded:
    root: Path
    sizes: dict[str, int] = field(default_factory=dict)  # every blob written (layers, configs, manifests)
    mtimes: dict[str, float] = field(default_factory=dict)
    private: set[str] = field(default_factory=set)  # what team/app references, its manifest included
    hot: set[str] = field(default_factory=set)  # the newest proxied repository's manifest and blobs
    repos: list[str] = field(default_factory=list)
    manifests: dict[str, str] = field(default_factory=dict)  # repository -> its manifest digest
    proxied_blobs: int = 0  # layers and configs of the proxied repositories (not their manifests)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def hot_repo(self) -> str:
        return self.repos[-1]


class _Writer:
    """Blobs and links under a storage root, keyed by mirror.storage.paths."""

    def __init__(self, seeded: Seeded, rng: random.Random, max_size: int) -> None:
        self.s = seeded
        self.rng = rng
        self.pool = rng.randbytes(max_size + MiB)
        self.serial = 0

    def file(self, key: str, data: bytes, mtime: float | None = None) -> None:
        path = self.s.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))

    def blob(self, data: bytes, mtime: float) -> str:
        d = Digest("sha256", hashlib.sha256(data).hexdigest())
        self.file(layout.blob(d), data, mtime)
        self.s.sizes[str(d)] = len(data)
        self.s.mtimes[str(d)] = mtime
        return str(d)

    def random_blob(self, size: int, mtime: float) -> str:
        """`size` bytes no other blob has: a serial number, then a slice of the pool."""
        self.serial += 1
        offset = self.rng.randrange(MiB)
        return self.blob(self.serial.to_bytes(8, "big") + self.pool[offset:offset + size - 8], mtime)

    def image(self, repo: str, config: str, layers: list[str], mtime: float) -> str:
        """The manifest (a blob), its revision link, tag `latest`, and a layer link per blob."""
        def descriptor(media_type: str, digest: str) -> dict[str, Any]:
            return {"mediaType": media_type, "digest": digest, "size": self.s.sizes[digest]}

        body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", d) for d in layers],
        }, indent=2).encode()
        digest = self.blob(body, mtime)
        d = Digest(*digest.split(":", 1))
        self.file(layout.revision(repo, d), layout.link(d))
        for key, data in layout.tag_links(repo, "latest", d):
            self.file(key, data)
        for blob in (config, *layers):
            self.file(layout.layer(repo, Digest(*blob.split(":", 1))), layout.link(blob))
        self.s.manifests[repo] = digest
        return digest


def seed_storage(root: Path, p: Params, now: float) -> Seeded:
    t0 = time.perf_counter()
    rng = random.Random(p.seed)
    s = Seeded(root)
    w = _Writer(s, rng, p.max_kib * KiB)
    s.repos = [f"library/r{k}" for k in range(p.repos)]

    def size() -> int:
        return rng.randint(p.min_kib * KiB, p.max_kib * KiB)

    def used(k: int) -> float:
        """When proxied repository k was last pulled: r0 six days ago (within proxy.ttl's 7 days) ..
        the last one an hour ago, at even steps."""
        return now - 6 * DAY + k * (6 * DAY - 3600) / max(1, p.repos - 1)

    step = (6 * DAY - 3600) / max(1, p.repos - 1)
    base = [w.random_blob(size(), used(p.repos - 1)) for _ in range(BASE_LAYERS)]
    own = p.blobs - BASE_LAYERS
    per_repo = [own // p.repos + (1 if k < own % p.repos else 0) for k in range(p.repos)]
    shared: list[str] = []
    for k, repo in enumerate(s.repos):
        # jitter within a third of the step: repositories never overlap in LRU order
        blobs = [w.random_blob(size(), used(k) - rng.uniform(0, step / 3)) for _ in range(per_repo[k])]
        config, layers = blobs[0], [*base, *blobs[1:]]
        digest = w.image(repo, config, layers, used(k))
        w.file(layout.marker(repo, layout.CACHED_MARK), b"")  # pulled through, as the server marks it
        if k == 0:
            shared = blobs[1:1 + SHARED_WITH_PRIVATE]
        if k == p.repos - 1:
            s.hot = {digest, config, *layers}
    s.proxied_blobs = p.blobs

    # team/app: pushed 30 days ago, never pulled since; expired and least recently used if it
    # were proxied. Its marker file is what makes it private (no private.patterns configured).
    old = now - 30 * DAY
    count = max(10, p.blobs // 200)
    blobs = [w.random_blob(size(), old) for _ in range(count)]
    digest = w.image(PRIVATE_REPO, blobs[0], [*blobs[1:], *shared], old)
    w.file(layout.marker(PRIVATE_REPO, layout.PRIVATE_MARK), b"")
    s.private = {digest, *blobs, *shared}
    s.seconds = round(time.perf_counter() - t0, 1)
    return s


def stored_blobs(root: Path) -> dict[str, int]:
    """digest -> size of every blob in storage now."""
    out = {}
    for dirpath, _, files in os.walk(root / layout.BLOBS):
        for name in files:
            parsed = layout.parse(Path(dirpath, name).relative_to(root).as_posix())
            if parsed is not None and parsed.kind == layout.BLOB:
                with contextlib.suppress(FileNotFoundError):
                    out[str(parsed.digest)] = os.stat(os.path.join(dirpath, name)).st_size
    return out


def files_under(root: Path, key: str) -> set[str]:
    return {Path(d, n).relative_to(root).as_posix() for d, _, names in os.walk(root / key) for n in names}


def dangling(root: Path, present: set[str]) -> dict[str, int]:
    """Links and tags under repositories/ naming a blob that is gone (eviction removes links first)."""
    counts = {"layer_links": 0, "revisions": 0, "tags": 0}
    kinds = {layout.LAYER: "layer_links", layout.REVISION: "revisions", layout.TAG: "tags"}
    for dirpath, _, files in os.walk(root / layout.REPOSITORIES):
        for name in files:
            path = Path(dirpath, name)
            parsed = layout.parse(path.relative_to(root).as_posix())
            if parsed is None or parsed.kind not in kinds:
                continue
            digest = path.read_text().strip() if parsed.kind == layout.TAG else str(parsed.digest)
            counts[kinds[parsed.kind]] += digest not in present
    return counts


# --- the upstream: counts what it is asked ------------------------------------------------------


class CountingUpstream:
    """A loopback HTTP server that answers /v2/ and 404s everything else, and counts requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, str, str]] = []  # (perf_counter, method, path)
        lock = threading.Lock()
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                with lock:
                    seen.append((time.perf_counter(), self.command, self.path))
                body = b"{}" if self.path == "/v2/" else \
                    b'{"errors":[{"code":"NAME_UNKNOWN","message":"bench upstream has nothing"}]}'
                self.send_response(200 if self.path == "/v2/" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="upstream", daemon=True)
        self.thread.start()

    def count(self, before: float | None = None) -> int:
        return sum(1 for t, _, _ in list(self.requests) if before is None or t <= before)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the mirror's log ---------------------------------------------------------------------------


class LogWatch:
    """New JSON lines of the mirror's stdout as they come, with when this process saw them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.lines: list[tuple[float, dict[str, Any]]] = []

    def poll(self) -> None:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        if not data:
            return
        self.offset += len(data)
        chunks = (self.partial + data).split(b"\n")
        self.partial = chunks.pop()
        seen = time.perf_counter()
        for line in chunks:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    self.lines.append((seen, entry))

    def find(self, contains: str) -> tuple[float, dict[str, Any]] | None:
        return next(((t, e) for t, e in self.lines if contains in str(e.get("msg", ""))), None)

    def problems(self) -> list[str]:
        return [json.dumps(e)[:300] for _, e in self.lines if e.get("level") in ("warning", "error", "critical")]


def log_time(entry: dict[str, Any]) -> float:
    return datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


# --- clients --------------------------------------------------------------------------------------


@dataclass
class Sample:
    target: int  # index into the URLs
    start: float  # perf_counter
    end: float
    status: int  # 0: the connection failed after it was made


async def hammer(urls: list[str], clients: int, stop: asyncio.Event, seconds: float) -> list[Sample]:
    """`clients` loops of GETs, client k on urls[k % len(urls)], until `stop` or `seconds` pass.
    A refused connection (the server not listening yet) is retried at once and not a sample."""
    samples: list[Sample] = []
    deadline = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=seconds + 30, sock_connect=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as s:
        async def client(k: int) -> None:
            target = k % len(urls)
            while not stop.is_set() and time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with s.get(urls[target], headers={"Accept": MANIFEST_ACCEPT}) as resp:
                        await resp.read()
                        status = resp.status
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.005)
                    continue
                except aiohttp.ClientError:
                    status = 0
                samples.append(Sample(target, t0, time.perf_counter(), status))

        await asyncio.gather(*(client(k) for k in range(clients)))
    return samples


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of `values` at or below it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def latency(samples: list[Sample], since: float | None = None) -> dict[str, Any]:
    """Latency in ms, req/s, errors and the longest stretch with no response, over `samples`
    (the window starts at `since`, else the first request)."""
    if not samples:
        return {"requests": 0}
    ms = [(x.end - x.start) * 1000 for x in samples]
    start = min(x.start for x in samples) if since is None else since
    ends = sorted(x.end for x in samples)
    window = ends[-1] - start
    gaps = [b - a for a, b in zip([start, *ends], ends, strict=False)]
    return {"requests": len(samples), "errors": sum(1 for x in samples if x.status != 200),
            "seconds": round(window, 3), "rps": round(len(samples) / window, 1) if window > 0 else None,
            "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
            "max_ms": round(max(ms), 2), "longest_gap_ms": round(max(gaps) * 1000, 1)}


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class PassRun:
    samples: list[Sample]
    spawned: float  # perf_counter
    first_ok: float | None
    ended: float  # the "evicted" line seen
    listening: dict[str, Any]
    evicted: dict[str, Any]
    cpu_seconds: float


async def run_pass(mirror: procs.Mirror, urls: list[str], p: Params, spy: Callable[[int], None]) -> PassRun:
    """Spawn the mirror and hammer it until its first pass logs what it evicted."""
    watch = LogWatch(mirror.proc.stdout_path)
    stop = asyncio.Event()
    spawned = time.perf_counter()
    mirror.proc.start()
    pid = mirror.proc.pid
    assert pid is not None
    spy(pid)
    ended: list[float] = []

    async def watcher() -> None:
        try:
            while True:
                watch.poll()
                found = watch.find("evicted ")
                if found:
                    ended.append(found[0])
                    return
                if not mirror.proc.running:
                    raise BenchError(f"the mirror exited during its first pass\n{mirror.logs()}")
                if time.perf_counter() - spawned > p.pass_timeout:
                    raise BenchError(f"no eviction logged within {p.pass_timeout:.0f}s\n{mirror.logs()}")
                await asyncio.sleep(0.01)
        finally:
            stop.set()

    with CpuMeter({"mirror": pid}) as cpu:
        samples, _ = await asyncio.gather(hammer(urls, p.clients, stop, p.pass_timeout), watcher())
    listening, evicted = watch.find("listening on"), watch.find("evicted ")
    assert evicted is not None
    if listening is None:
        raise BenchError(f"no 'listening on' line in the mirror's log\n{mirror.logs()}")
    ok = [x.end for x in samples if x.status == 200]
    return PassRun(samples, spawned, min(ok) if ok else None, ended[0], listening[1], evicted[1],
                   cpu.used["mirror"])


class Spy:
    """py-spy recording the mirror (--py-spy): raw collapsed stacks into a file, stopped by SIGINT."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None

    def __call__(self, pid: int) -> None:
        if self.out is None:
            return
        exe = shutil.which("py-spy")
        if exe is None:
            raise BenchError("py-spy is not installed")
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "200", "--threads",
                                      "--format", "raw", "--output", str(self.out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> str:
        if self.proc is None:
            return ""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        return err.decode(errors="replace")[-500:]


def spy_summary(path: Path, under: str = "Evictor.run", depth: int = 3, top: int = 10) -> dict[str, Any]:
    """From py-spy's raw stacks ("thread (tid): name;outer;...;inner count"): samples per thread,
    and of the event loop thread's samples inside `under`, how many went down each call path
    (the `depth` functions below it)."""
    threads: dict[str, int] = {}
    paths_: dict[str, int] = {}
    inside = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            thread, *frames = stack.split(";")
            name = thread.partition(": ")[2] or thread
            threads[name] = threads.get(name, 0) + n
            at = next((i for i, f in enumerate(frames) if f.startswith(under + " ")), None)
            if name != "MainThread" or at is None:
                continue
            inside += n
            short = [f.split(" (")[0] for f in frames[at + 1:at + 1 + depth]]
            key = " > ".join(short) or "(itself)"
            paths_[key] = paths_.get(key, 0) + n
    return {"samples_by_thread": threads, f"main_thread_in_{under}": inside,
            "paths": dict(sorted(paths_.items(), key=lambda kv: -kv[1])[:top])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.eviction", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 blobs, 2 s idle measurements")
    ap.add_argument("--blobs", type=int, help="proxied blobs to seed (10000, quick 2000)")
    ap.add_argument("--repos", type=int, default=100, help="proxied repositories they are spread over (100)")
    ap.add_argument("--min-kib", type=int, default=4, help="smallest blob (4 KiB)")
    ap.add_argument("--max-kib", type=int, default=64, help="largest blob (64 KiB)")
    ap.add_argument("--cap-share", type=float, default=0.5, help="cache.max_size as a share of what is seeded (0.5)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent manifest clients (16)")
    ap.add_argument("--idle-seconds", type=float, help="client loop on the idle server (5, quick 2)")
    ap.add_argument("--pass-timeout", type=float, default=120, help="give up on the first pass after (120 s)")
    ap.add_argument("--seed", type=int, default=1, help="random seed of sizes and contents (1)")
    ap.add_argument("--py-spy", action="store_true", help="record the mirror with py-spy during the pass")
    ap.add_argument("--out", type=Path, default=RESULTS / "eviction.json", help="JSON results file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    p = params(args)
    if p.repos < 2 or p.blobs < p.repos * 3 + BASE_LAYERS or p.min_kib < 1 or p.max_kib < p.min_kib:
        ap.error("need --repos >= 2, --blobs >= 3 per repository (+2), 1 <= --min-kib <= --max-kib")

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-eviction-"))
    upstream = CountingUpstream()
    mirror: procs.Mirror | None = None
    spy = Spy(args.out.with_suffix(".pyspy.txt") if args.py_spy else None)
    results: dict[str, Any] = {"params": asdict(p), "versions": versions(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "cpu_busy_before": measure.machine_busy()}
    try:
        log(f"work directory {work}; seeding {p.blobs} blobs over {p.repos} repositories")
        seeded = seed_storage(work / "data", p, time.time())
        before = stored_blobs(seeded.root)
        private_files = files_under(seeded.root, layout.repository(PRIVATE_REPO))
        if before.keys() != seeded.sizes.keys():
            raise BenchError("the seeded root does not hold what was written")
        cap = int(seeded.total * p.cap_share)
        log(f"seeded {len(seeded.sizes)} objects, {seeded.total / MiB:.1f} MiB in {seeded.seconds}s; "
            f"cache.max_size {cap / MiB:.1f} MiB")
        mirror = procs.Mirror(work, {
            "version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(seeded.root)}},
            "proxy": {"remoteurl": upstream.url},
            "cache": {"max_size": cap, "min_idle": "0s"},
        })
        hot_repo = seeded.hot_repo
        urls = [f"{mirror.url}/v2/{PRIVATE_REPO}/manifests/{seeded.manifests[PRIVATE_REPO]}",
                f"{mirror.url}/v2/{hot_repo}/manifests/{seeded.manifests[hot_repo]}"]
        names = [PRIVATE_REPO, hot_repo]

        with measure.Interference() as noise:
            run = asyncio.run(run_pass(mirror, urls, p, spy))
        spy_err = spy.stop()
        upstream_during = upstream.count(before=run.ended)
        m = EVICTED.search(run.evicted["msg"])
        if not m:
            raise BenchError(f"cannot parse {run.evicted['msg']!r}")
        objects, evicted_bytes, expired, usage_before, usage_after = map(int, m.groups())
        pass_seconds = log_time(run.evicted) - log_time(run.listening)
        log(f"pass: {objects} objects evicted in {pass_seconds:.2f}s "
            f"(first response {(run.first_ok or run.ended) - run.spawned:.2f}s after spawn)")

        after = stored_blobs(seeded.root)
        gone = before.keys() - after.keys()
        proxied_kept = [d for d in after if d not in seeded.private]
        lru_ok = not gone or not proxied_kept or \
            max(seeded.mtimes[d] for d in gone) <= min(seeded.mtimes[d] for d in proxied_kept)
        checks = {
            "private_kept": len(seeded.private & after.keys()), "private_total": len(seeded.private),
            "private_files_kept": len(private_files & files_under(seeded.root, layout.repository(PRIVATE_REPO))),
            "private_files_total": len(private_files),
            "hot_kept": len(seeded.hot & after.keys()), "hot_total": len(seeded.hot),
            "lru_order": lru_ok, "dangling": dangling(seeded.root, set(after)),
            "log_agrees": objects == len(gone) and usage_after == sum(after.values()),
        }

        during = {"all": latency(run.samples, run.first_ok)}
        for i, name in enumerate(names):
            during[name] = latency([x for x in run.samples if x.target == i], run.first_ok)

        log(f"idle: {p.clients} clients for {p.idle_seconds:g}s, then wrk {p.wrk_seconds:g}s")
        idle_samples = asyncio.run(hammer(urls, p.clients, asyncio.Event(), p.idle_seconds))
        idle = {"all": latency(idle_samples)}
        for i, name in enumerate(names):
            idle[name] = latency([x for x in idle_samples if x.target == i])
        w = measure.wrk(urls[0], p.wrk_seconds, 2, p.clients, {"Accept": MANIFEST_ACCEPT}, latency=True)
        wrk_idle = {"rps": w.requests_per_s, "requests": w.requests, "non_2xx": w.non_2xx,
                    "socket_errors": w.socket_errors, "percentiles_ms": w.percentiles_ms,
                    "max_ms": measure.wrk_ms(w.latency_max) if w.latency_max else None}
        problems = LogWatch(mirror.proc.stdout_path)
        problems.poll()
        results.update({
            "seed": {"objects": len(seeded.sizes), "proxied_blobs": seeded.proxied_blobs,
                     "manifests": len(seeded.manifests), "repositories": len(seeded.repos),
                     "private_objects": len(seeded.private), "bytes": seeded.total, "seconds": seeded.seconds},
            "cap": {"max_size": cap, "high": int(cap * 0.95), "low": int(cap * 0.85)},
            "pass": {"seconds": round(pass_seconds, 3),
                     "spawn_to_first_response_seconds": round(run.first_ok - run.spawned, 3) if run.first_ok
                     else None,
                     "spawn_to_logged_seconds": round(run.ended - run.spawned, 3),
                     "objects": objects, "bytes": evicted_bytes, "expired": expired,
                     "usage_before": usage_before, "usage_after": usage_after,
                     "storage_before": sum(before.values()), "storage_after": sum(after.values()),
                     "mirror_cpu_seconds": run.cpu_seconds},
            "upstream_requests": {"during_pass": upstream_during, "total": upstream.count(),
                                  "first": [f"{m_} {p_}" for _, m_, p_ in upstream.requests[:10]]},
            "checks": checks,
            "latency": {"urls": dict(zip(names, urls, strict=True)), "clients": p.clients,
                        "during_pass": during, "idle": idle, "idle_wrk": wrk_idle},
            "log_problems": problems.problems(),
            # other work on the machine during the pass (shares of all CPUs), as bench.run reports it
            "interference": {"foreign_cpu_share": noise.foreign_share,
                             "unattributed_cpu_share": noise.unattributed_share, "steal_share": noise.steal_share,
                             "top_foreign_cpu_seconds": dict(sorted(noise.others.items(), key=lambda kv: -kv[1])[:5])},
        })
        if spy.out is not None:
            results["py_spy"] = {"file": str(spy.out), **spy_summary(spy.out)} if spy.out.exists() else \
                {"error": spy_err}
    finally:
        if mirror is not None:
            mirror.stop()
        upstream.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["elapsed_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n{'quick' if p.quick else 'full'} run, {results['elapsed_seconds']:.0f}s; results in {args.out}")
    return 0


def table(r: dict[str, Any]) -> str:
    s, c, ps, up, ck, lat = r["seed"], r["cap"], r["pass"], r["upstream_requests"], r["checks"], r["latency"]

    def mib(n: int) -> str:
        return f"{n / MiB:.1f} MiB"

    dangling = sum(ck["dangling"].values())
    facts = [
        ("seeded", f"{s['proxied_blobs']:,} proxied blobs + {s['manifests'] - 1} manifests in "
                   f"{s['repositories']} repositories, {s['private_objects']} private objects (team/app, "
                   f"{SHARED_WITH_PRIVATE} shared with library/r0): "
                   f"{s['objects']:,} objects, {mib(s['bytes'])}"),
        ("cache.max_size", f"{mib(c['max_size'])} (evicts past 95% {mib(c['high'])}, down to 85% {mib(c['low'])})"),
        ("eviction pass", f"{ps['seconds']:.2f} s (the mirror's log: listening -> evicted), "
                          f"mirror CPU from its spawn to then {ps['mirror_cpu_seconds']:.2f} s"),
        ("evicted", f"{ps['objects']:,} objects, {mib(ps['bytes'])} ({ps['expired']} expired)"),
        ("storage before -> after", f"{mib(ps['storage_before'])} -> {mib(ps['storage_after'])} "
                                    f"({ps['storage_after'] / c['max_size']:.0%} of the cap)"),
        ("upstream requests", f"{up['during_pass']} during the pass, {up['total']} in all"),
        ("private kept", f"{ck['private_kept']}/{ck['private_total']} objects, {ck['private_files_kept']}/"
                         f"{ck['private_files_total']} files under repositories/{PRIVATE_REPO} (links, tag, marker)"),
        ("checks", f"LRU order {'kept' if ck['lru_order'] else 'BROKEN'}; newest repository "
                   f"{ck['hot_kept']}/{ck['hot_total']} kept; dangling links/tags {dangling}; "
                   f"log {'agrees with' if ck['log_agrees'] else 'DIFFERS from'} storage"),
    ]
    width = max(len(k) for k, _ in facts)
    lines = [f"{k.ljust(width)}  {v}" for k, v in facts]

    header = ["manifest GET by digest", "req/s", "p50 ms", "p99 ms", "max ms", "longest gap ms", "errors"]
    rows = []

    def row(label: str, x: dict[str, Any]) -> None:
        if not x.get("requests"):
            rows.append([label, "-", "-", "-", "-", "-", "-"])
            return
        rows.append([label, f"{x['rps']:.0f}", f"{x['p50_ms']:.1f}", f"{x['p99_ms']:.1f}", f"{x['max_ms']:.1f}",
                     f"{x['longest_gap_ms']:.0f}", str(x["errors"])])

    for phase, label in (("during_pass", "during pass"), ("idle", "idle")):
        for name, x in lat[phase].items():
            row(f"{label}, {name}", x)
    w = lat["idle_wrk"]
    pct = w["percentiles_ms"]
    rows.append([f"idle, wrk -c{lat['clients']} {PRIVATE_REPO}", f"{w['rps']:.0f}", f"{pct.get('50', 0):.1f}",
                 f"{pct.get('99', 0):.1f}", f"{w['max_ms']:.1f}" if w["max_ms"] is not None else "-", "-",
                 str(w["non_2xx"] + sum(w["socket_errors"].values()))])
    d, i = lat["during_pass"]["all"], lat["idle"]["all"]
    if d.get("requests") and i.get("requests"):
        rows.append(["during/idle, all", f"{d['rps'] / i['rps']:.2f}x", f"{d['p50_ms'] / i['p50_ms']:.1f}x",
                     f"{d['p99_ms'] / i['p99_ms']:.1f}x", f"{d['max_ms'] / i['max_ms']:.1f}x",
                     f"{d['longest_gap_ms'] / max(i['longest_gap_ms'], 0.1):.0f}x", ""])
    widths = [max(len(cells[k]) for cells in [header, *rows]) for k in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(widths[k]) if k == 0 else c.rjust(widths[k]) for k, c in enumerate(cells)).rstrip()

    lines += ["", fmt(header), "  ".join("-" * n for n in widths), *(fmt(cells) for cells in rows)]
    lines.append(f"({lat['clients']} aiohttp clients, half on each manifest; 'during pass' runs from the first "
                 f"response to the 'evicted' log line, {d.get('seconds', 0):.2f} s)")
    spy = r.get("py_spy")
    if spy and "paths" in spy:
        inside = spy["main_thread_in_Evictor.run"]
        lines.append(f"\npy-spy (it slows the mirror: numbers above are skewed): {inside} samples of the event loop "
                     f"thread inside Evictor.run, by call path:")
        lines += [f"  {n:5d} {path}" for path, n in spy["paths"].items()]
    noise = r.get("interference") or {}
    other = sum(noise.get(k, 0.0) for k in ("foreign_cpu_share", "unattributed_cpu_share", "steal_share"))
    if other > NOISY:
        lines.append(f"WARNING: other work took {other:.0%} of the CPUs during the pass: its numbers are skewed")
    problems = r.get("log_problems") or []
    if problems:
        lines.append(f"mirror logged {len(problems)} warning/error lines, first: {problems[0]}")
    return "\n".join(lines)


def versions() -> dict[str, Any]:
    def out(cmd: list[str]) -> str:
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"
        return text.splitlines()[0] if text else ""

    return {"mirror_commit": out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
            "mirror_dirty": out(["git", "-C", str(ROOT), "status", "--porcelain", "mirror"]) != "",
            "python": sys.version.split()[0], "cpus": os.cpu_count()}


if __name__ == "__main__":
    sys.exit(main())
