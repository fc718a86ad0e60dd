"""registry:2's storage, both ways, with the real `docker-registry` binary (CNCF distribution 2.8).

It writes a root mirror must serve as it is: images pushed with skopeo (a multi-arch index, a name
nested under another, a tag that looks like a digest), a manifest deleted through its API, an upload
left half done, a pull-through cache of its own. And it reads what mirror wrote to the same root:
pushes, a tag and a manifest deleted, a referrer; its garbage collector runs over that root and
takes nothing an image needs. OSS: a bucket laid out as registry:2 lays one out (2.8 has no OSS driver
to write it), served by mirror, and what mirror pushed there read by registry:2 from a copy. Last,
mirror's own old layout in a bucket, the process killed midway through moving it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirror.config import OssConfig
from mirror.names import parse_digest
from mirror.storage import layout
from mirror.storage.oss import OssStorage
from tests.e2e.conftest import require
from tests.support.clients import DOCKER_CLI, DOCKERD, SKOPEO, Dockerd, skopeo_copy
from tests.support.images import OCI_MANIFEST, Layout, inspect_digest, seed, sha256_digest
from tests.support.ossserver import OssServer
from tests.support.procs import DISTRIBUTION, Distribution, Mirror, http, mirror_config, run, wait_for
from tests.support.registry import MANIFEST_ACCEPT, check_oci_copy, oci_error

DIGEST_TAG = "0123456789abcdef" * 4  # a tag that looks like a digest's hex
HALF = 300_000  # bytes of the upload registry:2 leaves half done (more than one block of the hash)


@dataclass
class Written:
    """A root registry:2 wrote, and what registry:2 answered about it."""

    root: Path
    catalog: list[str]
    tags: dict[str, list[str] | int]
    upload: str  # the Location of the upload it left half done
    upload_data: bytes


def catalog(url: str) -> list[str]:
    r = http("GET", f"{url}/v2/_catalog")
    assert r.status == 200, r.body[:300]
    return list(r.json()["repositories"])


def tags(url: str, repo: str) -> list[str] | int:
    """A repository's tags, or the status of an error answer."""
    r = http("GET", f"{url}/v2/{repo}/tags/list")
    return sorted(r.json()["tags"] or []) if r.status == 200 else r.status


def copy_out(host: str, ref: str, out: Path, *extra: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    skopeo_copy(f"docker://{host}/{ref}", f"oci:{out}:x", *extra)
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, layouts: dict[str, Layout]) -> Written:
    require(DISTRIBUTION, SKOPEO)
    dist = Distribution(tmp_path_factory.mktemp("registry2"), name="registry2-writer").start()
    try:
        seed(layouts["small"], dist.host, "team/app", tag="v1")
        seed(layouts["small"], dist.host, "team/app", tag=DIGEST_TAG)
        seed(layouts["multi"], dist.host, "team/multi", tag="latest")
        seed(layouts["quay"], dist.host, "team/app/sub", tag="v1")  # a name under a name
        seed(layouts["quay"], dist.host, "team/gone", tag="v1")
        r = http("DELETE", f"{dist.url}/v2/team/gone/manifests/{layouts['quay'].digest}")
        assert r.status == 202, r.body[:300]
        data = os.urandom(HALF * 2)
        r = http("POST", f"{dist.url}/v2/team/app/blobs/uploads/")
        assert r.status == 202, r.body[:300]
        r = http("PATCH", r.headers["Location"], {"Content-Type": "application/octet-stream"}, data[:HALF])
        assert r.status == 202 and r.headers["Range"] == f"0-{HALF - 1}", (r.status, r.body[:300])
        location = r.headers["Location"].split("/v2/", 1)[1]
        names = catalog(dist.url)
        return Written(dist.root, names, {n: tags(dist.url, n) for n in names}, location, data)
    finally:
        dist.stop()


def private_mirror(root: Path | None = None, **extra: Any) -> dict[str, Any]:
    """No upstream: every repository is private, as in a plain registry:2."""
    storage: dict[str, Any] = {"delete": {"enabled": True}}
    if root is not None:
        storage["filesystem"] = {"rootdirectory": str(root)}
    return {"version": 0.1, "log": {"level": "info"}, "storage": storage, **extra}


