"""`mirror prefetch`: the image reference and platform parsers, and prefetches through a real mirror
app (in front of the scripted upstream) and through one started in-process from a config."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.commands.prefetch import (
    BadReference,
    ImageRef,
    Platform,
    host_platform,
    parse_platform,
    parse_reference,
    prefetch,
    prefetch_in_process,
)
from mirror.config import parse
from mirror.storage import layout
from tests.scripted_upstream import ScriptedUpstream, digest
from tests.support.terminal import drain
from tests.test_cache import image as cache_image

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
D = "sha256:" + "ab" * 32


# --- references ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "registry", "repository", "reference", "mirror_name", "ns"), [
    ("alpine", "docker.io", "library/alpine", "latest", "library/alpine", None),
    ("alpine:3.19", "docker.io", "library/alpine", "3.19", "library/alpine", None),
    ("user/app:1", "docker.io", "user/app", "1", "user/app", None),
    ("docker.io/library/alpine:edge", "docker.io", "library/alpine", "edge", "library/alpine", None),
    ("index.docker.io/alpine", "docker.io", "library/alpine", "latest", "library/alpine", None),
    ("registry-1.docker.io/user/app", "docker.io", "user/app", "latest", "user/app", None),
    ("ghcr.io/org/app:1", "ghcr.io", "org/app", "1", "ghcr.io/org/app", None),
    ("quay.io/org/img", "quay.io", "org/img", "latest", "quay.io/org/img", None),
    ("Quay.IO/org/img", "quay.io", "org/img", "latest", "quay.io/org/img", None),
    (f"alpine@{D}", "docker.io", "library/alpine", D, "library/alpine", None),
    (f"alpine:3@{D}", "docker.io", "library/alpine", D, "library/alpine", None),  # the digest wins, as in docker
    ("localhost/app", "localhost", "app", "latest", "localhost/app", None),
    ("localhost:5000/team/app:v1", "localhost:5000", "team/app", "v1", "team/app", "localhost:5000"),
    ("team/deep/name_x-y.z:V_1.0-rc", "docker.io", "team/deep/name_x-y.z", "V_1.0-rc", "team/deep/name_x-y.z", None),
])
def test_reference(text: str, registry: str, repository: str, reference: str, mirror_name: str,
                   ns: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.reference, ref.mirror_name, ref.ns) == \
        (registry, repository, reference, mirror_name, ns)
    assert ref.original == text


@pytest.mark.parametrize("text", [
    "", "Alpine", "alpine:", "alpine:bad tag", "alpine:-x", "alpine@sha256:abc", "alpine@md5:" + "0" * 32,
    "a//b", "ghcr.io/", "/alpine", "alpine/", "ghcr.io/Org/app", "alpine@", ":tag",
    "bad_host_.io/x", "a" * 256,
])
def test_bad_reference(text: str) -> None:
    with pytest.raises(BadReference):
        parse_reference(text)


COMPONENT = st.from_regex(r"[a-z0-9]{1,5}(?:[._-][a-z0-9]{1,5}){0,2}", fullmatch=True)


@given(st.lists(COMPONENT, min_size=1, max_size=3), st.one_of(st.none(), st.from_regex(
    r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}", fullmatch=True)))
def test_reference_round_trip(components: list[str], tag: str | None) -> None:
    name = "/".join(components)
    if "." in components[0] and len(components) > 1:
        return  # a registry host: covered above
    ref = parse_reference(f"{name}:{tag}" if tag else name)
    assert ref.repository == (name if "/" in name else f"library/{name}")
    assert ref.reference == (tag or "latest")
    again = parse_reference(str(ref))
    assert (again.registry, again.repository, again.reference) == (ref.registry, ref.repository, ref.reference)


@given(st.text(max_size=80))
def test_reference_parser_only_ever_refuses_cleanly(text: str) -> None:
    try:
        ref = parse_reference(text)
    except BadReference:
        return
    assert isinstance(ref, ImageRef) and ref.repository


def test_platforms() -> None:
    assert parse_platform(None) == host_platform()
    assert parse_platform("all") is None
    assert parse_platform("linux/arm64") == Platform("linux", "arm64")
    arm = parse_platform("linux/arm/v7")
    assert arm == Platform("linux", "arm", "v7") and str(arm) == "linux/arm/v7"
    for bad in ("linux", "linux/", "a/b/c/d", "Linux/AMD64", "linux/amd64 "):
        with pytest.raises(BadReference):
            parse_platform(bad)
    assert Platform("linux", "arm64").matches({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert not Platform("linux", "arm", "v7").matches({"os": "linux", "architecture": "arm", "variant": "v6"})
    assert not Platform("linux", "amd64").matches(None)
    if os.uname().machine == "x86_64":
        assert str(host_platform()) == "linux/amd64"


# --- through a mirror in front of the scripted upstream ---------------------------------------------

def image(script: ScriptedUpstream, repo: str, arch: str, size: int) -> tuple[str, list[str]]:
    """An untagged image manifest with a config and one layer of `size` bytes."""
    config = script.add_blob(json.dumps({"architecture": arch, "os": "linux"}).encode())
    layer = script.add_blob(os.urandom(size))
    m = script.add_manifest(repo, None, {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                   "size": len(script.blobs[config])},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": size}]})
    return m, [config, layer]


def multi(script: ScriptedUpstream) -> tuple[str, dict[str, tuple[str, list[str]]]]:
    images = {arch: image(script, "library/multi", arch, 300_000 + i) for i, arch in enumerate(("amd64", "arm64"))}
    index = script.add_manifest("library/multi", "latest", {
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": m, "size": len(script.manifests[("library/multi", m)][0]),
                       "platform": {"os": "linux", "architecture": arch}} for arch, (m, _) in images.items()]},
        media_type=OCI_INDEX)
    return index, images


def fetched(script: ScriptedUpstream) -> set[str]:
    return {k.rsplit("/", 1)[1] for k, n in script.calls.items() if k.startswith("GET ") and "/blobs/" in k and n}


async def test_prefetch_picks_the_platform_and_fills_the_cache(upstream: Any, mirror: Any) -> None:
    script, _ = upstream
    index, images = multi(script)
    client = await mirror()
    base = str(client.server.make_url("")).rstrip("/")

    report = await prefetch(base, [parse_reference("multi")], Platform("linux", "amd64"))
    assert not report.failures
    (result,) = report.images
    amd_manifest, amd_blobs = images["amd64"]
    assert result.digest == index and result.manifests == [index, amd_manifest]
    assert result.blobs == amd_blobs
    assert result.bytes == sum(len(script.blobs[b]) for b in amd_blobs)
    assert fetched(script) == set(amd_blobs)

    # all: every child; what is cached already is served from the cache
    report = await prefetch(base, [parse_reference("multi:latest")], None)
    assert report.images[0].manifests == [index, amd_manifest, images["arm64"][0]]
    assert fetched(script) == set(amd_blobs) | set(images["arm64"][1])
    assert all(n == 1 for k, n in script.calls.items() if "/blobs/" in k)
    doc = report.to_json()
    assert doc["ok"] is True and doc["platform"] == "all" and doc["failures"] == []
    assert doc["images"][0]["repository"] == "library/multi" and doc["images"][0]["digest"] == index
    assert doc["bytes"] == sum(len(script.blobs[b]) for _, bs in images.values() for b in bs)

    # the upstream goes away: what was prefetched is still served
    script.status = 503
    for _, blobs in images.values():
        for blob in blobs:
            r = await client.get(f"/v2/library/multi/blobs/{blob}")
            assert r.status == 200 and digest(await r.read()) == blob


async def test_prefetch_failures_are_per_image(upstream: Any, mirror: Any) -> None:
    script, _ = upstream
    multi(script)
    client = await mirror()
    base = str(client.server.make_url("")).rstrip("/")
    report = await prefetch(base, [parse_reference("nothere:1"), parse_reference("multi")],
                            Platform("linux", "s390x"))
    assert [r.error is not None for r in report.images] == [True, True]
    assert "library/nothere:1" in str(report.images[0].error) and "MANIFEST_UNKNOWN" in str(report.images[0].error)
    assert "no linux/s390x image" in str(report.images[1].error) and "linux/arm64" in str(report.images[1].error)
    assert report.to_json()["ok"] is False and len(report.to_json()["failures"]) == 2

    # a blob the upstream cannot deliver fails that image, with its digest named
    m, blobs = image(script, "library/broken", "amd64", 1000)
    script.manifests[("library/broken", "latest")] = script.manifests[("library/broken", m)]
    del script.blobs[blobs[1]]
    report = await prefetch(base, [parse_reference("broken")], None)
    assert blobs[1] in str(report.images[0].error)

    # what the upstream sends is read as a client reads it: descriptors without a mediaType are fine,
    # a body that is no manifest at all is an error for that image, not a crash
    m, layer = cache_image(script, "library/plain")
    script.add_manifest("library/junk", "latest", b"<html>not a manifest</html>", media_type=OCI_MANIFEST)
    report = await prefetch(base, [parse_reference("plain"), parse_reference("junk")], None)
    assert report.images[0].error is None and layer in report.images[0].blobs
    assert "is not a JSON object" in str(report.images[1].error)


async def test_prefetch_in_process_from_config(upstream: Any, tmp_path: Path) -> None:
    script, server = upstream
    m, blobs = image(script, "library/solo", "amd64", 200_000)
    script.manifests[("library/solo", "v1")] = script.manifests[("library/solo", m)]
    config = parse({"storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}},
                    "metrics": {"addr": "127.0.0.1:1"},  # must not be opened: a running server may hold it
                    "upstreams": [{"name": "hub", "url": str(server.make_url("")), "dockerhub": True}]})
    report = await prefetch_in_process(config, [parse_reference("solo:v1")], host_platform())
    assert not report.failures and report.server == "in-process"
    stored = {p.parent.name for p in (tmp_path / "data" / layout.BLOBS).rglob("data")}
    assert stored == {d.split(":")[1] for d in [m, *blobs]}
    assert (tmp_path / "data" / layout.tag("library/solo", "v1")).read_text() == m


# --- the command -----------------------------------------------------------------------------------

def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.e2e  # runs `python -m mirror` processes
def test_command_usage_errors_exit_2() -> None:
    r = run("prefetch", "Alpine")
    assert r.returncode == 2 and "bad image reference 'Alpine'" in r.stderr and "Traceback" not in r.stderr
    r = run("prefetch", "alpine", "--platform", "linux")
    assert r.returncode == 2 and "invalid platform" in r.stderr
    r = run("prefetch", "alpine", "--server", "ftp://x")
    assert r.returncode == 2 and "--server" in r.stderr
    r = run("prefetch", "alpine", "--server", "http://127.0.0.1:1", "--config", "x.yml")
    assert r.returncode == 2 and "not allowed with" in r.stderr


@pytest.mark.e2e  # runs `python -m mirror` processes
async def test_command_unreachable_server_exits_1() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "prefetch", "alpine", "busybox", "--server", "http://127.0.0.1:9", "--json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    doc = json.loads(out)
    assert doc["ok"] is False and [f["image"] for f in doc["failures"]] == ["alpine", "busybox"]
    assert "cannot reach http://127.0.0.1:9" in err.decode()


@pytest.mark.e2e  # runs `python -m mirror` processes
async def test_progress_bars_on_a_terminal_only(upstream: Any, mirror: Any) -> None:
    """Bars go to stderr when it is a terminal, never with --json; stdout stays the result."""
    script, _ = upstream
    m, _ = image(script, "library/solo", "amd64", 3_000_000)
    script.manifests[("library/solo", "latest")] = script.manifests[("library/solo", m)]
    client = await mirror()
    base = str(client.server.make_url("")).rstrip("/")
    for extra, bars in (((), True), (("--json",), False)):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0x0
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mirror", "prefetch", "solo", "--server", base, *extra,
                stdout=subprocess.PIPE, stderr=slave)
            os.close(slave)
            drained = asyncio.create_task(asyncio.to_thread(drain, master))
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            err = (await asyncio.wait_for(drained, 10)).decode(errors="replace")
        finally:
            os.close(master)
        assert proc.returncode == 0, err
        assert ("library/solo:latest" in err and "100%" in err) is bars, err
        if bars:
            assert out.decode().startswith(f"library/solo:latest {m} 1 manifests, 2 blobs, 2.9 MiB")
        else:
            assert json.loads(out)["images"][0]["digest"] == m and "%" not in err
