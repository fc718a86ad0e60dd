"""The container image and compose.yaml, built here and run the way registry:2 is run.

No container registry is reachable from this machine, so the images are built offline-ish, once
per session: a Debian bookworm made with mmdebstrap (from the apt mirror) and `docker import`ed is
the `BASE` (python:3.11-slim's stand-in), `docker build --network host` builds the Dockerfile (pip
reaches the package index over the host network), and an image of Debian's `prometheus` package on
the same base stands in for prom/prometheus. Build times and sizes go to
test-artifacts/image/build.json.

All of it runs on a private dockerd with a bridge of its own (tests/support/clients.py: `Bridge`),
so `docker run -p` works; containers reach this machine only, at the bridge's gateway address,
where the upstream distribution listens (a clone of the session upstream). dockerd pulls Docker Hub
names through the containerised mirror (`registry-mirrors`), as a registry:2 pull-through cache.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import require
from tests.support.clients import DOCKER_CLI, DOCKER_COMPOSE, DOCKERD, Bridge, Dockerd
from tests.support.images import Layout
from tests.support.procs import (
    REPO_ROOT,
    Distribution,
    client_env,
    clone_storage,
    free_port,
    http,
    registry_ready,
    run,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MMDEBSTRAP = "/usr/bin/mmdebstrap"
BASE_IMAGE = "e2e-base:bookworm"
MIRROR_IMAGE = "mirror:e2e"
PROMETHEUS_IMAGE = "e2e-prometheus:bookworm"
PROMETHEUS_DOCKERFILE = REPO_ROOT / "tests" / "support" / "docker" / "prometheus.Dockerfile"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "image"
MIRROR_UID = 10001
# What python:3.11-slim is made of (debian:bookworm-slim: minbase, no docs, manuals or locales).
MMDEBSTRAP_ARGS = [
    "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
    "--aptopt=APT::Install-Recommends \"false\"", "--aptopt=Acquire::Check-Valid-Until \"false\"",
    "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-include=/usr/share/locale/locale.alias", "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    # pip in the build may meet this machine's TLS interception: trust what the machine trusts
    # (which is why these images stay on the test's own dockerd).
    "--customize-hook=cp /etc/ssl/certs/ca-certificates.crt \"$1/etc/ssl/certs/ca-certificates.crt\"",
]


@dataclass
class Images:
    seconds: dict[str, float]  # base (mmdebstrap + import), mirror, prometheus
    sizes: dict[str, int]  # bytes, as `docker image inspect` reports them


# --- the daemon, the images, the upstream ----------------------------------------------------------

@pytest.fixture(scope="module")
def mirror_port() -> int:
    """The port the tests publish the mirror container on (dockerd's registry-mirrors points there)."""
    return free_port()


@pytest.fixture(scope="module")
def bridge() -> Iterator[Bridge]:
    require(DOCKERD, DOCKER_CLI, DOCKER_COMPOSE, MMDEBSTRAP, "/usr/sbin/docker-proxy", "ip", root=True)
    b = Bridge().create()
    try:
        yield b
    finally:
        b.delete()


@pytest.fixture(scope="module")
def dockerd(e2e_tmp: Path, bridge: Bridge, mirror_port: int) -> Iterator[Dockerd]:
    d = Dockerd(e2e_tmp / "image-dockerd", [f"http://127.0.0.1:{mirror_port}"], bridge=bridge)
    d.start()
    try:
        yield d
    finally:
        containers = d.cli("ps", "-aq", timeout=30, check=False).stdout.split()
        if containers:
            d.cli("rm", "-f", "-v", *containers, timeout=60, check=False)
        d.stop()
        # the images are hundreds of megabytes of layers nobody looks at after the session
        run(["rm", "-rf", d.data_root], timeout=120, check=False)


@pytest.fixture(scope="module")
def images(dockerd: Dockerd, e2e_tmp: Path) -> Images:
    seconds = {}
    t0 = time.monotonic()
    tar = e2e_tmp / "bookworm.tar"
    # mmdebstrap reaches the Debian archive as apt on this machine does: the environment as it is.
    run([MMDEBSTRAP, *MMDEBSTRAP_ARGS, "bookworm", tar, "http://deb.debian.org/debian"], timeout=600,
        env=dict(os.environ))
    dockerd.cli("import", "--change", 'CMD ["bash"]', str(tar), BASE_IMAGE, timeout=300)
    tar.unlink()
    seconds["base"] = time.monotonic() - t0
    build = ("build", "--network", "host", "--force-rm", "--build-arg", f"BASE={BASE_IMAGE}")
    t0 = time.monotonic()
    dockerd.cli(*build, "-t", MIRROR_IMAGE, str(REPO_ROOT), timeout=600)
    seconds["mirror"] = time.monotonic() - t0
    t0 = time.monotonic()
    empty = e2e_tmp / "empty-context"
    empty.mkdir(exist_ok=True)
    dockerd.cli(*build, "-t", PROMETHEUS_IMAGE, "-f", str(PROMETHEUS_DOCKERFILE), str(empty), timeout=600)
    seconds["prometheus"] = time.monotonic() - t0
    sizes = {name: int(dockerd.cli("image", "inspect", "--format", "{{.Size}}", ref, timeout=30).stdout)
             for name, ref in (("base", BASE_IMAGE), ("mirror", MIRROR_IMAGE), ("prometheus", PROMETHEUS_IMAGE))}
    built = Images({k: round(v, 1) for k, v in seconds.items()}, sizes)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "build.json").write_text(json.dumps(asdict(built), indent=1) + "\n")
    return built


