"""An upstream that serves wrong bytes for a blob (distribution does not verify what it reads
from disk): the mirror must not hand a complete wrong body to anyone, and must not cache it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.clients import skopeo_copy
from tests.support.images import Blob, Layout
from tests.support.procs import Distribution, Mirror, mirror_config, replace_file, wait_for
from tests.support.registry import RawBlob, get_raw

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def corrupt(up: Distribution, blob: Blob, whole: bool) -> tuple[bytes, bytes]:
    """Same length, different bytes (every byte, or one in the middle) -> (original, corrupted)."""
    path = up.blob_path(blob.digest)
    original = path.read_bytes()
    if whole:
        bad = bytes(b ^ 0xFF for b in original)
    else:
        mid = len(original) // 2
        bad = original[:mid] + bytes([original[mid] ^ 0xFF]) + original[mid + 1:]
    assert len(bad) == len(original) and bad != original
    replace_file(path, bad)  # a new inode: the session upstream's hard-linked original stays intact
    return original, bad


def assert_not_served_whole(r: RawBlob, bad: bytes) -> None:
    """An error status, or a connection cut before the end: never a complete 200 body."""
    assert not (r.status == 200 and r.complete), \
        f"mirror answered 200 with a complete body ({len(r.body)} bytes, wrong bytes: {r.body == bad})"
    if r.status == 200:
        assert len(r.body) < len(bad), "connection cut only after the whole wrong body"


def assert_nothing_cached(mirror: Mirror, digest: str, bad: bytes) -> None:
    # the fetch may still be tidying up in the background: give it a bounded moment
    deadline = time.monotonic() + 5
    while True:
        leftovers = [p for p in mirror.root.rglob("*") if p.is_file() and p.stat().st_size == len(bad)
                     and p.read_bytes() == bad]
        named = [p for p in mirror.blob_files() if digest.split(":", 1)[1] in p.as_posix()]
        if (not leftovers and not named) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not named, f"blob cached under its digest despite the mismatch: {named}"
    assert not leftovers, f"wrong bytes left in the mirror's storage: {leftovers}"


CASES = {
    "small-layer-all-bytes": ("small", 0, True),
    "big-layer-one-byte": ("big", 1, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mismatching_blob_is_refused_and_not_cached(case: str, mirror_factory: Callable[..., Mirror],
                                                    upstream_clone: Callable[..., Distribution],
                                                    layouts: dict[str, Layout], tmp_path: Path) -> None:
    name, index, whole = CASES[case]
    layout = layouts[name]
    blob = layout.image().layers[index]
    up = upstream_clone()
    original, bad = corrupt(up, blob, whole)
    mirror = mirror_factory(mirror_config(up.url))
    path = f"/v2/library/{name}/blobs/{blob.digest}"

    r = get_raw(mirror.port, path)
    assert_not_served_whole(r, bad)
    assert_nothing_cached(mirror, blob.digest, bad)

    # a real client fails too (and does not hang)
    if name == "small":
        res = skopeo_copy(f"docker://{mirror.host}/library/small:latest", f"oci:{tmp_path / 'out'}:latest",
                          check=False, timeout=60)
        assert res.returncode != 0, res.stdout
        assert_nothing_cached(mirror, blob.digest, bad)

    # upstream fixed: the mirror fetches again (it had kept nothing) and now serves and keeps it
    replace_file(up.blob_path(blob.digest), original)
    mark = up.mark()
    r = get_raw(mirror.port, path)
    assert r.status == 200 and r.complete and r.body == original, (r.status, r.error, len(r.body))
    assert len(up.blob_gets(blob.digest, since=mark)) == 1
    # Clients get the last bytes once the digest checks; the commit to storage follows.
    wait_for(lambda: mirror.has_blob(blob.digest), 30, f"{blob.digest} committed")


def test_mismatching_blob_then_upstream_down(mirror_factory: Callable[..., Mirror],
                                            upstream_clone: Callable[..., Distribution],
                                            layouts: dict[str, Layout]) -> None:
    small = layouts["small"]
    blob = small.image().layers[1]
    up = upstream_clone()
    _, bad = corrupt(up, blob, whole=True)
    mirror = mirror_factory(mirror_config(up.url))
    path = f"/v2/library/small/blobs/{blob.digest}"

    assert_not_served_whole(get_raw(mirror.port, path), bad)
    up.stop()
    t0 = time.monotonic()
    r = get_raw(mirror.port, path)
    assert time.monotonic() - t0 < 20
    assert r.status >= 400, f"served with the upstream down, so something was cached: {r.status} {r.body[:200]!r}"
    assert_nothing_cached(mirror, blob.digest, bad)
