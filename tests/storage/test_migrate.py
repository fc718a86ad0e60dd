"""Mirror's old layout moved to registry:2's at start (storage/migrate.py): lossless on every backend,
finished by the next start wherever a crash stopped it, idempotent, and whatever it does not
recognise left where it was. The old root is written here key by key, as the old releases wrote it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.names import Digest
from mirror.storage import Stat, Storage, Writer, inventory, layout, migrate
from mirror.storage.filesystem import FilesystemStorage
from tests.support.walked import walked

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
UPLOAD = "0123456789abcdef0123456789abcdef"
DIGEST_TAG = "ab" * 32  # a tag that looks like a digest's hex


def blob(objects: dict[str, bytes], data: bytes) -> Digest:
    d = Digest.of(data)
    objects[f"blobs/sha256/{d.hex[:2]}/{d.hex}"] = data
    return d


def image(objects: dict[str, bytes], name: str, seed: str, shared: Digest) -> Digest:
    """An image in the old layout: its blobs, links and tags as plain files holding digests."""
    config = blob(objects, json.dumps({"os": "linux", "seed": seed}).encode())
    layer = blob(objects, seed.encode() * 3000)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(config),
                                  "size": 1},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": str(d),
                                   "size": 1} for d in (layer, shared)]}).encode()
    manifest = blob(objects, body)
    repo = f"repositories/{name}"
    for d in (config, layer, shared):
        objects[f"{repo}/_layers/sha256/{d.hex}"] = str(d).encode()
    objects[f"{repo}/_manifests/revisions/sha256/{manifest.hex}"] = b""  # old releases left some empty
    objects[f"{repo}/_manifests/tags/latest"] = str(manifest).encode()
    objects[f"{repo}/_manifests/tags/{DIGEST_TAG}"] = f"{manifest}\n".encode()
    return manifest


PRIVATE = {"team/app", "old/one", "corp/tool"}


def old_root(small: bool = False) -> tuple[dict[str, bytes], dict[str, Digest]]:
    """team/app (old `_mirror/private`), old/one (the older `_private` file), library/alpine and
    library/alpine/sub (pulled through, unmarked, nested), corp/tool (unmarked, private by config),
    an upload in progress, a referrer, a tag holding no digest and a stray blob file. `small`: the
    first three only."""
    objects: dict[str, bytes] = {}
    shared = blob(objects, b"shared base layer" * 100)
    names = ("team/app", "old/one", "library/alpine") + (() if small else ("library/alpine/sub", "corp/tool"))
    manifests = {name: image(objects, name, name, shared) for name in names}
    objects["repositories/team/app/_mirror/private"] = b""
    objects["repositories/old/one/_private"] = b""
    sbom = blob(objects, json.dumps({"schemaVersion": 2, "subject": {"digest": str(manifests["team/app"])}}).encode())
    subject = manifests["team/app"]
    objects[f"repositories/team/app/_referrers/sha256/{subject.hex}/sha256-{sbom.hex}"] = b'{"digest": "x"}'
    objects[f"repositories/team/app/_uploads/{UPLOAD}/data"] = b"half an upload"
    objects[f"repositories/team/app/_uploads/{UPLOAD}/startedat"] = b"1700000000.25"
    objects[f"repositories/team/app/_uploads/{UPLOAD}/hashstate"] = b"mhs1" + bytes(40)
    objects["repositories/library/alpine/_manifests/tags/broken"] = b"not a digest"
    objects["blobs/sha256/zz/junk"] = b"an editor's backup"
    return objects, manifests


def is_private(name: str) -> bool:
    return name.startswith("corp/")


async def write(storage: Storage, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        await storage.put_bytes(key, data)


def write_files(root: Path, objects: dict[str, bytes]) -> None:
    """The old root as files, the way the old release left them on disk."""
    for key, data in objects.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)


async def contents(storage: Storage, *tops: str) -> dict[str, bytes]:
    found = {}
    for top in tops or (layout.ROOT,):
        async for key, _ in storage.scan(top):
            found[key] = await storage.get_bytes(key)
    return found


async def check_migrated(storage: Storage, objects: dict[str, bytes], manifests: dict[str, Digest]) -> None:
    for key, data in objects.items():
        parsed = layout.parse_legacy(key)
        if parsed is not None and parsed.kind == layout.BLOB and parsed.digest is not None:
            assert await storage.get_bytes(layout.blob(parsed.digest)) == data
    found = await walked(storage)
    assert {n: r.marks for n, r in found.items()} == {
        name: {"private" if name in PRIVATE else "cached"} for name in manifests}
    for name, manifest in manifests.items():
        repo = found[name]
        assert repo.manifests == {str(manifest)} and len(repo.layers) == 3
        assert repo.tags == {"latest", DIGEST_TAG}
        for tag in repo.tags:
            assert await inventory.tag_target(storage, name, tag) == str(manifest)
            assert await storage.get_bytes(layout.tag_index(name, tag, manifest)) == layout.link(manifest)
        for d in inventory.digests(repo.manifests | repo.layers):  # each link holds its digest, as registry:2 reads it
            key = layout.revision(name, d) if str(d) in repo.manifests else layout.layer(name, d)
            assert await storage.get_bytes(key) == layout.link(d)
    ((subject, referrer, _),) = await inventory.referrer_records(storage, "team/app")
    assert subject == manifests["team/app"] and await storage.get_bytes(layout.blob(referrer))
    assert await storage.get_bytes(layout.upload_data("team/app", UPLOAD)) == b"half an upload"
    assert await storage.get_bytes(layout.upload_started("team/app", UPLOAD)) == b"2023-11-14T22:13:20Z"
    assert await storage.list(layout.hashstates("team/app", UPLOAD, "sha256")) == []
    # what it did not recognise is where it was, and nothing else is left of the old layout
    assert await contents(storage, layout.LEGACY_BLOBS, layout.LEGACY_REPOSITORIES) == {
        "blobs/sha256/zz/junk": b"an editor's backup",
        "repositories/library/alpine/_manifests/tags/broken": b"not a digest"}


async def test_an_old_root_moves_over_losslessly(storage: Storage) -> None:
    objects, manifests = old_root()
    await write(storage, objects)
    result = await migrate.run(storage, is_private)
    assert result is not None
    assert result.blobs == 1 + 3 * 5 + 1 and result.left == ["blobs/sha256/zz/junk",
                                                             "repositories/library/alpine/_manifests/tags/broken"]
    assert sorted(result.private) == ["corp/tool", "old/one", "team/app"]
    assert sorted(result.cached) == ["library/alpine", "library/alpine/sub"]
    await check_migrated(storage, objects, manifests)
    after = await contents(storage)
    again = await migrate.run(storage, is_private)  # the strays keep it looking, and it changes nothing
    assert again is not None and again.blobs == 0 and again.records == 0
    assert await contents(storage) == after


async def test_a_new_root_is_left_alone(storage: Storage) -> None:
    assert await migrate.run(storage, is_private) is None
    await storage.put_bytes(layout.marker("team/app", layout.PRIVATE_MARK), b"")
    assert await migrate.run(storage, is_private) is None


class Crash(Exception):
    """The process died here."""


class CrashingStorage(Storage):
    """A filesystem that dies before its `at`-th change (put, move, delete, commit)."""

    def __init__(self, root: Path, at: int) -> None:
        self.inner = FilesystemStorage(root)
        self.name = self.inner.name
        self.at = at
        self.changes = 0

    def _change(self) -> None:
        self.changes += 1
        if self.at and self.changes >= self.at:  # dead: nothing after the first failure happens either
            raise Crash(self.changes)

    async def stat(self, key: str) -> Stat | None:
        return await self.inner.stat(key)

    def reader(self, key: str, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        return self.inner.reader(key, offset, length)

    async def writer(self, key: str, append: bool = False) -> Writer:
        self._change()
        return await self.inner.writer(key, append)

    async def get_bytes(self, key: str) -> bytes:
        return await self.inner.get_bytes(key)

    async def put_bytes(self, key: str, data: bytes) -> None:
        self._change()
        await self.inner.put_bytes(key, data)

    async def put_file(self, key: str, source: Path) -> None:
        self._change()
        await self.inner.put_file(key, source)

    async def list(self, prefix: str) -> list[str]:
        return await self.inner.list(prefix)

    async def delete(self, key: str) -> None:
        self._change()
        await self.inner.delete(key)

    async def move(self, src: str, dst: str) -> None:
        self._change()
        await self.inner.move(src, dst)

    def scan(self, prefix: str) -> Any:
        return self.inner.scan(prefix)

    def staging_dir(self) -> Path:
        return self.inner.staging_dir()


async def test_a_crash_at_any_point_is_finished_by_the_next_start(tmp_path: Path) -> None:
    objects, manifests = old_root(small=True)
    write_files(tmp_path / "clean", objects)
    clean = FilesystemStorage(tmp_path / "clean")
    total = CrashingStorage(tmp_path / "clean", at=0)
    await migrate.run(total, is_private)
    await check_migrated(clean, objects, manifests)
    expected = await contents(clean)
    assert total.changes > 30
    for at in range(1, total.changes + 1):
        root = tmp_path / f"crash-{at}"
        write_files(root, objects)
        with pytest.raises(Crash):
            await migrate.run(CrashingStorage(root, at), is_private)
        restarted = FilesystemStorage(root)
        await migrate.run(restarted, is_private)
        assert await contents(restarted) == expected, f"crashed before change {at}"
        assert await contents(restarted, layout.LEGACY_BLOBS, layout.LEGACY_REPOSITORIES) == {
            k: v for k, v in objects.items() if k.endswith(("/junk", "/broken"))}


async def test_two_replicas_starting_together_both_finish(storage: Storage, tmp_path: Path) -> None:
    """Two processes on one bucket move the same objects at once: whoever comes second finds each done."""
    objects, manifests = old_root()
    await write(storage, objects)
    await asyncio.gather(migrate.run(storage, is_private), migrate.run(storage, is_private))
    await check_migrated(storage, objects, manifests)


@pytest.mark.parametrize("inner", ["docker/registry/v2", "docker", "docker/registry"])
async def test_a_root_pointed_inside_registry2s_tree_is_refused(tmp_path: Path, inner: str) -> None:
    """storage.filesystem.rootdirectory set to registry:2's docker/registry/v2 (or docker/, docker/registry/):
    served as it is it would look empty (or be taken for mirror's old layout): a clear error instead."""
    r2 = FilesystemStorage(tmp_path / "r2")
    d = Digest.of(b"x")
    await r2.put_bytes(layout.blob(d), b"x")
    await r2.put_bytes(layout.layer("app", d), layout.link(d))
    pointed = FilesystemStorage(tmp_path / "r2" / inner)
    with pytest.raises(migrate.LayoutError, match=r"point storage\.filesystem\.rootdirectory"):
        await migrate.run(pointed, is_private)
    assert await r2.get_bytes(layout.blob(d)) == b"x" and await r2.stat(layout.layer("app", d)) is not None


Factory = Callable[..., Any]


async def test_an_old_root_is_served_after_the_upgrade(registry: Factory, tmp_path: Path) -> None:
    """The old root as the previous release left it, served by a mirror started on it: every tag, manifest
    and blob, the pulled-through ones with their upstream down (stale, as any cached tag)."""
    objects, manifests = old_root()
    objects[f"repositories/team/app/_uploads/{UPLOAD}/startedat"] = str(time.time()).encode()  # not yet purged
    root = tmp_path / "data"
    write_files(root, objects)
    client = await registry(root=root, private={"patterns": ["corp/**"]}, upstreams=[
        {"name": "hub", "url": "http://127.0.0.1:9", "dockerhub": True, "retries": 1, "connect_timeout": "1s"}])
    r = await client.get("/v2/_catalog")
    assert (await r.json())["repositories"] == sorted(manifests)
    for name, manifest in manifests.items():
        for tag in ("latest", DIGEST_TAG):
            r = await client.get(f"/v2/{name}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
            assert r.status == 200 and r.headers["Docker-Content-Digest"] == str(manifest), (name, tag)
        for layer in json.loads(objects[f"blobs/sha256/{manifest.hex[:2]}/{manifest.hex}"])["layers"]:
            r = await client.get(f"/v2/{name}/blobs/{layer['digest']}")
            assert r.status == 200 and Digest.of(await r.read()) == Digest(*layer["digest"].split(":")), name
    for name in ("team/app", "corp/tool"):
        assert sorted((await (await client.get(f"/v2/{name}/tags/list")).json())["tags"]) == sorted(
            ["latest", DIGEST_TAG])
    r = await client.get(f"/v2/team/app/blobs/uploads/{UPLOAD}")
    assert r.status == 204 and r.headers["Range"] == f"0-{len(b'half an upload') - 1}"
    left = sorted(str(p.relative_to(root)) for top in ("blobs", "repositories") for p in (root / top).rglob("*")
                  if p.is_file())
    assert left == ["blobs/sha256/zz/junk", "repositories/library/alpine/_manifests/tags/broken"]
