"""mirror against CNCF distribution (proxy mode), both in front of one local upstream.

    python -m bench.run            # the full run, a few minutes
    python -m bench.run --quick    # a smoke test: 256 MiB blob, 3 s wrk, 2 rounds (1 for pushes)

Measures warm blob throughput (N curls at once), warm manifest GETs (wrk, by digest and by tag),
the cold pull of a ~200 MiB image against the same pull straight from the upstream, the memory
of each proxy process, and push throughput of a big blob (monolithic and chunked). Prints one
table, writes bench/results/latest.json (all samples, CPU seconds each server spent, versions).
Only 127.0.0.1 is ever contacted.

Columns: "mirror" and "distribution" are the two proxies (distribution 2.8 with `proxy.remoteurl`),
both in front of one upstream distribution; "direct" is the same client against that upstream
with no proxy (a reference for every row, and the bound of the cold-pull goal). Warm blob and
cold pull are the best of --rounds; "cold blob" is the single first GET of the big blob through
each proxy (one sample). Every byte a pull or a first GET receives is checked against its digest.
Note that on a tag GET distribution's proxy asks the upstream every time, mirror only after its
tag_ttl (5m default), so "by tag" compares two different policies.

Push rows: distribution refuses pushes in proxy mode, so they compare a fresh mirror (the same
config as the others, with `private.patterns: ["bench/**"]`) against a fresh plain distribution
(own storage), both pushed `bench/push` blobs of --push-mib seeded pseudo-random bytes streamed
from a generator (bench.measure.PushBody), a new blob every push. MB/s is the blob size over the
first request sent .. the final 201; best of --push-rounds. Monolithic is one request with the
whole blob where the registry takes it (`POST ?digest=`, 201); distribution 2.8 ignores a POST
body, so it gets the spec's other single-request form, `POST` (202) then one `PUT ?digest=` with
the body (which form each took is probed with a tiny blob and printed under the table). Chunked
is `POST`, `PATCH`es of --push-chunk-mib with Content-Range, then `PUT ?digest=` with no body.
Every push is checked by a HEAD of the blob (200, the right Content-Length), then its file is
deleted from the target's storage and the page cache written out (`sync`) before the next push,
so each push starts from the same memory and no push's writeback lands in another.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import measure
from bench.measure import MANIFEST_ACCEPT, BenchError, CpuMeter
from bench.seed import push_big_blob_image

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
NOISY = 0.10  # share of the machine's CPU taken by others (or the hypervisor) worth a warning
MiB = 1 << 20
MB = 1_000_000

GOALS = {  # metric -> (ratio it is judged on, comparison, bound)
    "warm_blob": ("mirror/distribution", ">=", 1.2),
    "manifest_digest": ("mirror/distribution", ">=", 1.0),
    "manifest_tag": ("mirror/distribution", ">=", 1.0),
    "cold_pull": ("mirror/direct", "<=", 1.1),
}


@dataclass(frozen=True)
class Params:
    quick: bool
    blob_mib: int
    clients: int
    rounds: int  # best-of for warm blob and cold pull
    wrk_seconds: float
    wrk_threads: int
    wrk_connections: int
    pull_concurrency: int
    push_mib: int
    push_rounds: int  # best-of for pushes
    push_chunk_mib: int


def params(args: argparse.Namespace) -> Params:
    q = args.quick
    return Params(
        quick=q,
        blob_mib=args.blob_mib or (256 if q else 1024),
        clients=args.clients,
        rounds=args.rounds or (2 if q else 3),
        wrk_seconds=args.wrk_seconds or (3 if q else 10),
        wrk_threads=2,
        wrk_connections=32,
        pull_concurrency=3,
        push_mib=args.push_mib or (256 if q else 1024),
        push_rounds=args.push_rounds or (1 if q else 2),
        push_chunk_mib=args.push_chunk_mib,
    )


# --- the processes ------------------------------------------------------------------------------
# Starting registries and building the ~200 MiB image: tests/support (the e2e tests' helpers).

from tests.support import images as support_images  # noqa: E402
from tests.support import procs  # noqa: E402

QUIET = {"level": "warn", "accesslog": {"disabled": True}}
PUSH_REPO = "bench/push"  # private on the mirror: every config has private.patterns ["bench/**"]


class Proxy:
    """One running proxy (a tests.support Mirror or Distribution) and where it keeps blobs."""

    def __init__(self, kind: str, handle: procs.Mirror | procs.Distribution, peak_row: bool = True) -> None:
        self.kind = kind
        self.peak_row = peak_row  # its VmHWM counts in the "peak RSS" row (not the push targets)
        self.handle = handle
        self.url = handle.url
        assert handle.proc.pid is not None
        self.pid = handle.proc.pid

    def stored_size(self, digest: str) -> int | None:
        """Size of the blob in the proxy's storage (None: not there)."""
        if isinstance(self.handle, procs.Mirror):
            hexpart = digest.split(":", 1)[1]
            files = [f for f in self.handle.blob_files() if hexpart in f.as_posix()]
        else:
            files = [self.handle.blob_path(digest)]
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                return f.stat().st_size
        return None

    def memory(self) -> dict[str, float]:
        return measure.memory(self.pid)

    def drop_blob(self, digest: str) -> int:
        """Unlink the blob's file(s) in the process's storage behind its back (the push targets
        only: nothing reads the blob again, the process is thrown away). Returns bytes freed."""
        if isinstance(self.handle, procs.Mirror):
            hexpart = digest.split(":", 1)[1]
            files = [f for f in self.handle.blob_files() if hexpart in f.as_posix()]
        else:
            files = [self.handle.blob_path(digest)]
        freed = 0
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                freed += f.stat().st_size
                f.unlink()
        return freed

    def log_problems(self) -> list[str]:
        """Lines of its own logs at warning level or above (both log at warn: nothing else shows)."""
        out = []
        for path in (self.handle.proc.stdout_path, self.handle.proc.stderr_path):
            with contextlib.suppress(OSError):
                out += [line[:300] for line in path.read_text(errors="replace").splitlines() if line.strip()]
        # distribution always warns about these two at start; they say nothing about the run.
        noise = ("No HTTP secret provided", "does not implement RempositoryRemover")
        return [line for line in out if not any(n in line for n in noise)]


