"""Export and import go through the Storage interface only: the round trip, and a damaged archive
leaving storage unchanged, on every backend (OSS and the hot tier included)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from mirror.commands.archive import ArchiveError, export
from mirror.names import Digest, parse_digest
from mirror.storage import NotFound, Storage, layout
from tests.test_archive import imported_from

MiB = 1 << 20


async def listing(storage: Storage, prefix: str = "") -> dict[str, str]:
    """Every object under the layout's top-level prefixes: key -> sha256 of its bytes."""
    out: dict[str, str] = {}
    for top in ([prefix] if prefix else [layout.BLOBS, layout.REPOSITORIES]):
        children = await storage.list(top)
        if not children:
            try:
                out[top] = hashlib.sha256(await storage.get_bytes(top)).hexdigest()
            except NotFound:
                pass
            continue
        for child in children:
            out.update(await listing(storage, f"{top}/{child}"))
    return out


async def put_blob(storage: Storage, data: bytes) -> Digest:
    digest = Digest.of(data)
    await storage.put_bytes(layout.blob(digest), data)
    return digest


async def populate(storage: Storage) -> None:
    """team/app:v1 (private, a layer bigger than an OSS part) and library/cached:latest (proxied)."""
    for name, private, size in (("team/app", True, 3 * MiB + 5), ("library/cached", False, 1000)):
        config = await put_blob(storage, json.dumps({"os": "linux", "name": name}).encode())
        layer = await put_blob(storage, os.urandom(size))
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": str(config), "size": 1},
                               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                           "digest": str(layer), "size": size}]}).encode()
        m = await put_blob(storage, manifest)
        for d in (config, layer):
            await storage.put_bytes(layout.layer(name, d), layout.link(d))
        await storage.put_bytes(layout.revision(name, m), layout.link(m))
        for key, data in layout.tag_links(name, "v1" if private else "latest", m):
            await storage.put_bytes(key, data)
        await storage.put_bytes(layout.marker(name, layout.PRIVATE_MARK if private else layout.CACHED_MARK), b"")


async def test_round_trip_on_every_backend(storage: Storage, tmp_path: Path) -> None:
    await populate(storage)
    before = await listing(storage)
    archive = tmp_path / "backup.tar"
    result = await export(storage, archive, [], None)
    assert [(r.name, r.kind) for r in result.header.repositories] == [("library/cached", "proxied"),
                                                                       ("team/app", "private")]
    await storage.delete(layout.REPOSITORIES)
    await storage.delete(layout.BLOBS)
    assert await listing(storage) == {}

    imported = await imported_from(storage, archive, tmp_path)
    assert imported.new_blobs == 6
    assert await listing(storage) == before

    # A damaged copy: one byte of the big layer flipped. It fails and storage stays as it is.
    big = max(result.header.blobs, key=lambda d: result.header.blobs[d])
    await storage.delete(layout.blob(parse_digest(big)))
    await storage.delete(layout.repository("team"))
    damaged = bytearray(archive.read_bytes())
    damaged[damaged.index(b"blobs/sha256/" + big.split(":")[1].encode()) + 2048] ^= 1  # inside its data
    (tmp_path / "bad.tar").write_bytes(bytes(damaged))
    partial = await listing(storage)
    with pytest.raises(ArchiveError, match="do not match the digest"):
        await imported_from(storage, tmp_path / "bad.tar", tmp_path)
    assert await listing(storage) == partial
