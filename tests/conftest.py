"""Fixtures shared by the in-process HTTP suites (tests/e2e has its own for real processes)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror.config import parse
from mirror.server.app import create_app
from tests.scripted_upstream import ScriptedUpstream
from tests.support.clock import ManualClock
from tests.support.tmpfs import Tmpfs

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # `python -m mirror` in a subprocess imports this checkout, installed or not.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture
def clock() -> ManualClock:
    """The mirror's clock in the in-process suites: `clock.advance(s)` instead of sleeping."""
    return ManualClock()


@pytest.fixture
async def registry(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Callable[..., Any]]:
    """`start(**config)` -> a client of a mirror app (config: parse()'s raw dict) on loopback."""
    clients: list[TestClient] = []

    async def start(root: Path | None = None, port: int | None = None, **config: Any) -> TestClient:
        # A test's own storage keys (delete, redirect, ...) join the root, never replace it.
        storage = {"filesystem": {"rootdirectory": str(root or tmp_path / "data")}, **config.pop("storage", {})}
        raw = {"storage": storage, **config}
        app = create_app(parse(raw), clock)
        client = TestClient(TestServer(app, port=port) if port else TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for c in clients:
        await c.close()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[ScriptedUpstream, TestServer]]:
    """A scripted upstream registry on loopback (tests/scripted_upstream.py)."""
    script = ScriptedUpstream()
    server = TestServer(script.app())
    await server.start_server()
    yield script, server
    await server.close()


MirrorFactory = Callable[..., Any]


@pytest.fixture
def mirror(upstream: tuple[ScriptedUpstream, TestServer], registry: Callable[..., Any]) -> MirrorFactory:
    """`start(**upstream_settings)` -> a client of a mirror in front of the scripted upstream."""
    _, server = upstream

    async def start(**up: Any) -> TestClient:
        settings = {"name": "hub", "url": str(server.make_url("")), "hosts": ["docker.io"], "dockerhub": True,
                    "tag_ttl": "1h", "retries": 2, **up}
        return await registry(upstreams=[settings])

    return start


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Tmpfs]]:
    """`make(size)` -> a tmpfs of `size` bytes mounted under tmp_path, unmounted at teardown. Needs
    root: skipped without it, except under CI=true, where that is a failure."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("mounting a tmpfs needs root")
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Tmpfs] = []

    def make(size: int) -> Tmpfs:
        fs = Tmpfs(tmp_path / f"tmpfs-{len(mounted)}", size).mount()
        mounted.append(fs)
        return fs

    yield make
    for fs in mounted:
        fs.unmount()