def copy_root(written: Written, dest: Path) -> Path:
    # A real copy: an upload's data is appended to in place, and the module's root must stay as written.
    shutil.copytree(written.root, dest)
    return dest


def check_served(host: str, layouts: dict[str, Layout], out: Path) -> None:
    for ref, name, extra in (("team/app:v1", "small", ()), (f"team/app:{DIGEST_TAG}", "small", ()),
                             ("team/multi:latest", "multi", ("--all",)), ("team/app/sub:v1", "quay", ())):
        check_oci_copy(copy_out(host, ref, out / ref.replace("/", "_").replace(":", "_")[:40], *extra),
                       layouts[name], None if extra else ("amd64",))


def test_mirror_serves_a_root_registry2_wrote(written: Written, layouts: dict[str, Layout],
                                              mirror_factory: Callable[..., Mirror], tmp_path: Path) -> None:
    root = copy_root(written, tmp_path / "root")
    mirror = mirror_factory(private_mirror(root))
    assert catalog(mirror.url) == written.catalog == ["team/app", "team/app/sub", "team/gone", "team/multi"]
    for repo, expected in written.tags.items():
        assert tags(mirror.url, repo) == expected, repo
    assert written.tags["team/app"] == sorted(["v1", DIGEST_TAG]) and written.tags["team/gone"] == []
    check_served(mirror.host, layouts, tmp_path / "out")
    # what registry:2 deleted stays deleted
    for ref in (layouts["quay"].digest, "v1"):
        r = http("GET", f"{mirror.url}/v2/team/gone/manifests/{ref}", {"Accept": MANIFEST_ACCEPT})
        assert r.status == 404 and oci_error(r.body)[0]["code"] == "MANIFEST_UNKNOWN", (ref, r.status)
    # the upload registry:2 left half done continues here from its saved hash state
    location = f"{mirror.url}/v2/{written.upload}"
    r = http("GET", location)
    assert r.status == 204 and r.headers["Range"] == f"0-{HALF - 1}", (r.status, r.body[:300])
    r = http("PATCH", location, {"Content-Type": "application/octet-stream"}, written.upload_data[HALF:])
    assert r.status == 202, (r.status, r.body[:300])
    digest = sha256_digest(written.upload_data)
    r = http("PUT", f"{mirror.url}{r.headers['Location']}{'&' if '?' in r.headers['Location'] else '?'}digest={digest}")
    assert r.status == 201, (r.status, r.body[:300])
    assert http("GET", f"{mirror.url}/v2/team/app/blobs/{digest}").body == written.upload_data
    # nothing of mirror's own went where registry:2 reads but its marks
    assert not (root / "docker" / "registry" / "v2" / "_index").exists()
    assert sorted(p.name for p in root.iterdir()) == ["_index", "_mirror", "_staging", "docker"]
    assert {p.name for p in (root / "_mirror").iterdir()} <= {"journal", "passes"}  # what replicas share


def test_docker_pulls_from_a_root_registry2_wrote(written: Written, docker: Dockerd, tmp_path: Path,
                                                  docker_mirror: Callable[..., Mirror]) -> None:
    require(DOCKERD, DOCKER_CLI, root=True)
    mirror = docker_mirror(private_mirror(copy_root(written, tmp_path / "root")))
    docker.pull(f"{mirror.host}/team/multi:latest")
    docker.pull(f"{mirror.host}/team/app/sub:v1")
    out = docker.cli("image", "inspect", "--format", "{{.RepoDigests}}", f"{mirror.host}/team/multi:latest").stdout
    assert inspect_digest(f"docker://{mirror.host}/team/multi:latest") in out


