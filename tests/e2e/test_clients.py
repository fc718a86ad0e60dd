"""Real clients pull through the mirror: dockerd (registry-mirrors), podman (registries.conf
mirror), containerd's ctr (hosts.toml) and skopeo. Digests are checked against the upstream's,
and the upstream's access log proves the second pull came from the mirror's cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.clients import Containerd, Dockerd, Podman, skopeo_copy, write_hosts_toml
from tests.support.images import Layout
from tests.support.procs import Distribution, Mirror, mirror_config
from tests.support.registry import check_oci_copy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def assert_fetched_once(upstream: Distribution, layout: Layout, since: int, arch: str = "amd64") -> None:
    image = layout.image(arch)
    for blob in image.blobs:
        n = len(upstream.blob_gets(blob.digest, since=since))
        assert n == 1, f"upstream served {blob.digest} {n} times (expected once)"


def assert_untouched(upstream: Distribution, repo: str, since: int) -> None:
    """No request for `repo` reached the upstream since `since` (cache hit, tag still fresh)."""
    seen = [f"{e.method} {e.path} {e.status}" for e in upstream.requests(contains=f"/v2/{repo}/", since=since)]
    assert not seen, f"expected the mirror to answer from cache, but the upstream saw: {seen}"


def mirror_hits(mirror: Mirror, fragment: str) -> list[dict[str, object]]:
    return [e for e in mirror.requests() if fragment in str(e.get("path"))]


# --- dockerd ---------------------------------------------------------------------------------------------

def test_docker_pull_small_then_from_cache(docker: Dockerd, docker_mirror: Callable[..., Mirror],
                                           upstream: Distribution, layouts: dict[str, Layout]) -> None:
    small = layouts["small"]
    mirror = docker_mirror(mirror_config(upstream.url))
    mark = upstream.mark()

    docker.pull("small")
    assert docker.repo_digests("small") == [f"small@{small.digest}"]
    assert docker.image_id("small") == small.image().config.digest
    assert_fetched_once(upstream, small, mark)
    # dockerd really went through the mirror (and only saw Docker Hub names there)
    assert mirror_hits(mirror, f"/v2/library/small/blobs/{small.image().layers[0].digest}")

    docker.clean()
    mark = upstream.mark()
    docker.pull("small")
    assert docker.repo_digests("small") == [f"small@{small.digest}"]
    assert_untouched(upstream, "library/small", mark)

    # the access log: one JSON object per line, one line per request dockerd made
    assert not mirror.non_json_lines()
    reqs = mirror.requests()
    assert {e["method"] for e in reqs} >= {"GET", "HEAD"}
    assert sum(1 for e in reqs if str(e["path"]).startswith("/v2/library/small/blobs/")) >= 2 * len(
        small.image().blobs)


def test_docker_pull_multi_platform_index(docker: Dockerd, docker_mirror: Callable[..., Mirror],
                                          upstream: Distribution, layouts: dict[str, Layout]) -> None:
    multi = layouts["multi"]
    docker_mirror(mirror_config(upstream.url))
    mark = upstream.mark()

    docker.pull("multi")
    assert docker.repo_digests("multi") == [f"multi@{multi.digest}"]  # the index digest
    assert docker.image_id("multi") == multi.image("amd64").config.digest
    assert_fetched_once(upstream, multi, mark, "amd64")
    for blob in multi.image("arm64").blobs:  # a client's pull never drags the other platform in
        assert not upstream.blob_gets(blob.digest, since=mark)

    docker.clean()
    mark = upstream.mark()
    docker.pull("multi")
    assert docker.image_id("multi") == multi.image("amd64").config.digest
    assert_untouched(upstream, "library/multi", mark)


def test_docker_pull_by_digest(docker: Dockerd, docker_mirror: Callable[..., Mirror], upstream: Distribution,
                               layouts: dict[str, Layout]) -> None:
    small = layouts["small"]
    mirror = docker_mirror(mirror_config(upstream.url))
    mark = upstream.mark()

    ref = f"small@{small.digest}"
    docker.pull(ref)
    assert docker.image_id(ref) == small.image().config.digest
    assert_fetched_once(upstream, small, mark)
    assert mirror_hits(mirror, f"/v2/library/small/manifests/{small.digest}")
    # by digest, no tag is involved anywhere
    assert not upstream.requests(contains="/v2/library/small/manifests/latest", since=mark)

    docker.clean()
    mark = upstream.mark()
    docker.pull(ref)
    assert_untouched(upstream, "library/small", mark)


# --- podman ------------------------------------------------------------------------------------------------

def test_podman_pull_through_registries_conf_mirror(podman_factory: Callable[[str], Podman], mirror: Mirror,
                                                    upstream: Distribution, layouts: dict[str, Layout]) -> None:
    small = layouts["small"]
    mark = upstream.mark()
    t0 = time.monotonic()
    podman_factory(mirror.host).pull("docker.io/library/small")
    took = time.monotonic() - t0
    assert_fetched_once(upstream, small, mark)
    # podman opens with a TLS ClientHello on the plain-HTTP port; a mirror that does not reject
    # it at once makes every pull stall ~10 s.
    assert took < 8, f"podman pull took {took:.1f}s (TLS probe not rejected at once?)"

    fresh = podman_factory(mirror.host)  # new, empty storage
    mark = upstream.mark()
    fresh.pull("docker.io/library/small")
    assert fresh.image_digest("docker.io/library/small") == small.digest
    assert_untouched(upstream, "library/small", mark)


# --- containerd ------------------------------------------------------------------------------------------

def test_ctr_pull_with_hosts_toml(containerd: Containerd, mirror: Mirror, upstream: Distribution,
                                  layouts: dict[str, Layout], tmp_path: Path) -> None:
    small = layouts["small"]
    hosts = write_hosts_toml(tmp_path / "certs.d", "docker.io", "https://registry-1.docker.io", mirror.url)
    ref = "docker.io/library/small:latest"
    mark = upstream.mark()

    ns = containerd.new_namespace()
    containerd.pull(ref, hosts, ns)
    assert containerd.image_digest(ref, ns) == small.digest
    assert_fetched_once(upstream, small, mark)
    # containerd names the registry on every request, blobs included
    blob_requests = mirror_hits(mirror, "/blobs/sha256:")
    assert blob_requests and all("ns=docker.io" in str(e["path"]) for e in blob_requests), blob_requests

    mark = upstream.mark()
    ns2 = containerd.new_namespace()  # content is isolated per namespace: a cold client
    containerd.pull(ref, hosts, ns2)
    assert containerd.image_digest(ref, ns2) == small.digest
    assert_untouched(upstream, "library/small", mark)


# --- skopeo ------------------------------------------------------------------------------------------------

def test_skopeo_copy_all_platforms(skopeo_required: None, mirror: Mirror, upstream: Distribution,
                                   layouts: dict[str, Layout], tmp_path: Path) -> None:
    multi = layouts["multi"]
    mark = upstream.mark()
    out = tmp_path / "multi-oci"
    skopeo_copy(f"docker://{mirror.host}/library/multi:latest", f"oci:{out}:latest", "--all")
    check_oci_copy(out, multi)
    for arch in ("amd64", "arm64"):
        assert_fetched_once(upstream, multi, mark, arch)

    mark = upstream.mark()
    out2 = tmp_path / "multi-oci-again"
    skopeo_copy(f"docker://{mirror.host}/library/multi:latest", f"oci:{out2}:latest", "--all")
    check_oci_copy(out2, multi)
    assert_untouched(upstream, "library/multi", mark)

    # the warm mirror also answers by digest, and with the upstream's own digest
    out3 = tmp_path / "multi-by-digest"
    skopeo_copy(f"docker://{mirror.host}/library/multi@{multi.digest}", f"oci:{out3}", "--all")
    index = (out3 / "index.json").read_text()
    assert multi.digest in index
    assert_untouched(upstream, "library/multi", mark)
