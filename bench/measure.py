"""The measurements themselves: clients (curl, wrk, an aiohttp puller) and /proc readings.

Nothing here starts a registry; run.py does that and hands in base URLs and pids. Every wait is
bounded: subprocesses by a timeout, HTTP by aiohttp timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import aiohttp

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


def wrk(url: str, seconds: float, threads: int = 2, connections: int = 32,
        headers: dict[str, str] | None = None) -> WrkResult:
    exe = shutil.which("wrk")
    if exe is None:
        raise BenchError("wrk is not installed (apt-get install -y wrk)")
    cmd = [exe, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s"]
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
    return res
