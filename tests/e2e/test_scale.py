"""Costs that do not grow with the registry, on 100,000 objects seeded straight into storage (through
mirror/storage/layout.py): a `mirror serve` on them listens at once and serves pulls while its ledger
is rebuilt; and its event loop never stalls 50 ms while the ledger is rebuilt from them and while one
eviction pass removes all of them (its loop probe: a task that sleeps 10 ms in a loop and records how
late it wakes, mirror_event_loop_stall_seconds)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from mirror.names import Digest
from mirror.storage import layout
from tests.support.procs import Mirror, free_port, http

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
OBJECTS = 100_000
REPOSITORIES = 100
STALL = 0.050
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def seed(root: Path, objects: int = OBJECTS) -> None:
    """`objects` small cached blobs, each linked by one of REPOSITORIES cached repositories, and one
    pushed image (team/app:v1) a pull is asked for while the ledger is read."""
    made: set[Path] = set()

    def write(key: str, data: bytes) -> None:
        path = root / key
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)

    for r in range(REPOSITORIES):
        write(layout.marker(f"library/r{r:03d}", layout.CACHED_MARK), b"")
    for i in range(objects):
        data = b"blob %d" % i
        d = Digest("sha256", hashlib.sha256(data).hexdigest())
        write(layout.blob(d), data)
        write(layout.layer(f"library/r{i % REPOSITORIES:03d}", d), str(d).encode())
    config, layer = b'{"os":"linux"}', b"the pushed layer"
    descriptors = []
    for data, media in ((config, "application/vnd.oci.image.config.v1+json"),
                        (layer, "application/vnd.oci.image.layer.v1.tar")):
        d = Digest("sha256", hashlib.sha256(data).hexdigest())
        write(layout.blob(d), data)
        write(layout.layer("team/app", d), str(d).encode())
        descriptors.append({"mediaType": media, "digest": str(d), "size": len(data)})
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptors[0],
                       "layers": descriptors[1:]}).encode()
    m = Digest("sha256", hashlib.sha256(body).hexdigest())
    write(layout.blob(m), body)
    write(layout.revision("team/app", m), str(m).encode())
    write(layout.tag("team/app", "v1"), str(m).encode())
    write(layout.marker("team/app", layout.PRIVATE_MARK), b"")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scale") / "data"
    seed(root)
    return root


def test_serve_listens_at_once_on_a_large_storage(seeded: Path, mirror_factory: Any, tmp_path: Path) -> None:
    """`mirror serve` opens its port before anything is read from storage; a pull is served while its
    ledger is rebuilt, and the catalog says it is not ready rather than answering short."""
    port = free_port()
    t0 = time.monotonic()
    m: Mirror = mirror_factory({"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
                                "http": {"addr": f"127.0.0.1:{port}"},
                                "storage": {"filesystem": {"rootdirectory": str(seeded)}},
                                "cache": {"directory": str(tmp_path / "local")},
                                "private": {"patterns": ["team/**"]}}, port=port)
    listening = time.monotonic() - t0
    r = http("GET", f"{m.url}/v2/team/app/manifests/v1", {"Accept": OCI_MANIFEST})
    assert r.status == 200
    catalog = http("GET", f"{m.url}/v2/_catalog?n=5", timeout=30)
    assert catalog.status in (200, 503), catalog.status
    deadline = time.monotonic() + 600
    while http("GET", f"{m.url}/v2/_catalog?n=5", timeout=30).status != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    # registry:2's catalog: every repository with content (the cached ones link blobs), in path order
    first = json.loads(http("GET", f"{m.url}/v2/_catalog?n=2").body)["repositories"]
    assert first == ["library/r000", "library/r001"]
    last = f"library/r{REPOSITORIES - 1:03d}"
    assert json.loads(http("GET", f"{m.url}/v2/_catalog?n=5&last={last}").body)["repositories"] == ["team/app"]
    m.stop()  # the next test evicts from the seed: this one reads it first
    print(f"listening {listening:.2f}s after the spawn (the process's own start included)")
    assert listening < 10.0


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


def test_the_loop_never_stalls_while_a_pass_over_100k_objects_runs(seeded: Path, mirror_factory: Any,
                                                                   tmp_path: Path) -> None:
    """A `mirror serve` whose cap is far below what storage holds: it rebuilds its ledger from the
    200,000 files, then its first eviction pass removes the 100,000 cached blobs; its own loop probe
    (mirror_event_loop_stall_seconds) says how long the loop was ever held up meanwhile."""
    port = free_port()
    m: Mirror = mirror_factory({"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
                                "http": {"addr": f"127.0.0.1:{port}"},
                                "storage": {"filesystem": {"rootdirectory": str(seeded)}},
                                "cache": {"directory": str(tmp_path / "local"), "max_size": "1KiB", "min_idle": "0s"},
                                "proxy": {"remoteurl": "http://127.0.0.1:9"}, "private": {"patterns": ["team/**"]}},
                               port=port)
    t0 = time.monotonic()
    evicted: list[int] = []
    while not evicted:
        assert time.monotonic() - t0 < 600, "no eviction pass ended"
        time.sleep(0.5)
        evicted = [int(x) for x in re.findall(r"evicted (\d+) objects", "\n".join(json.dumps(e) for e in
                                                                                m.log_lines()))]
    took = time.monotonic() - t0
    assert sum(evicted) >= OBJECTS * 0.99, evicted  # down to the low watermark: a few small ones stay
    assert http("GET", f"{m.url}/v2/team/app/manifests/v1", {"Accept": OCI_MANIFEST}).status == 200  # kept
    text = http("GET", f"{m.url}/metrics", timeout=30).body.decode()
    stall = metric(text, "mirror_event_loop_stall_max_seconds")
    slow = metric(text, "mirror_event_loop_stall_seconds_count") \
        - metric(text, 'mirror_event_loop_stall_seconds_bucket{le="0.05"}')
    print(f"ledger rebuilt from {2 * OBJECTS} files and {sum(evicted)} blobs evicted in {took:.1f}s; the loop's "
          f"longest stall {stall * 1e3:.1f} ms, {slow:.0f} wakes over 50 ms")
    assert stall < STALL, stall
