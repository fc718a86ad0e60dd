"""Auth with real clients: `docker login` against htpasswd and token auth (our token server process),
pushes allowed and denied by access rules, and anonymous pulls of cached content through dockerd's
registry-mirrors when the rules allow them (and 401 when they do not).

dockerd logs in and pushes over plain HTTP here: 127.0.0.0/8 is an insecure registry to it
(tests/e2e/test_tls.py has the HTTPS side). Every login is undone with `docker logout`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.push_helpers import push_config
from tests.support.clients import Dockerd, skopeo_copy
from tests.support.images import Layout
from tests.support.procs import Distribution, Mirror, htpasswd_entry, http, wait_for
from tests.support.registry import MANIFEST_ACCEPT, check_oci_copy, oci_error
from tests.support.tokenserver import ISSUER, SERVICE, TokenServerProc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

USERS = {"alice": "alice-secret", "bob": "bob-secret"}


def htpasswd(tmp_path: Path, users: dict[str, str]) -> str:
    path = tmp_path / "htpasswd"
    path.write_text("".join(htpasswd_entry(u, p) + "\n" for u, p in users.items()))
    return str(path)


def auth_config(upstream_url: str, auth: dict[str, Any], anonymous_pull: bool = True) -> dict[str, Any]:
    config = push_config(upstream_url)  # hub upstream, team/** private, deletes on
    config["auth"] = auth
    config["access"] = {"anonymous_pull": anonymous_pull,
                        "rules": [{"repositories": ["team/**"], "push": ["alice", "robot"]}]}
    return config


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def logins(docker: Dockerd) -> Iterator[list[str]]:
    """Hosts the test logged in to: logged out again at the end, whatever happened."""
    hosts: list[str] = []
    yield hosts
    for host in hosts:
        docker.cli("logout", host, timeout=30, check=False)


def login(docker: Dockerd, host: str, user: str, password: str) -> Any:
    return docker.cli("login", "--username", user, "--password", password, host, timeout=60, check=False)


def test_docker_login_and_push_by_rule_with_htpasswd(docker: Dockerd, mirror_factory: Callable[..., Mirror],
                                                     docker_mirror: Callable[..., Mirror], upstream: Distribution,
                                                     layouts: dict[str, Layout], tmp_path: Path,
                                                     logins: list[str]) -> None:
    docker_mirror(push_config(upstream.url))  # where dockerd pulls `small` from (no auth)
    docker.pull("small")
    mirror = mirror_factory(auth_config(upstream.url, {"htpasswd": {"realm": "e2e", "path": htpasswd(tmp_path,
                                                                                                      USERS)}}))
    host = mirror.host
    logins.append(host)

    r = login(docker, host, "alice", "wrong")
    assert r.returncode != 0 and "unauthorized" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    r = login(docker, host, "alice", USERS["alice"])
    assert r.returncode == 0 and "Login Succeeded" in r.stdout, r.stdout + r.stderr
    ref = f"{host}/team/app:v1"
    docker.cli("tag", "small", ref)
    out = docker.cli("push", ref).stdout
    pushed = re.search(r"v1: digest: (sha256:[0-9a-f]{64})", out)
    assert pushed, out
    # the access log line is written once the answer went out: docker may be done before it is
    wait_for(lambda: [e["user"] for e in mirror.requests() if e["method"] == "PUT" and "/manifests/v1" in e["path"]]
             == ["alice"], 5, "alice's manifest PUT in the access log")

    # bob may log in and pull, but not push to team/** (the rule names alice only)
    docker.cli("logout", host)
    assert login(docker, host, "bob", USERS["bob"]).returncode == 0
    docker.cli("rmi", ref)
    docker.pull(ref)
    assert f"{host}/team/app@{pushed.group(1)}" in docker.repo_digests(ref)
    other = f"{host}/team/bobs:v1"
    docker.cli("tag", "small", other)
    r = docker.cli("push", other, check=False, timeout=60)
    assert r.returncode != 0 and "denied" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert any(e["status"] == 403 and e["user"] == "bob" for e in mirror.requests()
               if str(e["path"]).startswith("/v2/team/bobs/"))

    # logged out: no pull of private content
    docker.cli("logout", host)
    docker.cli("rmi", ref)
    r = docker.pull(ref, check=False, timeout=60)
    assert r.returncode != 0, r.stdout
    r = http("GET", f"{mirror.url}/v2/team/app/manifests/v1", {"Accept": MANIFEST_ACCEPT})
    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="e2e"'
    assert oci_error(r.body)[0]["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize("anonymous_pull", [True, False])
def test_anonymous_pull_through_registry_mirrors_with_token_auth(
        anonymous_pull: bool, docker: Dockerd, docker_mirror: Callable[..., Mirror], upstream: Distribution,
        layouts: dict[str, Layout], tmp_path: Path) -> None:
    """dockerd's registry-mirrors never send credentials; with token auth it fetches a token for
    nobody, and anonymous pulls of Docker Hub content work exactly when access.anonymous_pull is on."""
    small = layouts["small"]
    ts = TokenServerProc(tmp_path / "tokenserver", {"robot": "robot-secret"}).start()  # no --anonymous-pull
    try:
        auth = {"token": {"realm": ts.realm, "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": str(ts.cert_path)}}
        mirror = docker_mirror(auth_config(upstream.url, auth, anonymous_pull=anonymous_pull))
        assert http("GET", f"{mirror.url}/v2/").status == 401  # what makes `docker login` work
        if anonymous_pull:
            docker.pull("small")
            assert docker.image_id("small") == small.image().config.digest
            assert any(t["account"] is None and t["status"] == 200 for t in ts.requests()), ts.requests()
        else:
            r = docker.pull("small", check=False, timeout=90)
            assert r.returncode != 0, r.stdout
            assert not docker.image_ids()
            assert any(e["status"] == 401 and "/manifests/" in str(e["path"]) for e in mirror.requests())
            assert not mirror.has_blob(small.image().config.digest)  # nothing was fetched for it
    finally:
        ts.stop()


@pytest.mark.parametrize("anonymous_pull", [True, False])
def test_anonymous_pull_of_cached_content_with_htpasswd(anonymous_pull: bool, mirror_factory: Callable[..., Mirror],
                                                        upstream: Distribution, layouts: dict[str, Layout],
                                                        tmp_path: Path) -> None:
    """skopeo without credentials (it sends `Basic Og==` after a Basic challenge) pulls cached
    upstream content when anonymous_pull is on; otherwise it gets 401 and nothing is fetched."""
    small = layouts["small"]
    mirror = mirror_factory(auth_config(upstream.url, {"htpasswd": {"realm": "e2e", "path": htpasswd(tmp_path,
                                                                                                      USERS)}},
                                        anonymous_pull=anonymous_pull))
    ref = f"docker://{mirror.host}/library/small:latest"
    if anonymous_pull:
        skopeo_copy(ref, f"oci:{tmp_path / 'first'}:latest")  # cold: fetched from the upstream
        skopeo_copy(ref, f"oci:{tmp_path / 'second'}:latest")  # warm
        check_oci_copy(tmp_path / "second", small)
        assert mirror.has_blob(small.image().config.digest)
    else:
        r = skopeo_copy(ref, f"oci:{tmp_path / 'out'}:latest", check=False, timeout=60)
        assert r.returncode != 0 and "unauthorized" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
        assert not mirror.has_blob(small.image().config.digest)
        r = http("GET", f"{mirror.url}/v2/library/small/manifests/latest",
                 {"Accept": MANIFEST_ACCEPT, **basic("bob", USERS["bob"])})
        assert r.status == 200  # authenticated users still pull through


def test_docker_login_push_pull_with_token_auth(docker: Dockerd, mirror_factory: Callable[..., Mirror],
                                               docker_mirror: Callable[..., Mirror], upstream: Distribution,
                                               layouts: dict[str, Layout], tmp_path: Path,
                                               logins: list[str]) -> None:
    docker_mirror(push_config(upstream.url))
    docker.pull("small")
    ts = TokenServerProc(tmp_path / "tokenserver", {"robot": "robot-secret", "bob": "bob-secret"}).start()
    try:
        auth = {"token": {"realm": ts.realm, "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": str(ts.cert_path)}}
        mirror = mirror_factory(auth_config(upstream.url, auth, anonymous_pull=False))
        challenge = http("GET", f"{mirror.url}/v2/").headers["WWW-Authenticate"]
        assert challenge == f'Bearer realm="{ts.realm}",service="{SERVICE}"'
        host = mirror.host
        logins.append(host)

        r = login(docker, host, "robot", "wrong")
        assert r.returncode != 0, r.stdout
        assert login(docker, host, "robot", "robot-secret").returncode == 0
        ref = f"{host}/team/tok:v1"
        docker.cli("tag", "small", ref)
        out = docker.cli("push", ref).stdout
        assert "v1: digest: sha256:" in out, out
        granted = [g for t in ts.requests() if t["status"] == 200 and t["account"] == "robot" for g in t["granted"]]
        assert any(g["name"] == "team/tok" and "push" in g["actions"] for g in granted), granted
        docker.cli("rmi", ref)
        docker.pull(ref)
        assert docker.image_id(ref) == layouts["small"].image().config.digest

        # bob's token grants push too, but the access rule keeps team/** for alice and robot
        docker.cli("logout", host)
        assert login(docker, host, "bob", "bob-secret").returncode == 0
        other = f"{host}/team/bobs:v1"
        docker.cli("tag", "small", other)
        r = docker.cli("push", other, check=False, timeout=60)
        assert r.returncode != 0 and "denied" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
        # and without any token: 401 with the scope the client has to ask for
        r = http("GET", f"{mirror.url}/v2/team/tok/manifests/v1", {"Accept": MANIFEST_ACCEPT})
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == \
            f'Bearer realm="{ts.realm}",service="{SERVICE}",scope="repository:team/tok:pull"'
    finally:
        ts.stop()
