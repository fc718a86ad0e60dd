"""The measurements themselves: clients (curl, wrk, an aiohttp puller) and /proc readings.

Nothing here starts a registry; run.py does that and hands in base URLs and pids. Every wait is
bounded: subprocesses by a timeout, HTTP by aiohttp timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES)
INDEX_TYPES = MANIFEST_TYPES[2:]
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A measurement could not be taken, or a proxy answered wrongly."""


# --- /proc ----------------------------------------------------------------------------------


def memory(pid: int) -> dict[str, float]:
    """VmHWM (peak) and VmRSS (current) of `pid`, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) / 1024  # kB
    return out


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of `pid` so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def cpu_times() -> list[int]:
    """The machine's `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def _processes() -> dict[int, tuple[int, int, float]]:
    """pid -> (ppid, start time, CPU seconds) of every process now."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        out[int(entry.name)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


class Interference:
    """How much CPU other work on the machine took during a `with` block, as shares of all CPUs:
    `foreign_share`, the CPU time of every process that is neither this one nor its descendant
    (servers, curl, wrk) nor a kernel thread; `unattributed_share`, busy time (/proc/stat) that
    neither we nor those processes account for (others' processes that started and ended inside
    the block, kernel threads); and the hypervisor's `steal_share`."""

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> Interference:
        self._before = _processes()
        self._stat = cpu_times()
        self._own0 = self._own()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        after = _processes()
        d = [b - a for a, b in zip(self._stat, cpu_times(), strict=True)]
        me = os.getpid()

        def ours(pid: int) -> bool:
            seen = 0
            while pid > 2 and seen < 64:
                if pid == me:
                    return True
                pid = after[pid][0] if pid in after else 0
                seen += 1
            return False

        foreign = 0.0
        own = self._own() - self._own0  # this process and its children that ended (waited)
        self.others: dict[str, float] = {}
        for pid, (ppid, started, cpu) in after.items():
            if pid == 2 or ppid == 2:  # kthreadd's children: kernel threads
                continue
            old = self._before.get(pid)
            used = cpu - old[2] if old and old[1] == started else cpu
            if ours(pid):
                if pid != me:
                    own += used  # servers still running
                continue
            if used > 0:
                foreign += used
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        name = f"{pid} {f.read().strip()}"
                except OSError:
                    name = str(pid)
                self.others[name] = round(used, 2)
        capacity = wall * (os.cpu_count() or 1)
        self.foreign_share = round(foreign / capacity, 3)
        # Busy time nobody above accounts for: short-lived processes of others, kernel threads.
        busy = (d[0] + d[1] + d[2]) / CLK_TCK  # user nice system
        self.unattributed_share = round(max(0.0, busy - own - foreign) / capacity, 3)
        self.steal_share = round(d[7] / max(1, sum(d[:8])), 3)


def machine_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (from /proc/stat): other work on the machine."""

    def sample() -> tuple[int, int]:
        values = cpu_times()
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return round((busy1 - busy0) / max(1, total1 - total0), 3)


class CpuMeter:
    """CPU seconds each of some pids spent inside a `with` block."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._start = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.used = {k: round(cpu_seconds(p) - self._start[k], 2) for k, p in self.pids.items()}


# --- HTTP client pieces ---------------------------------------------------------------------


def _timeout(total: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total, sock_connect=10, sock_read=60)


