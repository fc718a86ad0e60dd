"""One mirror, two upstreams: containerd's `?ns=quay.io` and the `/v2/quay.io/...` path prefix
reach the second one; `_catalog` lists what was pulled under the names that pull it again."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.clients import Containerd, skopeo_copy, write_hosts_toml
from tests.support.images import Layout
from tests.support.procs import Distribution, Mirror, http
from tests.support.registry import check_oci_copy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_ctr_reaches_second_upstream_by_ns(containerd: Containerd, mirror: Mirror, upstream: Distribution,
                                           quay_upstream: Distribution, layouts: dict[str, Layout],
                                           tmp_path: Path) -> None:
    img = layouts["quay"]
    hosts = write_hosts_toml(tmp_path / "certs.d", "quay.io", "https://quay.io", mirror.url)
    mark_quay, mark_hub = quay_upstream.mark(), upstream.mark()

    ns = containerd.new_namespace()
    ref = "quay.io/org/img:tag"
    containerd.pull(ref, hosts, ns)
    assert containerd.image_digest(ref, ns) == img.digest
    for blob in img.image().blobs:
        assert len(quay_upstream.blob_gets(blob.digest, since=mark_quay)) == 1
    assert not upstream.requests(since=mark_hub, contains="/v2/org/img"), "routed to the wrong upstream"
    assert any("ns=quay.io" in str(e.get("path")) for e in mirror.requests())

    # the same content is then found under the prefixed name, from cache
    mark_quay = quay_upstream.mark()
    out = tmp_path / "by-prefix"
    skopeo_copy(f"docker://{mirror.host}/quay.io/org/img:tag", f"oci:{out}:tag")
    check_oci_copy(out, img)
    assert not quay_upstream.blob_gets(since=mark_quay)


def test_path_prefix_and_catalog(skopeo_required: None, mirror: Mirror, upstream: Distribution,
                                 quay_upstream: Distribution, layouts: dict[str, Layout], tmp_path: Path) -> None:
    img, small = layouts["quay"], layouts["small"]
    mark_quay, mark_hub = quay_upstream.mark(), upstream.mark()

    out = tmp_path / "quay"
    skopeo_copy(f"docker://{mirror.host}/quay.io/org/img:tag", f"oci:{out}:tag")
    check_oci_copy(out, img)
    for blob in img.image().blobs:
        assert len(quay_upstream.blob_gets(blob.digest, since=mark_quay)) == 1
    # the upstream is asked under its own name, without the prefix
    assert quay_upstream.requests(contains="/v2/org/img/manifests/", since=mark_quay)

    out = tmp_path / "small"
    skopeo_copy(f"docker://{mirror.host}/library/small:latest", f"oci:{out}:latest")
    check_oci_copy(out, small)
    # the default upstream's own prefix (docker.io/...) and Docker Hub short names work too
    out = tmp_path / "small-prefixed"
    skopeo_copy(f"docker://{mirror.host}/docker.io/library/small:latest", f"oci:{out}:latest")
    check_oci_copy(out, small)
    r = http("GET", f"{mirror.url}/v2/small/manifests/latest",
             {"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status == 200 and r.headers.get("Docker-Content-Digest") == small.digest
    for blob in small.image().blobs:
        assert len(upstream.blob_gets(blob.digest, since=mark_hub)) == 1
    assert not quay_upstream.requests(contains="library/small", since=mark_quay)

    r = http("GET", f"{mirror.url}/v2/_catalog")
    assert r.status == 200
    repos = r.json()["repositories"]
    assert "library/small" in repos and "quay.io/org/img" in repos, repos
    assert repos == sorted(repos)

    r = http("GET", f"{mirror.url}/v2/quay.io/org/img/tags/list")
    assert r.status == 200 and "tag" in r.json()["tags"], r.body
