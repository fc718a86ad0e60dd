"""The cache within its disk: over `cache.max_size` the least recently used proxied content goes,
pushed content never does, an evicted image pulls again, and a 429 backs the upstream off."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from mirror.cache.eviction import Evictor
from mirror.ledger import ops
from mirror.ledger.ledger import Ledger
from mirror.names import parse_digest
from mirror.registry.stores import ManifestStore
from mirror.server.metrics import Metrics
from mirror.storage import layout
from mirror.storage.filesystem import FilesystemStorage
from tests.scripted_upstream import ScriptedUpstream
from tests.support.clock import ManualClock
from tests.support.terminal import drain

MiB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = {"Accept": OCI_MANIFEST}


def add_image(script: ScriptedUpstream, repo: str, size: int = MiB) -> tuple[str, str]:
    layer = script.add_blob(os.urandom(size))
    config = script.add_blob(json.dumps({"repo": repo}).encode())
    manifest = script.add_manifest(repo, "latest", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 15},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": size}]})
    return manifest, layer


async def pull(client: TestClient, script: ScriptedUpstream, repo: str) -> None:
    r = await client.get(f"/v2/{repo}/manifests/latest", headers=ACCEPT)
    assert r.status == 200, await r.text()
    doc = json.loads(await r.read())
    for d in [doc["config"]["digest"]] + [layer["digest"] for layer in doc["layers"]]:
        r = await client.get(f"/v2/{repo}/blobs/{d}")
        assert r.status == 200 and await r.read() == script.blobs[d], d
    await asyncio.sleep(0.02)  # distinct access times


def stored(root: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_size for p in (root / layout.BLOBS).rglob("data") if p.is_file()}


async def wait_until(check: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_lru_within_max_size_keeps_private_and_refetches(
        upstream: tuple[ScriptedUpstream, TestServer], registry: Callable[..., Any], tmp_path: Path) -> None:
    script, server = upstream
    images = {name: add_image(script, f"library/{name}") for name in ("a", "b", "c")}
    root = tmp_path / "data"
    client = await registry(
        upstreams=[{"name": "hub", "url": str(server.make_url("")), "dockerhub": True, "tag_ttl": "1h"}],
        private={"patterns": ["team/**"]},
        cache={"max_size": int(2.5 * MiB), "min_idle": 0, "high_watermark": 0.95, "low_watermark": 0.85})

    pushed = os.urandom(MiB)
    private = "sha256:" + hashlib.sha256(pushed).hexdigest()
    r = await client.post(f"/v2/team/app/blobs/uploads/?digest={private}", data=pushed)
    assert r.status == 201

    await pull(client, script, "a")
    await pull(client, script, "b")
    await pull(client, script, "a")  # a is now more recently used than b
    fetches = script.calls[f"GET /v2/library/b/blobs/{images['b'][1]}"]
    await pull(client, script, "c")  # 3 MiB of proxied content: past the high watermark (pushed MiB never counts)

    b_layer = images["b"][1].split(":")[1]
    await wait_until(lambda: b_layer not in stored(root), "b's layer to be evicted")
    blobs = stored(root)
    assert sum(size for name, size in blobs.items() if name != private.split(":")[1]) <= 2.5 * MiB * 0.85
    assert private.split(":")[1] in blobs  # pushed content is never evicted
    for name in ("a", "c"):
        assert images[name][1].split(":")[1] in blobs, f"{name} was used more recently than b"
    assert not (root / layout.tag_entry("library/b", "latest")).exists()  # its tag went with it
    assert images["b"][0].split(":")[1] not in blobs

    await pull(client, script, "b")  # evicted: fetched again, correctly
    assert script.calls[f"GET /v2/library/b/blobs/{images['b'][1]}"] == fetches + 1
    r = await client.get(f"/v2/team/app/blobs/{private}")
    assert r.status == 200 and await r.read() == pushed


async def test_429_serves_stale_passes_retry_after_and_backs_off(
        upstream: tuple[ScriptedUpstream, TestServer], registry: Callable[..., Any], clock: ManualClock) -> None:
    script, server = upstream
    add_image(script, "library/cached", size=1024)
    _, uncached_layer = add_image(script, "library/uncached", size=1024)
    client = await registry(upstreams=[{"name": "hub", "url": str(server.make_url("")), "dockerhub": True,
                                        "tag_ttl": "5m", "retries": 1}])
    await pull(client, script, "cached")
    clock.advance(301)  # the cached tag is due for revalidation

    script.status, script.retry_after = 429, "30"
    script.headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "0;w=21600"}
    r = await client.get("/v2/library/cached/manifests/latest", headers=ACCEPT)
    assert r.status == 200 and "110" in r.headers["Warning"]  # stale, and said so
    seen = sum(script.calls.values())

    r = await client.get("/v2/library/uncached/manifests/latest", headers=ACCEPT)
    body = await r.json()
    assert r.status == 429 and body["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert 0 < int(r.headers["Retry-After"]) <= 30
    r = await client.get(f"/v2/library/uncached/blobs/{uncached_layer}")
    assert r.status == 429 and "Retry-After" in r.headers
    r = await client.get("/v2/library/cached/manifests/latest", headers=ACCEPT)
    assert r.status == 200
    assert sum(script.calls.values()) == seen, "the upstream was asked again during the back-off"

    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'mirror_upstream_ratelimit_remaining{upstream="hub"} 0.0' in metrics
    backoff = next(line for line in metrics.splitlines() if line.startswith("mirror_upstream_backoff_seconds{"))
    assert 0 < float(backoff.split()[-1]) <= 30

    script.status = None  # the back-off over, the upstream is asked again
    clock.advance(31)
    assert (await client.get("/v2/library/uncached/manifests/latest", headers=ACCEPT)).status == 200


def mirror_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.e2e  # runs `python -m mirror` processes
async def test_du_evict_and_index_rebuild_from_the_command_line(
        upstream: tuple[ScriptedUpstream, TestServer], registry: Callable[..., Any], tmp_path: Path) -> None:
    script, server = upstream
    manifest, layer = add_image(script, "library/a")
    settings: dict[str, Any] = {
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}},
        "upstreams": [{"name": "hub", "url": str(server.make_url("")), "dockerhub": True, "tag_ttl": "1h"}],
        "private": {"patterns": ["team/**"]}, "cache": {"min_idle": 0}}
    client = await registry(**{k: v for k, v in settings.items() if k != "storage"})
    await pull(client, script, "a")
    pushed = os.urandom(MiB)
    private = "sha256:" + hashlib.sha256(pushed).hexdigest()
    assert (await client.post(f"/v2/team/app/blobs/uploads/?digest={private}", data=pushed)).status == 201
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"version": 0.1, **settings}))
    await asyncio.sleep(0.05)

    r = await asyncio.to_thread(mirror_cli, "du", "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    repos = {x["name"]: x for x in report["repositories"]}
    assert repos["library/a"]["kind"] == "cached" and repos["library/a"]["upstream"] == "hub"
    assert repos["library/a"]["bytes"] >= MiB and repos["library/a"]["objects"] == 3
    assert repos["team/app"] == {"name": "team/app", "kind": "private", "upstream": None, "objects": 1, "bytes": MiB}
    assert report["private_bytes"] == MiB and report["by_upstream"]["hub"] == repos["library/a"]["bytes"]
    assert report["total_bytes"] == report["private_bytes"] + report["cached_bytes"] + report["unreferenced_bytes"]
    r = await asyncio.to_thread(mirror_cli, "du", "--config", str(config))
    assert "library/a" in r.stdout and "team/app" in r.stdout and "private 1.0 MiB" in r.stdout

    r = await asyncio.to_thread(mirror_cli, "evict", "--config", str(config), "--older-than", "30d", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["evicted"] == []  # all used just now
    r = await asyncio.to_thread(mirror_cli, "evict", "--config", str(config), "--older-than", "0s", "--dry-run",
                                "--json")
    planned = json.loads(r.stdout)
    config_blob = next(d for d in script.blobs if d != layer)
    assert set(planned["evicted"]) == {manifest, layer, config_blob}
    assert private not in planned["evicted"] and planned["manifests"] == 1 and planned["dropped_tags"] == 1
    assert stored(tmp_path / "data").keys() >= {layer.split(":")[1]}  # a dry run changes nothing
    r = await asyncio.to_thread(mirror_cli, "evict", "--config", str(config), "--older-than", "0s")
    assert r.returncode == 0 and "evicted 3 objects" in r.stdout, r.stdout
    assert set(stored(tmp_path / "data")) == {private.split(":")[1]}

    # The running server hears of the evictions through the journal within a second, and fetches again.
    for _ in range(40):
        await pull(client, script, "a")
        if manifest.split(":")[1] in stored(tmp_path / "data"):
            break
        await asyncio.sleep(0.25)
    assert stored(tmp_path / "data").keys() >= {manifest.split(":")[1], layer.split(":")[1]}
    r = await asyncio.to_thread(mirror_cli, "index", "rebuild", "--config", str(config), "--json")
    rebuilt = json.loads(r.stdout)
    assert r.returncode == 0 and (rebuilt["repositories"], rebuilt["tags"], rebuilt["blobs"]) == (1, 1, 4), rebuilt
    r = await asyncio.to_thread(mirror_cli, "index", "rebuild", "--verify", "--config", str(config), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["verified"], r.stdout


def run_on_a_terminal(*args: str) -> tuple[int, str, bytes]:
    """`mirror ARGS` with stderr on a pty: (exit code, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0x0
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mirror", *args], stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        terminal = drain(master)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
    return proc.returncode, stdout.decode(), terminal


@pytest.mark.e2e  # runs `python -m mirror` processes
def test_du_and_evict_show_progress_on_a_terminal_only(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"version": 0.1, "storage": {"filesystem": {"rootdirectory": str(tmp_path)}},
                                      "upstreams": [{"name": "hub", "url": "http://127.0.0.1:9"}]}))
    for command in (["du"], ["evict", "--older-than", "30d"]):
        code, out, terminal = run_on_a_terminal(*command, "--config", str(config))
        assert code == 0 and (b"the ledger" in terminal or b"the journal" in terminal), terminal
        assert "ledger" not in out and "journal" not in out
        code, out, terminal = run_on_a_terminal(*command, "--config", str(config), "--json")
        assert code == 0 and b"ledger" not in terminal and b"journal" not in terminal and json.loads(out)