async def get_manifest(session: aiohttp.ClientSession, base: str, repo: str, ref: str) -> tuple[str, str, bytes]:
    """(digest, media type, body) of a manifest, with the digest checked against the body."""
    async with session.get(f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT}) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise BenchError(f"GET {base}/v2/{repo}/manifests/{ref}: {resp.status} {body[:300]!r}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        header = resp.headers.get("Docker-Content-Digest")
        if header and header != digest:
            raise BenchError(f"{base} {repo}:{ref}: Docker-Content-Digest {header} but body is {digest}")
        if ref.startswith("sha256:") and ref != digest:
            raise BenchError(f"{base} {repo}@{ref}: body hashes to {digest}")
        return digest, resp.headers.get("Content-Type", "").split(";")[0], body


@dataclass
class Image:
    repo: str
    tag: str
    manifest_digest: str  # what the tag resolves to (an index or an image manifest)
    manifests: list[str]  # every manifest digest a client fetches, in order
    blobs: list[tuple[str, int]]  # (digest, size) of the config and layers

    @property
    def blob_bytes(self) -> int:
        return sum(size for _, size in self.blobs)


async def resolve_image(base: str, repo: str, tag: str) -> Image:
    """What a client pulls for repo:tag (linux/amd64, or the first entry, of an index)."""
    async with aiohttp.ClientSession(timeout=_timeout(60)) as s:
        digest, media_type, body = await get_manifest(s, base, repo, tag)
        doc = json.loads(body)
        manifests = [digest]
        if media_type in INDEX_TYPES or "manifests" in doc:
            entries = doc["manifests"]
            chosen = next((m for m in entries if (m.get("platform") or {}).get("architecture") == "amd64"),
                          entries[0])
            _, _, body = await get_manifest(s, base, repo, chosen["digest"])
            doc = json.loads(body)
            manifests.append(chosen["digest"])
    blobs = [(doc["config"]["digest"], doc["config"]["size"])]
    blobs += [(layer["digest"], layer["size"]) for layer in doc["layers"]]
    return Image(repo, tag, digest, manifests, blobs)


async def _fetch_blob(session: aiohttp.ClientSession, base: str, repo: str, digest: str, size: int,
                      verify: bool) -> int:
    hasher = hashlib.sha256() if verify else None
    got = 0
    async with session.get(f"{base}/v2/{repo}/blobs/{digest}") as resp:
        if resp.status != 200:
            raise BenchError(f"GET {base}/v2/{repo}/blobs/{digest}: {resp.status} {(await resp.read())[:300]!r}")
        async for chunk in resp.content.iter_chunked(1 << 20):
            got += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
    if got != size:
        raise BenchError(f"{base} {repo}@{digest}: got {got} bytes, expected {size}")
    if hasher is not None and "sha256:" + hasher.hexdigest() != digest:
        raise BenchError(f"{base} {repo}@{digest}: body hashes to sha256:{hasher.hexdigest()}")
    return got


async def fetch_blob(base: str, repo: str, digest: str, size: int, limit_s: float = 600) -> float:
    """GET one blob, verify size and digest; seconds taken."""
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=_timeout(limit_s), auto_decompress=False) as s:
        await _fetch_blob(s, base, repo, digest, size, verify=True)
    return time.perf_counter() - t0


async def pull(base: str, image: Image, concurrency: int = 3, limit_s: float = 600) -> float:
    """A client's pull: /v2/, the manifest by tag (and the platform's manifest), then the config and
    layers `concurrency` at a time, each verified as it arrives. Returns seconds."""
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=_timeout(limit_s), auto_decompress=False) as s:
        async with s.get(f"{base}/v2/") as resp:
            await resp.read()
            if resp.status != 200:
                raise BenchError(f"GET {base}/v2/: {resp.status}")
        digest, _, _ = await get_manifest(s, base, image.repo, image.tag)
        if digest != image.manifest_digest:
            raise BenchError(f"{base} {image.repo}:{image.tag} is {digest}, upstream has {image.manifest_digest}")
        for child in image.manifests[1:]:
            await get_manifest(s, base, image.repo, child)
        sem = asyncio.Semaphore(concurrency)

        async def one(digest: str, size: int) -> int:
            async with sem:
                return await _fetch_blob(s, base, image.repo, digest, size, verify=True)

        await asyncio.gather(*(one(d, n) for d, n in image.blobs))
    return time.perf_counter() - t0


# --- pushes: a streamed blob to a registry, monolithic or chunked -----------------------------


