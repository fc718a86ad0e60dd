"""Rot is found and repaired: bytes flipped in stored files (the layout's own keys) are never served
as good, a push of the right bytes replaces a damaged copy (chunked, monolithic, manifests), a
mount never links one, and the scrub (one pass, and the server's background passes) removes
damaged cached content, which the next pull fetches again, and quarantines damaged private content."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from mirror.cache.scrub import Scrubber, ScrubResult
from mirror.names import parse_digest
from mirror.registry.integrity import Pace
from mirror.storage import layout
from mirror.storage.filesystem import FilesystemStorage
from tests.scripted_upstream import ScriptedUpstream
from tests.support import ledgers
from tests.support.prometheus import Samples

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
Factory = Callable[..., Any]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stored(root: Path, digest: str) -> Path:
    return root / layout.blob(parse_digest(digest))


def flip(path: Path, at: int | None = None) -> None:
    """One byte changed in place (same size, same inode): what a bad disk does."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    with open(path, "r+b") as f:
        f.write(data)


def manifest_for(config: bytes, layers: list[bytes]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(x), "size": len(x)}
                   for x in layers]}).encode()


CONFIG, LAYER = b'{"os":"linux"}', bytes(range(256)) * 4096  # 1 MiB
MANIFEST = manifest_for(CONFIG, [LAYER])