def test_registry2_reads_what_mirror_wrote(written: Written, layouts: dict[str, Layout],
                                           mirror_factory: Callable[..., Mirror], tmp_path: Path) -> None:
    root = copy_root(written, tmp_path / "root")
    mirror = mirror_factory(private_mirror(root))
    seed(layouts["multi"], mirror.host, "team/new", tag="v1")  # a new repository
    seed(layouts["small"], mirror.host, "team/multi", tag="small")  # a new tag in one registry:2 wrote
    r = http("DELETE", f"{mirror.url}/v2/team/app/manifests/{DIGEST_TAG}")  # a tag
    assert r.status == 202, r.body[:300]
    r = http("DELETE", f"{mirror.url}/v2/team/app/sub/manifests/{layouts['quay'].digest}")  # a manifest
    assert r.status == 202, r.body[:300]
    # an artifact referring to team/new's index: mirror keeps its referrer record where registry:2 never looks
    empty = b"{}"
    assert http("POST", f"{mirror.url}/v2/team/new/blobs/uploads/?digest={sha256_digest(empty)}", data=empty,
                headers={"Content-Type": "application/octet-stream"}).status == 201
    artifact = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x-sbom",
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                                      "digest": sha256_digest(empty), "size": 2}, "layers": [],
                           "subject": {"mediaType": "application/vnd.oci.image.index.v1+json",
                                       "digest": layouts["multi"].digest, "size": 1}}).encode()
    r = http("PUT", f"{mirror.url}/v2/team/new/manifests/{sha256_digest(artifact)}", {"Content-Type": OCI_MANIFEST},
             artifact)
    assert r.status == 201, r.body[:300]
    assert referrers(mirror, layouts["multi"].digest) == [sha256_digest(artifact)]
    names = catalog(mirror.url)
    seen = {repo: tags(mirror.url, repo) for repo in names}
    assert seen == {"team/app": ["v1"], "team/app/sub": [], "team/gone": [], "team/multi": ["latest", "small"],
                    "team/new": ["v1"]}  # the deleted manifest took its tag with it, as in registry:2
    mirror.stop()

    registry2 = Distribution(tmp_path / "registry2", root=root, name="registry2-reader").start()
    try:
        assert catalog(registry2.url) == names
        assert {repo: tags(registry2.url, repo) for repo in names} == seen
        check_read_back(registry2, layouts, tmp_path / "before-gc", sha256_digest(artifact))
    finally:
        registry2.stop()
    # registry:2's garbage collector walks mirror's root and takes only what nothing references
    gc = run([DISTRIBUTION, "garbage-collect", registry2.config_path], timeout=120)
    assert "blob eligible for deletion" in gc.stdout + gc.stderr  # the deleted manifest's, at least
    registry2.start()
    try:
        check_read_back(registry2, layouts, tmp_path / "after-gc", sha256_digest(artifact))
        r = http("DELETE", f"{registry2.url}/v2/team/new/manifests/{sha256_digest(artifact)}")
        assert r.status == 202, r.body[:300]
    finally:
        registry2.stop()
    # back to mirror: registry:2 knew nothing of the referrer record; the artifact it deleted is not listed
    mirror.start()
    assert referrers(mirror, layouts["multi"].digest) == []
    check_oci_copy(copy_out(mirror.host, "team/new:v1", tmp_path / "again", "--all"), layouts["multi"])


def referrers(mirror: Mirror, subject: str) -> list[str]:
    r = http("GET", f"{mirror.url}/v2/team/new/referrers/{subject}")
    assert r.status == 200, r.body[:300]
    return [m["digest"] for m in r.json()["manifests"]]


def check_read_back(registry2: Distribution, layouts: dict[str, Layout], out: Path, artifact: str) -> None:
    check_oci_copy(copy_out(registry2.host, "team/new:v1", out / "new", "--all"), layouts["multi"])
    check_oci_copy(copy_out(registry2.host, "team/multi:small", out / "small"), layouts["small"], ("amd64",))
    check_oci_copy(copy_out(registry2.host, "team/app:v1", out / "app"), layouts["small"], ("amd64",))
    for repo, ref in (("team/app", DIGEST_TAG), ("team/app/sub", layouts["quay"].digest)):  # deleted by mirror
        r = http("GET", f"{registry2.url}/v2/{repo}/manifests/{ref}", {"Accept": MANIFEST_ACCEPT})
        assert r.status == 404, (repo, ref, r.status)
    r = http("GET", f"{registry2.url}/v2/team/new/manifests/{artifact}", {"Accept": OCI_MANIFEST})
    assert r.status == 200 and sha256_digest(r.body) == artifact