class PushBody:
    """`size` seeded pseudo-random bytes, produced on the fly in 4 MiB pieces, never held whole.

    random.randbytes makes ~380 MB/s on the bench machine, less than the registries take in, and
    the client shares the CPUs with the server: a push client that generated every byte that way
    would measure itself. So one 36 MiB pool of randbytes (seeded) is made up front, and piece k
    of the blob is the pool's 4 MiB at an offset derived from (seed, k): a memoryview, no copy.
    Same (size, seed) -> same bytes and digest; another seed -> another blob (no registry can
    skip a push as already stored). `digest()` runs the whole stream once through sha256, which
    is done before the clock starts.
    """

    PIECE = 4 << 20
    POOL = 32 << 20

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._pool = memoryview(random.Random(seed).randbytes(self.POOL + self.PIECE))
        self._digest: str | None = None

    def _offset(self, k: int) -> int:
        h = hashlib.blake2b(f"{self.seed}:{k}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") % self.POOL

    def pieces(self, start: int = 0, end: int | None = None) -> Iterator[memoryview]:
        """The bytes [start, end) of the blob, at most one piece at a time."""
        end = self.size if end is None else min(end, self.size)
        pos = start
        while pos < end:
            k, within = divmod(pos, self.PIECE)
            n = min(self.PIECE - within, end - pos)
            base = self._offset(k) + within
            yield self._pool[base:base + n]
            pos += n

    async def stream(self, start: int = 0, end: int | None = None) -> AsyncIterator[memoryview]:
        for piece in self.pieces(start, end):
            yield piece

    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            for piece in self.pieces():
                h.update(piece)
            self._digest = "sha256:" + h.hexdigest()
        return self._digest


PUSH_MONOLITHIC_POST = "post"  # POST ?digest= with the whole body -> 201
PUSH_MONOLITHIC_PUT = "post+put"  # POST -> 202 Location, then PUT <location>&digest= with the whole body


def _push_timeout(size: int) -> aiohttp.ClientTimeout:
    # Bounded, generous: 1 GiB at 10 MB/s.
    return aiohttp.ClientTimeout(total=max(120.0, size / (10 * 1_000_000)), sock_connect=10, sock_read=120)


async def _expect(resp: aiohttp.ClientResponse, status: int, what: str) -> None:
    if resp.status != status:
        raise BenchError(f"{what}: {resp.status}, expected {status}: {(await resp.read())[:300]!r}")


def _location(base: str, resp: aiohttp.ClientResponse) -> URL:
    loc = resp.headers.get("Location")
    if not loc:
        raise BenchError(f"{resp.method} {resp.url}: {resp.status} without a Location")
    return URL(base).join(URL(loc))


async def monolithic_form(base: str, repo: str) -> str:
    """Which single-request form `base` takes: a tiny blob by `POST ?digest=` with its body; a 201
    is PUSH_MONOLITHIC_POST. A 202 means the body was ignored (distribution 2.8): the form is
    PUSH_MONOLITHIC_PUT. The session that 202 opened is left alone: a DELETE of it makes
    distribution 2.8 log an error ("error closing blobwriter: ... file already closed")."""
    data = random.Random(0).randbytes(1024)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with aiohttp.ClientSession(timeout=_timeout(30)) as s:
        async with s.post(f"{base}/v2/{repo}/blobs/uploads/", params={"digest": digest}, data=data,
                          headers={"Content-Type": "application/octet-stream"}) as resp:
            await resp.read()
            if resp.status == 201:
                return PUSH_MONOLITHIC_POST
            if resp.status != 202:
                raise BenchError(f"POST {base}/v2/{repo}/blobs/uploads/?digest=: {resp.status}")
    return PUSH_MONOLITHIC_PUT


@dataclass
class PushResult:
    seconds: float  # the first request sent to the final 201 received
    requests: int
    digest: str


