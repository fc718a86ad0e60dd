"""The operator CLI against real processes: `mirror prefetch` warms a mirror so docker pulls with
the upstream gone; `mirror export` of a running mirror, wiped storage, `mirror import`, and docker
pulls the same digests again (pushed and cached images); damaged archives fail with exit 1 and
leave storage byte for byte as it was."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.commands.archive import HEADER, TRAILER, member_name
from mirror.storage.layout import BLOBS
from tests.e2e.push_helpers import push_config
from tests.e2e.test_replicas import replica_config
from tests.support.clients import Dockerd, skopeo, skopeo_copy
from tests.support.images import Layout, inspect_raw, sha256_digest
from tests.support.ossserver import OssServer
from tests.support.procs import REPO_ROOT, Distribution, Mirror, client_env, http, run, wait_for
from tests.support.registry import MANIFEST_ACCEPT, check_oci_copy, manifest_digest
from tests.test_archive import members, snapshot

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TAG_TTL = "1s"
MiB = 1 << 20


def mirror_cli(*args: str | Path, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """`python -m mirror ...` as its own process (stderr is not a terminal: no progress bars)."""
    env = {k: v for k, v in client_env({"PYTHONPATH": str(REPO_ROOT)}).items() if not k.startswith("REGISTRY_")}
    return run([sys.executable, "-m", "mirror", *args], timeout=timeout, env=env, cwd=REPO_ROOT, check=False)


def json_out(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


def config_with(default_url: str, quay_url: str | None = None, private: bool = False) -> dict[str, Any]:
    """The standard test config, tags stale after a second, with `team/**` private if asked."""
    config = push_config(default_url, quay_url)
    if not private:
        del config["private"]
    config["upstreams"][0]["tag_ttl"] = TAG_TTL
    return config


# --- prefetch --------------------------------------------------------------------------------------

def test_prefetch_then_upstream_down_docker_pull(docker: Dockerd, docker_mirror: Callable[..., Mirror],
                                                 upstream_clone: Callable[..., Distribution],
                                                 quay_upstream: Distribution, layouts: dict[str, Layout],
                                                 tmp_path: Path) -> None:
    small, big, quay = layouts["small"], layouts["big"], layouts["quay"]
    up = upstream_clone()
    mirror = docker_mirror(config_with(up.url, quay_upstream.url))

    t0 = time.monotonic()
    r = mirror_cli("prefetch", "small", "docker.io/library/big:latest", "quay.io/org/img:tag", "--server", mirror.url,
                   "--json")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    doc = json_out(r)
    assert doc["ok"] is True and doc["failures"] == [] and doc["server"] == mirror.url
    by_image = {i["image"]: i for i in doc["images"]}
    assert set(by_image) == {"small", "docker.io/library/big:latest", "quay.io/org/img:tag"}
    for image, layout, repository in ((by_image["small"], small, "library/small"),
                                      (by_image["docker.io/library/big:latest"], big, "library/big"),
                                      (by_image["quay.io/org/img:tag"], quay, "quay.io/org/img")):
        assert image["repository"] == repository and image["digest"] == layout.digest and image["error"] is None
        assert image["manifests"] == [layout.digest]
        assert sorted(image["blobs"]) == sorted(b.digest for b in layout.image().blobs)
        assert image["bytes"] == sum(b.size for b in layout.image().blobs)
        assert all(mirror.has_blob(b.digest) for b in layout.image().blobs)
    assert doc["bytes"] == sum(i["bytes"] for i in doc["images"])
    print(f"prefetch of small + big ({doc['bytes'] / MiB:.0f} MiB) + quay, cold: {took:.1f}s")

    up.stop()
    time.sleep(1.5)  # the cached tags are stale now: revalidation fails, they are served anyway
    docker.pull("small")
    assert docker.image_id("small") == small.image().config.digest
    assert docker.repo_digests("small") == [f"small@{small.digest}"]
    out = tmp_path / "big"
    skopeo_copy(f"docker://{mirror.host}/library/big:latest", f"oci:{out}:latest", timeout=180)
    check_oci_copy(out, big)


def test_prefetch_without_server_then_upstream_down(docker: Dockerd, docker_mirror: Callable[..., Mirror],
                                                    upstream_clone: Callable[..., Distribution],
                                                    layouts: dict[str, Layout]) -> None:
    """No server running: the mirror app runs inside the command, on the config's storage."""
    small = layouts["small"]
    up = upstream_clone()
    mirror = docker_mirror(config_with(up.url))
    mirror.stop()

    r = mirror_cli("prefetch", "small:latest", "--config", mirror.config_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"library/small:latest {small.digest} 1 manifests, 3 blobs"), r.stdout
    assert all(mirror.has_blob(b.digest) for b in [small.image().manifest, *small.image().blobs])
    before = len(up.access())

    up.stop()
    mirror.start()
    time.sleep(1.5)
    docker.pull("small")
    assert docker.image_id("small") == small.image().config.digest
    assert before > 0


