"""The hot tier's own rules: which reads fill it, LRU within its size, what survives a restart.
(The storage contract itself runs against it in test_contract.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.storage.filesystem import FilesystemStorage
from mirror.storage.tier import HotTier

MiB = 1 << 20


def tier(tmp_path: Path, size: int = 64 * MiB) -> tuple[HotTier, FilesystemStorage]:
    remote = FilesystemStorage(tmp_path / "remote")
    return HotTier(remote, tmp_path / "tier", size), remote


async def read(storage: HotTier, key: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join([c async for c in storage.reader(key, offset, length)])


async def put_blob(storage: HotTier, tmp_path: Path, key: str, data: bytes) -> None:
    source = storage.staging_dir() / os.path.basename(key)
    source.write_bytes(data)
    await storage.put_file(key, source)


async def test_whole_blob_reads_fill_the_tier_and_ranges_do_not(tmp_path: Path) -> None:
    hot, remote = tier(tmp_path)
    data = os.urandom(3 * MiB)
    await remote.put_bytes("blobs/sha256/ab/one", data)
    await remote.put_bytes("repositories/r/_layers/x", b"link")
    assert hot.local_path("blobs/sha256/ab/one") is None
    assert await read(hot, "blobs/sha256/ab/one", 10, 100) == data[10:110]
    assert hot.local_path("blobs/sha256/ab/one") is None  # a range is not the whole blob
    assert await read(hot, "blobs/sha256/ab/one") == data
    path = hot.local_path("blobs/sha256/ab/one")
    assert path is not None and path.read_bytes() == data
    assert await read(hot, "repositories/r/_layers/x") == b"link"
    assert hot.local_path("repositories/r/_layers/x") is None  # shared records always come from the backend
    await hot.delete("blobs/sha256/ab/one")
    assert hot.local_path("blobs/sha256/ab/one") is None and not path.exists()


async def test_put_file_keeps_a_local_copy_without_copying(tmp_path: Path) -> None:
    hot, remote = tier(tmp_path)
    await put_blob(hot, tmp_path, "blobs/sha256/cd/two", b"verified bytes")
    assert await remote.get_bytes("blobs/sha256/cd/two") == b"verified bytes"
    local = hot.local_path("blobs/sha256/cd/two")
    assert local is not None and local.read_bytes() == b"verified bytes"
    assert not list(hot.staging_dir().iterdir())


async def test_least_recently_used_blobs_leave_first_and_the_size_holds(tmp_path: Path) -> None:
    hot, remote = tier(tmp_path, size=3 * MiB)
    for name in ("a", "b", "c"):
        await put_blob(hot, tmp_path, f"blobs/sha256/00/{name}", os.urandom(MiB))
    assert hot.local_path("blobs/sha256/00/a") is not None  # a is now the most recently used
    await put_blob(hot, tmp_path, "blobs/sha256/00/d", os.urandom(MiB))
    assert hot.size <= 3 * MiB
    assert hot.local_path("blobs/sha256/00/b") is None  # the least recently used went first
    assert hot.local_path("blobs/sha256/00/a") is not None and hot.local_path("blobs/sha256/00/d") is not None
    assert len(await remote.list("blobs/sha256/00")) == 4  # the backend keeps everything
    assert len(await read(hot, "blobs/sha256/00/b")) == MiB  # and an evicted blob still reads


async def test_a_restart_finds_the_tier_in_last_use_order(tmp_path: Path) -> None:
    hot, _ = tier(tmp_path, size=10 * MiB)
    for name in ("old", "new", "third"):
        await put_blob(hot, tmp_path, f"blobs/sha256/00/{name}", os.urandom(3 * MiB))
    os.utime(tmp_path / "tier/blobs/sha256/00/old", (1, 1))
    hot, _ = tier(tmp_path, size=10 * MiB)
    assert hot.size == 9 * MiB
    await put_blob(hot, tmp_path, "blobs/sha256/00/fourth", os.urandom(3 * MiB))
    assert hot.local_path("blobs/sha256/00/old") is None
    assert hot.local_path("blobs/sha256/00/new") is not None


async def test_a_read_cut_short_leaves_no_local_copy(tmp_path: Path) -> None:
    hot, remote = tier(tmp_path)
    await remote.put_bytes("blobs/sha256/ef/cut", os.urandom(4 * MiB))
    chunks = hot.reader("blobs/sha256/ef/cut")
    await anext(chunks)
    await chunks.aclose()
    assert hot.local_path("blobs/sha256/ef/cut") is None
    assert not list(hot.staging_dir().iterdir())


@pytest.mark.parametrize("size", [0, MiB])
async def test_blobs_larger_than_the_tier_are_not_kept(tmp_path: Path, size: int) -> None:
    hot, _ = tier(tmp_path, size=size)
    await put_blob(hot, tmp_path, "blobs/sha256/00/big", os.urandom(MiB + 1))
    assert hot.local_path("blobs/sha256/00/big") is None and hot.size == 0
