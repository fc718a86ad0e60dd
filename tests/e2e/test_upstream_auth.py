"""Upstreams that want credentials: distribution with htpasswd (Basic) and with token auth (our
token server issuing Docker-token-spec JWTs). The mirror holds the credentials; clients pull
anonymously from the mirror."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.clients import skopeo_copy
from tests.support.images import Layout
from tests.support.procs import (
    HTPASSWD_PASSWORD,
    HTPASSWD_USER,
    Distribution,
    Mirror,
    htpasswd_config,
    http,
    mirror_config,
)
from tests.support.registry import MANIFEST_ACCEPT, check_oci_copy, oci_error
from tests.support.tokenserver import TokenServerProc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TOKEN_USER, TOKEN_PASSWORD = "robot", "token-secret"


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[Callable[..., TokenServerProc]]:
    started: list[TokenServerProc] = []

    def make(**kwargs: object) -> TokenServerProc:
        ts = TokenServerProc(tmp_path / f"tokenserver-{len(started)}", {TOKEN_USER: TOKEN_PASSWORD}, **kwargs)  # type: ignore[arg-type]
        started.append(ts)
        return ts.start()

    yield make
    for ts in started:
        ts.stop()


def pull_small(mirror: Mirror, small: Layout, out: Path) -> None:
    skopeo_copy(f"docker://{mirror.host}/library/small:latest", f"oci:{out}:latest")
    check_oci_copy(out, small)


def assert_clear_auth_error(mirror: Mirror, limit: float = 20.0) -> None:
    t0 = time.monotonic()
    r = http("GET", f"{mirror.url}/v2/library/small/manifests/latest", {"Accept": MANIFEST_ACCEPT},
             timeout=limit + 5)
    assert time.monotonic() - t0 < limit, "the mirror took too long to report the upstream's refusal"
    assert 400 <= r.status < 600, (r.status, r.body[:300])
    errors = oci_error(r.body)
    text = " ".join(f"{e.get('code')} {e.get('message')} {e.get('detail', '')}" for e in errors).lower()
    assert any(w in text for w in ("auth", "401", "credential", "denied", "password")), \
        f"error does not say the upstream refused the credentials: {errors}"


# --- htpasswd (Basic) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["upstreams", "proxy"])
def test_basic_auth_upstream(style: str, mirror_factory: Callable[..., Mirror],
                             upstream_clone: Callable[..., Distribution], layouts: dict[str, Layout],
                             tmp_path: Path) -> None:
    small = layouts["small"]
    up = upstream_clone(htpasswd_config(tmp_path / "htpasswd"), name="basic-upstream")
    assert http("GET", f"{up.url}/v2/").status == 401  # the upstream really wants credentials
    if style == "proxy":  # registry:2's own keys
        config: dict[str, object] = {"version": 0.1, "proxy": {"remoteurl": up.url, "username": HTPASSWD_USER,
                                                               "password": HTPASSWD_PASSWORD}}
    else:
        config = mirror_config(up.url, username=HTPASSWD_USER, password=HTPASSWD_PASSWORD)
    mirror = mirror_factory(config)
    mark = up.mark()
    pull_small(mirror, small, tmp_path / "out")
    for blob in small.image().blobs:
        gets = up.blob_gets(blob.digest, since=mark)
        assert [e.status for e in gets if e.status == 200] == [200], gets


def test_basic_auth_wrong_password(mirror_factory: Callable[..., Mirror],
                                   upstream_clone: Callable[..., Distribution], layouts: dict[str, Layout],
                                   tmp_path: Path) -> None:
    up = upstream_clone(htpasswd_config(tmp_path / "htpasswd"), name="basic-upstream")
    mirror = mirror_factory(mirror_config(up.url, username=HTPASSWD_USER, password="wrong"))
    assert_clear_auth_error(mirror)
    r = skopeo_copy(f"docker://{mirror.host}/library/small:latest", f"oci:{tmp_path / 'out'}:latest",
                    check=False, timeout=60)
    assert r.returncode != 0
    assert not up.requests(method="GET", contains="/blobs/sha256:")


# --- token auth --------------------------------------------------------------------------------------------

def test_token_auth_upstream_and_token_reuse(mirror_factory: Callable[..., Mirror],
                                             upstream_clone: Callable[..., Distribution],
                                             token_server: Callable[..., TokenServerProc],
                                             layouts: dict[str, Layout], tmp_path: Path) -> None:
    small = layouts["small"]
    ts = token_server(expires_in=300)
    up = upstream_clone(ts.distribution_auth(), name="token-upstream")
    challenge = http("GET", f"{up.url}/v2/").headers.get("WWW-Authenticate", "")
    assert challenge.startswith("Bearer ") and ts.realm in challenge
    mirror = mirror_factory(mirror_config(up.url, username=TOKEN_USER, password=TOKEN_PASSWORD, tag_ttl="1s"))

    pull_small(mirror, small, tmp_path / "first")
    issued = [t for t in ts.requests() if t["status"] == 200]
    assert issued, f"the token server saw no token request: {ts.requests()}"
    assert all(t["account"] == TOKEN_USER for t in issued), issued  # the mirror sent its credentials
    assert any(g["name"] == "library/small" and "pull" in g["actions"] for t in issued for g in t["granted"])

    # the tag goes stale, so the second pull revalidates upstream: with the token it already has
    time.sleep(1.5)
    before, mark = len(ts.requests()), up.mark()
    pull_small(mirror, small, tmp_path / "second")
    asked = up.requests(contains="/v2/library/small/manifests/", since=mark)
    assert asked and all(e.status == 200 for e in asked), asked
    assert len(ts.requests()) == before, f"a new token was requested within expiry: {ts.requests()[before:]}"


def test_token_auth_wrong_password(mirror_factory: Callable[..., Mirror],
                                   upstream_clone: Callable[..., Distribution],
                                   token_server: Callable[..., TokenServerProc], tmp_path: Path) -> None:
    ts = token_server()
    up = upstream_clone(ts.distribution_auth(), name="token-upstream")
    mirror = mirror_factory(mirror_config(up.url, username=TOKEN_USER, password="wrong"))
    assert_clear_auth_error(mirror)
    assert any(t["status"] == 401 for t in ts.requests()), ts.requests()
    assert not up.requests(method="GET", contains="/blobs/sha256:")


# --- credentials never leak ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["basic", "token"])
def test_upstream_credentials_never_in_logs_errors_or_metrics(
        kind: str, mirror_factory: Callable[..., Mirror], upstream_clone: Callable[..., Distribution],
        layouts: dict[str, Layout], tmp_path: Path) -> None:
    """After a failing and a succeeding upstream login (debug logging on), neither password (nor
    its Basic encoding) is in the mirror's output, in any answer it gave, or in /metrics."""
    user, password, wrong = "leak-user", f"right-{uuid.uuid4().hex}", f"wrong-{uuid.uuid4().hex}"
    if kind == "basic":
        up = upstream_clone(htpasswd_config(tmp_path / "htpasswd", {user: password}), name="basic-upstream")
    else:
        ts = TokenServerProc(tmp_path / "ts", {user: password}).start()
        try:
            up = upstream_clone(ts.distribution_auth(), name="token-upstream")
        except BaseException:
            ts.stop()
            raise
    try:
        secrets = [s.encode() for s in (password, wrong)]
        secrets += [base64.b64encode(f"{user}:{p}".encode()) for p in (password, wrong)]
        answers: list[bytes] = []
        mirrors = []
        for pw, proxy_style in ((wrong, False), (password, True)):
            config = {"version": 0.1, "log": {"level": "debug"},
                      "proxy": {"remoteurl": up.url, "username": user, "password": pw}} if proxy_style else \
                mirror_config(up.url, username=user, password=pw)
            config["log"] = {"level": "debug"}
            mirror = mirror_factory(config)
            mirrors.append(mirror)
            for path in ("/v2/library/small/manifests/latest", "/v2/library/small/tags/list",
                         f"/v2/library/small/blobs/{layouts['small'].image().config.digest}"):
                r = http("GET", mirror.url + path, {"Accept": MANIFEST_ACCEPT}, timeout=30)
                answers.append(r.body + str(dict(r.headers)).encode())
            if pw == password:
                pull_small(mirror, layouts["small"], tmp_path / "pulled")
            else:
                assert_clear_auth_error(mirror)
            metrics = http("GET", f"{mirror.url}/metrics")
            assert metrics.status == 200
            answers.append(metrics.body)
        for mirror in mirrors:
            mirror.stop()
            output = mirror.proc.stdout_path.read_bytes() + mirror.proc.stderr_path.read_bytes()
            assert b"upstream" in output  # the log is there, and it talks about the upstream
            for secret in secrets:
                assert secret not in output, f"{secret!r} in {mirror.proc.stdout_path}"
        for answer in answers:
            for secret in secrets:
                assert secret not in answer
    finally:
        if kind == "token":
            ts.stop()