def test_prefetch_index_platforms(mirror_factory: Callable[..., Mirror], upstream: Distribution,
                                  layouts: dict[str, Layout]) -> None:
    multi = layouts["multi"]
    amd, arm = multi.image("amd64"), multi.image("arm64")
    mirror = mirror_factory(config_with(upstream.url))

    r = mirror_cli("prefetch", "multi", "--server", mirror.url, "--platform", "linux/arm64", "--json")
    assert r.returncode == 0, r.stderr
    (image,) = json_out(r)["images"]
    assert image["digest"] == multi.digest and image["manifests"] == [multi.digest, arm.manifest.digest]
    assert all(mirror.has_blob(b.digest) for b in arm.blobs)
    assert not any(mirror.has_blob(b.digest) for b in amd.blobs)

    # the default is this host's platform
    r = mirror_cli("prefetch", "multi", "--server", mirror.url, "--json")
    assert r.returncode == 0, r.stderr
    doc = json_out(r)
    if os.uname().machine == "x86_64":
        assert doc["platform"] == "linux/amd64"
        assert doc["images"][0]["manifests"] == [multi.digest, amd.manifest.digest]
        assert all(mirror.has_blob(b.digest) for b in amd.blobs)

    r = mirror_cli("prefetch", "multi", "--server", mirror.url, "--platform", "all", "--json")
    assert r.returncode == 0, r.stderr
    doc = json_out(r)
    assert doc["platform"] == "all"
    assert doc["images"][0]["manifests"] == [multi.digest, amd.manifest.digest, arm.manifest.digest]
    assert sorted(doc["images"][0]["blobs"]) == sorted(b.digest for b in multi.blobs)
    assert all(mirror.has_blob(b.digest) for b in multi.blobs)


def test_prefetch_missing_image_fails_clearly(mirror_factory: Callable[..., Mirror], upstream: Distribution,
                                              layouts: dict[str, Layout]) -> None:
    mirror = mirror_factory(config_with(upstream.url))
    r = mirror_cli("prefetch", "library/nothere:1", "small", "--server", mirror.url, "--json")
    assert r.returncode == 1
    doc = json_out(r)
    assert doc["ok"] is False
    assert [f["image"] for f in doc["failures"]] == ["library/nothere:1"]
    assert "MANIFEST_UNKNOWN" in doc["failures"][0]["error"]
    assert "mirror: prefetch of library/nothere:1 failed: library/nothere:1: manifest 1: MANIFEST_UNKNOWN" \
        in r.stderr, r.stderr
    assert [i["error"] is None for i in doc["images"]] == [False, True]  # the other image was fetched
    assert mirror.has_blob(layouts["small"].image().layers[0].digest)

    r = mirror_cli("prefetch", "multi", "--server", mirror.url, "--platform", "linux/s390x")
    assert r.returncode == 1 and "no linux/s390x image in the index (it has linux/amd64, linux/arm64)" in r.stderr
    r = mirror_cli("prefetch", "NotAName", "--server", mirror.url)
    assert r.returncode == 2 and "bad image reference 'NotAName'" in r.stderr


# --- export / import -------------------------------------------------------------------------------