async def push_blob(base: str, repo: str, body: PushBody, mode: str, chunk: int = 16 << 20) -> PushResult:
    """Push `body` to repo as one blob: mode PUSH_MONOLITHIC_POST, PUSH_MONOLITHIC_PUT, or "chunked"
    (POST, then PATCHes of `chunk` bytes with Content-Range, then PUT ?digest= without a body).
    Every request has a Content-Length; the body comes from the generator as it is sent."""
    digest = body.digest()  # computed now if not yet: before the clock
    octet = {"Content-Type": "application/octet-stream"}
    uploads = f"{base}/v2/{repo}/blobs/uploads/"
    async with aiohttp.ClientSession(timeout=_push_timeout(body.size)) as s:
        t0 = time.perf_counter()
        requests = 1
        if mode == PUSH_MONOLITHIC_POST:
            async with s.post(uploads, params={"digest": digest}, data=body.stream(),
                              headers={**octet, "Content-Length": str(body.size)}) as resp:
                await _expect(resp, 201, f"POST {uploads}?digest= with {body.size} bytes")
        else:
            async with s.post(uploads) as resp:
                await _expect(resp, 202, f"POST {uploads}")
                location = _location(base, resp)
            if mode == PUSH_MONOLITHIC_PUT:
                requests += 1
                async with s.put(location.update_query(digest=digest), data=body.stream(),
                                 headers={**octet, "Content-Length": str(body.size)}) as resp:
                    await _expect(resp, 201, f"PUT {location} with {body.size} bytes")
            elif mode == "chunked":
                for start in range(0, body.size, chunk):
                    end = min(start + chunk, body.size)
                    requests += 1
                    async with s.patch(location, data=body.stream(start, end),
                                       headers={**octet, "Content-Length": str(end - start),
                                                "Content-Range": f"{start}-{end - 1}"}) as resp:
                        await _expect(resp, 202, f"PATCH {location} {start}-{end - 1}")
                        location = _location(base, resp)
                requests += 1
                async with s.put(location.update_query(digest=digest)) as resp:
                    await _expect(resp, 201, f"PUT {location}?digest= (no body)")
            else:
                raise ValueError(f"unknown push mode {mode}")
        seconds = time.perf_counter() - t0
        # Not timed: the blob is there, whole.
        async with s.head(f"{base}/v2/{repo}/blobs/{digest}") as resp:
            length = resp.headers.get("Content-Length")
            if resp.status != 200 or length != str(body.size):
                raise BenchError(f"HEAD {base}/v2/{repo}/blobs/{digest} after the push: {resp.status}, "
                                 f"Content-Length {length}, expected {body.size}")
            header = resp.headers.get("Docker-Content-Digest")
            if header and header != digest:
                raise BenchError(f"HEAD {base}/v2/{repo}/blobs/{digest}: Docker-Content-Digest {header}")
    return PushResult(seconds, requests, digest)


# --- curl: N concurrent whole-blob GETs -----------------------------------------------------


def concurrent_curl(url: str, clients: int, size: int, timeout: float) -> float:
    """`clients` curl processes GET `url` at once into /dev/null; aggregate bytes/s."""
    curl = shutil.which("curl")
    if curl is None:
        raise BenchError("curl is not installed")
    cmd = [curl, "-sS", "--max-time", str(int(timeout)), "-o", "/dev/null",
           "-w", "%{http_code} %{size_download}", url]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(clients)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout + 10))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    elapsed = time.perf_counter() - t0
    for p, (out, err) in zip(procs, outs, strict=True):
        code, _, got = out.strip().partition(" ")
        if p.returncode != 0 or code != "200" or int(float(got or 0)) != size:
            raise BenchError(f"curl {url}: exit {p.returncode}, status {code}, {got} of {size} bytes; {err.strip()}")
    return clients * size / elapsed


# --- wrk -------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    latency_avg: str = ""
    latency_max: str = ""
    raw: str = ""
    percentiles_ms: dict[str, float] = field(default_factory=dict)  # with latency=True: "50", "99" -> ms


_WRK_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk_ms(text: str) -> float:
    """wrk's "635.91us", "1.47ms", "2.00s" in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise BenchError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _WRK_UNITS_MS[m.group(2)]


def wrk(url: str, seconds: float, threads: int = 2, connections: int = 32,
        headers: dict[str, str] | None = None, latency: bool = False) -> WrkResult:
    """wrk against `url`; with `latency`, also its latency distribution (50/75/90/99th percentiles)."""
    exe = shutil.which("wrk")
    if exe is None:
        raise BenchError("wrk is not installed (apt-get install -y wrk)")
    cmd = [exe, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s"]
    if latency:
        cmd.append("--latency")
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    out = proc.stdout
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()} {out}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    res = WrkResult(float(rps.group(1)), int(total.group(1)), raw=out)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res.non_2xx = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res.socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
    m = re.search(r"Latency\s+(\S+)\s+\S+\s+(\S+)", out)
    if m:
        res.latency_avg, res.latency_max = m.group(1), m.group(2)
    if latency:
        for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+(?:us|ms|s|m))\s*$", out, re.M):
            res.percentiles_ms[m.group(1)] = round(wrk_ms(m.group(2)), 3)
    return res