class Bench:
    big: measure.Image  # set by seed()
    huge_layer: str

    def __init__(self, p: Params, work: Path) -> None:
        self.p = p
        self.work = work
        self.started: list[Proxy] = []
        self.peak: dict[str, float] = {"mirror": 0.0, "distribution": 0.0}
        self.problems: dict[str, list[str]] = {"mirror": [], "distribution": []}
        self.instances = 0
        self.upstream_handle: procs.Distribution | None = None

    def start_upstream(self) -> None:
        self.upstream_handle = procs.start_distribution(self.work / "upstream", {"log": QUIET},
                                                        name="upstream")
        self.upstream = self.upstream_handle.url

    def start_proxy(self, kind: str) -> Proxy:
        """A new process with empty storage."""
        self.instances += 1
        where = self.work / f"{kind}-{self.instances}"
        handle: procs.Mirror | procs.Distribution
        if kind == "mirror":
            handle = procs.start_mirror(where, {"version": 0.1, "log": QUIET,
                                                "proxy": {"remoteurl": self.upstream},
                                                "private": {"patterns": ["bench/**"]}})
        else:
            handle = procs.start_distribution(where, {"log": QUIET, "proxy": {"remoteurl": self.upstream}},
                                              name="distribution-proxy")
        proxy = Proxy(kind, handle)
        self.started.append(proxy)
        return proxy

    def start_push_target(self, kind: str) -> Proxy:
        """A new process with empty storage that takes pushes to PUSH_REPO: a mirror as
        start_proxy starts it, or a plain distribution (its proxy mode refuses pushes)."""
        if kind == "mirror":
            target = self.start_proxy("mirror")
            target.peak_row = False
            return target
        self.instances += 1
        handle = procs.start_distribution(self.work / f"{kind}-push-{self.instances}", {"log": QUIET},
                                          name="distribution-push")
        target = Proxy(kind, handle, peak_row=False)
        self.started.append(target)
        return target

    def stop_proxy(self, proxy: Proxy) -> None:
        with contextlib.suppress(OSError):
            if proxy.peak_row:
                self.peak[proxy.kind] = max(self.peak[proxy.kind], proxy.memory()["VmHWM"])
        proxy.handle.stop()
        self.started.remove(proxy)
        self.problems[proxy.kind] += proxy.log_problems()
        shutil.rmtree(proxy.handle.root, ignore_errors=True)  # the cached data; logs stay until the end

    def stop_all(self) -> None:
        for proxy in list(self.started):
            with contextlib.suppress(Exception):
                self.stop_proxy(proxy)
        if self.upstream_handle is not None:
            with contextlib.suppress(Exception):
                self.upstream_handle.stop()


