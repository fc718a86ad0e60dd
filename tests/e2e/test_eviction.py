"""A mirror with a small `cache.max_size` under real docker pulls: usage stays under the cap, the
least recently used proxied image goes first, a pushed image is never touched, and the evicted
image pulls again correctly (fetched from upstream again)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.push_helpers import PRIVATE
from tests.support.clients import Dockerd, skopeo_copy
from tests.support.images import Layout, _Writer, seed
from tests.support.procs import Distribution, Mirror, mirror_config, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

MiB = 1 << 20
IMAGE = 3 * MiB


def build(path: Path, name: str) -> Layout:
    """One image whose single layer is IMAGE incompressible bytes of its own."""
    w = _Writer(path / name)
    layer = w.layer({f"{name}.bin": os.urandom(IMAGE)}, compresslevel=1)
    image = w.image([layer], "amd64", name)
    return w.finish(name, "latest", image.manifest, [image])


def stored(mirror: Mirror) -> dict[str, int]:
    return {p.parent.name: p.stat().st_size for p in mirror.blob_files()}


def test_lru_eviction_under_real_pulls(docker: Dockerd, docker_mirror: Callable[..., Mirror],
                                       upstream_clone: Callable[..., Distribution], tmp_path: Path) -> None:
    images = {name: build(tmp_path / "images", name) for name in ("a", "b", "c", "p")}
    up = upstream_clone()
    for name in ("a", "b", "c"):
        seed(images[name], up.host, f"library/{name}")
    config = mirror_config(up.url, tag_ttl="1h")
    config["private"] = {"patterns": list(PRIVATE)}
    cap = 4 * IMAGE  # four images and their manifests pass 95% of it: one must go
    config["cache"] = {"max_size": cap, "min_idle": "0s"}
    mirror = docker_mirror(config)

    skopeo_copy(images["p"].oci_ref(), f"docker://{mirror.host}/team/p:latest", "--dest-tls-verify=false")
    for name in ("a", "b", "a", "c"):  # a is pulled again: b is the least recently used
        docker.pull(name)
        docker.clean()

    def layer(name: str) -> str:
        return images[name].image().layers[0].digest.split(":")[1]

    wait_for(lambda: layer("b") not in stored(mirror), 20, "b's layer to be evicted")
    kept = stored(mirror)
    assert sum(kept.values()) <= cap
    for name in ("a", "c", "p"):
        assert layer(name) in kept, f"{name} was evicted"
    for blob in images["p"].blobs + images["p"].manifests:  # nothing of the pushed image went
        assert blob.digest.split(":")[1] in kept

    mark = up.mark()
    docker.pull("b")
    assert docker.image_id("b") == images["b"].image().config.digest
    assert len(up.blob_gets(images["b"].image().layers[0].digest, since=mark)) == 1  # fetched again
