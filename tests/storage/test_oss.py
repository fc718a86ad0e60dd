"""What only the OSS backend has: retries, resumed reads, failures that leave nothing visible, a
clear error for a bad bucket, encryption and signed URLs — against tests/support/ossserver.py."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import oss2
import pytest

from mirror.storage import NotFound, StorageUnavailable
from mirror.storage.oss import OssStorage
from tests.storage.conftest import MiB, oss
from tests.support.ossserver import OssServer
from tests.support.procs import http


@pytest.fixture
async def storage(request: pytest.FixtureRequest, tmp_path: Path, oss_server: OssServer) -> AsyncIterator[OssStorage]:
    oss_server.faults(down=False, status503=0, drop=0, cut=0, delay=0)
    s = oss(tmp_path, request)
    yield s
    oss_server.faults(down=False, status503=0, drop=0, cut=0, delay=0)
    await s.close()


async def read_all(storage: OssStorage, key: str) -> bytes:
    return b"".join([c async for c in storage.reader(key)])


async def test_transient_failures_are_retried(storage: OssStorage, oss_server: OssServer) -> None:
    data = os.urandom(3 * MiB)
    oss_server.faults(status503=2)
    await storage.put_bytes("blobs/x", data)
    oss_server.faults(drop=1)
    assert await storage.get_bytes("blobs/x") == data
    oss_server.faults(status503=2)
    assert (await storage.stat("blobs/x")) is not None


async def test_a_read_cut_mid_body_resumes_where_it_stopped(storage: OssStorage, oss_server: OssServer) -> None:
    data = os.urandom(5 * MiB + 11)
    await storage.put_bytes("blobs/cut", data)
    oss_server.clear_requests()
    oss_server.faults(cut=1)
    assert await read_all(storage, "blobs/cut") == data
    gets = [r for r in oss_server.requests() if r["method"] == "GET"]
    assert len(gets) == 2  # the cut one, then one ranged GET from where it stopped


async def test_an_outage_is_storage_unavailable_and_leaves_nothing_half_written(
        storage: OssStorage, oss_server: OssServer) -> None:
    writer = await storage.writer("blobs/half")
    await writer.write(os.urandom(3 * MiB))  # parts are up already
    oss_server.faults(down=True)
    with pytest.raises(StorageUnavailable):
        async with writer:
            await writer.write(os.urandom(MiB))
            await writer.commit()
    for call in (storage.stat("blobs/half"), storage.get_bytes("blobs/half"), storage.list("blobs")):
        with pytest.raises(StorageUnavailable, match="mirror-test"):
            await call
    oss_server.faults(down=False)
    assert await storage.stat("blobs/half") is None
    with pytest.raises(NotFound):
        await storage.get_bytes("blobs/half")


async def test_a_cancelled_write_aborts_its_multipart_upload(storage: OssStorage) -> None:
    writer = await storage.writer("blobs/cancelled")
    await writer.write(os.urandom(3 * MiB))
    await writer.cancel()
    uploads = await storage.run(lambda: list(oss2.MultipartUploadIterator(storage.bucket, prefix=storage.prefix)))
    assert uploads == [] and await storage.stat("blobs/cancelled") is None


@pytest.mark.parametrize(("change", "code"), [({"accesskeysecret": "wrong"}, "SignatureDoesNotMatch"),
                                              ({"accesskeyid": "nobody"}, "InvalidAccessKeyId"),
                                              ({"bucket": "missing"}, "NoSuchBucket")])
async def test_bad_settings_fail_the_start_check_clearly(storage: OssStorage, tmp_path: Path,
                                                         change: dict[str, str], code: str) -> None:
    bad = OssStorage(dataclasses.replace(storage.config, **change), tmp_path / "bad")  # type: ignore[arg-type]
    try:
        with pytest.raises(StorageUnavailable) as e:
            await bad.check()
        bucket = change.get("bucket", storage.config.bucket)
        assert code in str(e.value) and repr(bucket) in str(e.value) and "'oss-test'" in str(e.value)
        assert storage.config.accesskeysecret not in str(e.value)
    finally:
        await bad.close()
    await storage.check()


async def test_encryption_and_signed_urls(storage: OssStorage, tmp_path: Path) -> None:
    encrypted = OssStorage(dataclasses.replace(storage.config, encrypt=True), tmp_path / "enc")
    try:
        await encrypted.put_bytes("blobs/secret", b"sealed")
        head = await encrypted.run(encrypted.bucket.head_object, encrypted.key("blobs/secret"))
        assert head.headers["x-oss-server-side-encryption"] == "AES256"
        assert http("GET", encrypted.redirect_url("blobs/secret")).body == b"sealed"
    finally:
        await encrypted.close()