async def _seed_cached(storage: FilesystemStorage, repo: str, size: int) -> tuple[str, str, str]:
    """A cached image written straight into storage: (manifest, config, layer) digests."""
    layer, config = os.urandom(size), json.dumps({"repo": repo}).encode()
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": digest_of(config), "size": len(config)},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(layer),
                                   "size": size}]}).encode()
    await storage.put_bytes(layout.marker(repo, layout.CACHED_MARK), b"")
    for data in (layer, config, body):
        d = parse_digest(digest_of(data))
        await storage.put_bytes(layout.blob(d), data)
        await storage.put_bytes((layout.revision if data is body else layout.layer)(repo, d), str(d).encode())
    await storage.put_bytes(layout.tag(repo, "latest"), digest_of(body).encode())
    return digest_of(body), digest_of(config), digest_of(layer)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_only_pulls_in_progress_are_protected_and_the_cap_comes_back_when_they_end(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path / "data")
    a = await _seed_cached(storage, "library/a", MiB)
    b = await _seed_cached(storage, "library/b", MiB)
    c = await _seed_cached(storage, "library/c", MiB)
    ledger = await Ledger(tmp_path / "index", storage, lambda _: False).open()
    await ledger.prepare()  # the seeded storage, read into the ledger
    metrics = Metrics()
    evictor = Evictor(ledger, ManifestStore(storage, ledger, 0, metrics.blob_added), metrics,
                      max_size=int(1.5 * MiB), min_idle=30.0)
    t0 = time.time() + 1000  # later than the seeded files' mtimes (last use only moves forward)

    async def used(times: dict[str, float]) -> None:
        await ledger.record([ops.used(times)], durable=False)

    try:
        # Three manifests were just served, none of their blobs fetched since: three pulls in progress, all
        # of it over the cap, and none of it evicted.
        await used({d: t0 - 100 for d in (*a[1:], *b[1:], *c[1:])})
        await used({m: t0 for m in (a[0], b[0], c[0])})
        result = await evictor.run(now=t0 + 1)
        assert result.evicted == [] and result.protected_until == t0 + 30 and evictor.over_cap
        assert metrics.cache_protected_bytes._value.get() >= 3 * MiB  # said in a metric
        # b's client fetched its config and layer: its pull no longer holds them, and they go, least recently
        # used of what is left, while a and c, still being pulled, stay (b's manifest too, served just now).
        await used({d: t0 + 2 for d in b[1:]})
        result = await evictor.run(now=t0 + 3)
        assert set(result.evicted) == set(b[1:]) and evictor.over_cap  # a and c still being pulled
        # c's client fetched its layer: that blob is no longer protected (nor needed over the cap yet: a still is)
        await used({c[2]: t0 + 4})
        # Their pulls are over (min_idle passed): down to the low watermark at once, least recently used first
        result = await evictor.run(now=t0 + 31)
        assert a[2] in result.evicted and c[2] not in result.evicted and result.proxied_after <= 1.5 * MiB * 0.85
        assert not evictor.over_cap and metrics.cache_protected_bytes._value.get() == 0
        assert not (tmp_path / "data" / layout.tag("library/a", "latest")).exists() or a[0] not in result.evicted
    finally:
        await ledger.close()
