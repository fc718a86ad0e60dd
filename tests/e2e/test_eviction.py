"""A mirror with a small `cache.max_size` under real pulls: usage stays under the cap, the least recently
used proxied image goes first, a pushed image is never touched (nor counted), the evicted image pulls
again correctly (fetched from upstream again), and after a burst of pulls larger than the cap the cap
holds again within seconds without breaking a pull that was in progress."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.push_helpers import PRIVATE
from tests.support.clients import Dockerd, skopeo_copy
from tests.support.images import Layout, _Writer, seed, sha256_digest
from tests.support.procs import Distribution, Mirror, http, mirror_config, wait_for
from tests.support.registry import MANIFEST_ACCEPT, check_oci_copy

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
    cap = int(2.5 * IMAGE)  # three proxied images pass 95% of it (the pushed one never counts): one must go
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
    pushed = {b.digest.split(":")[1] for b in images["p"].blobs + images["p"].manifests}
    assert sum(size for name, size in kept.items() if name not in pushed) <= cap
    for name in ("a", "c", "p"):
        assert layer(name) in kept, f"{name} was evicted"
    for blob in images["p"].blobs + images["p"].manifests:  # nothing of the pushed image went
        assert blob.digest.split(":")[1] in kept

    mark = up.mark()
    docker.pull("b")
    assert docker.image_id("b") == images["b"].image().config.digest
    assert len(up.blob_gets(images["b"].image().layers[0].digest, since=mark)) == 1  # fetched again


def test_the_cap_holds_right_after_a_burst_of_pulls(mirror_factory: Callable[..., Mirror],
                                                    upstream_clone: Callable[..., Distribution],
                                                    tmp_path: Path) -> None:
    names = [f"burst{i}" for i in range(6)]
    images = {name: build(tmp_path / "images", name) for name in [*names, "slow"]}
    up = upstream_clone()
    for name, layout in images.items():
        seed(layout, up.host, f"library/{name}")
    config = mirror_config(up.url, tag_ttl="1h")
    cap = 8 * MiB  # the six images are 18 MiB: more than twice the cap
    config["cache"] = {"max_size": cap, "min_idle": "30s"}
    mirror = mirror_factory(config, name="burst")

    # A pull in progress: the slow client already had `slow` cached, asks for its manifest now, and comes
    # back for its blobs only after the burst and its evictions (its blobs are the least recently used).
    skopeo_copy(f"docker://{mirror.host}/library/slow:latest", f"oci:{tmp_path / 'slow-warm'}:latest")
    slow = images["slow"].image()
    r = http("GET", f"{mirror.url}/v2/library/slow/manifests/latest", {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200

    errors: list[str] = []

    def pull(name: str) -> None:
        try:
            out = tmp_path / f"pulled-{name}"
            skopeo_copy(f"docker://{mirror.host}/library/{name}:latest", f"oci:{out}:latest")
            check_oci_copy(out, images[name])
        except Exception as e:
            errors.append(f"{name}: {e}")

    threads = [threading.Thread(target=pull, args=(name,)) for name in names]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    ended = time.monotonic()
    assert not errors, errors

    # The pull in progress finishes: its blobs are still here (never fetched again), byte for byte.
    for blob in [slow.config, *slow.layers]:
        r = http("GET", f"{mirror.url}/v2/library/slow/blobs/{blob.digest}", timeout=30)
        assert r.status == 200 and sha256_digest(r.body) == blob.digest
    assert len(up.blob_gets(slow.layers[0].digest)) == 1, "the slow pull's layer was evicted under it"

    # Within seconds of the burst the proxied content is back under the cap (no private content here).
    peak = sum(stored(mirror).values())
    wait_for(lambda: sum(stored(mirror).values()) <= cap * 0.95, 15, "storage back under the cap")
    print(f"\nburst of {len(names)} pulls: {peak / MiB:.1f} MiB stored when they ended, "
          f"{sum(stored(mirror).values()) / MiB:.1f} MiB {time.monotonic() - ended:.1f} s later "
          f"(cap {cap / MiB:.0f} MiB)")
    evicted = [n for n in names if images[n].image().layers[0].digest.split(":")[1] not in stored(mirror)]
    assert evicted, "nothing was evicted"
    mark = up.mark()
    again = evicted[0]
    skopeo_copy(f"docker://{mirror.host}/library/{again}:latest", f"oci:{tmp_path / 'again'}:latest")
    check_oci_copy(tmp_path / "again", images[again])
    assert len(up.blob_gets(images[again].image().layers[0].digest, since=mark)) == 1  # from upstream again
