"""`mirror gc`: exactly the unreferenced blobs go; whatever a tag, manifest or index needs stays."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mirror.commands import gc
from mirror.commands.gc import GcResult
from mirror.names import parse_digest
from mirror.storage import layout
from mirror.storage.filesystem import FilesystemStorage
from tests.support import ledgers
from tests.test_push import OCI_INDEX, OCI_MANIFEST, Factory, push_image, sha, upload


def age_everything(root: Path, seconds: float = 7200) -> None:
    """Blobs and links as if written `seconds` ago (gc keeps what was written or linked within its grace);
    uploads keep their own times. Their journal records go too: records that old are behind the
    horizon of any ledger read from storage now (a rebuild replays only what came during its walk)."""
    past = time.time() - seconds
    for top in (layout.BLOBS, layout.REPOSITORIES):
        for p in (root / top).rglob("*"):
            if "_uploads" not in p.parts:
                os.utime(p, (past, past))
    shutil.rmtree(root / layout.JOURNAL, ignore_errors=True)


async def collect(storage: FilesystemStorage, tmp: Path, **kwargs: Any) -> GcResult:
    """`mirror gc` as the command runs it: on a ledger read from storage as it is now."""
    async with ledgers.opened(storage, tmp) as ledger:
        return await gc.collect(ledger, **kwargs)


async def test_gc_sweeps_exactly_the_unreferenced(registry: Factory, tmp_path: Path) -> None:
    root = tmp_path / "data"
    client = await registry(storage={"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}})
    _kept, _kept_body = await push_image(client, "team/app", "v1", seed=b"k")
    child, child_body = await push_image(client, "team/multi", "amd64", seed=b"c")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": child, "size": len(child_body)}]}).encode()
    assert (await client.put("/v2/team/multi/manifests/latest", data=index,
                             headers={"Content-Type": OCI_INDEX})).status == 201
    # The child loses its own tag: only the index keeps it (and its blobs) alive.
    assert (await client.delete("/v2/team/multi/manifests/amd64")).status == 202
    gone, _ = await push_image(client, "team/old", "v1", seed=b"g")
    assert (await client.delete(f"/v2/team/old/manifests/{gone}")).status == 202
    orphan = await upload(client, "team/app", b"uploaded, never referenced")

    storage = FilesystemStorage(root)
    age_everything(root)
    dry = await collect(storage, tmp_path, dry_run=True)
    expected = {orphan, gone, sha(b'{"os":"linux","seed":"g"}'), sha(b"layer-" + b"g" * 1000)}
    assert set(dry.swept) == expected
    assert all((root / layout.blob(parse_digest(d))).exists() for d in expected)  # dry run

    result = await collect(storage, tmp_path)
    assert set(result.swept) == expected
    for digest in expected:
        assert not (root / layout.blob_entry(parse_digest(digest))).exists()
    # Everything still referenced pulls as before.
    for name, ref in (("team/app", "v1"), ("team/multi", "latest"), ("team/multi", child)):
        assert (await client.get(f"/v2/{name}/manifests/{ref}")).status == 200
    for layer in (b"layer-" + b"k" * 1000, b"layer-" + b"c" * 1000):
        name = "team/app" if b"k" in layer else "team/multi"
        assert await (await client.get(f"/v2/{name}/blobs/{sha(layer)}")).read() == layer
    assert (await collect(storage, tmp_path)).swept == []


async def test_gc_keeps_young_blobs_and_those_of_live_uploads(registry: Factory, tmp_path: Path) -> None:
    root = tmp_path / "data"
    client = await registry(storage={"filesystem": {"rootdirectory": str(root)}})
    young = await upload(client, "team/app", b"just pushed, manifest on its way")
    result = await collect(FilesystemStorage(root), tmp_path)
    assert result.swept == [] and result.kept_young == 1
    # An upload that started an hour ago holds back everything younger than it.
    location = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    upload_id = location.rsplit("/", 1)[1]
    (root / layout.upload_started("team/app", upload_id)).write_bytes(layout.started_at(time.time() - 3 * 3600))
    age_everything(root, seconds=2 * 3600)
    result = await collect(FilesystemStorage(root), tmp_path)
    assert result.swept == [] and result.kept_young == 1
    age_everything(root, seconds=4 * 3600)
    assert (await collect(FilesystemStorage(root), tmp_path)).swept == [young]


async def test_an_idle_upload_stops_protecting_younger_blobs(registry: Factory, tmp_path: Path) -> None:
    root = tmp_path / "data"
    client = await registry(storage={"filesystem": {"rootdirectory": str(root)}})
    young = await upload(client, "team/app", b"pushed, manifest never came")
    location = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    assert (await client.patch(location, data=b"some bytes")).status == 202
    upload_dir = root / layout.upload("team/app", location.rsplit("/", 1)[1])
    (upload_dir / "startedat").write_bytes(layout.started_at(time.time() - 3 * 3600))
    age_everything(root, seconds=2 * 3600)
    # Receiving bytes until now: in progress, it keeps what is younger than its start.
    assert (await collect(FilesystemStorage(root), tmp_path)).swept == []
    # Silent for two hours: abandoned, it keeps nothing (purging removes it later).
    past = time.time() - 2 * 3600
    for f in upload_dir.rglob("*"):  # data, startedat and the hash states (hashstates/<alg>/<offset>)
        os.utime(f, (past, past))
    assert (await collect(FilesystemStorage(root), tmp_path, upload_idle=3 * 3600, dry_run=True)).swept == []
    assert (await collect(FilesystemStorage(root), tmp_path)).swept == [young]
    assert upload_dir.exists()


@pytest.mark.e2e  # runs `python -m mirror` processes
def test_gc_cli(tmp_path: Path) -> None:
    root = tmp_path / "data"
    orphan = root / layout.blob(parse_digest("sha256:ab" + "0" * 62))
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x")
    age_everything(root)
    config = tmp_path / "config.yml"
    config.write_text(f"version: 0.1\nstorage: {{filesystem: {{rootdirectory: {root}}}}}\n")
    r = subprocess.run([sys.executable, "-m", "mirror", "gc", "--config", str(config), "--dry-run", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["swept"] == ["sha256:ab" + "0" * 62] and orphan.exists()
    r = subprocess.run([sys.executable, "-m", "mirror", "gc", "--config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "deleted 1 blobs" in r.stdout and not orphan.exists()


async def test_gc_keeps_what_a_leniently_written_cached_manifest_references(tmp_path: Path) -> None:
    """Upstreams send manifests a push would refuse (descriptors without mediaType): what they
    reference is in use all the same."""
    storage = FilesystemStorage(tmp_path / "data")
    layer, config = os.urandom(1000), b'{"os":"linux"}'
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": sha(config), "size": len(config)},
                           "layers": [{"digest": sha(layer), "size": len(layer)}]}).encode()
    for data in (layer, config, manifest):
        d = sha(data)
        await storage.put_bytes(layout.blob(parse_digest(d)), data)
    m = parse_digest(sha(manifest))
    await storage.put_bytes(layout.revision("library/app", m), layout.link(m))
    age_everything(tmp_path / "data")
    result = await collect(storage, tmp_path, grace=0)
    assert result.swept == [] and result.marked == 3
