"""The storage contract: the same cases against every backend (tests/storage/conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from mirror.storage import NotFound, Storage

MiB = 1 << 20


async def read_all(storage: Storage, key: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in storage.reader(key, offset, length)])


async def test_put_get_stat_delete(storage: Storage) -> None:
    assert await storage.stat("a/b") is None
    await storage.put_bytes("a/b", b"hello")
    st = await storage.stat("a/b")
    assert st is not None and st.size == 5
    assert await storage.get_bytes("a/b") == b"hello"
    await storage.put_bytes("a/b", b"replaced")
    assert await storage.get_bytes("a/b") == b"replaced"
    await storage.delete("a/b")
    assert await storage.stat("a/b") is None
    await storage.delete("a/b")  # absent is not an error


async def test_missing_keys(storage: Storage) -> None:
    with pytest.raises(NotFound):
        await storage.get_bytes("nope")
    with pytest.raises(NotFound):
        await read_all(storage, "nope")
    with pytest.raises(NotFound):
        await storage.move("nope", "other")
    assert await storage.list("nope") == []


async def test_list_children_and_delete_prefix(storage: Storage) -> None:
    for key in ("r/x/1", "r/x/2", "r/y", "r/z/deep/3"):
        await storage.put_bytes(key, b"")
    assert await storage.list("r") == ["x", "y", "z"]
    assert await storage.list("r/x") == ["1", "2"]
    await storage.delete("r/x")
    assert await storage.list("r") == ["y", "z"]
    assert sorted([key async for key, _ in storage.scan("r")]) == ["r/y", "r/z/deep/3"]


async def test_scan_finds_every_object_below_a_prefix(storage: Storage) -> None:
    for key, data in (("s/a/1", b"x"), ("s/a/b/2", b"yy"), ("s/3", b""), ("other/4", b"z")):
        await storage.put_bytes(key, data)
    found = {key: st.size async for key, st in storage.scan("s")}
    assert found == {"s/a/1": 1, "s/a/b/2": 2, "s/3": 0}
    assert [entry async for entry in storage.scan("none")] == []


async def test_ranged_reads(storage: Storage) -> None:
    data = os.urandom(3 * MiB + 17)
    await storage.put_bytes("blob", data)
    assert await read_all(storage, "blob") == data
    assert await read_all(storage, "blob", 1000) == data[1000:]
    assert await read_all(storage, "blob", MiB - 1, MiB + 2) == data[MiB - 1:2 * MiB + 1]
    assert await read_all(storage, "blob", len(data)) == b""


async def test_large_streaming_write_is_invisible_until_commit(storage: Storage) -> None:
    h = hashlib.sha256()
    writer = await storage.writer("big")
    for i in range(40):  # 40 MiB, one chunk at a time
        chunk = bytes([i]) * MiB
        h.update(chunk)
        await writer.write(chunk)
        assert await storage.stat("big") is None
    await writer.commit()
    assert writer.size == 40 * MiB
    got = hashlib.sha256()
    async for chunk in storage.reader("big"):
        got.update(chunk)
    assert got.hexdigest() == h.hexdigest()


async def test_cancel_leaves_nothing(storage: Storage) -> None:
    writer = await storage.writer("gone")
    await writer.write(b"x" * MiB)
    await writer.cancel()
    assert await storage.stat("gone") is None
    with pytest.raises(RuntimeError):
        async with await storage.writer("gone2") as w:
            await w.write(b"partial")
            raise RuntimeError("client went away")
    assert await storage.stat("gone2") is None
    staging = storage.staging_dir()
    assert not list(staging.iterdir())


async def test_concurrent_writers_of_one_key(storage: Storage) -> None:
    """Two writers racing to commit the same content-addressed key: one whole object wins."""
    data = os.urandom(4 * MiB)

    async def write() -> None:
        w = await storage.writer("same")
        for i in range(0, len(data), 256 * 1024):
            await w.write(data[i:i + 256 * 1024])
            await asyncio.sleep(0)
        await w.commit()

    await asyncio.gather(*(write() for _ in range(4)))
    assert await storage.get_bytes("same") == data


async def test_append_keeps_what_was_written(storage: Storage) -> None:
    w = await storage.writer("up/data", append=True)
    await w.write(b"abc")
    await w.cancel()  # abandoned: an upload resumes from what is there
    w = await storage.writer("up/data", append=True)
    assert w.size == 3
    await w.write(b"def")
    await w.commit()
    assert await storage.get_bytes("up/data") == b"abcdef"


async def test_append_in_several_sessions_of_any_size(storage: Storage) -> None:
    """Upload data arrives in PATCHes: large and tiny, each its own writer, some abandoned."""
    pieces = [os.urandom(3 * MiB + 5), b"x", os.urandom(200 * 1024), os.urandom(2 * MiB)]
    for i, piece in enumerate(pieces):
        w = await storage.writer("up/big", append=True)
        assert w.size == sum(map(len, pieces[:i]))
        await w.write(piece)
        await (w.cancel() if i % 2 else w.commit())
    assert await read_all(storage, "up/big") == b"".join(pieces)
    w = await storage.writer("up/big", append=True)
    await w.commit()  # nothing new: unchanged
    assert (await storage.stat("up/big")) is not None
    assert await read_all(storage, "up/big", 3 * MiB) == b"".join(pieces)[3 * MiB:]


async def test_move_of_a_large_object(storage: Storage) -> None:
    data = os.urandom(5 * MiB + 3)
    await storage.put_bytes("uploads/data", data)
    await storage.move("uploads/data", "blobs/moved")
    assert await storage.stat("uploads/data") is None
    assert await read_all(storage, "blobs/moved") == data


async def test_move_and_put_file(storage: Storage) -> None:
    await storage.put_bytes("src", b"content")
    await storage.move("src", "dst/x")
    assert await storage.stat("src") is None and await storage.get_bytes("dst/x") == b"content"
    local = storage.staging_dir() / "ready"
    local.write_bytes(b"verified")
    await storage.put_file("blobs/f", local)
    assert await storage.get_bytes("blobs/f") == b"verified" and not local.exists()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "a/./b", "a\\b", "a\x00b", "a/"])
async def test_keys_that_could_escape_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        await storage.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        await storage.stat(key)