def test_export_wipe_import_docker_pull(docker: Dockerd, docker_mirror: Callable[..., Mirror],
                                        upstream_clone: Callable[..., Distribution], layouts: dict[str, Layout],
                                        tmp_path: Path) -> None:
    small, big, multi = layouts["small"], layouts["big"], layouts["multi"]
    up = upstream_clone()
    mirror = docker_mirror(config_with(up.url, private=True))
    docker.pull("small")  # cached
    assert mirror_cli("prefetch", "big", "--server", mirror.url).returncode == 0  # cached, 200 MiB
    ref = f"{mirror.host}/team/app:v1"  # pushed
    docker.cli("tag", "small", ref)
    docker.cli("push", ref)
    pushed = manifest_digest(mirror.url, "team/app", "v1")
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", "--dest-no-creds", "--retry-times", "0",
           multi.oci_ref(), f"docker://{mirror.host}/team/multi:latest")  # pushed, an index
    before = {(repo, tag): manifest_digest(mirror.url, repo, tag) for repo, tag in (
        ("library/small", "latest"), ("library/big", "latest"), ("team/app", "v1"), ("team/multi", "latest"))}

    # Export while the server runs and a push is going on next to it.
    archive = tmp_path / "backup.tar"
    env = {k: v for k, v in client_env({"PYTHONPATH": str(REPO_ROOT)}).items() if not k.startswith("REGISTRY_")}
    export = subprocess.Popen([sys.executable, "-m", "mirror", "export", "--config", str(mirror.config_path),
                               "--output", str(archive), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=REPO_ROOT)
    try:
        skopeo_copy(f"oci:{small.path}:latest", f"docker://{mirror.host}/team/during:v1", "--dest-tls-verify=false")
        out, err = export.communicate(timeout=240)
    finally:
        if export.poll() is None:
            export.kill()
            export.wait(10)
    assert export.returncode == 0, err
    exported = json_out(subprocess.CompletedProcess([], 0, out, err))
    names = {r["name"]: r for r in exported["repositories"]}
    assert {"library/small", "library/big", "team/app", "team/multi"} <= set(names) <= \
        {"library/small", "library/big", "team/app", "team/multi", "team/during"}
    assert names["team/app"]["kind"] == "private" and names["library/big"]["kind"] == "proxied"
    assert names["team/multi"] == {"name": "team/multi", "kind": "private", "tags": ["latest"], "manifests": 3,
                                   "layers": 6, "absent": 0}
    print(f"export: {exported['bytes'] / MiB:.0f} MiB in {exported['seconds']:.2f}s "
          f"({exported['bytes'] / 1e6 / exported['seconds']:.0f} MB/s)")

    # Wipe everything, start an empty mirror on the same port, import into it while it runs.
    mirror.stop()
    shutil.rmtree(mirror.root)
    mirror.start()
    assert http("GET", f"{mirror.url}/v2/team/app/manifests/v1", {"Accept": MANIFEST_ACCEPT}).status == 404
    r = mirror_cli("import", archive, "--config", mirror.config_path, "--json")
    assert r.returncode == 0, r.stderr
    imported = json_out(r)
    assert imported["ok"] is True and imported["new_blobs"] == imported["blobs"] == exported["blobs"]
    print(f"import: {imported['bytes'] / MiB:.0f} MiB in {imported['seconds']:.2f}s "
          f"({imported['bytes'] / 1e6 / imported['seconds']:.0f} MB/s)")

    # The upstream is gone: everything comes from what was imported, with the same digests.
    up.stop()
    time.sleep(1.5)
    after = {key: manifest_digest(mirror.url, *key) for key in before}
    assert after == before
    docker.clean()
    docker.pull("small")  # a cached tag, revalidation fails: served stale
    assert docker.repo_digests("small") == [f"small@{small.digest}"]
    docker.pull(ref)  # the pushed image (the same image as small: docker lists both names)
    assert f"{mirror.host}/team/app@{pushed}" in docker.repo_digests(ref)
    assert docker.image_id(ref) == small.image().config.digest
    assert inspect_raw(f"docker://{mirror.host}/team/multi:latest") == multi.read(multi.digest)
    out_dir = tmp_path / "big"
    skopeo_copy(f"docker://{mirror.host}/library/big:latest", f"oci:{out_dir}:latest", timeout=180)
    check_oci_copy(out_dir, big)
    # A restarted server knows the imported private repositories from their markers.
    mirror.restart()
    assert manifest_digest(mirror.url, "team/app", "v1") == pushed
    catalog = http("GET", f"{mirror.url}/v2/_catalog").json()["repositories"]
    assert {"library/small", "library/big", "team/app", "team/multi"} <= set(catalog)


def _rewrite_without(archive: Path, dest: Path, repo: str) -> str:
    """A self-consistent archive (new header and end marker) that lacks one layer of `repo`'s image:
    its manifest references a blob the archive neither holds nor declares absent. The layer's digest."""
    parts = members(archive)
    doc = json.loads(parts[0][1])
    entry = next(r for r in doc["repositories"] if r["name"] == repo)
    bodies = {i.name: data for i, data in parts}
    manifest = next(json.loads(bodies[member_name(m)]) for m in entry["manifests"]
                    if "layers" in json.loads(bodies[member_name(m)]))
    layer = manifest["layers"][-1]["digest"]
    entry["layers"].remove(layer)
    doc["blobs"] = [b for b in doc["blobs"] if b["digest"] != layer]
    for other in doc["repositories"]:  # the same layer elsewhere goes too
        if layer in other["layers"]:
            other["layers"].remove(layer)
    header = json.dumps(doc).encode()
    trailer = json.dumps({"header": sha256_digest(header), "blobs": len(doc["blobs"]),
                          "bytes": sum(b["size"] for b in doc["blobs"])}).encode()
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(HEADER, header), *[(i.name, d) for i, d in parts[1:-1] if i.name != member_name(layer)],
                           (TRAILER, trailer)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return layer


def test_damaged_archives_fail_and_leave_storage_unchanged(mirror_factory: Callable[..., Mirror],
                                                           upstream: Distribution, layouts: dict[str, Layout],
                                                           tmp_path: Path) -> None:
    small, multi = layouts["small"], layouts["multi"]
    source = mirror_factory(config_with(upstream.url, private=True), name="source")
    skopeo_copy(f"docker://{source.host}/library/small:latest", f"oci:{tmp_path / 'pulled'}:latest")  # cached
    skopeo_copy(f"oci:{small.path}:latest", f"docker://{source.host}/team/app:v1", "--dest-tls-verify=false")
    archive = tmp_path / "good.tar"
    r = mirror_cli("export", "--config", source.config_path, "--output", archive)
    assert r.returncode == 0 and r.stdout.startswith("exported 2 repositories (1 private, 1 proxied)"), r.stderr

    target = mirror_factory(config_with(upstream.url, private=True), name="target")
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", "--dest-no-creds", "--retry-times", "0",
           multi.oci_ref(), f"docker://{target.host}/team/multi:latest")
    target.stop()  # nothing else writes: the comparison is byte for byte, the journal included
    before = snapshot(target.root, journal=True)
    assert any(k.startswith(BLOBS) for k in before) and any(k.startswith("_mirror/journal/") for k in before)

    raw = archive.read_bytes()
    largest = max((i for i, _ in members(archive)[1:-1]), key=lambda i: i.size)
    cases: list[tuple[str, bytes | None, str]] = []
    flipped = bytearray(raw)
    for offset in range(largest.offset_data + 100, largest.offset_data + 164):
        flipped[offset] ^= 0xFF
    cases.append(("flipped bytes in a blob", bytes(flipped), f"{largest.name}: its bytes do not match the digest"))
    cases.append(("truncated", raw[: len(raw) * 3 // 5], "truncated"))
    cases.append(("truncated before the end marker", raw[: members(archive)[-1][0].offset], f"no {TRAILER}"))
    layer_archive = tmp_path / "layer.tar"
    layer = _rewrite_without(archive, layer_archive, "team/app")
    cases.append(("a manifest referencing a missing blob", None, f"references {layer}"))

    for what, data, expect in cases:
        bad = tmp_path / "bad.tar"
        if data is None:
            shutil.copyfile(layer_archive, bad)
        else:
            bad.write_bytes(data)
        r = mirror_cli("import", bad, "--config", target.config_path)
        print(f"{what}: exit {r.returncode}: {r.stderr.strip()}")
        assert r.returncode == 1, (what, r.stdout, r.stderr)
        assert expect in r.stderr and "nothing was written to storage" in r.stderr, (what, r.stderr)
        assert "Traceback" not in r.stderr
        assert snapshot(target.root, journal=True) == before, what

    # The good archive goes in, and the target serves both its own and the imported content.
    r = mirror_cli("import", archive, "--config", target.config_path)
    assert r.returncode == 0, r.stderr
    target.start()
    assert manifest_digest(target.url, "team/app", "v1") == small.digest
    assert manifest_digest(target.url, "team/multi", "latest") == multi.digest
    assert manifest_digest(target.url, "library/small", small.digest) == small.digest


def test_export_import_on_oss(mirror_factory: Callable[..., Mirror], upstream: Distribution, oss: OssServer,
                              layouts: dict[str, Layout], tmp_path: Path) -> None:
    """Through the Storage interface only: from one OSS prefix to another, next to running replicas,
    and without touching the servers' hot tiers."""
    small = layouts["small"]
    a = mirror_factory(replica_config(upstream, oss), name="oss-a")
    skopeo_copy(f"oci:{small.path}:latest", f"docker://{a.host}/team/app:v1", "--dest-tls-verify=false")
    skopeo_copy(f"docker://{a.host}/team/app:v1", f"oci:{tmp_path / 'pulled'}:latest")  # fills a's hot tier
    tier = a.root / "_tier" / BLOBS
    wait_for(lambda: len([p for p in tier.rglob("*") if p.is_file()]) >= 3, 10, "a's hot tier to fill")
    hot = snapshot(tier)

    archive = tmp_path / "oss.tar"
    r = mirror_cli("export", "--config", a.config_path, "--output", archive, "--json")
    assert r.returncode == 0, r.stderr
    assert [x["name"] for x in json_out(r)["repositories"]] == ["team/app"]
    assert snapshot(tier) == hot  # the export read the bucket, not a's tier, and evicted nothing

    restored = replica_config(upstream, oss)
    restored["storage"]["oss"]["rootdirectory"] = "restored"
    b = mirror_factory(restored, name="oss-b")
    r = mirror_cli("import", archive, "--config", b.config_path, "--json")
    assert r.returncode == 0, r.stderr
    assert json_out(r)["new_blobs"] == 4  # the manifest, the config, two layers
    assert manifest_digest(b.url, "team/app", "v1") == small.digest
    out = tmp_path / "from-b"
    skopeo_copy(f"docker://{b.host}/team/app:v1", f"oci:{out}:latest")
    check_oci_copy(out, small)