# --- phases ---------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seed(b: Bench) -> dict:
    assert b.upstream_handle is not None
    t0 = time.perf_counter()
    layout = support_images.build_big(b.work / "images" / "big")
    support_images.seed(layout, b.upstream_handle.host, "library/big")
    shutil.rmtree(layout.path, ignore_errors=True)
    t1 = time.perf_counter()
    # tests/support has no streamed generator for a 1 GiB layer: bench/seed.py pushes it over HTTP.
    _, layer = asyncio.run(push_big_blob_image(b.upstream, "library/huge", "latest", b.p.blob_mib * MiB))
    t2 = time.perf_counter()
    b.big = asyncio.run(measure.resolve_image(b.upstream, "library/big", layout.tag))
    if b.big.manifest_digest != layout.digest:
        raise BenchError(f"upstream has library/big at {b.big.manifest_digest}, the layout {layout.digest}")
    b.huge_layer = layer
    log(f"seeded library/big:latest ({b.big.blob_bytes / MiB:.0f} MiB in {len(b.big.blobs)} blobs) in "
        f"{t1 - t0:.1f}s; library/huge:latest ({b.p.blob_mib} MiB layer) in {t2 - t1:.1f}s")
    return {"big_image": {"repo": b.big.repo, "tag": b.big.tag, "manifest": b.big.manifest_digest,
                          "blobs": len(b.big.blobs), "bytes": b.big.blob_bytes},
            "huge_blob": {"digest": layer, "bytes": b.p.blob_mib * MiB},
            "seed_seconds": {"big": round(t1 - t0, 1), "huge": round(t2 - t1, 1)}}


