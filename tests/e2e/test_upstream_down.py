"""The upstream goes away: what the mirror has cached keeps being served (by tag, stale, and by
digest), through a mirror restart too; what it has not cached fails quickly and clearly."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.clients import Dockerd, skopeo_copy
from tests.support.images import OCI_MANIFEST, Layout
from tests.support.procs import Distribution, Mirror, http, mirror_config
from tests.support.registry import MANIFEST_ACCEPT, check_oci_copy, oci_error

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TAG_TTL = 1.0  # seconds: by the time the upstream is down the cached tag is stale


def warm(docker: Dockerd, mirror: Mirror, small: Layout, tmp_path: Path) -> None:
    docker.pull("small")
    skopeo_copy(f"docker://{mirror.host}/library/small:latest", f"oci:{tmp_path / 'warm'}:latest")
    docker.clean()


def assert_quick_oci_error(mirror: Mirror, path: str, limit: float = 20.0) -> tuple[int, list[dict[str, object]]]:
    t0 = time.monotonic()
    r = http("GET", mirror.url + path, {"Accept": MANIFEST_ACCEPT}, timeout=limit + 5)
    took = time.monotonic() - t0
    assert took < limit, f"GET {path} took {took:.1f}s with the upstream down"
    assert 400 <= r.status < 600, f"GET {path}: {r.status} {r.body[:300]!r}"
    return r.status, oci_error(r.body)


def test_cached_content_survives_upstream_outage(docker: Dockerd, docker_mirror: Callable[..., Mirror],
                                                 upstream_clone: Callable[..., Distribution],
                                                 layouts: dict[str, Layout], tmp_path: Path) -> None:
    small, multi = layouts["small"], layouts["multi"]
    up = upstream_clone()
    mirror = docker_mirror(mirror_config(up.url, tag_ttl=f"{TAG_TTL:g}s"))
    warm(docker, mirror, small, tmp_path)

    up.stop()
    time.sleep(TAG_TTL + 0.5)

    # by tag (stale now: revalidation fails, the cached manifest is served) and by digest
    t0 = time.monotonic()
    docker.pull("small")
    assert docker.image_id("small") == small.image().config.digest
    docker.pull(f"small@{small.digest}")
    assert time.monotonic() - t0 < 60
    out = tmp_path / "down-tag"
    skopeo_copy(f"docker://{mirror.host}/library/small:latest", f"oci:{out}:latest")
    check_oci_copy(out, small)
    out = tmp_path / "down-digest"
    skopeo_copy(f"docker://{mirror.host}/library/small@{small.digest}", f"oci:{out}")
    assert small.digest in (out / "index.json").read_text()

    r = http("GET", f"{mirror.url}/v2/library/small/manifests/latest", {"Accept": OCI_MANIFEST})
    assert r.status == 200 and r.headers.get("Docker-Content-Digest") == small.digest
    # README: stale-if-error answers carry `Warning: 110 - "Response is Stale"`
    assert "110" in (r.headers.get("Warning") or ""), dict(r.headers)

    # not cached: a clear error, quickly, for manifests and blobs alike
    status, errors = assert_quick_oci_error(mirror, "/v2/library/multi/manifests/latest")
    print("uncached manifest with upstream down:", status, errors)
    assert_quick_oci_error(mirror, f"/v2/library/multi/manifests/{multi.digest}")
    assert_quick_oci_error(mirror, f"/v2/library/multi/blobs/{multi.image().layers[0].digest}")

    t0 = time.monotonic()
    r = skopeo_copy(f"docker://{mirror.host}/library/multi:latest", f"oci:{tmp_path / 'multi'}:latest",
                    check=False, timeout=60)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 30, "skopeo took too long to fail"

    t0 = time.monotonic()
    r = docker.pull("multi", check=False, timeout=90)
    assert r.returncode != 0, r.stdout
    assert time.monotonic() - t0 < 60, "docker pull took too long to fail"


def test_cache_survives_mirror_restart_while_upstream_down(docker: Dockerd, docker_mirror: Callable[..., Mirror],
                                                           upstream_clone: Callable[..., Distribution],
                                                           layouts: dict[str, Layout], tmp_path: Path) -> None:
    small = layouts["small"]
    up = upstream_clone()
    mirror = docker_mirror(mirror_config(up.url, tag_ttl=f"{TAG_TTL:g}s"))
    warm(docker, mirror, small, tmp_path)

    up.stop()
    rc = mirror.stop()
    assert rc in (0, -signal.SIGTERM) and not mirror.proc.killed, f"mirror did not exit cleanly on SIGTERM: {rc}"
    mirror.start()  # same port, same storage: what it knew is on disk
    time.sleep(TAG_TTL + 0.5)

    docker.pull("small")
    assert docker.repo_digests("small") == [f"small@{small.digest}"]
    out = tmp_path / "after-restart"
    skopeo_copy(f"docker://{mirror.host}/library/small:latest", f"oci:{out}:latest")
    check_oci_copy(out, small)
