"""Costs that do not grow with the registry: start-up, the catalog, idle work and the operator
commands on 1,000 / 10,000 / 100,000 repositories, the code before the ledger beside the code after.

    python -m bench.scale                                  # this checkout, 1k, 10k and 100k repositories
    python -m bench.scale --quick                          # 1k and 10k
    python -m bench.scale --sizes 1000 --before /tmp/before
    python -m bench.scale --trees before=/tmp/before,after=.

`--before PATH` names a checkout of the code to compare with (without it only this checkout is
measured); make one with `git worktree add /tmp/before <commit>` (981cad9 is the commit before the
ledger; `git worktree remove /tmp/before` afterwards), or without touching the repository's worktree
list, `mkdir /tmp/before && git archive 981cad9 | tar -x -C /tmp/before`. Each tree's own `mirror`
package runs (PYTHONPATH and the working directory are the tree), under this Python. A full run takes
about 1.5 hours on a 2-core machine, most of it the code before on 100k repositories (its walks are
capped, see below) and deleting the two 100k roots (~3M inodes each).

For each size and tree, a storage root is seeded straight in registry:2's layout (through
mirror/storage/layout.py, plain os.open/os.write as tests/e2e/test_scale.py does), the same bytes and
mtimes for every tree (seeded again, deterministically, rather than copied: a 100k root is ~3M inodes
and ~12 GB of 4 KiB blocks): N repositories, one in ten private (`team/app-NNNNNN`, its `private`
marker), the rest cached (`library/img-NNNNNN`, their `cached` marker), each with tag `latest` -> an
OCI manifest -> its own config, its own layer and one of 16 shared base layers (revision link, tag
index and current links, three layer links); plus N/100 blobs nothing references (gc's work). Every
file is two days old (within proxy.ttl, older than gc's grace). The config is the embedded default's
(proxy.ttl 168h, tag_ttl 5m, cache.memory 64MiB) with that storage root, `cache.max_size: 64GiB`
(far above what is stored: eviction looks, deletes nothing) and a dead loopback upstream
(127.0.0.1:9): nothing but 127.0.0.1 is ever contacted.

Then, on each tree's own copy:
1. `mirror serve`, first start (no index or ledger yet). From the spawn: when `/v2/` answers 200, when
   `GET /v2/_catalog?n=1` first answers 200 (after: 503 until the ledger is built; before: every
   catalog request walks storage), when the web UI's list `/ui/` first shows rows; meanwhile one client
   GETs one manifest by digest every 20 ms (its worst latency; a flood would slow what it waits for).
   Settled: two 1 s windows in a row in which the server used under 5% of a core (the manifest loop
   paused for them). Then idle CPU over
   --idle-seconds (60: the code before walks storage every 45 s for the UI and every 60 s for the
   gauges, which a 20 s window can miss), RSS, then (medians of up to 20 requests in 10 s each) the
   catalog's first page and a page from the middle (`last=`), the UI's first page, a manifest by
   digest (p50 of 200), and the event loop's longest stall since start from `/metrics`
   (`mirror_event_loop_stall_max_seconds`; the code before has no probe: n/a).
2. `mirror index rebuild` (wall time, and peak RSS from /usr/bin/time's `%M`: wait4's own figure for a
   child starts at the RSS of the process that forked it, this one).
3. `mirror serve` again on the same root: when `/v2/` and the catalog answer, then checks: a pull of a
   private and a cached image (manifest by tag, every blob, digests checked) and the whole catalog
   (pages of 1,000 when paged) lists the N repositories.
4. With no server running: `mirror du`, `mirror evict --dry-run --max-size 64GiB --older-than 168h`,
   `mirror gc --dry-run` (each wall time and peak RSS; their --json results checked: du lists N
   repositories, evict would remove nothing, gc would sweep the N/100 unreferenced blobs).
A command running over --command-timeout (600 s) is killed (its own process group) and shown as
">600 s"; a start-up not settled within --settle-timeout (900 s) likewise.

Prints one table, rows = measures, columns = size x tree, then the goals at the largest size for the
`after` tree (✓/✗) and an extrapolation to 1M repositories / 10M blobs: per row, the straight line
through the two largest sizes against objects stored (repositories + blobs), evaluated at 11M (a row
that fell from one to the other is taken as flat). Goals at 100k (issue 17): start < 2 s, catalog
page < 20 ms, idle CPU < 1 %, RSS < 300 MB, du and evict --dry-run < 2 s, gc --dry-run < 30 s, loop
stalls < 50 ms, and per-request and per-page costs at 100k within 2x of 1k. Writes
bench/results/scale.json. Exit 1 when a check fails or a goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.measure import MANIFEST_ACCEPT, cpu_seconds, memory
from mirror.names import Digest
from mirror.storage import layout
from tests.support import procs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (1000, 10_000, 100_000)
QUICK = (1000, 10_000)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
SHARED_LAYERS = 16
PRIVATE_EVERY = 10
ORPHANS_PER = 100  # one unreferenced blob per this many repositories
AGE = 2 * 86400.0  # every seeded file's mtime: within proxy.ttl, older than gc's grace
CAP = "64GiB"
TTL = "168h"
DEAD_UPSTREAM = "http://127.0.0.1:9"
TIME = "/usr/bin/time"
PACE = 0.020  # seconds from one start-up manifest GET to the next: a steady client, not a flood
QUIET_CPU = 5.0  # % of one core under which a 1 s window counts as quiet
QUIET_WINDOWS = 2
SAMPLES = 20
SAMPLE_BUDGET = 10.0  # seconds of requests per measured page at most
MANIFEST_SAMPLES = 200
TARGET_OBJECTS = 1_000_000 + 10_000_000  # the extrapolation: 1M repositories, 10M blobs
MB = 1e6
ROW = re.compile(r'class="repo" href="/ui/repo/')
STALL = re.compile(r"^mirror_event_loop_stall_max_seconds (\S+)$", re.M)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the dataset ----------------------------------------------------------------------------------


def repository_name(i: int) -> str:
    return f"team/app-{i:06d}" if i % PRIVATE_EVERY == 0 else f"library/img-{i:06d}"


@dataclass
class Image:
    name: str
    manifest: str
    blobs: list[str]


@dataclass
class Dataset:
    repositories: int
    blobs: int = 0
    files: int = 0
    bytes: int = 0
    orphans: int = 0
    seconds: float = 0.0
    images: list[Image] = field(default_factory=list)  # what the checks pull: one private, one cached

    def names(self) -> list[str]:
        return sorted(repository_name(i) for i in range(self.repositories))


def objects(repositories: int) -> int:
    """Repositories + blobs `seed` writes for this many repositories."""
    return repositories + 3 * repositories + SHARED_LAYERS + repositories // ORPHANS_PER


def seed(root: Path, repositories: int, when: float) -> Dataset:
    """The storage root described in the module docstring; the same files, bytes and mtimes for the
    same arguments."""
    t0 = time.perf_counter()
    data = Dataset(repositories)
    made: set[str] = set()

    def write(key: str, body: bytes) -> None:
        path = os.path.join(root, key)
        parent = os.path.dirname(path)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
            os.utime(fd, (when, when))
        finally:
            os.close(fd)
        data.files += 1

    def blob(body: bytes) -> Digest:
        d = Digest("sha256", hashlib.sha256(body).hexdigest())
        write(layout.blob(d), body)
        data.blobs += 1
        data.bytes += len(body)
        return d

    base_bodies = [b"base layer %d\n" % k * 80 for k in range(SHARED_LAYERS)]
    base = [blob(b) for b in base_bodies]
    for i in range(repositories):
        name = repository_name(i)
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": [f"N={i}"]},
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        own = b"layer %d\n" % i * (8 + i % 64)
        c, layer = blob(config), blob(own)
        shared = i % SHARED_LAYERS
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": str(c), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": str(base[shared]), "size": len(base_bodies[shared])},
                       {"mediaType": OCI_LAYER, "digest": str(layer), "size": len(own)}]}).encode()
        m = blob(manifest)
        for d in (c, base[shared], layer):
            write(layout.layer(name, d), layout.link(d))
        write(layout.revision(name, m), layout.link(m))
        for key, body in layout.tag_links(name, "latest", m):
            write(key, body)
        write(layout.marker(name, layout.PRIVATE_MARK if i % PRIVATE_EVERY == 0 else layout.CACHED_MARK), b"")
        if i in (0, repositories - 1):  # private (0) and cached (the last)
            data.images.append(Image(name, str(m), [str(c), str(base[shared]), str(layer)]))
    data.orphans = repositories // ORPHANS_PER
    for k in range(data.orphans):
        blob(b"nothing references this blob %d\n" % k)
    data.seconds = round(time.perf_counter() - t0, 1)
    return data


# --- processes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    label: str
    path: Path


def tree_env(tree: Tree) -> dict[str, str]:
    """The tree's own `mirror` first on the path; REGISTRY_* from our environment would override the config."""
    env = procs.client_env({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree.path)})
    return {k: v for k, v in env.items() if not k.startswith("REGISTRY_")}


