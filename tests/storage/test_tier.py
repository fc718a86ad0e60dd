"""The hot tier's own rules: which reads fill it, LRU within its size, what survives a restart.
(The storage contract itself runs against it in test_contract.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.names import Digest
from mirror.storage import layout
from mirror.storage.filesystem import FilesystemStorage
from mirror.storage.tier import HotTier

MiB = 1 << 20


def blob(name: str, prefix: str = "00") -> str:
    """A key in the blob store (the tier keeps only those)."""
    return f"{layout.BLOBS}/sha256/{prefix}/{name}/data"


def tier(tmp_path: Path, size: int = 64 * MiB) -> tuple[HotTier, FilesystemStorage]:
    remote = FilesystemStorage(tmp_path / "remote")
    return HotTier(remote, tmp_path / "tier", size), remote


async def read(storage: HotTier, key: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join([c async for c in storage.reader(key, offset, length)])


async def put_blob(storage: HotTier, tmp_path: Path, key: str, data: bytes) -> None:
    source = storage.staging_dir() / key.replace("/", "-")
    source.write_bytes(data)
    await storage.put_file(key, source)


async def test_whole_blob_reads_fill_the_tier_and_ranges_do_not(tmp_path: Path) -> None:
    hot, remote = tier(tmp_path)
    data = os.urandom(3 * MiB)
    await remote.put_bytes(blob("one", "ab"), data)
    link = layout.layer("r", Digest("sha256", "a" * 64))
    await remote.put_bytes(link, b"link")
    assert hot.local_path(blob("one", "ab")) is None
    assert await read(hot, blob("one", "ab"), 10, 100) == data[10:110]
    assert hot.local_path(blob("one", "ab")) is None  # a range is not the whole blob
    assert await read(hot, blob("one", "ab")) == data
    path = hot.local_path(blob("one", "ab"))
    assert path is not None and path.read_bytes() == data
    assert await read(hot, link) == b"link"
    assert hot.local_path(link) is None  # shared records always come from the backend
    await hot.delete(blob("one", "ab"))
    assert hot.local_path(blob("one", "ab")) is None and not path.exists()


async def test_put_file_keeps_a_local_copy_without_copying(tmp_path: Path) -> None:
    hot, remote = tier(tmp_path)
    await put_blob(hot, tmp_path, blob("two", "cd"), b"verified bytes")
    assert await remote.get_bytes(blob("two", "cd")) == b"verified bytes"
    local = hot.local_path(blob("two", "cd"))
    assert local is not None and local.read_bytes() == b"verified bytes"
    assert not list(hot.staging_dir().iterdir())


async def test_least_recently_used_blobs_leave_first_and_the_size_holds(tmp_path: Path) -> None:
    hot, remote = tier(tmp_path, size=3 * MiB)
    for name in ("a", "b", "c"):
        await put_blob(hot, tmp_path, blob(name), os.urandom(MiB))
    assert hot.local_path(blob("a")) is not None  # a is now the most recently used
    await put_blob(hot, tmp_path, blob("d"), os.urandom(MiB))
    assert hot.size <= 3 * MiB
    assert hot.local_path(blob("b")) is None  # the least recently used went first
    assert hot.local_path(blob("a")) is not None and hot.local_path(blob("d")) is not None
    assert len(await remote.list(f"{layout.BLOBS}/sha256/00")) == 4  # the backend keeps everything
    assert len(await read(hot, blob("b"))) == MiB  # and an evicted blob still reads


async def test_a_restart_finds_the_tier_in_last_use_order(tmp_path: Path) -> None:
    hot, _ = tier(tmp_path, size=10 * MiB)
    for name in ("old", "new", "third"):
        await put_blob(hot, tmp_path, blob(name), os.urandom(3 * MiB))
    os.utime(tmp_path / "tier" / blob("old"), (1, 1))
    hot, _ = tier(tmp_path, size=10 * MiB)
    assert hot.size == 9 * MiB
    await put_blob(hot, tmp_path, blob("fourth"), os.urandom(3 * MiB))
    assert hot.local_path(blob("old")) is None
    assert hot.local_path(blob("new")) is not None


async def test_a_read_cut_short_leaves_no_local_copy(tmp_path: Path) -> None:
    hot, remote = tier(tmp_path)
    await remote.put_bytes(blob("cut", "ef"), os.urandom(4 * MiB))
    chunks = hot.reader(blob("cut", "ef"))
    await anext(chunks)
    await chunks.aclose()
    assert hot.local_path(blob("cut", "ef")) is None
    assert not list(hot.staging_dir().iterdir())


@pytest.mark.parametrize("size", [0, MiB])
async def test_blobs_larger_than_the_tier_are_not_kept(tmp_path: Path, size: int) -> None:
    hot, _ = tier(tmp_path, size=size)
    await put_blob(hot, tmp_path, blob("big"), os.urandom(MiB + 1))
    assert hot.local_path(blob("big")) is None and hot.size == 0


async def test_a_tier_in_mirrors_old_layout_is_moved_not_lost(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    digest = Digest.of(data)
    old = tmp_path / "tier" / "blobs" / "sha256" / digest.hex[:2] / digest.hex
    old.parent.mkdir(parents=True)
    old.write_bytes(data)
    hot, _ = tier(tmp_path)
    local = hot.local_path(layout.blob(digest))
    assert local is not None and local.read_bytes() == data and hot.size == MiB
    assert not (tmp_path / "tier" / "blobs").exists()
