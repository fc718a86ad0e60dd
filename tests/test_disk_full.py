"""A full disk is an operating state, on a real tmpfs that runs out of space (and is grown with a
remount, as an operator would): a cold fetch that fills it ends for every client at once and
leaves nothing behind, pushes answer 507 STORAGE_FULL with one "storage full" log line, deletes
still work, eviction makes room at once, and everything works again once there is room, without
a restart."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror.cache.flight import write_all
from mirror.names import parse_digest
from mirror.storage import layout
from tests.scripted_upstream import ScriptedUpstream
from tests.support.prometheus import Samples
from tests.support.tmpfs import Tmpfs

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
Factory = Callable[..., Any]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def noise(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def metrics(client: TestClient) -> Samples:
    return Samples(await (await client.get("/metrics")).text())


async def eventually(check: Callable[[], Any], what: str, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def get_blob(client: TestClient, path: str) -> tuple[int, bytes, bool, dict[str, Any] | None]:
    """(status, body, complete, OCI error body) of one GET, a cut connection telling from a whole body."""
    async with asyncio.timeout(30):  # a wedged flight would hang here
        r = await client.get(path)
        if r.status != 200:
            return r.status, b"", True, await r.json()
        body = bytearray()
        try:
            async for chunk in r.content.iter_chunked(1 << 16):
                body += chunk
        except aiohttp.ClientPayloadError:
            return r.status, bytes(body), False, None
        return r.status, bytes(body), len(body) == int(r.headers["Content-Length"]), None


def full_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Warnings and errors about the full disk (the cuts it causes are info)."""
    return [r for r in caplog.records if "storage full" in r.getMessage() and r.levelno >= logging.WARNING]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and r.name.startswith("mirror")]


def staged(root: Path) -> list[str]:
    return [p.name for p in (root / "_staging").iterdir()]


@pytest.fixture
async def upstream_url() -> Any:
    script = ScriptedUpstream()
    server = TestServer(script.app())
    await server.start_server()
    yield script, str(server.make_url("")).rstrip("/")
    await server.close()


async def proxy_on(registry: Factory, fs: Tmpfs, url: str, **config: Any) -> TestClient:
    up = {"name": "hub", "url": url, "hosts": ["docker.io"], "dockerhub": True, "tag_ttl": "1h", "retries": 1}
    return await registry(root=fs.path / "data", upstreams=[up], **config)


