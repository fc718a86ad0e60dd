"""Fixtures for the end-to-end suite: real distribution upstreams, real clients, a real mirror.

Session scope (started once): the image layouts, the seeded upstream distributions, dockerd,
containerd. Function scope: mirrors (fresh storage each), podman storage, ctr namespaces.

dockerd's `registry-mirrors` is fixed when it starts, so dockerd is paired with a port chosen
first (`docker_mirror_port`); `docker_mirror()` starts a mirror on that port, and only one runs
there at a time. Missing tools skip the tests that need them, except in CI (CI=true), where a
missing tool is a failure.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import (
    CONTAINERD,
    CTR,
    DOCKER_CLI,
    DOCKERD,
    PODMAN,
    SKOPEO,
    Containerd,
    Dockerd,
    Podman,
    missing,
)
from tests.support.images import Layout, build_all, seed
from tests.support.ossserver import OssServer
from tests.support.procs import (
    DISTRIBUTION,
    Distribution,
    Mirror,
    clone_storage,
    free_port,
    mirror_config,
    start_distribution,
)

# Processes started for the running test, whose logs go into its report when it fails.
_STARTED: dict[str, list[Mirror | Distribution]] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is e2e, so `pytest -m 'not e2e'` runs the fast suite alone."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                                          pytest.TestReport]:
    rep = yield
    if rep.failed and rep.when in ("setup", "call"):
        # What the test started, and what it got from longer-lived fixtures.
        given = [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, Mirror | Distribution)]
        for handle in [*_STARTED.get(item.nodeid, []), *given]:
            rep.sections.append((f"{handle.proc.name} log", handle.logs(40)))
    return rep


def _track(request: pytest.FixtureRequest, handle: Mirror | Distribution) -> None:
    _STARTED.setdefault(request.node.nodeid, []).append(handle)


def require(*tools: str, root: bool = False) -> None:
    gone = missing(*tools)
    if gone or (root and os.geteuid() != 0):
        msg = (f"missing tools: {', '.join(gone)} (scripts/test.sh installs them)" if gone
               else f"{', '.join(tools)} need root")
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def e2e_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def layouts(e2e_tmp: Path) -> dict[str, Layout]:
    """small, multi, big (~200 MiB) and quay (another tiny image), built once per session."""
    return build_all(e2e_tmp / "images")


@pytest.fixture(scope="session")
def upstream(e2e_tmp: Path, layouts: dict[str, Layout]) -> Iterator[Distribution]:
    """The default (Docker Hub-like) upstream: library/small:latest (also tagged v1, v2, v3),
    library/multi:latest, library/big:latest. Shared by the whole session: never stop or
    corrupt it (clone it)."""
    require(DISTRIBUTION, SKOPEO)
    dist = start_distribution(e2e_tmp / "upstream", name="upstream")
    try:
        for name in ("small", "multi", "big"):
            seed(layouts[name], dist.host, f"library/{name}")
        for tag in ("v1", "v2", "v3"):
            seed(layouts["small"], dist.host, "library/small", tag=tag)
        yield dist
    finally:
        dist.stop()


@pytest.fixture(scope="session")
def quay_upstream(e2e_tmp: Path, layouts: dict[str, Layout]) -> Iterator[Distribution]:
    """The second upstream: org/img:tag."""
    require(DISTRIBUTION, SKOPEO)
    dist = start_distribution(e2e_tmp / "quay-upstream", name="quay-upstream")
    try:
        seed(layouts["quay"], dist.host, "org/img")
        yield dist
    finally:
        dist.stop()


@pytest.fixture
def upstream_clone(request: pytest.FixtureRequest, tmp_path: Path,
                   upstream: Distribution) -> Iterator[Callable[..., Distribution]]:
    """Start a private distribution over a hard-link copy of the session upstream's storage
    (for tests that stop, corrupt or put auth in front of their upstream)."""
    started: list[Distribution] = []

    def make(extra_config: dict[str, Any] | None = None, name: str = "upstream-clone") -> Distribution:
        d = tmp_path / f"{name}-{len(started)}"
        root = clone_storage(upstream.root, d / "storage")
        dist = Distribution(d, extra_config, root=root, name=name)
        started.append(dist)
        _track(request, dist)
        return dist.start()

    yield make
    for dist in started:
        dist.stop()


@pytest.fixture
def mirror_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Mirror]]:
    """`make(config, port=None)` -> a started mirror with fresh storage; all stopped at teardown."""
    started: list[Mirror] = []

    def make(config: dict[str, Any], port: int | None = None, name: str = "mirror",
             context: ssl.SSLContext | None = None, environ: dict[str, str] | None = None) -> Mirror:
        for other in started:  # one mirror per port at a time (dockerd's port is fixed)
            if other.port == port:
                other.stop()
        m = Mirror(tmp_path / f"{name}-{len(started)}", config, port=port, name=name, context=context,
                   environ=environ)
        started.append(m)
        _track(request, m)
        return m.start()

    yield make
    for m in started:
        m.stop()
    _STARTED.pop(request.node.nodeid, None)


@pytest.fixture
def mirror(mirror_factory: Callable[..., Mirror], upstream: Distribution, quay_upstream: Distribution) -> Mirror:
    """A mirror on its own port in front of both session upstreams, cold."""
    return mirror_factory(mirror_config(upstream.url, quay_upstream.url))


# --- dockerd, paired with a mirror port --------------------------------------------------------------

@pytest.fixture(scope="session")
def docker_mirror_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def dockerd_session(e2e_tmp: Path, docker_mirror_port: int) -> Iterator[Dockerd]:
    require(DOCKERD, DOCKER_CLI, root=True)
    dockerd = Dockerd(e2e_tmp / "dockerd", [f"http://127.0.0.1:{docker_mirror_port}"])
    dockerd.start()
    try:
        yield dockerd
    finally:
        dockerd.stop()


@pytest.fixture
def docker(dockerd_session: Dockerd) -> Iterator[Dockerd]:
    """The session dockerd with no images before and after the test."""
    dockerd_session.clean()
    yield dockerd_session
    dockerd_session.clean()


@pytest.fixture
def docker_mirror(mirror_factory: Callable[..., Mirror], docker_mirror_port: int) -> Callable[..., Mirror]:
    """`make(config)` -> a mirror on the port dockerd mirrors to (stop() and start() keep the port)."""

    def make(config: dict[str, Any]) -> Mirror:
        return mirror_factory(config, port=docker_mirror_port, name="docker-mirror")

    return make


# --- containerd, podman ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def containerd(e2e_tmp: Path) -> Iterator[Containerd]:
    require(CONTAINERD, CTR, root=True)
    c = Containerd(e2e_tmp / "containerd")
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def podman_factory(tmp_path: Path) -> Iterator[Callable[[str], Podman]]:
    """`make(mirror_host)` -> podman with fresh storage, docker.io mirrored to `mirror_host`."""
    require(PODMAN, root=True)
    made: list[Podman] = []

    def make(mirror_host: str) -> Podman:
        p = Podman(tmp_path / f"podman-{len(made)}", mirror_host)
        made.append(p)
        return p

    yield make
    for p in made:
        p.cleanup()


@pytest.fixture
def skopeo_required() -> None:
    require(SKOPEO)


# --- OSS -------------------------------------------------------------------------------------------

@pytest.fixture
def oss(tmp_path: Path) -> Iterator[OssServer]:
    """A fresh OSS-protocol server (tests/support/ossserver.py) with one empty bucket."""
    with OssServer(tmp_path / "oss") as server:
        yield server