def test_mirror_serves_a_registry2_pull_through_cache(upstream: Distribution, layouts: dict[str, Layout],
                                                      mirror_factory: Callable[..., Mirror], tmp_path: Path) -> None:
    """registry:2 run as a cache (`proxy.remoteurl`): its content is served from the root, not fetched again."""
    cache = Distribution(tmp_path / "registry2", {"proxy": {"remoteurl": upstream.url}},
                         name="registry2-cache").start()
    try:
        copy_out(cache.host, "library/small:latest", tmp_path / "via-registry2")
        wait_for(lambda: (cache.root / "scheduler-state.json").exists(), 20, "registry:2's scheduler state")
    finally:
        cache.stop()
    config = mirror_config(upstream.url)
    config["storage"] = {"filesystem": {"rootdirectory": str(cache.root)}}
    mirror = mirror_factory(config)
    mark = upstream.mark()
    check_oci_copy(copy_out(mirror.host, "library/small:latest", tmp_path / "via-mirror"), layouts["small"],
                   ("amd64",))
    assert not upstream.blob_gets(since=mark)  # every blob came from registry:2's cache
    assert (cache.root / layout.SCHEDULER_STATE).exists()
    # a cache's content is cached here too (revalidated, evictable, never claimed by a push), not adopted as private
    assert (cache.root / layout.marker("library/small", layout.CACHED_MARK)).exists()
    assert not (cache.root / layout.marker("library/small", layout.PRIVATE_MARK)).exists()


# --- OSS ---------------------------------------------------------------------------------------------------

def oss_config(oss: OssServer, rootdirectory: str) -> OssConfig:
    return OssConfig(accesskeyid=oss.key_id, accesskeysecret=oss.key_secret, region="oss-test", bucket=oss.bucket,
                     endpoint=oss.endpoint, secure=False, rootdirectory=rootdirectory)


