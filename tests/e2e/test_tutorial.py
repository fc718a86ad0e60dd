"""The registry:2 tutorials, as people type them, against the embedded default started with REGISTRY_*
variables only (no config file): a real dockerd pushes its own nginx:alpine, busybox, hello-world and
myteam/myapp to the mirror and pulls them back, while `docker pull nginx:alpine` through
registry-mirrors still gets the upstream's image, and a push to a name the upstream serves changes
nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mirror.storage import layout
from tests.support.clients import Dockerd
from tests.support.images import Layout, seed
from tests.support.procs import Distribution, Mirror, http
from tests.support.registry import MANIFEST_ACCEPT, manifest_digest


def stored_names(root: Path) -> list[str]:
    repos = root / layout.REPOSITORIES
    return sorted(str(p.parent.relative_to(repos)) for p in repos.rglob("_mirror")) if repos.exists() else []


def test_registry2_tutorials_on_the_embedded_default(docker: Dockerd, mirror_factory: Callable[..., Mirror],
                                                     docker_mirror_port: int,
                                                     upstream_clone: Callable[..., Distribution],
                                                     layouts: dict[str, Layout]) -> None:
    # A Docker Hub-shaped upstream: library/nginx:alpine (what `docker pull nginx:alpine` means), and
    # someone/app, a user's repository the upstream serves.
    up = upstream_clone()
    hub_nginx = seed(layouts["quay"], up.host, "library/nginx", "alpine")
    seed(layouts["quay"], up.host, "library/hello-world", "latest")
    seed(layouts["quay"], up.host, "someone/app", "1")
    mirror = mirror_factory({}, port=docker_mirror_port, name="tutorial", environ={
        "REGISTRY_PROXY_REMOTEURL": up.url, "REGISTRY_PROXY_DOCKERHUB": "true"})
    local = mirror.host

    # "Copy an image from Docker Hub to your registry": our own image goes under the tutorials' names.
    docker.pull("small")
    ours = docker.image_id("small")
    for ref in ("nginx:alpine", "busybox", "hello-world:latest", "myteam/myapp:1.0"):
        docker.cli("tag", "small", f"{local}/{ref}")
        r = docker.cli("push", f"{local}/{ref}", check=False, timeout=120)
        assert r.returncode == 0, f"push {ref}: {r.stdout}{r.stderr}"
    docker.clean()
    for ref in ("nginx:alpine", "busybox", "hello-world", "myteam/myapp:1.0"):
        docker.pull(f"{local}/{ref}")
        assert docker.image_id(f"{local}/{ref}") == ours, ref

    catalog = http("GET", f"{mirror.url}/v2/_catalog").json()["repositories"]
    assert {"busybox", "hello-world", "myteam/myapp", "nginx"} <= set(catalog), catalog
    assert http("GET", f"{mirror.url}/v2/nginx/tags/list").json() == {"name": "nginx", "tags": ["alpine"]}

    # A registry-mirrors client asks for library/nginx: the upstream's image, not ours.
    docker.clean()
    docker.pull("nginx:alpine")
    assert docker.repo_digests("nginx:alpine") == [f"nginx@{hub_nginx}"] and docker.image_id("nginx:alpine") != ours
    assert manifest_digest(mirror.url, "library/nginx", "alpine") == hub_nginx
    assert manifest_digest(mirror.url, "nginx", "alpine") != hub_nginx  # and ours stays ours

    # A push to a name the upstream serves is refused, and changes nothing.
    before = stored_names(mirror.root)
    docker.cli("tag", "nginx:alpine", f"{local}/someone/app:1")
    r = docker.cli("push", f"{local}/someone/app:1", check=False, timeout=120)
    assert r.returncode != 0 and "denied" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert stored_names(mirror.root) == before and "someone/app" not in before
    assert not (mirror.root / layout.repository("someone")).exists()
    r = http("GET", f"{mirror.url}/v2/someone/app/manifests/1", {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == layouts["quay"].digest  # still the upstream's