async def test_a_cold_blob_that_fills_the_disk_ends_its_flight_for_everyone(
        registry: Factory, tmpfs: Callable[[int], Tmpfs], upstream_url: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    script, url = upstream_url
    blob = noise(24 * MiB, 1)  # more than the flight's queue (16 MiB) and than the disk
    digest = script.add_blob(blob)
    script.slow = 0.001
    fs = tmpfs(8 * MiB)
    client = await proxy_on(registry, fs, url)
    root = fs.path / "data"
    path = f"/v2/library/app/blobs/{digest}"

    results = await asyncio.gather(*(get_blob(client, path) for _ in range(3)))
    for status, body, complete, error in results:
        assert not (status == 200 and complete), "a complete body from a fetch that could not be stored"
        if status != 200:
            assert status == 507 and error is not None and error["errors"][0]["code"] == "STORAGE_FULL", error
        else:
            assert len(body) < len(blob) and blob.startswith(body)  # cut short, and only right bytes

    async def released() -> bool:
        m = await metrics(client)
        return (m.value("mirror_blob_flights_in_progress") == 0 and script.streaming == 0
                and not [n for n in staged(root) if n.startswith("f-")])

    await eventually(released, "the flight, its upstream response and its spool to be released")
    m = await metrics(client)
    assert m.value("mirror_storage_full") == 1 and m.value("mirror_storage_full_errors_total") >= 1
    assert len(full_lines(caplog)) == 1 and not tracebacks(caplog)

    # Still full (something else took the space): a clean 507 before any header of a body.
    filler = fs.fill()
    status, _, _, error = await get_blob(client, path)
    assert status == 507 and error is not None and "storage full" in error["errors"][0]["message"]
    filler.unlink()

    # Room again, no restart: a fresh fetch, served whole and kept.
    fs.resize(64 * MiB)
    status, body, complete, _ = await get_blob(client, path)
    assert status == 200 and complete and body == blob
    assert script.calls[f"GET /v2/library/app/blobs/{digest}"] >= 3
    await eventually(lambda: asyncio.sleep(0, (root / layout.blob(parse_digest(digest))).exists()),
                     "the blob to be committed")
    assert (await metrics(client)).value("mirror_storage_full") == 0
    assert len(full_lines(caplog)) == 1 and not tracebacks(caplog)


async def test_pushes_on_a_full_disk_answer_507_and_work_once_there_is_room(
        registry: Factory, tmpfs: Callable[[int], Tmpfs], caplog: pytest.LogCaptureFixture) -> None:
    fs = tmpfs(4 * MiB)
    client = await registry(root=fs.path / "data")
    big = noise(6 * MiB, 2)
    config = b'{"os":"linux"}'

    async def monolithic() -> aiohttp.ClientResponse:
        return await client.post(f"/v2/team/app/blobs/uploads/?digest={sha(big)}", data=io.BytesIO(big))

    async def chunked() -> list[aiohttp.ClientResponse]:
        r = await client.post("/v2/team/app/blobs/uploads/")
        if r.status != 202:
            return [r]
        patch = await client.patch(r.headers["Location"], data=io.BytesIO(big),
                                   headers={"Content-Range": f"0-{len(big) - 1}"})
        if patch.status != 202:
            return [patch]
        return [await client.put(f"{patch.headers['Location']}?digest={sha(big)}")]

    def refused(r: aiohttp.ClientResponse) -> Any:
        assert r.status == 507, r.status
        assert r.headers["Retry-After"]
        return r.json()

    for error in [await refused(await monolithic())]:
        assert error["errors"][0]["code"] == "STORAGE_FULL" and "storage full" in error["errors"][0]["message"]
    r = await client.post(f"/v2/team/app/blobs/uploads/?digest={sha(config)}", data=config)
    assert r.status == 201  # nothing of the refused blob was kept: a small one fits
    # A chunk keeps what arrived (the client resumes from its Range), so the disk stays full.
    (patch,) = await chunked()
    assert (await refused(patch))["errors"][0]["code"] == "STORAGE_FULL"
    config_descriptor = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config),
                         "size": len(config)}
    small = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
                        "config": config_descriptor}).encode()
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_descriptor,
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(big),
                                   "size": len(big)}]}).encode()
    filler = fs.fill()
    r = await client.put("/v2/team/app/manifests/v1", data=b"{}", headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400  # validation first: no space needed to refuse
    r = await client.put("/v2/team/app/manifests/small", data=small, headers={"Content-Type": OCI_MANIFEST})
    assert (await refused(r))["errors"][0]["code"] == "STORAGE_FULL"
    m = await metrics(client)
    assert m.value("mirror_storage_full") == 1 and m.value("mirror_storage_full_errors_total") >= 3
    assert len(full_lines(caplog)) == 1, [r.getMessage() for r in full_lines(caplog)]
    assert not tracebacks(caplog)

    filler.unlink()
    fs.resize(32 * MiB)
    assert (await monolithic()).status == 201
    (done,) = await chunked()
    assert done.status == 201, await done.text()
    for tag, manifest in (("v1", body), ("small", small)):
        r = await client.put(f"/v2/team/app/manifests/{tag}", data=manifest, headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 201, await r.text()
    r = await client.get(f"/v2/team/app/blobs/{sha(big)}")
    assert await r.read() == big
    assert (await metrics(client)).value("mirror_storage_full") == 0


async def test_deletes_work_on_a_full_disk(registry: Factory, tmpfs: Callable[[int], Tmpfs]) -> None:
    fs = tmpfs(4 * MiB)
    client = await registry(root=fs.path / "data", storage={"delete": {"enabled": True}})
    config, layer = b'{"os":"linux"}', noise(64 << 10, 3)
    for data in (config, layer):
        assert (await client.post(f"/v2/team/app/blobs/uploads/?digest={sha(data)}", data=data)).status == 201
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config),
                                  "size": len(config)},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer),
                                   "size": len(layer)}]}).encode()
    for tag in ("v1", "v2"):
        r = await client.put(f"/v2/team/app/manifests/{tag}", data=body, headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 201
    fs.fill()

    assert (await client.delete("/v2/team/app/manifests/v2")).status == 202
    r = await client.delete(f"/v2/team/app/manifests/{sha(body)}")
    assert r.status == 202, await r.text()
    for ref in ("v1", "v2", sha(body)):
        assert (await client.get(f"/v2/team/app/manifests/{ref}")).status == 404
    repo = fs.path / "data" / layout.repository("team/app") / "_manifests"
    assert not [p for p in repo.rglob("*") if p.is_file()], "a tag or the revision was left behind"
    assert (await client.delete(f"/v2/team/app/blobs/{sha(layer)}")).status == 202


async def test_a_write_that_finds_the_disk_full_evicts_at_once(
        registry: Factory, tmpfs: Callable[[int], Tmpfs], upstream_url: Any) -> None:
    script, url = upstream_url
    old, new = noise(3 * MiB, 4), noise(3 * MiB, 5)
    old_digest, new_digest = script.add_blob(old), script.add_blob(new)
    fs = tmpfs(16 * MiB)
    client = await proxy_on(registry, fs, url, cache={"min_idle": "0s"})
    status, body, complete, _ = await get_blob(client, f"/v2/library/app/blobs/{old_digest}")
    assert status == 200 and complete and body == old
    stored = fs.path / "data" / layout.blob(parse_digest(old_digest))
    await eventually(lambda: asyncio.sleep(0, stored.exists()), "the first blob to be stored")
    fs.fill(leave=1 * MiB)

    status, _, complete, _ = await get_blob(client, f"/v2/library/app/blobs/{new_digest}")
    assert not (status == 200 and complete)
    await eventually(lambda: asyncio.sleep(0, not stored.exists()), "eviction of the least recently used blob")
    assert (await metrics(client)).value("mirror_cache_evictions_total", kind="blob") == 1
    status, body, complete, _ = await get_blob(client, f"/v2/library/app/blobs/{new_digest}")
    assert status == 200 and complete and body == new


def test_a_spool_write_at_the_brim_writes_everything_or_fails(tmpfs: Callable[[int], Tmpfs]) -> None:
    """A disk with a page or two left takes part of a write and says so in the count: a spool that
    ignored it had a hole of zeros once space came back (found by `mirror scrub` in the e2e run)."""
    fs = tmpfs(1 * MiB)
    fs.fill(leave=8192)
    fd = os.open(fs.path / "spool", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        data = noise(64 << 10, 6)
        assert 0 < os.pwrite(fd, data, 0) < len(data)  # what the kernel does at the brim
        with pytest.raises(OSError) as refused:
            write_all(fd, data, 0)
        assert refused.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