def oss_mirror(oss: OssServer, rootdirectory: str, **extra: Any) -> dict[str, Any]:
    config = private_mirror(**extra)
    config["storage"]["oss"] = {"accesskeyid": oss.key_id, "accesskeysecret": oss.key_secret, "region": "oss-test",
                                "bucket": oss.bucket, "endpoint": oss.endpoint, "secure": False,
                                "rootdirectory": rootdirectory}
    return config


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by its relative key (the test images are small)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_tree(dest: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        (dest / key).write_bytes(data)


async def upload(storage: OssStorage, files: dict[str, bytes]) -> None:
    """Into the bucket under the same keys, as registry:2's OSS driver lays a root out."""
    for key, data in files.items():
        await storage.put_bytes(key, data)


async def download(storage: OssStorage) -> dict[str, bytes]:
    return {key: await storage.get_bytes(key) async for key, _ in storage.scan("docker")}


def test_a_bucket_laid_out_as_registry2_would(written: Written, layouts: dict[str, Layout], oss: OssServer,
                                              mirror_factory: Callable[..., Mirror], tmp_path: Path) -> None:
    storage = OssStorage(oss_config(oss, "registry"), tmp_path / "staging")
    try:
        asyncio.run(upload(storage, tree(written.root)))
        mirror = mirror_factory(oss_mirror(oss, "registry", cache={"directory": str(tmp_path / "local")}))
        assert catalog(mirror.url) == written.catalog
        check_served(mirror.host, layouts, tmp_path / "out")
        seed(layouts["multi"], mirror.host, "team/new", tag="v1")
        mirror.stop()
        # registry:2 reads what mirror wrote to the bucket (from a copy: Debian's 2.8 has no OSS driver)
        write_tree(tmp_path / "copy", asyncio.run(download(storage)))
    finally:
        asyncio.run(storage.close())
    registry2 = Distribution(tmp_path / "registry2", root=tmp_path / "copy", name="registry2-reader").start()
    try:
        assert "team/new" in catalog(registry2.url)
        check_oci_copy(copy_out(registry2.host, "team/new:v1", tmp_path / "back", "--all"), layouts["multi"])
    finally:
        registry2.stop()


async def write_old_layout(storage: OssStorage, layouts: dict[str, Layout]) -> dict[str, str]:
    """Mirror's layout before registry:2's: team/app (private marker), old/multi (the older `_private` file),
    library/img (pulled through, unmarked). -> repository: tag."""
    images = {"team/app": ("small", "v1"), "old/multi": ("multi", "latest"), "library/img": ("quay", "tag")}
    for name, (which, tag) in images.items():
        lay = layouts[which]
        for blob in [lay.top, *lay.manifests, *lay.blobs]:
            d = parse_digest(blob.digest)
            await storage.put_bytes(f"blobs/sha256/{d.hex[:2]}/{d.hex}", lay.read(blob.digest))
            kind = "_manifests/revisions" if blob in [lay.top, *lay.manifests] else "_layers"
            await storage.put_bytes(f"repositories/{name}/{kind}/sha256/{d.hex}", blob.digest.encode())
        await storage.put_bytes(f"repositories/{name}/_manifests/tags/{tag}", lay.digest.encode())
    await storage.put_bytes("repositories/team/app/_mirror/private", b"")
    await storage.put_bytes("repositories/old/multi/_private", b"")
    return {name: tag for name, (_, tag) in images.items()}


async def keys(storage: OssStorage, prefix: str) -> list[str]:
    return [key async for key, _ in storage.scan(prefix)]


def test_mirrors_old_layout_in_a_bucket_moved_over_despite_a_kill(layouts: dict[str, Layout], oss: OssServer,
                                                                  tmp_path: Path) -> None:
    storage = OssStorage(oss_config(oss, "old"), tmp_path / "staging")
    try:
        repos = asyncio.run(write_old_layout(storage, layouts))
        before = asyncio.run(keys(storage, "blobs"))
        mirror = Mirror(tmp_path / "mirror", oss_mirror(oss, "old", private={"patterns": ["team/**", "old/**"]},
                                                      upstreams=[{"name": "hub", "url": "http://127.0.0.1:9",
                                                                  "dockerhub": True}]))
        oss.faults(delay=0.5)  # each request half a second: the move takes long enough to be killed in
        mirror.proc.start()
        try:
            wait_for(lambda: "old layout found" in mirror.proc.stdout_path.read_text(errors="replace")
                     and asyncio.run(keys(storage, layout.BLOBS)) != [], 60, "the move to begin")
            mirror.proc.kill()
            oss.faults(delay=0)
            assert asyncio.run(keys(storage, "blobs")), "the move finished before the kill"
            assert "moved to registry:2's layout" not in mirror.proc.stdout_path.read_text(errors="replace")

            mirror.start()
            assert "moved to registry:2's layout" in mirror.proc.stdout_path.read_text(errors="replace")
            assert asyncio.run(keys(storage, "blobs")) == [] and asyncio.run(keys(storage, "repositories")) == []
            for name, which, extra in (("team/app", "small", ()), ("old/multi", "multi", ("--all",))):
                out = copy_out(mirror.host, f"{name}:{repos[name]}", tmp_path / name.replace("/", "_"), *extra)
                check_oci_copy(out, layouts[which], None if extra else ("amd64",))
            marks = {name: asyncio.run(storage.list(layout.markers(name))) for name in repos}
            assert marks == {"team/app": ["private"], "old/multi": ["private"], "library/img": ["cached"]}
            assert len(asyncio.run(keys(storage, layout.BLOBS))) == len(before)
        finally:
            oss.faults(delay=0)
            mirror.stop()
    finally:
        asyncio.run(storage.close())


def test_a_root_pointed_at_registry2s_inner_directory_fails_in_one_line(written: Written, tmp_path: Path) -> None:
    """The usual mistake when switching: rootdirectory set to …/docker/registry/v2. It would serve an
    empty registry; it says what to set instead."""
    root = copy_root(written, tmp_path / "root")
    mirror = Mirror(tmp_path / "mirror", private_mirror(root / "docker" / "registry" / "v2"))
    mirror.proc.start()
    wait_for(lambda: not mirror.proc.running, 30, "mirror to exit")
    assert mirror.proc.popen is not None and mirror.proc.popen.returncode == 2
    err = mirror.proc.stderr_path.read_text().strip().splitlines()
    assert len(err) == 1 and "registry:2's docker/registry/v2/ directory" in err[0] and "Traceback" not in err[0]
    assert not (root / "docker" / "registry" / "v2" / "docker").exists()
