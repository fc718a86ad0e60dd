"""Every storage backend the contract suite runs against; a new backend adds one entry here."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from mirror.config import OssConfig
from mirror.storage import Storage
from mirror.storage.base import Observed
from mirror.storage.filesystem import FilesystemStorage
from mirror.storage.oss import OssStorage
from mirror.storage.tier import HotTier
from tests.support.ossserver import OssServer

MiB = 1 << 20


@pytest.fixture(scope="session")
def oss_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OssServer]:
    """Our OSS-protocol server (tests/support/ossserver.py) as a process; each test gets its own prefix."""
    with OssServer(tmp_path_factory.mktemp("oss")) as server:
        yield server


def oss(root: Path, request: pytest.FixtureRequest) -> OssStorage:
    server: OssServer = request.getfixturevalue("oss_server")
    config = OssConfig(accesskeyid=server.key_id, accesskeysecret=server.key_secret, region="oss-test",
                       bucket=server.bucket, endpoint=server.endpoint, secure=False,
                       chunksize=MiB, rootdirectory=f"contract-{uuid.uuid4().hex[:8]}")
    storage = OssStorage(config, root / "staging")
    storage.copy_limit = storage.copy_part = 2 * MiB  # small, so moves copy part by part
    return storage


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Storage]] = {
    "filesystem": lambda root, _: FilesystemStorage(root),
    # the hot tier must keep the contract of what it fronts (a directory stands in for the bucket)
    "tiered": lambda root, _: HotTier(FilesystemStorage(root / "remote"), root / "tier", 64 * MiB),
    "oss": oss,
    "oss+tier": lambda root, request: HotTier(oss(root, request), root / "tier", 64 * MiB),
    # the metrics wrapper the app puts around a remote backend passes everything through
    "observed": lambda root, _: Observed(FilesystemStorage(root), lambda operation, seconds, failed: None),
}


@pytest.fixture(params=sorted(BACKENDS))
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    backend = BACKENDS[request.param](tmp_path / "root", request)
    yield backend
    await backend.close()