def cold_pulls(b: Bench) -> dict:
    """Each round: a fresh mirror and a fresh distribution proxy (empty storage), and the direct
    pull; the order rotates so neither proxy always goes first."""
    samples: dict[str, list[float]] = {"mirror": [], "distribution": [], "direct": []}
    cpu: dict[str, list[float]] = {"mirror": [], "distribution": []}
    kinds = ["direct", "mirror", "distribution"]
    for r in range(b.p.rounds):
        for kind in kinds[r % 3:] + kinds[:r % 3]:
            if kind == "direct":
                samples[kind].append(asyncio.run(measure.pull(b.upstream, b.big, b.p.pull_concurrency)))
                continue
            proxy = b.start_proxy(kind)
            try:
                with CpuMeter({kind: proxy.pid}) as m:
                    samples[kind].append(asyncio.run(measure.pull(proxy.url, b.big, b.p.pull_concurrency)))
                cpu[kind].append(m.used[kind])
            finally:
                b.stop_proxy(proxy)
        log(f"cold pull round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in samples.items()))
    return {"seconds": samples, "best": {k: min(v) for k, v in samples.items()},
            "median": {k: statistics.median(v) for k, v in samples.items()}, "proxy_cpu_seconds": cpu}


def wait_stored(proxy: Proxy, digest: str, size: int, timeout: float) -> float:
    """Until `proxy` has the whole blob in its storage (distribution stores it in the background)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proxy.stored_size(digest) == size:
            return time.perf_counter() - t0
        time.sleep(0.1)
    raise BenchError(f"{proxy.kind} did not store {digest} within {timeout:.0f}s")


def warm_blobs(b: Bench, proxies: list[Proxy]) -> dict:
    size = b.p.blob_mib * MiB
    out: dict = {"first_get_seconds": {}, "stored_after_seconds": {}, "warm_get_seconds": {},
                 "MBps": {p.kind: [] for p in proxies}, "proxy_cpu_seconds": {p.kind: [] for p in proxies}}
    out["MBps"]["direct"] = []
    # The single-client GET straight from the upstream: the reference for the first (cold) GETs.
    out["first_get_seconds"]["direct"] = round(
        asyncio.run(measure.fetch_blob(b.upstream, "library/huge", b.huge_layer, size)), 2)
    for proxy in proxies:
        out["first_get_seconds"][proxy.kind] = round(
            asyncio.run(measure.fetch_blob(proxy.url, "library/huge", b.huge_layer, size)), 2)
        out["stored_after_seconds"][proxy.kind] = round(wait_stored(proxy, b.huge_layer, size, 120), 2)
        out["warm_get_seconds"][proxy.kind] = round(
            asyncio.run(measure.fetch_blob(proxy.url, "library/huge", b.huge_layer, size)), 2)
    log("blob warmed: " + ", ".join(f"{k} first GET {v}s" for k, v in out["first_get_seconds"].items()))
    timeout = max(60.0, size / (20 * MB) * b.p.clients)
    targets: list[Proxy | None] = [*proxies, None]  # None: straight from the upstream, for reference
    for r in range(b.p.rounds):
        for target in targets if r % 2 == 0 else targets[::-1]:
            base = target.url if target else b.upstream
            url = f"{base}/v2/library/huge/blobs/{b.huge_layer}"
            if target is None:
                out["MBps"]["direct"].append(round(measure.concurrent_curl(url, b.p.clients, size, timeout) / MB, 1))
                continue
            with CpuMeter({"p": target.pid}) as m:
                rate = measure.concurrent_curl(url, b.p.clients, size, timeout)
            out["MBps"][target.kind].append(round(rate / MB, 1))
            out["proxy_cpu_seconds"][target.kind].append(m.used["p"])
        log(f"warm blob round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} MB/s" for k, v in out["MBps"].items()))
    out["best"] = {k: max(v) for k, v in out["MBps"].items()}
    out["median"] = {k: statistics.median(v) for k, v in out["MBps"].items()}
    return out


def manifests(b: Bench, proxies: list[Proxy]) -> dict:
    async def warm() -> None:
        async with aiohttp.ClientSession(timeout=measure._timeout(60)) as s:
            for proxy in proxies:
                for ref in (b.big.tag, b.big.manifest_digest, b.big.tag, b.big.manifest_digest):
                    digest, _, _ = await measure.get_manifest(s, proxy.url, b.big.repo, ref)
                    if digest != b.big.manifest_digest:
                        raise BenchError(f"{proxy.kind}: {b.big.repo}:{ref} is {digest}")

    asyncio.run(warm())
    out: dict = {}
    # "direct": the upstream distribution itself (no proxy), for reference.
    assert b.upstream_handle is not None and b.upstream_handle.proc.pid is not None
    targets = [(p.kind, p.url, p.pid) for p in proxies] + [("direct", b.upstream, b.upstream_handle.proc.pid)]
    for metric, ref in (("manifest_digest", b.big.manifest_digest), ("manifest_tag", b.big.tag)):
        out[metric] = {}
        for kind, base, pid in targets:
            url = f"{base}/v2/{b.big.repo}/manifests/{ref}"
            with CpuMeter({"p": pid}) as m:
                res = measure.wrk(url, b.p.wrk_seconds, b.p.wrk_threads, b.p.wrk_connections,
                                  {"Accept": MANIFEST_ACCEPT})
            errors = res.non_2xx + sum(res.socket_errors.values())
            out[metric][kind] = {
                "rps": res.requests_per_s, "requests": res.requests, "non_2xx": res.non_2xx,
                "socket_errors": res.socket_errors, "latency_avg": res.latency_avg,
                "latency_max": res.latency_max, "proxy_cpu_seconds": m.used["p"],
                "proxy_cpu_share": round(m.used["p"] / m.wall, 2),
            }
            if errors:
                log(f"WARNING {kind} {metric}: {res.non_2xx} non-2xx, socket errors {res.socket_errors}")
            log(f"{metric} {kind}: {res.requests_per_s:.0f} req/s, avg {res.latency_avg}, "
                f"proxy CPU {m.used['p'] / m.wall:.0%}")
    return out


def sync_disks() -> float:
    """Write out dirty pages (the last push's blob) so they are not written during the next."""
    t0 = time.perf_counter()
    subprocess.run(["sync"], check=False, timeout=300)
    return time.perf_counter() - t0


def pushes(b: Bench) -> dict:
    """A fresh mirror and a fresh plain distribution; each round pushes a new blob to each, once
    monolithic and once chunked, the order of the targets alternating between rounds."""
    size, chunk = b.p.push_mib * MiB, b.p.push_chunk_mib * MiB
    targets = [b.start_push_target("mirror"), b.start_push_target("distribution")]
    out: dict = {"repo": PUSH_REPO, "bytes": size, "chunk_bytes": chunk, "forms": {}, "requests": {},
                 "MBps": {"monolithic": {}, "chunked": {}}, "server_cpu_seconds": {"monolithic": {}, "chunked": {}},
                 "sync_seconds": []}
    try:
        for t in targets:
            out["forms"][t.kind] = asyncio.run(measure.monolithic_form(t.url, PUSH_REPO))
        seed = 1000
        for r in range(b.p.push_rounds):
            for mode in ("monolithic", "chunked"):
                for t in targets if r % 2 == 0 else targets[::-1]:
                    seed += 1
                    body = measure.PushBody(size, seed)
                    body.digest()
                    out["sync_seconds"].append(round(sync_disks(), 2))
                    how = out["forms"][t.kind] if mode == "monolithic" else "chunked"
                    with CpuMeter({"p": t.pid}) as m:
                        res = asyncio.run(measure.push_blob(t.url, PUSH_REPO, body, how, chunk))
                    # Its pages leave the page cache. On the bench VM (2 CPUs, 24 GiB), once the
                    # page cache had grown past ~4 GiB, writing a GiB cost the writer ~3x the system
                    # time (1.2 s -> 3.6-4 s, MB/s halved): kept, each push would be slower than
                    # the one before it, whichever registry took it.
                    if t.drop_blob(res.digest) != size:
                        raise BenchError(f"{t.kind}: no {size}-byte file for {res.digest} in its storage")
                    out["MBps"][mode].setdefault(t.kind, []).append(round(size / res.seconds / MB, 1))
                    out["server_cpu_seconds"][mode].setdefault(t.kind, []).append(m.used["p"])
                    out["requests"].setdefault(mode, {})[t.kind] = res.requests
            log(f"push round {r + 1}: " + ", ".join(
                f"{mode} {kind} {v[-1]:.0f} MB/s" for mode, by in out["MBps"].items() for kind, v in by.items()))
        out["best"] = {mode: {k: max(v) for k, v in by.items()} for mode, by in out["MBps"].items()}
        out["peak_MiB"] = {t.kind: round(t.memory()["VmHWM"], 1) for t in targets}
    finally:
        for t in targets:
            b.stop_proxy(t)
    return out


def push_footnote(results: dict) -> str:
    push = results.get("push")
    if not push:
        return ""
    form = {measure.PUSH_MONOLITHIC_POST: "one `POST ?digest=` with the body (201)",
            measure.PUSH_MONOLITHIC_PUT: "`POST` (202) then one `PUT <location>&digest=` with the body "
                                         "(a body on its POST is ignored)"}
    lines = ["push: a fresh mirror (private.patterns [bench/**]) vs a fresh plain distribution (its proxy "
             "mode refuses pushes); MB/s from the first request to the final 201, best of "
             f"{results['params']['push_rounds']}; each push verified by a HEAD (200, Content-Length)."]
    for kind, f in push["forms"].items():
        lines.append(f"  monolithic, {kind}: {form.get(f, f)}")
    lines.append(f"  chunked, both: `POST`, {push['requests']['chunked']['mirror'] - 2} `PATCH`es of "
                 f"{push['chunk_bytes'] // MiB} MiB with Content-Range, `PUT ?digest=` with no body")
    return "\n".join(lines)


# --- report -------------------------------------------------------------------------------------


def judge(metric: str, ratios: dict[str, float | None]) -> tuple[str, bool | None]:
    which, op, bound = GOALS[metric]
    r = ratios.get(which)
    if r is None:
        return f"{which} {op} {bound}", None
    ok = r >= bound if op == ">=" else r <= bound
    return f"{which} {op} {bound}", ok


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def table(results: dict) -> tuple[str, dict]:
    rows = []
    summary = {}

    def add(metric: str, label: str, unit: str, m: float | None, d: float | None, direct: float | None = None,
            fmt: str = "{:.0f}") -> None:
        ratios = {"mirror/distribution": ratio(m, d), "mirror/direct": ratio(m, direct)}
        goal, ok = judge(metric, ratios) if metric in GOALS else ("", None)
        summary[metric] = {"unit": unit, "mirror": m, "distribution": d, "direct": direct, **ratios,
                           "goal": goal or None, "met": ok}
        def cell(v: float | None) -> str:
            return "-" if v is None else fmt.format(v)

        def rcell(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}x"

        rows.append([f"{label} ({unit})", cell(m), cell(d), cell(direct), rcell(ratios["mirror/distribution"]),
                     rcell(ratios["mirror/direct"]), goal or "-", {True: "MET", False: "MISSED", None: "-"}[ok]])

    wb = results["warm_blob"]["best"]
    blob = f"{results['params']['blob_mib']} MiB"
    add("warm_blob", f"warm blob, {results['params']['clients']} clients x {blob}", "MB/s",
        wb["mirror"], wb["distribution"], wb["direct"])
    first = results["warm_blob"]["first_get_seconds"]
    rate = {k: results["params"]["blob_mib"] * MiB / MB / v for k, v in first.items()}
    add("cold_blob", f"cold blob, 1 client x {blob}", "MB/s", rate["mirror"], rate["distribution"], rate["direct"])
    for metric, label in (("manifest_digest", "warm manifest by digest"), ("manifest_tag", "warm manifest by tag")):
        r = results["manifests"][metric]
        add(metric, label, "req/s", r["mirror"]["rps"], r["distribution"]["rps"], r["direct"]["rps"])
    cp = results["cold_pull"]["best"]
    add("cold_pull", f"cold pull {results['seed']['big_image']['bytes'] / MiB:.0f} MiB image", "s",
        cp["mirror"], cp["distribution"], cp["direct"], fmt="{:.2f}")
    if "push" in results:
        pb = results["push"]["best"]
        mib = results["params"]["push_mib"]
        size = f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"
        add("push_monolithic", f"push {size} monolithic", "MB/s", pb["monolithic"]["mirror"],
            pb["monolithic"]["distribution"])
        add("push_chunked", f"push {size} chunked, {results['params']['push_chunk_mib']} MiB chunks", "MB/s",
            pb["chunked"]["mirror"], pb["chunked"]["distribution"])
    mem = results["memory"]
    add("rss_peak", "peak RSS, VmHWM (max over instances)", "MiB", mem["peak_MiB"]["mirror"],
        mem["peak_MiB"]["distribution"], fmt="{:.1f}")
    add("rss_end", "RSS at end, VmRSS", "MiB", mem["end_MiB"]["mirror"], mem["end_MiB"]["distribution"],
        fmt="{:.1f}")

    header = ["metric", "mirror", "distribution", "direct", "mirror/dist", "mirror/direct", "goal", "result"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, r in enumerate([header, *rows]):
        cells = [str(c).ljust(widths[i]) if i in (0, 6, 7) else str(c).rjust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines), summary


def versions() -> dict:
    def out(cmd: list[str]) -> str:
        """The first line `cmd` prints ("" for none, "?" if it cannot run)."""
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"
        return text.splitlines()[0] if text else ""

    return {
        "mirror_commit": out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        # uncommitted changes under mirror/ when measured (other work in progress)
        "mirror_dirty": out(["git", "-C", str(ROOT), "status", "--porcelain", "mirror"]) != "",
        "distribution": out(["docker-registry", "--version"]),
        "wrk": out(["wrk", "--version"]) if shutil.which("wrk") else None,
        "curl": out(["curl", "--version"]),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: small blob, short wrk, 2 rounds")
    ap.add_argument("--blob-mib", type=int, help="size of the big blob (default 1024, quick 256)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients on the warm blob (4)")
    ap.add_argument("--rounds", type=int, help="best-of rounds for warm blob and cold pull (3, quick 2)")
    ap.add_argument("--wrk-seconds", type=float, help="seconds per wrk run (10, quick 3)")
    ap.add_argument("--push-mib", type=int, help="size of each pushed blob (default 1024, quick 256)")
    ap.add_argument("--push-rounds", type=int, help="best-of rounds for pushes (2, quick 1)")
    ap.add_argument("--push-chunk-mib", type=int, default=16, help="PATCH size of the chunked push (16)")
    ap.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="JSON results file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    p = params(args)

    # SIGTERM (a `timeout`, say) unwinds like Ctrl-C, so the processes started here are stopped.
    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    b = Bench(p, work)
    results: dict = {"params": asdict(p), "versions": versions(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     # other work on the machine skews every number: worth knowing afterwards
                     "cpu_busy_before": measure.machine_busy()}
    try:
        log(f"work directory {work}; {'quick' if p.quick else 'full'} run")
        b.start_upstream()
        interference: dict[str, dict[str, Any]] = {}
        results["interference"] = interference

        def phase(name: str, run: Callable[[], dict]) -> dict:
            with measure.Interference() as i:
                out = run()
            top = dict(sorted(i.others.items(), key=lambda kv: -kv[1])[:5])
            interference[name] = {"foreign_cpu_share": i.foreign_share,
                                  "unattributed_cpu_share": i.unattributed_share,
                                  "steal_share": i.steal_share, "top_foreign_cpu_seconds": top}
            other = i.foreign_share + i.unattributed_share + i.steal_share
            if name != "seed" and other > NOISY:
                log(f"WARNING: other work took {other:.0%} of the CPUs during {name} "
                    f"(other processes {i.foreign_share:.0%}, unattributed {i.unattributed_share:.0%}, "
                    f"steal {i.steal_share:.0%}): its numbers are skewed")
            return out

        results["seed"] = phase("seed", lambda: seed(b))
        results["cold_pull"] = phase("cold_pull", lambda: cold_pulls(b))
        proxies = [b.start_proxy("mirror"), b.start_proxy("distribution")]
        results["warm_blob"] = phase("warm_blob", lambda: warm_blobs(b, proxies))
        results["manifests"] = phase("manifests", lambda: manifests(b, proxies))
        end = {px.kind: px.memory() for px in proxies}
        for px in proxies:
            b.peak[px.kind] = max(b.peak[px.kind], end[px.kind]["VmHWM"])
        for px in proxies:
            b.stop_proxy(px)
        results["push"] = phase("push", lambda: pushes(b))
        results["log_problems"] = {k: {"count": len(v), "first": v[:10]} for k, v in b.problems.items()}
        results["memory"] = {"peak_MiB": {k: round(v, 1) for k, v in b.peak.items()},
                             "end_MiB": {k: round(v["VmRSS"], 1) for k, v in end.items()},
                             "end_peak_MiB": {k: round(v["VmHWM"], 1) for k, v in end.items()}}
    finally:
        b.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["elapsed_seconds"] = round(time.perf_counter() - t0, 1)
    text, summary = table(results)
    results["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    footnote = push_footnote(results)
    if footnote:
        print("\n" + footnote)
    for kind, found in results.get("log_problems", {}).items():
        if found["count"]:
            print(f"\n{kind} logged {found['count']} warning/error lines, first: {found['first'][0]}")
    def other(v: dict[str, Any]) -> float:
        return float(v["foreign_cpu_share"] + v["unattributed_cpu_share"] + v["steal_share"])

    noisy = [f"{name} {other(v):.0%}" for name, v in results.get("interference", {}).items()
             if name != "seed" and other(v) > NOISY]
    busy = f" (other work on the machine during: {', '.join(noisy)}: those numbers are skewed)" if noisy else ""
    print(f"\n{'quick' if p.quick else 'full'} run, {results['elapsed_seconds']:.0f}s{busy}; "
          f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
