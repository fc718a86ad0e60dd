"""Every storage backend the contract suite runs against; a new backend adds one entry here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mirror.storage import Storage
from mirror.storage.filesystem import FilesystemStorage

BACKENDS: dict[str, Callable[[Path], Storage]] = {
    "filesystem": FilesystemStorage,
}


@pytest.fixture(params=sorted(BACKENDS))
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    backend = BACKENDS[request.param](tmp_path / "root")
    yield backend
    await backend.close()