def write_config(path: Path, root: Path, port: int) -> Path:
    """The embedded default's keys, with this storage root, a cap far above what is stored and a dead
    loopback upstream (JSON is YAML)."""
    config = {"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
              "http": {"addr": f"127.0.0.1:{port}"},
              "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": False}},
              "proxy": {"remoteurl": DEAD_UPSTREAM, "ttl": TTL, "tag_ttl": "5m"},
              "cache": {"memory": "64MiB", "max_size": CAP}}
    path.write_text(json.dumps(config, indent=2))
    return path


@dataclass
class Value:
    """One cell: a number in the row's unit, or why there is none."""

    value: float | None = None
    over: bool = False  # `value` is a bound the measure ran past (a timeout)
    error: str = ""


@dataclass
class CommandRun:
    seconds: float
    rss_mb: float | None
    rc: int | None
    timed_out: bool
    result: Any = None  # its --json output
    stderr: str = ""


def run_command(tree: Tree, args: list[str], config: Path, work: Path, timeout: float) -> CommandRun:
    """`python -m mirror <args> --config <config> --json` in the tree, timed; its peak RSS from /usr/bin/time
    (`%M`). Past `timeout` its process group (its own session) is killed."""
    name = "-".join(a for a in args if not a.startswith("-"))
    out, err, rss = work / f"{name}.stdout", work / f"{name}.stderr", work / f"{name}.rss"
    argv = [sys.executable, "-m", "mirror", *args, "--config", str(config), "--json"]
    if os.access(TIME, os.X_OK):  # its child's peak: ours (wait4's) starts at this process's own RSS at fork
        argv = [TIME, "-f", "%M", "-o", str(rss), *argv]
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, cwd=tree.path,
                             env=tree_env(tree), start_new_session=True)
        timed_out = False
        status, usage = 0, None
        try:
            while True:
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid == p.pid:
                    break
                if time.perf_counter() - t0 > timeout:
                    timed_out = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    _, status, usage = os.wait4(p.pid, 0)
                    break
                time.sleep(0.02)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.wait4(p.pid, 0)
            raise
        finally:
            p.returncode = -1  # reaped here, not by Popen
        seconds = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status) if not timed_out else None
    result = None
    with contextlib.suppress(ValueError, OSError):
        result = json.loads(out.read_text())
    peak = None
    with contextlib.suppress(ValueError, OSError, IndexError):
        peak = int(rss.read_text().split()[-1]) * 1024 / MB  # KiB
    if peak is None and usage is not None and argv[0] != TIME:
        peak = usage.ru_maxrss * 1024 / MB  # an upper bound: see above
    return CommandRun(round(seconds, 3), round(peak, 1) if peak else None, rc, timed_out, result,
                      err.read_text(errors="replace")[-2000:])