async def push(client: TestClient, name: str, tag: str = "v1") -> None:
    for data in (CONFIG, LAYER):
        r = await client.post(f"/v2/{name}/blobs/uploads/?digest={sha(data)}", data=io.BytesIO(data))
        assert r.status == 201, await r.text()
    r = await client.put(f"/v2/{name}/manifests/{tag}", data=MANIFEST, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()


async def chunked(client: TestClient, name: str, data: bytes) -> int:
    r = await client.post(f"/v2/{name}/blobs/uploads/")
    assert r.status == 202
    r = await client.patch(r.headers["Location"], data=io.BytesIO(data),
                           headers={"Content-Range": f"0-{len(data) - 1}"})
    assert r.status == 202
    r = await client.put(f"{r.headers['Location']}?digest={sha(data)}")
    return r.status


async def test_a_push_of_the_right_bytes_repairs_a_damaged_copy(registry: Factory, tmp_path: Path) -> None:
    root = tmp_path / "data"
    client = await registry(root=root)
    await push(client, "team/app")
    flip(stored(root, sha(LAYER)))
    flip(stored(root, sha(MANIFEST)))

    assert await chunked(client, "team/app", LAYER) == 201
    assert stored(root, sha(LAYER)).read_bytes() == LAYER
    flip(stored(root, sha(LAYER)))
    r = await client.post(f"/v2/team/app/blobs/uploads/?digest={sha(LAYER)}", data=io.BytesIO(LAYER))
    assert r.status == 201 and stored(root, sha(LAYER)).read_bytes() == LAYER

    # A server that never held the manifest reads it from storage: a damaged one is not served.
    fresh = await registry(root=root)
    assert (await fresh.get("/v2/team/app/manifests/v1")).status == 404
    r = await fresh.put("/v2/team/app/manifests/v1", data=MANIFEST, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201 and stored(root, sha(MANIFEST)).read_bytes() == MANIFEST
    r = await fresh.get("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert r.status == 200 and await r.read() == MANIFEST


async def test_a_mount_never_links_a_damaged_blob(registry: Factory, tmp_path: Path) -> None:
    root = tmp_path / "data"
    client = await registry(root=root)
    await push(client, "team/app")
    flip(stored(root, sha(LAYER)))
    r = await client.post(f"/v2/team/other/blobs/uploads/?mount={sha(LAYER)}&from=team/app")
    assert r.status == 202, "a damaged blob was mounted"  # a plain upload session instead
    assert not (root / layout.layer("team/other", parse_digest(sha(LAYER)))).exists()
    r = await client.put(f"{r.headers['Location']}?digest={sha(LAYER)}", data=io.BytesIO(LAYER))
    assert r.status == 201 and stored(root, sha(LAYER)).read_bytes() == LAYER  # the upload repaired it
    r = await client.post(f"/v2/team/third/blobs/uploads/?mount={sha(LAYER)}&from=team/app")
    assert r.status == 201  # intact: mounted


async def scrubbed(storage: FilesystemStorage, tmp: Path, **kwargs: Any) -> ScrubResult:
    """`mirror scrub` as the command runs it: on a ledger of its own, read from storage."""
    async with ledgers.opened(storage, tmp, private=lambda name: name.startswith("team/")) as ledger:
        return await Scrubber(storage, ledger).run(**kwargs)


async def test_scrub_quarantines_private_and_removes_cached_damage(registry: Factory, tmp_path: Path) -> None:
    script = ScriptedUpstream()
    cached_blob = bytes(reversed(range(256))) * 1024
    cached_digest = script.add_blob(cached_blob)
    server = TestServer(script.app())
    await server.start_server()
    try:
        root = tmp_path / "data"
        client = await registry(root=root, private={"patterns": ["team/**"]},
                                upstreams=[{"name": "hub", "url": str(server.make_url("")), "dockerhub": True}])
        await push(client, "team/app")
        await push(client, "team/copy")
        r = await client.get(f"/v2/library/cached/blobs/{cached_digest}")
        assert await r.read() == cached_blob
        for _ in range(100):
            if stored(root, cached_digest).exists():
                break
            await asyncio.sleep(0.05)
        flip(stored(root, sha(LAYER)))
        flip(stored(root, cached_digest), at=0)

        storage = FilesystemStorage(root)
        dry = await scrubbed(storage, tmp_path, dry_run=True)
        assert {d.digest for d in dry.damaged} == {sha(LAYER), cached_digest}
        assert stored(root, sha(LAYER)).exists() and stored(root, cached_digest).exists()

        result = await scrubbed(storage, tmp_path, pace=Pace(64 << 20))
        by_digest = {d.digest: d for d in result.damaged}
        assert set(by_digest) == {sha(LAYER), cached_digest}
        private, cached = by_digest[sha(LAYER)], by_digest[cached_digest]
        assert private.private and private.action == "quarantined"
        assert private.repositories == ["team/app", "team/copy"]
        assert not cached.private and cached.action == "removed" and cached.repositories == ["library/cached"]
        assert result.objects == 4 and result.bytes == len(CONFIG) + len(LAYER) + len(MANIFEST) + len(cached_blob)
        quarantined = root / layout.quarantined(parse_digest(sha(LAYER)))
        assert quarantined.exists() and not stored(root, sha(LAYER)).exists()

        # Damaged private content is not served, and a push repairs it; cached content is fetched again.
        assert (await client.get(f"/v2/team/app/blobs/{sha(LAYER)}")).status == 404
        assert await chunked(client, "team/app", LAYER) == 201
        assert await (await client.get(f"/v2/team/copy/blobs/{sha(LAYER)}")).read() == LAYER
        r = await client.get(f"/v2/library/cached/blobs/{cached_digest}")
        assert await r.read() == cached_blob
        assert script.calls[f"GET /v2/library/cached/blobs/{cached_digest}"] == 2
        assert not (await scrubbed(storage, tmp_path)).damaged
    finally:
        await server.close()


async def test_the_server_scrubs_in_the_background(registry: Factory, tmp_path: Path) -> None:
    script = ScriptedUpstream()
    blob = bytes(range(256)) * 2048
    digest = script.add_blob(blob)
    server = TestServer(script.app())
    await server.start_server()
    try:
        root = tmp_path / "data"
        client = await registry(root=root, scrub={"interval": "200ms", "rate": "64MiB"},
                                upstreams=[{"name": "hub", "url": str(server.make_url("")), "dockerhub": True}])
        assert await (await client.get(f"/v2/library/app/blobs/{digest}")).read() == blob
        for _ in range(100):
            if stored(root, digest).exists():
                break
            await asyncio.sleep(0.05)
        flip(stored(root, digest))

        async def metrics() -> Samples:
            return Samples(await (await client.get("/metrics")).text())

        for _ in range(200):  # bounded: a pass every 200 ms
            m = await metrics()
            if m.value("mirror_scrub_damaged_total", kind="cached") and m.value(
                    "mirror_scrub_last_pass_timestamp_seconds"):
                break
            await asyncio.sleep(0.05)
        assert m.value("mirror_scrub_damaged_total", kind="cached") == 1
        assert m.value("mirror_scrub_damaged_total", kind="private") == 0
        assert m.value("mirror_scrub_bytes_total") >= len(blob)
        assert m.value("mirror_scrub_last_pass_timestamp_seconds") > 0
        assert await (await client.get(f"/v2/library/app/blobs/{digest}")).read() == blob
        assert script.calls[f"GET /v2/library/app/blobs/{digest}"] == 2
    finally:
        await server.close()


async def test_a_damaged_cached_manifest_is_fetched_again_and_replaced(registry: Factory, tmp_path: Path) -> None:
    script = ScriptedUpstream()
    script.add_blob(CONFIG)
    script.add_blob(LAYER)
    digest = script.add_manifest("library/app", "v1", MANIFEST)
    server = TestServer(script.app())
    await server.start_server()
    try:
        root = tmp_path / "data"
        upstreams = [{"name": "hub", "url": str(server.make_url("")), "dockerhub": True}]
        client = await registry(root=root, upstreams=upstreams)
        assert await (await client.get(f"/v2/library/app/manifests/{digest}")).read() == MANIFEST
        flip(stored(root, digest))
        fresh = await registry(root=root, upstreams=upstreams)
        r = await fresh.get(f"/v2/library/app/manifests/{digest}")
        assert r.status == 200 and await r.read() == MANIFEST
        assert stored(root, digest).read_bytes() == MANIFEST  # replaced, not served
        assert script.calls[f"GET /v2/library/app/manifests/{digest}"] == 2
    finally:
        await server.close()
