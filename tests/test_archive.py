"""`mirror export` / `mirror import`: the tar format round trip (pushed and cached content, served
again after the import), and archives that are damaged, truncated or inconsistent, which must
fail naming the member and leave storage exactly as it was."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.commands.archive import (
    HEADER,
    TRAILER,
    ArchiveError,
    Header,
    ImportResult,
    export,
    import_archive,
    member_name,
    plan_export,
    write_archive,
)
from mirror.names import parse_digest
from mirror.storage import Storage, layout
from mirror.storage.filesystem import FilesystemStorage
from tests.support import ledgers
from tests.test_cache import committed
from tests.test_cache import image as upstream_image
from tests.test_push import OCI_INDEX, OCI_MANIFEST, Factory, push_image, sha, upload


async def imported_from(storage: Storage, archive: Path, tmp: Path) -> ImportResult:
    """`mirror import` as the command runs it: with a ledger of its own (outside the storage root)."""
    async with ledgers.opened(storage, tmp) as ledger:
        return await import_archive(storage, ledger, archive)


def snapshot(root: Path, journal: bool = False) -> dict[str, tuple[int, str]]:
    """Every file under `root` but this machine's ledger (`_index/`, local state any process that reads
    storage keeps up to date) and, unless `journal`, the replicas' journal and heartbeats (`_mirror/`,
    which a running server writes to): path -> (size, sha256). Storage 'unchanged' means this is equal."""
    out = {}
    skip = {"_index"} | (set() if journal else {layout.MIRROR})
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).parts[0] not in skip:
            data = p.read_bytes()
            out[str(p.relative_to(root))] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def content(root: Path) -> dict[str, tuple[int, str]]:
    """What an import must reproduce: blobs and repositories (not the index or staging)."""
    return {k: v for k, v in snapshot(root).items() if k.startswith(("docker/",))}


async def push_private(client: Any) -> dict[str, str]:
    """team/app:v1, team/multi:latest (an index over two images), an artifact referring to v1."""
    app, _ = await push_image(client, "team/app", "v1", seed=b"a")
    children = []
    for seed in (b"m", b"n"):
        digest, body = await push_image(client, "team/multi", seed.decode(), seed=seed)
        children.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body)})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
    r = await client.put("/v2/team/multi/manifests/latest", data=index, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201
    empty = await upload(client, "team/app", b"{}")
    sbom = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x-sbom",
                       "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
                       "layers": [],
                       "subject": {"mediaType": OCI_MANIFEST, "digest": app, "size": 1}}).encode()
    r = await client.put(f"/v2/team/app/manifests/{sha(sbom)}", data=sbom, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201
    return {"app": app, "index": sha(index), "sbom": sha(sbom)}


async def test_round_trip_private_and_cached(registry: Factory, mirror: Any, upstream: Any, tmp_path: Path) -> None:
    script, _ = upstream
    source = tmp_path / "data"  # the `mirror` fixture's storage
    client = await mirror(tag_ttl="1h")
    digests = await push_private(await registry(root=source))  # same storage: private repos next to the cache
    cached, _ = upstream_image(script)
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    blob_digest = json.loads(script.manifests[("library/app", cached)][0])["layers"][0]["digest"]
    assert (await client.get(f"/v2/app/blobs/{blob_digest}")).status == 200
    await committed(tmp_path, blob_digest)

    storage = FilesystemStorage(source)
    archive = tmp_path / "backup.tar"
    result = await export(storage, archive, [], None)  # while both apps run
    assert sorted((r.name, r.kind) for r in result.header.repositories) == [
        ("library/app", "proxied"), ("team/app", "private"), ("team/multi", "private")]
    assert result.bytes == sum(result.header.blobs.values()) and result.notes == []
    # standard tar, header first, every blob, the end marker last
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == HEADER and names[-1] == TRAILER
    assert sorted(names[1:-1]) == sorted(member_name(d) for d in result.header.blobs)
    assert not archive.with_name("backup.tar.partial").exists()

    target = tmp_path / "restored"
    imported = await imported_from(FilesystemStorage(target), archive, tmp_path)
    assert imported.new_blobs == len(result.header.blobs)
    assert content(target) == content(source)
    assert not [p for p in target.iterdir() if p.name.startswith("_import-")]

    # A mirror on the restored storage serves all of it, the cached tag with its upstream down.
    script.status = 503
    restored = await registry(root=target, upstreams=[{"name": "hub", "url": "http://127.0.0.1:9", "dockerhub": True,
                                                       "retries": 1, "connect_timeout": "1s"}],
                              private={"patterns": ["team/**"]})
    for path in ("team/app/manifests/v1", f"team/app/manifests/{digests['sbom']}", "team/multi/manifests/latest",
                 "team/multi/manifests/m"):
        r = await restored.get(f"/v2/{path}")
        assert r.status == 200, (path, await r.text())
    assert (await restored.get("/v2/team/multi/manifests/latest")).headers["Docker-Content-Digest"] == digests["index"]
    r = await restored.get("/v2/library/app/manifests/latest")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == cached and "110" in r.headers["Warning"]
    assert (await restored.get(f"/v2/library/app/blobs/{blob_digest}")).status == 200
    referrers = await (await restored.get(f"/v2/team/app/referrers/{digests['app']}")).json()
    assert [m["digest"] for m in referrers["manifests"]] == [digests["sbom"]]

    # Importing again changes nothing; so does an import of what is there already.
    before = snapshot(target)
    again = await imported_from(FilesystemStorage(target), archive, tmp_path)
    assert again.new_blobs == 0 and content(target) == {k: v for k, v in before.items() if k.startswith("docker/")}


async def test_selection(registry: Factory, mirror: Any, upstream: Any, tmp_path: Path) -> None:
    script, _ = upstream
    client = await mirror()
    await push_private(await registry(root=tmp_path / "data"))
    upstream_image(script)
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    storage = FilesystemStorage(tmp_path / "data")

    async def names(patterns: list[str], kind: str | None) -> list[str]:
        result = await export(storage, tmp_path / "x.tar", patterns, kind)
        return [r.name for r in result.header.repositories]

    assert await names([], "private") == ["team/app", "team/multi"]
    assert await names([], "proxied") == ["library/app"]
    assert await names(["team/*"], None) == ["team/app", "team/multi"]
    assert await names(["team/multi", "library/**"], None) == ["library/app", "team/multi"]
    with pytest.raises(ArchiveError, match="no repository matches team/nope"):
        await names(["team/nope"], None)
    # a proxied repository holds the manifest it cached, not blobs it never fetched: declared absent
    result = await export(storage, tmp_path / "x.tar", ["library/app"], None)
    (repo,) = result.header.repositories
    assert repo.tags == {"latest": repo.manifests[0]} and len(repo.absent) == 2 and repo.layers == []


# --- damaged archives ------------------------------------------------------------------------------

@pytest.fixture
async def exported(registry: Factory, tmp_path: Path) -> tuple[Path, Path]:
    """(an archive of private content, a storage root with other content to import it into)."""
    await push_private(await registry(root=tmp_path / "source"))
    archive = tmp_path / "good.tar"
    await export(FilesystemStorage(tmp_path / "source"), archive, [], None)
    await push_image(await registry(root=tmp_path / "target"), "team/other", "v1", seed=b"o")
    return archive, tmp_path / "target"


def members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(archive) as tar:
        out = []
        for info in tar.getmembers():
            f = tar.extractfile(info)
            assert f is not None
            out.append((info, f.read()))
        return out


def rewrite(archive: Path, dest: Path, edit: Callable[[dict[str, Any]], list[str]]) -> None:
    """A new, self-consistent archive (written with the standard tarfile module) whose header `edit`
    changed; the members of the digests it returns are left out."""
    parts = members(archive)
    doc = json.loads(parts[0][1])
    dropped = edit(doc)
    header = json.dumps(doc).encode()
    blobs = [(i, d) for i, d in parts[1:-1] if i.name not in {member_name(x) for x in dropped}]
    trailer = json.dumps({"header": sha(header), "blobs": len(doc["blobs"]),
                          "bytes": sum(b["size"] for b in doc["blobs"])}).encode()
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(HEADER, header), *[(i.name, d) for i, d in blobs], (TRAILER, trailer)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def drop_a_layer(doc: dict[str, Any]) -> list[str]:
    """Take one layer of team/app out of the archive entirely, as if it had never been there."""
    repo = next(r for r in doc["repositories"] if r["name"] == "team/app")
    layer = next(d for d in repo["layers"] if d != sha(b"{}") and d != sha(b'{"os":"linux","seed":"a"}'))
    repo["layers"].remove(layer)
    doc["blobs"] = [b for b in doc["blobs"] if b["digest"] != layer]
    return [layer]


def flip(archive: Path, dest: Path, offset: int) -> None:
    data = bytearray(archive.read_bytes())
    data[offset] ^= 0x55
    dest.write_bytes(bytes(data))


def layer_member(archive: Path) -> tarfile.TarInfo:
    return next(i for i, d in members(archive) if i.name.startswith("blobs/") and d.startswith(b"layer-"))


@pytest.mark.parametrize("damage", ["flip-blob", "flip-header-json", "flip-tar-header", "truncate-blob",
                                    "truncate-before-end", "truncate-header", "no-end", "missing-blob",
                                    "unlisted-blob", "manifest-references-missing", "tag-to-nowhere",
                                    "newer-version", "not-a-tar", "empty"])
async def test_damaged_archive_fails_and_leaves_storage_unchanged(exported: tuple[Path, Path], tmp_path: Path,
                                                                  damage: str) -> None:
    archive, target = exported
    bad = tmp_path / "bad.tar"
    size = archive.stat().st_size
    layer = layer_member(archive)
    expect = ""
    if damage == "flip-blob":
        flip(archive, bad, layer.offset_data + layer.size // 2)
        expect = f"{layer.name}: its bytes do not match the digest"
    elif damage == "flip-header-json":
        header = members(archive)[0][0]
        raw = archive.read_bytes()
        at = raw.index(b'"v1"', header.offset_data)  # a tag name: still valid JSON, still a valid tag
        bad.write_bytes(raw[:at] + b'"v7"' + raw[at + 4:])
        expect = f"{TRAILER} does not match {HEADER}"
    elif damage == "flip-tar-header":
        flip(archive, bad, layer.offset + 100)  # the mode field of a member's tar header: its checksum fails
        expect = f"without {layer.name}"
    elif damage == "truncate-blob":
        bad.write_bytes(archive.read_bytes()[:layer.offset_data + layer.size // 2])
        expect = f"{layer.name}"
    elif damage == "truncate-before-end":
        end = members(archive)[-1][0]
        bad.write_bytes(archive.read_bytes()[:end.offset])
        expect = f"no {TRAILER}"
    elif damage == "truncate-header":
        bad.write_bytes(archive.read_bytes()[:700])
        expect = HEADER
    elif damage == "no-end":
        rewrite(archive, bad, lambda doc: [])
        parts = members(bad)
        with tarfile.open(bad, "w") as tar:
            for info, data in parts[:-1]:
                tar.addfile(info, io.BytesIO(data))
        expect = f"no {TRAILER}"
    elif damage == "missing-blob":  # listed in the header, not in the archive
        parts = members(archive)
        victim = json.loads(parts[0][1])["blobs"][-1]["digest"]
        with tarfile.open(bad, "w") as tar:
            for info, data in parts:
                if info.name != member_name(victim):
                    tar.addfile(info, io.BytesIO(data))
        expect = f"without {member_name(victim)}"
    elif damage == "unlisted-blob":
        def unlist(doc: dict[str, Any]) -> list[str]:
            doc["blobs"] = doc["blobs"][:-1]
            for r in doc["repositories"]:
                for key in ("manifests", "layers"):
                    r[key] = [d for d in r[key] if d in {b["digest"] for b in doc["blobs"]}]
            return []
        rewrite(archive, bad, unlist)
        expect = f"is not listed in {HEADER}"
    elif damage == "manifest-references-missing":
        rewrite(archive, bad, drop_a_layer)
        expect = "of team/app references sha256:"
    elif damage == "tag-to-nowhere":
        def retag(doc: dict[str, Any]) -> list[str]:
            doc["repositories"][0]["tags"]["v9"] = "sha256:" + "0" * 64
            return []
        rewrite(archive, bad, retag)
        expect = "tag v9 points at sha256:000"
    elif damage == "newer-version":
        def bump(doc: dict[str, Any]) -> list[str]:
            doc["version"] = 2
            return []
        rewrite(archive, bad, bump)
        expect = "format version 2"
    elif damage == "not-a-tar":
        bad.write_bytes(b"this is not a tar file" * 100)
        expect = "not a tar file"
    elif damage == "empty":
        bad.write_bytes(b"")
        expect = "not a tar file"
    assert bad.stat().st_size <= size + 10240

    before = snapshot(target)
    with pytest.raises(ArchiveError) as failure:
        await imported_from(FilesystemStorage(target), bad, tmp_path)
    print(f"{damage}: {failure.value}")
    assert expect in str(failure.value), str(failure.value)
    assert "nothing was written to storage" in str(failure.value)
    assert snapshot(target) == before
    assert not [p for p in target.iterdir() if p.name.startswith("_import-")]


# --- the commands ----------------------------------------------------------------------------------

def mirror_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.e2e  # runs `python -m mirror` processes
async def test_commands_json_and_exit_codes(exported: tuple[Path, Path], tmp_path: Path) -> None:
    archive, target = exported
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"version": 0.1, "storage": {"filesystem": {"rootdirectory": str(target)}}}))
    source_config = tmp_path / "source.yml"
    source_config.write_text(yaml.safe_dump({"version": 0.1, "storage": {
        "filesystem": {"rootdirectory": str(tmp_path / "source")}}}))

    r = mirror_cli("export", "--config", str(source_config), "--output", str(tmp_path / "cli.tar"), "--json",
                   "--private-only", "team/**")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and [x["name"] for x in doc["repositories"]] == ["team/app", "team/multi"]
    assert doc["repositories"][0] == {"name": "team/app", "kind": "private", "tags": ["v1"], "manifests": 2,
                                      "layers": 3, "absent": 0}
    header = Header.from_bytes(members(tmp_path / "cli.tar")[0][1])
    assert doc["blobs"] == len(header.blobs) and doc["bytes"] == sum(header.blobs.values())
    assert {"output", "seconds", "notes"} <= doc.keys()

    r = mirror_cli("import", str(tmp_path / "cli.tar"), "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["new_blobs"] == doc["blobs"] > 0 and "Traceback" not in r.stderr

    bad = tmp_path / "bad.tar"
    flip(archive, bad, layer_member(archive).offset_data)
    before = snapshot(target)
    r = mirror_cli("import", str(bad), "--config", str(config), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and "do not match the digest" in doc["error"]
    assert "mirror: " in r.stderr and layer_member(archive).name in r.stderr
    assert snapshot(target) == before

    r = mirror_cli("import", str(tmp_path / "nope.tar"), "--config", str(config))
    assert r.returncode == 2 and "no such file" in r.stderr
    r = mirror_cli("export", "--config", str(config), "--output", str(tmp_path / "no" / "dir.tar"))
    assert r.returncode == 2 and "no directory" in r.stderr
    r = mirror_cli("export", "--config", str(config), "--output", str(tmp_path / "x.tar"), "--private-only",
                   "--cached-only")
    assert r.returncode == 2 and "not allowed with" in r.stderr
    r = mirror_cli("export", "--config", str(config), "--output", str(tmp_path / "x.tar"), "team/nothing")
    assert r.returncode == 1 and "no repository matches team/nothing" in r.stderr
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.tar.partial").exists()


def test_header_rejects_what_it_does_not_know() -> None:
    good = {"format": "mirror-export", "version": 1, "repositories": [], "blobs": []}
    assert Header.from_bytes(json.dumps(good).encode()).repositories == []
    for bad, message in [
        (b"[", "not valid JSON"),
        (json.dumps({**good, "format": "other"}).encode(), "not a mirror export header"),
        (json.dumps({**good, "blobs": [{"digest": "sha256:xyz", "size": 1}]}).encode(), "invalid digest"),
        (json.dumps({**good, "blobs": [{"digest": "sha256:" + "a" * 64, "size": -1}]}).encode(), "size"),
        (json.dumps({**good, "repositories": [{"name": "../etc", "kind": "private"}]}).encode(), "invalid repository"),
        (json.dumps({**good, "repositories": [{"name": "a", "kind": "other"}]}).encode(), "kind"),
    ]:
        with pytest.raises(ArchiveError, match=message):
            Header.from_bytes(bad)


async def test_blob_removed_during_export_fails_clearly(registry: Factory, tmp_path: Path) -> None:
    """Between the listing and the copy, gc (or eviction) removes a blob: a clear failure naming it,
    and no archive at all rather than one that looks whole."""
    await push_private(await registry(root=tmp_path / "data"))
    storage = FilesystemStorage(tmp_path / "data")
    header, _ = await plan_export(storage, [], None)
    victim = list(header.blobs)[len(header.blobs) // 2]
    (tmp_path / "data" / layout.blob(parse_digest(victim))).unlink()
    output = tmp_path / "out.tar"
    with pytest.raises(ArchiveError, match=f"blob {victim} was removed from storage during the export"):
        await write_archive(storage, header, output)
    assert not output.exists() and not output.with_name("out.tar.partial").exists()

    # Bytes changed under the same name (a damaged disk): caught by the hash on the way.
    other = next(d for d in header.blobs if d != victim and header.blobs[d] > 10)
    path = tmp_path / "data" / layout.blob(parse_digest(other))
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))
    header, _ = await plan_export(storage, [], None)
    with pytest.raises(ArchiveError, match=f"blob {other} in storage does not match its digest"):
        await write_archive(storage, header, output)
    assert not output.exists()