def serve_proc(tree: Tree, config: Path, work: Path, name: str) -> procs.Proc:
    argv = [sys.executable, "-m", "mirror", "serve", "--config", str(config)]
    return procs.Proc(name, argv, work, env=tree_env(tree), cwd=tree.path)


# --- HTTP -----------------------------------------------------------------------------------------


async def fetch(s: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
                ) -> tuple[int, bytes, float, dict[str, str]]:
    t0 = time.perf_counter()
    async with s.get(url, headers=headers) as r:
        body = await r.read()
        return r.status, body, time.perf_counter() - t0, dict(r.headers)


async def until(s: aiohttp.ClientSession, url: str, ok: Callable[[int, bytes], bool], t0: float, deadline: float,
                proc: procs.Proc) -> Value:
    """Seconds from t0 until a GET of `url` answers as `ok` says (polled every 50 ms after each answer)."""
    while time.perf_counter() < deadline and proc.running:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            status, body, _, _ = await fetch(s, url)
            if ok(status, body):
                return Value(round(time.perf_counter() - t0, 3))
        await asyncio.sleep(0.05)
    if not proc.running:
        return Value(error="the server exited")
    return Value(round(deadline - t0), over=True)


async def sampled(s: aiohttp.ClientSession, url: str, check: Callable[[int, bytes], str], samples: int = SAMPLES,
                  budget: float = SAMPLE_BUDGET) -> Value:
    """Median milliseconds of up to `samples` GETs (after one to warm, unless it took over a second), within
    `budget` seconds; `check` returns what is wrong with an answer ('' if nothing)."""
    times: list[float] = []
    t0 = time.perf_counter()
    try:
        status, body, seconds, _ = await fetch(s, url)
        problem = check(status, body)
        if seconds > 1.0:  # a page that walks storage: nothing to warm, and the budget allows few
            times.append(seconds)
        while not problem and len(times) < samples and time.perf_counter() - t0 < budget:
            status, body, seconds, _ = await fetch(s, url)
            problem = check(status, body)
            times.append(seconds)
    except (aiohttp.ClientError, TimeoutError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        return Value(error=problem)
    return Value(round(statistics.median(times) * 1000, 2)) if times else Value(error="no sample in budget")


def manifest_url(base: str, image: Image) -> str:
    return f"{base}/v2/{image.name}/manifests/{image.manifest}"


def manifest_problem(image: Image) -> Callable[[int, bytes], str]:
    def check(status: int, body: bytes) -> str:
        if status != 200:
            return f"manifest {image.name}@{image.manifest}: {status}"
        if "sha256:" + hashlib.sha256(body).hexdigest() != image.manifest:
            return f"manifest {image.name}@{image.manifest}: the body hashes to something else"
        return ""

    return check


def catalog_page(expected: list[str]) -> Callable[[int, bytes], str]:
    def check(status: int, body: bytes) -> str:
        if status != 200:
            return f"catalog {status}" + (" (ledger not ready)" if status == 503 else "")
        got = json.loads(body).get("repositories")
        return "" if got == expected else f"catalog page: {len(got or [])} names, not the {len(expected)} expected"

    return check


def ui_rows(status: int, body: bytes) -> str:
    rows = len(ROW.findall(body.decode(errors="replace")))
    return "" if status == 200 and rows == 50 else f"/ui/: status {status}, {rows} rows"


async def first_start(proc: procs.Proc, base: str, data: Dataset, limit: float, idle: float) -> dict[str, Value]:
    """Step 1 of the module docstring."""
    out: dict[str, Value] = {}
    names = data.names()
    middle = len(names) // 2
    hammered = data.images[0]
    timeout = aiohttp.ClientTimeout(total=120, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=8)) as s:
        t0 = time.perf_counter()
        deadline = t0 + limit
        proc.start()
        pid = proc.pid
        assert pid is not None
        settled, hold = asyncio.Event(), asyncio.Event()
        latencies: list[float] = []
        errors: list[str] = []
        check = manifest_problem(hammered)

        async def hammer() -> None:
            while not settled.is_set() and time.perf_counter() < deadline and proc.running:
                if hold.is_set():
                    await asyncio.sleep(0.02)
                    continue
                t = time.perf_counter()
                try:
                    status, body, seconds, _ = await fetch(s, manifest_url(base, hammered),
                                                           {"Accept": MANIFEST_ACCEPT})
                except aiohttp.ClientConnectorError:  # not listening yet: not a sample
                    await asyncio.sleep(0.005)
                    continue
                except (aiohttp.ClientError, TimeoutError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    seconds, status, body = time.perf_counter() - t, 0, b""
                latencies.append(seconds)
                if status and (problem := check(status, body)):
                    errors.append(problem)
                await asyncio.sleep(max(0.0, t + PACE - time.perf_counter()))

        loop = asyncio.create_task(hammer())
        try:  # /proc reads of a server that died raise OSError: its cells say so (below)
            v2, catalog, ui = await asyncio.gather(
                until(s, f"{base}/v2/", lambda st, _: st == 200, t0, deadline, proc),
                until(s, f"{base}/v2/_catalog?n=1", lambda st, _: st == 200, t0, deadline, proc),
                until(s, f"{base}/ui/", lambda st, b: st == 200 and ROW.search(b.decode(errors="replace")) is not None,
                      t0, deadline, proc))
            out.update(start=v2, catalog_ready=catalog, ui_ready=ui)
            quiet, quiet_since = 0, 0.0
            while time.perf_counter() < deadline and proc.running and quiet < QUIET_WINDOWS:
                hold.set()
                await asyncio.sleep(0.05)  # the request in flight ends
                w0, c0 = time.perf_counter(), cpu_seconds(pid)
                await asyncio.sleep(1.0)
                share = (cpu_seconds(pid) - c0) / (time.perf_counter() - w0) * 100
                if share < QUIET_CPU:
                    quiet_since = quiet_since if quiet else w0
                    quiet += 1
                    continue
                quiet = 0
                hold.clear()
                await asyncio.sleep(2.0)
            out["settled"] = Value(round(quiet_since - t0, 1)) if quiet >= QUIET_WINDOWS else \
                Value(round(limit), over=True) if proc.running else Value(error="the server exited")
        finally:
            settled.set()
            await loop
        out["startup_manifest_worst"] = Value(round(max(latencies) * 1000, 1)) if latencies else \
            Value(error="no manifest answered")
        if errors:
            out["startup_manifest_worst"].error = f"{len(errors)} failed: {errors[0]}"
        if not proc.running:
            return out
        c0, w0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(idle)
        out["idle_cpu"] = Value(round((cpu_seconds(pid) - c0) / (time.perf_counter() - w0) * 100, 2))
        mem = memory(pid)
        out["serve_rss"] = Value(round(mem["VmRSS"] * 1048576 / MB, 1))
        out["serve_peak_rss"] = Value(round(mem["VmHWM"] * 1048576 / MB, 1))
        out["catalog_first"] = await sampled(s, f"{base}/v2/_catalog?n=100", catalog_page(names[:100]))
        out["catalog_middle"] = await sampled(s, f"{base}/v2/_catalog?n=100&last={names[middle]}",
                                              catalog_page(names[middle + 1:middle + 101]))
        out["ui_page"] = await sampled(s, f"{base}/ui/", ui_rows)
        out["manifest_settled"] = await sampled(s, manifest_url(base, hammered), check, MANIFEST_SAMPLES,
                                                SAMPLE_BUDGET * 3)
        stall = None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            status, body, _, _ = await fetch(s, f"{base}/metrics")
            stall = STALL.search(body.decode(errors="replace")) if status == 200 else None
        out["loop_stall"] = Value(round(float(stall.group(1)) * 1000, 1)) if stall else Value(error="n/a")
    return out


async def first_start_or_exit(proc: procs.Proc, base: str, data: Dataset, limit: float, idle: float
                              ) -> dict[str, Value]:
    try:
        return await first_start(proc, base, data, limit, idle)
    except OSError as e:  # /proc/<pid> gone: the server exited under us
        return {"start": Value(error=f"the server exited ({e})")}


async def pull(s: aiohttp.ClientSession, base: str, image: Image) -> str:
    """What is wrong with a pull of `image` by tag ('' if nothing)."""
    status, body, _, headers = await fetch(s, f"{base}/v2/{image.name}/manifests/latest", {"Accept": MANIFEST_ACCEPT})
    if status != 200:
        return f"{image.name}:latest: {status} {body[:200]!r}"
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if digest != image.manifest or headers.get("Docker-Content-Digest", digest) != digest:
        return f"{image.name}:latest: manifest {digest}, not {image.manifest}"
    listed = json.loads(body)
    if [listed["config"]["digest"], *(d["digest"] for d in listed["layers"])] != image.blobs:
        return f"{image.name}:latest: the manifest lists other blobs"
    for blob in image.blobs:
        status, body, _, _ = await fetch(s, f"{base}/v2/{image.name}/blobs/{blob}")
        if status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != blob:
            return f"{image.name} blob {blob}: {status}, {len(body)} bytes"
    return ""


async def whole_catalog(s: aiohttp.ClientSession, base: str, deadline: float) -> list[str]:
    """Every name `_catalog` lists: one answer where it is not paged (the code before), else pages of 1,000."""
    status, body, _, headers = await fetch(s, f"{base}/v2/_catalog")
    if status != 200:
        raise RuntimeError(f"_catalog: {status} {body[:200]!r}")
    if "Link" not in headers:
        return list(json.loads(body)["repositories"])
    names: list[str] = []
    url = f"{base}/v2/_catalog?n=1000"
    while url:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"_catalog: still paging after {len(names)} names")
        status, body, _, headers = await fetch(s, url)
        if status != 200:
            raise RuntimeError(f"{url}: {status} {body[:200]!r}")
        names += json.loads(body)["repositories"]
        link = re.match(r"<([^>]+)>", headers.get("Link", ""))
        url = f"{base}{link.group(1)}" if link else ""
    return names