@pytest.fixture
def gateway_upstream(tmp_path: Path, bridge: Bridge, upstream: Distribution) -> Iterator[Distribution]:
    """A clone of the session upstream listening on the bridge's gateway, where containers reach it."""
    dist = Distribution(tmp_path / "upstream", root=clone_storage(upstream.root, tmp_path / "upstream" / "storage"),
                        name="gateway-upstream", listen=bridge.gateway)
    dist.start()
    try:
        yield dist
    finally:
        dist.stop()


# --- helpers ---------------------------------------------------------------------------------------

def state(dockerd: Dockerd, container: str) -> dict[str, object]:
    return dict(json.loads(dockerd.cli("inspect", "--format", "{{json .State}}", container, timeout=30).stdout))


def logs(dockerd: Dockerd, container: str) -> str:
    r = dockerd.cli("logs", container, timeout=30, check=False)
    return str(r.stdout + r.stderr)


def wait_container(dockerd: Dockerd, container: str, check: Callable[[], bool], what: str,
                   timeout: float = 60.0) -> None:
    """Until `check` holds; fails at once if the container exits, and with its log either way."""

    def running_and_check() -> bool:
        if not state(dockerd, container)["Running"]:
            raise AssertionError(f"{container} exited: {state(dockerd, container)}")
        return check()

    try:
        wait_for(running_and_check, timeout, f"{container}: {what}", interval=0.2)
    except (AssertionError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{logs(dockerd, container)}") from None


def health(dockerd: Dockerd, container: str) -> str:
    return str(json.loads(dockerd.cli("inspect", "--format", "{{json .State.Health}}", container,
                                      timeout=30).stdout)["Status"])


def run_mirror(dockerd: Dockerd, name: str, port: int, volume: str, *extra: str) -> None:
    """`docker run -d -p ...:5000 -v DATA:/var/lib/mirror ...` as registry:2's docs do, published on
    loopback only, with the bridge's gateway as the only name server (containers look nothing up
    outside this machine)."""
    assert dockerd.bridge is not None
    dockerd.cli("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:5000", "-v", f"{volume}:/var/lib/mirror",
                "--dns", dockerd.bridge.gateway, *extra, MIRROR_IMAGE, timeout=60)


# --- the tests -------------------------------------------------------------------------------------

def test_image_is_configured_as_documented(dockerd: Dockerd, images: Images) -> None:
    config = json.loads(dockerd.cli("image", "inspect", "--format", "{{json .Config}}", MIRROR_IMAGE,
                                    timeout=30).stdout)
    assert config["User"] == "mirror"
    assert config["Entrypoint"] == ["/opt/mirror/bin/mirror"]  # exec form: no shell to swallow SIGTERM
    assert config["Cmd"] == ["serve", "--config", "/etc/mirror/config.yml"]
    assert "/var/lib/mirror" in config["Volumes"] and "5000/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    r = dockerd.cli("run", "--rm", "--entrypoint", "id", MIRROR_IMAGE, timeout=60)
    assert r.stdout.split()[0] == f"uid={MIRROR_UID}(mirror)", r.stdout
    # the wheel inside carries the embedded default, and the version answers
    r = dockerd.cli("run", "--rm", MIRROR_IMAGE, "check-config", timeout=60)
    assert r.stdout.startswith("embedded default: ok"), r.stdout + r.stderr
    assert dockerd.cli("run", "--rm", MIRROR_IMAGE, "--version", timeout=60).stdout.startswith("mirror ")


def test_run_pull_push_restart_and_stop_like_registry2(tmp_path: Path, dockerd: Dockerd, images: Images,
                                                       mirror_port: int, gateway_upstream: Distribution,
                                                       layouts: dict[str, Layout]) -> None:
    # REGISTRY_* for the upstream; a config file for what has no variable (private.patterns)
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "info"}, "http": {"addr": ":5000"},
        "storage": {"filesystem": {"rootdirectory": "/var/lib/mirror"}},
        "private": {"patterns": ["team/**"]},
    }))
    volume = f"mirror-data-{uuid.uuid4().hex[:8]}"
    args = ("-v", f"{config}:/etc/mirror/config.yml:ro", "-e", f"REGISTRY_PROXY_REMOTEURL={gateway_upstream.url}")
    url = f"http://127.0.0.1:{mirror_port}"
    try:
        run_mirror(dockerd, "mirror", mirror_port, volume, *args)
        wait_container(dockerd, "mirror", registry_ready(url), "serving /v2/")
        # the server itself is PID 1, no shell in between: docker stop's SIGTERM goes to it
        pid1 = dockerd.cli("exec", "mirror", "cat", "/proc/1/cmdline", timeout=30).stdout.split("\0")
        assert pid1[0].startswith("/opt/mirror/bin/python") and pid1[1:3] == ["/opt/mirror/bin/mirror", "serve"], pid1

        # pull through: dockerd's registry-mirrors sends Docker Hub's library/small here
        dockerd.pull("small:latest")
        assert dockerd.repo_digests("small:latest") == [f"small@{layouts['small'].digest}"]
        assert gateway_upstream.blob_gets(), "the pull did not go through to the upstream"
        # push, to a name private.patterns keeps here
        pushed = f"127.0.0.1:{mirror_port}/team/app:1"
        dockerd.cli("tag", "small:latest", pushed, timeout=30)
        dockerd.cli("push", pushed, timeout=120)

        # the first check runs one --interval (10s) after the start
        wait_container(dockerd, "mirror", lambda: health(dockerd, "mirror") == "healthy", "HEALTHCHECK healthy")

        t0 = time.monotonic()
        dockerd.cli("stop", "mirror", timeout=60)
        took = time.monotonic() - t0
        stopped = state(dockerd, "mirror")
        log = dockerd.cli("logs", "mirror", timeout=30)
        assert took < 5, f"docker stop took {took:.1f}s (SIGTERM did not stop it: it was killed)\n{log.stdout}"
        assert stopped["ExitCode"] in (0, 143) and not stopped["OOMKilled"], stopped
        assert "Traceback" not in log.stdout + log.stderr, log.stderr
        assert json.loads(log.stdout.splitlines()[-1])["msg"] == "stopped", log.stdout

        # a new container on the same volume, with the upstream gone: everything comes from the volume
        dockerd.cli("rm", "mirror", timeout=30)
        gateway_upstream.stop()
        run_mirror(dockerd, "mirror", mirror_port, volume, *args)
        wait_container(dockerd, "mirror", registry_ready(url), "serving /v2/ again")
        dockerd.cli("rmi", "small:latest", pushed, timeout=60)
        dockerd.pull("small:latest")
        dockerd.pull(pushed)
        assert dockerd.image_id(pushed) == dockerd.image_id("small:latest")
    finally:
        dockerd.cli("rm", "-f", "mirror", timeout=60, check=False)
        dockerd.cli("rmi", "small:latest", f"127.0.0.1:{mirror_port}/team/app:1", timeout=60, check=False)


