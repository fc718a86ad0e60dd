"""Real clients push to the mirror's private repositories (`team/**`) and pull back what they
pushed: dockerd, skopeo (a multi-platform index), podman, and the `oras` Python client (an OCI
artifact with a `subject`, found again through the referrers API). Also over real processes: an
upload whose PATCH is cut off mid-body resumes (across a mirror restart too), and `mirror gc`
run next to the live server sweeps exactly what a deleted manifest alone held.

Every mirror here has the Docker Hub-like upstream and `private.patterns: [team/**]`, so a push to
a proxied name (library/...) must be refused with DENIED.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlencode

import pytest

from mirror.storage.layout import REPOSITORIES
from tests.e2e.push_helpers import (
    build_sharing,
    cut_patch,
    push_config,
    received,
    run_gc,
    sha,
    start_upload,
    wait_received,
)
from tests.support.clients import Dockerd, Podman, skopeo, skopeo_copy
from tests.support.images import OCI_INDEX, OCI_MANIFEST, Layout, inspect_raw, seed
from tests.support.procs import Distribution, Mirror, http, wait_for
from tests.support.registry import MANIFEST_ACCEPT, check_oci_copy, manifest_digest, oci_error

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]


@pytest.fixture
def push_mirror(mirror_factory: Callable[..., Mirror], upstream: Distribution) -> Mirror:
    """A mirror on its own port: upstream `hub` for Docker Hub names, `team/**` private."""
    return mirror_factory(push_config(upstream.url), name="push-mirror")


def denied_requests(mirror: Mirror, repo: str) -> list[dict[str, object]]:
    return [e for e in mirror.requests() if str(e["path"]).startswith(f"/v2/{repo}/") and e.get("status") == 403]


# --- 1. docker push / pull back ----------------------------------------------------------------------

def test_docker_push_then_pull_back(docker: Dockerd, docker_mirror: Callable[..., Mirror], upstream: Distribution,
                                    layouts: dict[str, Layout]) -> None:
    small = layouts["small"]
    mirror = docker_mirror(push_config(upstream.url))
    # 127.0.0.0/8 is insecure by default in dockerd (the helper's daemon.json lists no registries)
    info = json.loads(docker.cli("info", "--format", "{{json .RegistryConfig.InsecureRegistryCIDRs}}").stdout)
    assert "127.0.0.0/8" in info, info

    docker.pull("small")  # through the mirror, from the upstream
    image_id = docker.image_id("small")
    assert image_id == small.image().config.digest

    ref = f"{mirror.host}/team/app:v1"
    docker.cli("tag", "small", ref)
    out = docker.cli("push", ref).stdout
    m = re.search(r"v1: digest: (sha256:[0-9a-f]{64}) size: (\d+)", out)
    assert m, out
    pushed = m.group(1)
    # what the mirror serves for the tag is exactly what dockerd pushed
    assert manifest_digest(mirror.url, "team/app", "v1") == pushed
    assert sha(inspect_raw(f"docker://{ref}")) == pushed
    assert f"{mirror.host}/team/app@{pushed}" in docker.repo_digests(ref)

    # the same image to another private repository: dockerd mounts the layers it just pushed
    other = f"{mirror.host}/team/other:v1"
    docker.cli("tag", "small", other)
    out = docker.cli("push", other).stdout
    assert "Mounted from team/app" in out, out
    mounts = [e for e in mirror.requests() if str(e["path"]).startswith("/v2/team/other/blobs/uploads/?")
              and "mount=" in str(e["path"])]
    assert mounts and all(e["status"] == 201 for e in mounts), mounts
    # only the config is uploaded again (dockerd never mounts a config), no layer
    uploaded = {unquote(str(e["path"]).split("digest=", 1)[1]) for e in mirror.requests()
                if e["method"] == "PUT" and str(e["path"]).startswith("/v2/team/other/blobs/uploads/")}
    assert uploaded == {image_id}, uploaded
    assert f"v1: digest: {pushed} " in out, out  # same layers, same config: the same manifest

    docker.cli("rmi", ref, other, "small")
    assert docker.image_ids() == []
    docker.pull(ref)
    assert docker.image_id(ref) == image_id
    assert docker.repo_digests(ref) == [f"{mirror.host}/team/app@{pushed}"]
    # the private name never went to the upstream
    assert not upstream.requests(contains="/v2/team/app/")


def test_docker_push_to_proxied_name_is_denied(docker: Dockerd, docker_mirror: Callable[..., Mirror],
                                               upstream: Distribution, layouts: dict[str, Layout]) -> None:
    mirror = docker_mirror(push_config(upstream.url))
    docker.pull("small")
    ref = f"{mirror.host}/library/whatever:v1"
    docker.cli("tag", "small", ref)
    r = docker.cli("push", ref, check=False, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "denied" in out.lower(), out
    assert denied_requests(mirror, "library/whatever"), [f"{e['method']} {e['path']} {e['status']}"
                                                        for e in mirror.requests()]
    # nothing was stored under the proxied name: no upload session, no private marker, no manifest
    assert http("GET", f"{mirror.url}/v2/library/whatever/manifests/v1", {"Accept": MANIFEST_ACCEPT}).status == 404
    repositories = mirror.root / REPOSITORIES
    leftovers = sorted(str(p.relative_to(mirror.root)) for p in repositories.rglob("*")
                       if "library/whatever" in p.as_posix()) if repositories.exists() else []
    assert not leftovers, leftovers


# --- 2. skopeo: a multi-platform index, both ways ------------------------------------------------------

def test_skopeo_copy_all_index_round_trip(push_mirror: Mirror, layouts: dict[str, Layout], tmp_path: Path) -> None:
    multi = layouts["multi"]
    dest = f"docker://{push_mirror.host}/team/multi:latest"
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", "--dest-no-creds", "--retry-times", "0",
           multi.oci_ref(), dest)

    raw = inspect_raw(dest)
    assert raw == multi.read(multi.digest)  # the index, byte for byte
    for image in multi.images:
        child = inspect_raw(f"docker://{push_mirror.host}/team/multi@{image.manifest.digest}")
        assert child == multi.read(image.manifest.digest)
    r = http("GET", f"{push_mirror.url}/v2/team/multi/manifests/latest", {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200 and r.headers["Content-Type"] == OCI_INDEX and r.headers["Docker-Content-Digest"] == \
        multi.digest
    assert http("GET", f"{push_mirror.url}/v2/team/multi/tags/list").json() == {"name": "team/multi",
                                                                                  "tags": ["latest"]}

    out = tmp_path / "back"
    skopeo_copy(dest, f"oci:{out}:latest", "--all")
    check_oci_copy(out, multi)  # index digest, both children, every config and layer intact
    index = json.loads((out / "blobs" / "sha256" / multi.digest.split(":", 1)[1]).read_bytes())
    assert [m["digest"] for m in index["manifests"]] == [i.manifest.digest for i in multi.images]


# --- 3. podman push / pull back -------------------------------------------------------------------------

def test_podman_push_then_pull_back(push_mirror: Mirror, podman_factory: Callable[[str], Podman],
                                    layouts: dict[str, Layout], tmp_path: Path) -> None:
    small = layouts["small"]
    first = podman_factory(push_mirror.host)
    loaded = first.podman("pull", small.oci_ref()).stdout.split()[-1]
    image_id = first.podman("image", "inspect", "--format", "{{.Id}}", loaded).stdout.strip()
    assert "sha256:" + image_id == small.image().config.digest

    ref = f"{push_mirror.host}/team/pod:v1"
    digestfile = tmp_path / "pushed.digest"
    first.podman("push", "--tls-verify=false", "--digestfile", str(digestfile), loaded, ref)
    pushed = digestfile.read_text().strip()
    assert manifest_digest(push_mirror.url, "team/pod", "v1") == pushed

    second = podman_factory(push_mirror.host)  # fresh storage: everything comes from the mirror
    second.podman("pull", "--tls-verify=false", ref)
    assert second.image_digest(ref) == pushed
    assert second.podman("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip() == image_id
    # the pulled image is complete: its layers unpack to the files the layout put in
    out = second.podman("image", "mount", ref, check=False)
    if out.returncode == 0 and out.stdout.strip():  # rootless podman mounts only inside `podman unshare`
        root = Path(out.stdout.strip())
        assert (root / "hello").read_bytes().startswith(b"#!/bin/sh")
        second.podman("image", "unmount", ref, check=False)


# --- 4. an OCI artifact with a subject (oras), found through the referrers API ----------------------------

def test_oras_artifact_with_subject_and_referrers(push_mirror: Mirror, layouts: dict[str, Layout], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import oras.client
        import oras.oci
    except ImportError as e:  # a dev dependency (pyproject): missing is a failure in CI
        if os.environ.get("CI") == "true":
            pytest.fail(f"oras is not installed: {e}")
        pytest.skip(f"oras is not installed: {e}")

    small = layouts["small"]
    seed(small, push_mirror.host, "team/app", tag="v1")  # skopeo: the subject, an image manifest
    subject = oras.oci.Subject(mediaType=OCI_MANIFEST, digest=small.digest, size=small.top.size)

    # oras reads ~/.docker/config.json for credentials: give it an empty home, and no proxies
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    client = oras.client.OrasClient(hostname=push_mirror.host, insecure=True)
    client.session.trust_env = False
    monkeypatch.chdir(tmp_path)

    pushed: dict[str, str] = {}  # artifact type -> manifest digest
    kinds: dict[str, str] = {}
    for kind, media_type, content in [("sbom", "application/vnd.e2e.sbom.v1+json", b'{"packages":[]}'),
                                      ("sig", "application/vnd.e2e.signature.v1", b"not a real signature")]:
        (tmp_path / f"{kind}.bin").write_bytes(content)
        (tmp_path / f"{kind}-config.json").write_bytes(b"{}")
        r = client.push(f"{push_mirror.host}/team/app:{kind}", files=[f"{kind}.bin"],
                        manifest_config=f"{kind}-config.json:{media_type}", subject=subject,
                        manifest_annotations={"e2e.kind": kind}, quiet=True)
        assert r.status_code == 201, (r.status_code, r.text)
        assert r.headers.get("OCI-Subject") == small.digest, dict(r.headers)
        pushed[media_type] = r.headers["Docker-Content-Digest"]
        kinds[media_type] = kind
        body = http("GET", f"{push_mirror.url}/v2/team/app/manifests/{kind}", {"Accept": OCI_MANIFEST}).body
        assert sha(body) == pushed[media_type]
        assert json.loads(body)["subject"]["digest"] == small.digest

    url = f"{push_mirror.url}/v2/team/app/referrers/{small.digest}"
    r = http("GET", url)
    assert r.status == 200, (r.status, r.body[:300])
    content_types = {r.headers["Content-Type"]}
    index = r.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    found = {m["digest"]: m for m in index["manifests"]}
    assert set(found) == set(pushed.values()), index
    for media_type, digest in pushed.items():
        d = found[digest]
        # no artifactType in oras' manifest: the config's media type stands in (OCI 1.1)
        assert d["artifactType"] == media_type and d["mediaType"] == OCI_MANIFEST, d
        assert d["size"] > 0 and d["annotations"] == {"e2e.kind": kinds[media_type]}, d

    for media_type, digest in pushed.items():
        r = http("GET", f"{url}?{urlencode({'artifactType': media_type})}")  # "+" must be %2B
        assert r.status == 200 and r.headers.get("OCI-Filters-Applied") == "artifactType"
        content_types.add(r.headers["Content-Type"])
        assert [m["digest"] for m in r.json()["manifests"]] == [digest]
    r = http("GET", f"{url}?artifactType=application/vnd.e2e.nothing")
    assert r.status == 200 and r.json()["manifests"] == []

    # the subject itself is untouched, and a digest nothing refers to has no referrers
    assert manifest_digest(push_mirror.url, "team/app", "v1") == small.digest
    r = http("GET", f"{push_mirror.url}/v2/team/app/referrers/{sha(b'nothing')}")
    assert r.status == 200 and r.json()["manifests"] == []
    content_types.add(r.headers["Content-Type"])
    # exactly the index media type, no parameters: the OCI conformance suite compares the header
    # with Equal("application/vnd.oci.image.index.v1+json")
    assert content_types == {OCI_INDEX}, content_types


# --- 5. an upload cut off mid-PATCH resumes (also after a restart) ---------------------------------------

def _assert_not_served(mirror: Mirror, repo: str, *digests: str) -> None:
    for d in digests:
        for method in ("HEAD", "GET"):
            r = http(method, f"{mirror.url}/v2/{repo}/blobs/{d}")
            assert r.status == 404, (method, d, r.status)


def _finish(mirror: Mirror, repo: str, location: str, data: bytes, have: int) -> None:
    r = http("PATCH", mirror.url + location, {"Content-Range": f"{have}-{len(data) - 1}",
                                              "Content-Type": "application/octet-stream"}, data[have:], timeout=30)
    assert r.status == 202, (r.status, r.body[:300])
    assert r.headers["Range"] == f"0-{len(data) - 1}"
    location = r.headers.get("Location", location)
    r = http("PUT", f"{mirror.url}{location}{'&' if '?' in location else '?'}digest={sha(data)}")
    assert r.status == 201, (r.status, r.body[:300])
    assert r.headers["Docker-Content-Digest"] == sha(data)
    r = http("GET", f"{mirror.url}/v2/{repo}/blobs/{sha(data)}", timeout=30)
    assert r.status == 200 and r.body == data
    assert http("GET", mirror.url + location.split("?", 1)[0]).status == 404  # the session is gone


def test_interrupted_patch_resumes(push_mirror: Mirror) -> None:
    data = bytes(range(251)) * 16_000  # ~3.8 MiB, not a multiple of anything
    repo = "team/resume"
    location = start_upload(push_mirror, repo)
    cut = 1_500_001
    cut_patch(push_mirror.port, location, data, cut)
    have = wait_received(push_mirror, location, cut)
    assert have == cut, f"upload status reports {have} bytes, {cut} were sent before the cut"
    # A client going away is logged as such (499), not as a server error with a traceback.
    def patches() -> list[int]:
        return [e["status"] for e in push_mirror.requests() if e["method"] == "PATCH" and e["path"] == location]

    wait_for(lambda: bool(patches()), 10, "the cut PATCH in the access log")
    assert patches() == [499]
    assert not [e for e in push_mirror.log_lines() if e.get("level") == "error"]
    assert "Traceback" not in push_mirror.proc.stderr_path.read_text()
    _assert_not_served(push_mirror, repo, sha(data), sha(data[:cut]))
    _finish(push_mirror, repo, location, data, have)
    assert push_mirror.running


def test_interrupted_chunked_patch_resumes_after_restart(push_mirror: Mirror) -> None:
    data = bytes(range(253)) * 12_000  # ~3 MiB
    repo = "team/resume-restart"
    location = start_upload(push_mirror, repo)
    sent = 1_000_000 + 12_345  # inside a 64 KiB chunk, as docker's streamed PATCH would be cut
    cut_patch(push_mirror.port, location, data, sent, chunked=True)
    have = wait_received(push_mirror, location, sent)
    assert have == sent, f"upload status reports {have} bytes, {sent} were sent before the cut"
    _assert_not_served(push_mirror, repo, sha(data), sha(data[:have]))

    push_mirror.restart()  # same port, same storage
    assert received(push_mirror, location) == have
    _assert_not_served(push_mirror, repo, sha(data), sha(data[:have]))
    # a resume from the wrong offset is refused, with the Range to resume from
    r = http("PATCH", push_mirror.url + location, {"Content-Range": f"{have + 10}-{len(data) - 1}"},
             data[have + 10:])
    assert r.status == 416 and r.headers["Range"] == f"0-{have - 1}", (r.status, dict(r.headers))
    assert oci_error(r.body)[0]["code"] == "RANGE_INVALID"
    _finish(push_mirror, repo, location, data, have)


# --- 6. mirror gc next to the running server ---------------------------------------------------------------

def test_gc_sweeps_only_the_deleted_images_blobs(push_mirror: Mirror, layouts: dict[str, Layout],
                                                 tmp_path: Path) -> None:
    small = layouts["small"]
    sharing = build_sharing(tmp_path / "sharing-layout", small)
    seed(small, push_mirror.host, "team/gc-a", tag="v1")
    seed(sharing, push_mirror.host, "team/gc-b", tag="v1")
    a, b = small.image(), sharing.image()
    shared = {x.digest for x in a.blobs} & {x.digest for x in b.blobs}
    assert shared == {a.layers[0].digest}
    a_only = {a.manifest.digest, *(x.digest for x in a.blobs)} - shared

    # nothing unreferenced yet: a dry run sweeps nothing
    dry = run_gc(push_mirror, "--dry-run")
    assert dry["swept"] == [], dry

    r = http("DELETE", f"{push_mirror.url}/v2/team/gc-a/manifests/{small.digest}")
    assert r.status == 202, (r.status, r.body[:300])
    assert http("GET", f"{push_mirror.url}/v2/team/gc-a/manifests/v1", {"Accept": MANIFEST_ACCEPT}).status == 404

    result = run_gc(push_mirror)
    assert push_mirror.running
    assert sorted(result["swept"]) == sorted(a_only), result
    assert result["swept_bytes"] == sum(x.size for x in [a.manifest, *a.blobs] if x.digest in a_only)
    for d in a_only:
        assert not push_mirror.has_blob(d), d
    for d in shared | {b.manifest.digest, *(x.digest for x in b.blobs)}:
        assert push_mirror.has_blob(d), d

    # the other image still pulls, in full, from the server that never stopped
    out = tmp_path / "b-back"
    skopeo_copy(f"docker://{push_mirror.host}/team/gc-b:v1", f"oci:{out}:v1")
    check_oci_copy(out, sharing)
    # a second collection finds nothing more
    assert run_gc(push_mirror)["swept"] == []