async def restart(proc: procs.Proc, base: str, data: Dataset, limit: float, checks: list[str]) -> dict[str, Value]:
    """Step 3 of the module docstring: the times, and what the checks found wrong into `checks`."""
    timeout = aiohttp.ClientTimeout(total=300, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        t0 = time.perf_counter()
        deadline = t0 + limit
        proc.start()
        out = {"restart": await until(s, f"{base}/v2/", lambda st, _: st == 200, t0, deadline, proc),
               "restart_catalog": await until(s, f"{base}/v2/_catalog?n=1", lambda st, _: st == 200, t0, deadline,
                                              proc)}
        if not proc.running:
            checks.append("the restarted server exited")
            return out
        try:
            for image in data.images:
                if problem := await pull(s, base, image):
                    checks.append(f"pull: {problem}")
            names = await whole_catalog(s, base, deadline)
            if names != data.names():
                checks.append(f"_catalog lists {len(names)} repositories, not the {data.repositories} seeded")
        except (RuntimeError, aiohttp.ClientError, TimeoutError) as e:
            checks.append(f"_catalog: {e}")
    return out


# --- one tree on one size -------------------------------------------------------------------------


def command_checks(name: str, run: CommandRun, data: Dataset) -> list[str]:
    if run.timed_out:
        return [f"{name}: killed after {run.seconds:.0f}s"]
    if run.rc != 0 or not isinstance(run.result, dict):
        return [f"{name}: exit {run.rc}: {run.stderr.strip()[-500:]}"]
    r = run.result
    if name == "index rebuild" and r.get("blobs") != data.blobs:
        return [f"index rebuild: {r.get('blobs')} blobs, not the {data.blobs} seeded"]
    if name == "du" and len(r.get("repositories", [])) != data.repositories:
        return [f"du: {len(r.get('repositories', []))} repositories, not {data.repositories}"]
    if name == "evict --dry-run" and r.get("evicted"):
        return [f"evict --dry-run: would evict {len(r['evicted'])} objects (none expected)"]
    if name == "gc --dry-run" and len(r.get("swept", [])) != data.orphans:
        return [f"gc --dry-run: would sweep {len(r.get('swept', []))} blobs, not the {data.orphans} unreferenced"]
    return []


def command_values(key: str, run: CommandRun, timeout: float) -> dict[str, Value]:
    if run.timed_out:
        return {key: Value(round(timeout), over=True), f"{key}_rss": Value(run.rss_mb)}
    error = "" if run.rc == 0 else f"exit {run.rc}"
    return {key: Value(round(run.seconds, 2), error=error), f"{key}_rss": Value(run.rss_mb, error=error)}


COMMANDS = (("du", ["du"], "du"), ("evict", ["evict", "--dry-run", "--max-size", CAP, "--older-than", TTL],
                                   "evict --dry-run"), ("gc", ["gc", "--dry-run"], "gc --dry-run"))


def measure_tree(tree: Tree, size: int, work: Path, when: float, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    root = work / "data"
    data = seed(root, size, when)
    synced = time.perf_counter()
    os.sync()  # the seed's writeback is over before anything is measured
    log(f"{tree.label} {size:,}: seeded {data.files:,} files ({data.blobs:,} blobs) in {data.seconds}s, synced in "
        f"{time.perf_counter() - synced:.0f}s")
    port = procs.free_port()
    config = write_config(work / "config.json", root, port)
    base = f"http://127.0.0.1:{port}"
    values: dict[str, Value] = {}
    checks: list[str] = []
    load = os.getloadavg()[0]

    proc = serve_proc(tree, config, work, "serve-first")
    try:
        values.update(asyncio.run(first_start_or_exit(proc, base, data, args.settle_timeout, args.idle_seconds)))
    finally:
        proc.stop(60)
    lines = read_json_lines(proc.stdout_path)
    problems = [json.dumps(e)[:300] for e in lines if e.get("level") in ("error", "critical")]
    said = [f"{e.get('time', '')} {e.get('logger', '')}: {e.get('msg', '')}"[:300] for e in lines
            if "msg" in e and "method" not in e][:30]  # what the first start said (not the access log)
    checks += [f"serve (first start) logged: {p}" for p in problems[:3]]
    checks += [f"first start: {k}: {v.error}" for k, v in values.items() if v.error and k != "loop_stall"]
    log(f"{tree.label} {size:,}: first start " + ", ".join(f"{k} {fmt_value(v)}" for k, v in values.items()))

    rebuilt = run_command(tree, ["index", "rebuild"], config, work, args.command_timeout)
    values.update(command_values("rebuild", rebuilt, args.command_timeout))
    checks += command_checks("index rebuild", rebuilt, data)
    log(f"{tree.label} {size:,}: index rebuild {rebuilt.seconds:.1f}s, peak RSS {rebuilt.rss_mb} MB")

    proc = serve_proc(tree, config, work, "serve-again")
    try:
        values.update(asyncio.run(restart(proc, base, data, args.settle_timeout, checks)))
    finally:
        proc.stop(60)
    log(f"{tree.label} {size:,}: restart {fmt_value(values['restart'])}, catalog "
        f"{fmt_value(values['restart_catalog'])}; checks so far: {checks or 'all passed'}")

    for key, argv, name in COMMANDS:
        run = run_command(tree, argv, config, work, args.command_timeout)
        values.update(command_values(key, run, args.command_timeout))
        checks += command_checks(name, run, data)
        log(f"{tree.label} {size:,}: {name} {run.seconds:.1f}s, peak RSS {run.rss_mb} MB, exit {run.rc}")
    return {"tree": tree.label, "path": str(tree.path), "repositories": size, "loadavg_at_start": round(load, 2),
            "seconds": round(time.perf_counter() - t0), "first_start_log": said,
            "dataset": {k: v for k, v in asdict(data).items() if k != "images"},
            "values": {k: asdict(v) for k, v in values.items()}, "checks": checks}


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    out.append(entry)
    return out


def remove(path: Path) -> None:
    """rm -rf: millions of small files go faster than shutil.rmtree."""
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, timeout=1800)
        os.sync()  # nor the deletion's


# --- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str  # s, ms, %, MB
    goal: float | None = None  # the value at the largest size must be below this
    flat: bool = False  # per-request or per-page: at the largest size within 2x of the smallest


ROWS = (
    Row("start", "start → `/v2/` answers", "s", 2.0),
    Row("catalog_ready", "start → `_catalog` answers 200 (ledger ready)", "s"),
    Row("ui_ready", "start → first UI catalog (`/ui/` rows)", "s"),
    Row("startup_manifest_worst", "manifest GET during start-up, worst", "ms"),
    Row("settled", "start → settled (CPU < 5% for 2 s)", "s"),
    Row("catalog_first", "`GET /v2/_catalog?n=100`, first page", "ms", 20.0, True),
    Row("catalog_middle", "`GET /v2/_catalog?n=100&last=` (middle)", "ms", 20.0, True),
    Row("ui_page", "UI list `/ui/`, settled", "ms", None, True),
    Row("manifest_settled", "manifest GET by digest, settled (median)", "ms", None, True),
    Row("idle_cpu", "idle CPU of `serve` (after settle)", "%", 1.0),
    Row("serve_rss", "`serve` RSS after settle", "MB", 300.0),
    Row("loop_stall", "event loop stall, max since start (`/metrics`)", "ms", 50.0),
    Row("rebuild", "`index rebuild`", "s"),
    Row("rebuild_rss", "`index rebuild` peak RSS", "MB"),
    Row("restart", "restart → `/v2/` answers", "s"),
    Row("restart_catalog", "restart → `_catalog` answers 200", "s"),
    Row("du", "`du`", "s", 2.0),
    Row("du_rss", "`du` peak RSS", "MB"),
    Row("evict", "`evict --dry-run`", "s", 2.0),
    Row("evict_rss", "`evict --dry-run` peak RSS", "MB"),
    Row("gc", "`gc --dry-run`", "s", 30.0),
    Row("gc_rss", "`gc --dry-run` peak RSS", "MB"),
)


def number(x: float, unit: str) -> str:
    if unit == "s":
        return f"{x:.2f} s" if x < 10 else f"{x:,.0f} s" if x >= 100 else f"{x:.1f} s"
    if unit == "ms":
        return f"{x:.1f} ms" if x < 100 else f"{x:,.0f} ms"
    if unit == "%":
        return f"{x:.2f} %" if x < 10 else f"{x:.0f} %"
    return f"{x:,.0f} {unit}"


def fmt_value(v: Value, unit: str = "") -> str:
    if v.value is None:
        return (v.error or "n/a")[:40]
    text = (">" if v.over else "") + (number(v.value, unit) if unit else str(v.value))
    return f"{text} ({v.error})" if v.error else text


def short(size: int) -> str:
    return f"{size // 1_000_000}M" if size >= 1_000_000 and size % 1_000_000 == 0 else \
        f"{size // 1000}k" if size >= 1000 and size % 1000 == 0 else str(size)


def extrapolate(points: list[tuple[int, Value]]) -> Value:
    """The line through the two largest sizes (x = objects stored), at TARGET_OBJECTS; flat when it fell."""
    if len(points) < 2:
        return Value(error="n/a")
    (x1, a), (x2, b) = points[-2], points[-1]
    if a.value is None or b.value is None:
        return Value(error="n/a")
    slope = max(0.0, (b.value - a.value) / (x2 - x1))
    return Value(round(b.value + slope * (TARGET_OBJECTS - x2), 3), over=a.over or b.over)


def goal_of(row: Row, smallest: str) -> str:
    parts = []
    if row.goal is not None:
        parts.append(f"< {number(row.goal, row.unit)}")
    if row.flat:
        parts.append(f"≤ 2x {smallest}")
    return "; ".join(parts)


def met(row: Row, value: Value, base: Value | None) -> bool | None:
    """Whether `value` (the largest size) meets the row's goals; None when the row has none."""
    if row.goal is None and not row.flat:
        return None
    if value.value is None or value.over or value.error:
        return False
    ok = row.goal is None or value.value < row.goal
    if row.flat and base is not None and base.value is not None and base.value > 0:
        ok = ok and value.value <= 2 * base.value
    return ok


def table(results: list[dict[str, Any]], sizes: list[int], trees: list[Tree]) -> tuple[str, dict[str, Any]]:
    cell: dict[tuple[int, str], dict[str, Value]] = {
        (r["repositories"], r["tree"]): {k: Value(**v) for k, v in r["values"].items()} for r in results}
    judged = "after" if any(t.label == "after" for t in trees) else trees[-1].label
    largest, smallest = short(sizes[-1]), short(sizes[0])
    head = [f"{short(n)} {t.label}" for n in sizes for t in trees]
    head += [f"goal @{largest} ({judged})", "met", *(f"~1M repos/10M blobs {t.label}" for t in trees)]
    lines = ["| measure | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    goals: dict[str, Any] = {}
    extrapolated: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        cells = [fmt_value(cell.get((n, t.label), {}).get(row.key, Value(error="-")), row.unit)
                 for n in sizes for t in trees]
        outcome = met(row, cell.get((sizes[-1], judged), {}).get(row.key, Value()),
                      cell.get((sizes[0], judged), {}).get(row.key) if len(sizes) > 1 else None)
        if outcome is not None:
            goals[row.key] = {"goal": goal_of(row, smallest), "met": outcome}
        cells += [goal_of(row, smallest), "" if outcome is None else "✓" if outcome else "✗"]
        for t in trees:
            points = [(objects(n), cell[(n, t.label)].get(row.key, Value())) for n in sizes if (n, t.label) in cell]
            e = extrapolate(points)
            extrapolated.setdefault(row.key, {})[t.label] = asdict(e)
            cells.append(fmt_value(e, row.unit))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines), {"goals": goals, "extrapolated": extrapolated, "judged": judged}


# --- main -----------------------------------------------------------------------------------------


def parse_trees(args: argparse.Namespace) -> list[Tree]:
    if args.trees:
        trees = []
        for part in args.trees.split(","):
            label, _, path = part.partition("=")
            trees.append(Tree(label.strip(), Path(path.strip() or ".").resolve()))
    else:
        trees = ([Tree("before", Path(args.before).resolve())] if args.before else []) + [Tree("after", ROOT)]
    for t in trees:
        if not (t.path / "mirror" / "__init__.py").is_file():
            raise SystemExit(f"{t.label}={t.path}: no mirror package there")
    return trees


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="repositories per dataset, comma-separated (default 1000,10000,100000)")
    parser.add_argument("--quick", action="store_true", help="1000,10000")
    parser.add_argument("--before", help="a checkout of the code to compare with (git worktree add PATH COMMIT)")
    parser.add_argument("--trees", help="label=path,... instead of --before (default: after=this checkout)")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--settle-timeout", type=float, default=900.0)
    parser.add_argument("--command-timeout", type=float, default=600.0)
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the storage roots go (deleted after)")
    args = parser.parse_args(argv)
    sizes = sorted(int(x) for x in args.sizes.split(",")) if args.sizes else list(QUICK if args.quick else SIZES)
    trees = parse_trees(args)
    when = float(int(time.time() - AGE))

    def stopped(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # the finally blocks stop the servers and delete the data

    signal.signal(signal.SIGTERM, stopped)
    results: list[dict[str, Any]] = []
    base = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir))
    t0 = time.perf_counter()
    try:
        for size in sizes:
            for tree in trees:
                work = base / f"{size}-{tree.label}"
                work.mkdir()
                try:
                    results.append(measure_tree(tree, size, work, when, args))
                except Exception as e:  # one tree's failure is its cells, not the run's end
                    log(f"{tree.label} {size:,}: failed: {e!r}")
                    results.append({"tree": tree.label, "path": str(tree.path), "repositories": size, "values": {},
                                    "checks": [f"the measurement failed: {e!r}"[:500]]})
                finally:
                    remove(work)
                save(results, sizes, trees, time.perf_counter() - t0, complete=False)  # kept if we are stopped
    finally:
        remove(base)
    text, summary, failed, missed = save(results, sizes, trees, time.perf_counter() - t0, complete=True)
    data = next((r["dataset"] for r in reversed(results) if "dataset" in r),
                {"repositories": 0, "files": 0, "blobs": 0})
    print(f"\nmirror at scale: {', '.join(short(n) for n in sizes)} repositories "
          f"({data['repositories']:,} repositories: {data['files']:,} files, {data['blobs']:,} blobs), trees "
          + ", ".join(f"{t.label}={t.path}" for t in trees) + f"; {time.perf_counter() - t0:.0f}s in all\n")
    print(text)
    print(f"\ngoals at {short(sizes[-1])} ({summary['judged']}): "
          + (f"missed {', '.join(missed)}" if missed else "all met")
          + f"; extrapolation: per row, the line through {short(sizes[-2]) if len(sizes) > 1 else '-'} and "
          f"{short(sizes[-1])} against objects stored (repositories + blobs), at 1M + 10M")
    print("checks: " + ("all passed" if not failed else "FAILED\n  " + "\n  ".join(failed)))
    return 1 if failed or missed else 0


def save(results: list[dict[str, Any]], sizes: list[int], trees: list[Tree], seconds: float, complete: bool
         ) -> tuple[str, dict[str, Any], list[str], list[str]]:
    """bench/results/scale.json from what was measured so far: the table, the goals missed, the checks failed."""
    done = [n for n in sizes if any(r["repositories"] == n for r in results)]
    text, summary = table(results, done, trees)
    failed = [f"{r['tree']} {short(r['repositories'])}: {c}" for r in results for c in r["checks"]]
    missed = [k for k, g in summary["goals"].items() if not g["met"]]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps({
        "complete": complete, "sizes": sizes, "trees": {t.label: str(t.path) for t in trees}, "results": results,
        **summary, "checks_failed": failed, "seconds": round(seconds),
        "bench_peak_rss_mb": round(usage.ru_maxrss * 1024 / MB), "rows": [asdict(r) for r in ROWS], "table": text},
        indent=2))
    return text, summary, failed, missed


if __name__ == "__main__":
    sys.exit(main())