def test_root_owned_volume_stops_the_start_with_one_line(tmp_path: Path, dockerd: Dockerd, images: Images) -> None:
    # registry:2's docs bind-mount a host directory docker creates: root-owned, not writable by the mirror user
    data = tmp_path / "registry-data"
    try:
        dockerd.cli("run", "-d", "--name", "rootowned", "-v", f"{data}:/var/lib/mirror", MIRROR_IMAGE, timeout=60)
        code = int(dockerd.cli("wait", "rootowned", timeout=60).stdout)
        r = dockerd.cli("logs", "rootowned", timeout=30)
    finally:
        dockerd.cli("rm", "-f", "rootowned", timeout=60, check=False)
    assert code == 2, (code, r.stdout, r.stderr)
    assert r.stdout == "", r.stdout  # not even a "listening" line
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        "mirror: storage.filesystem.rootdirectory /var/lib/mirror is not writable: Permission denied; it is owned by "
        f"uid 0 and mirror runs as uid {MIRROR_UID}: `chown -R {MIRROR_UID} /var/lib/mirror`"), r.stderr


def test_compose_brings_up_mirror_and_prometheus(dockerd: Dockerd, images: Images) -> None:
    ports = {"MIRROR_PORT": free_port(), "PROMETHEUS_PORT": free_port()}
    env = {"MIRROR_IMAGE": MIRROR_IMAGE, "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
           **{k: f"127.0.0.1:{v}" for k, v in ports.items()}}
    project = ("-p", f"e2e{uuid.uuid4().hex[:8]}", "-f", str(REPO_ROOT / "compose.yaml"))
    prometheus = f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}"

    def mirror_up() -> bool:
        r = http("GET", f"{prometheus}/api/v1/query?query=up%7Bjob%3D%22mirror%22%7D", timeout=5)
        result = json.loads(r.body)["data"]["result"] if r.status == 200 else []
        return [s["value"][1] for s in result] == ["1"]

    try:
        # Grafana has no offline image: the two services that have one
        dockerd.compose(*project, "up", "-d", "--no-build", "mirror", "prometheus", env=env, cwd=REPO_ROOT)
        try:
            wait_for(registry_ready(f"http://127.0.0.1:{ports['MIRROR_PORT']}"), 60, "the mirror service",
                     interval=0.2)
            wait_for(mirror_up, 90, 'up{job="mirror"} == 1 in Prometheus', interval=1)  # it scrapes every 15s
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{dockerd.compose(*project, 'logs', '--tail', '30', env=env).stdout}") from None
    finally:
        dockerd.compose(*project, "down", "-v", "--timeout", "10", env=env, cwd=REPO_ROOT, timeout=120, check=False)


def test_compose_replicas_file_takes_the_same_overrides() -> None:
    require(DOCKER_COMPOSE)
    env = {"MIRROR_IMAGE": MIRROR_IMAGE, "MIRROR_A_PORT": "127.0.0.1:15000", "MIRROR_B_PORT": "127.0.0.1:15001",
           "OSS_ACCESSKEYID": "id", "OSS_ACCESSKEYSECRET": "secret", "OSS_REGION": "oss-cn-hangzhou",
           "OSS_BUCKET": "bucket"}
    r = run([DOCKER_COMPOSE, "-f", REPO_ROOT / "compose.replicas.yaml", "config"], timeout=60, env=client_env(env))
    services = yaml.safe_load(r.stdout)["services"]
    assert {s["image"] for s in services.values()} == {MIRROR_IMAGE}
    published = sorted(port for s in services.values() for port in s["ports"])
    assert published == ["127.0.0.1:15000:5000/tcp", "127.0.0.1:15001:5000/tcp"]
