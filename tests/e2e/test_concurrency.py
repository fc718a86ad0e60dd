"""Many cold clients at once on the same ~200 MiB image: the upstream serves every blob exactly
once (single-flight), and every client receives exactly the right bytes."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest

from tests.support.clients import skopeo_copy
from tests.support.images import Layout
from tests.support.procs import Distribution, Mirror
from tests.support.registry import check_oci_copy, get_raw, pull_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CLIENTS = 8


def assert_each_blob_fetched_once(upstream: Distribution, big: Layout, since: int) -> None:
    counts = {b.digest: len(upstream.blob_gets(b.digest, since=since)) for b in big.image().blobs}
    assert all(n == 1 for n in counts.values()), f"upstream blob GETs per digest (expected 1 each): {counts}"


async def test_eight_concurrent_cold_pulls_of_big(mirror: Mirror, upstream: Distribution,
                                                  layouts: dict[str, Layout]) -> None:
    big = layouts["big"]
    image = big.image()
    mark = upstream.mark()
    timeout = aiohttp.ClientTimeout(total=180, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        # each client starts on a different layer: single-flight is exercised in every interleaving
        results = await asyncio.gather(*(pull_image(session, mirror.url, "library/big", "latest", start_layer=i)
                                         for i in range(CLIENTS)))
    expected = {b.digest: b.size for b in image.blobs}
    for i, r in enumerate(results):
        assert not r.errors, f"client {i}: {r.errors}\n{mirror.logs(20)}"
        assert r.manifest_digest == big.digest, f"client {i} got manifest {r.manifest_digest}"
        assert r.blobs == {d: d for d in expected}, f"client {i} got wrong bytes: {r.blobs}"
        assert r.sizes == expected
    assert_each_blob_fetched_once(upstream, big, mark)

    # warm: a Range request is answered from the cache, byte-exact, and the upstream is not asked
    layer = image.layers[1]
    mark = upstream.mark()
    data = big.read(layer.digest)
    start, end = 1_000_003, 3_000_000
    part = await asyncio.to_thread(get_raw, mirror.port, f"/v2/library/big/blobs/{layer.digest}",
                                   {"Range": f"bytes={start}-{end}"})
    assert part.status == 206 and part.complete, (part.status, part.headers, part.error)
    assert part.body == data[start:end + 1]
    assert part.headers.get("Content-Range") == f"bytes {start}-{end}/{layer.size}"
    assert not upstream.blob_gets(since=mark)
    shutil.rmtree(mirror.root / "docker", ignore_errors=True)  # ~200 MiB: keep retained tmp dirs small


def test_concurrent_skopeo_copies_of_big(skopeo_required: None, mirror: Mirror, upstream: Distribution,
                                         layouts: dict[str, Layout], tmp_path: Path) -> None:
    """Real clients this time: four skopeo copies at once into OCI layouts."""
    big = layouts["big"]
    mark = upstream.mark()
    outs = [tmp_path / f"big-{i}" for i in range(4)]

    def copy(out: Path) -> None:
        skopeo_copy(f"docker://{mirror.host}/library/big:latest", f"oci:{out}:latest", timeout=180)

    with ThreadPoolExecutor(len(outs)) as pool:
        for future in [pool.submit(copy, out) for out in outs]:
            future.result(timeout=200)
    for out in outs:
        check_oci_copy(out, big)
    assert_each_blob_fetched_once(upstream, big, mark)
    # and the mirror's own copy is intact
    for blob in big.image().layers:
        files = [p for p in mirror.blob_files() if blob.digest.split(":", 1)[1] in p.as_posix()]
        assert files, f"{blob.digest} not cached"
        h = hashlib.sha256()
        with open(files[0], "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert "sha256:" + h.hexdigest() == blob.digest
    for out in [*outs, mirror.root / "docker"]:  # ~200 MiB each: keep retained tmp dirs small (on success)
        shutil.rmtree(out, ignore_errors=True)
