"""Auth over HTTP against the real app on loopback: htpasswd and token challenges, access rules,
mounts that must not leak, the filtered catalog, /metrics, and the abuse limits (uploads per
client, a stalled body, header sizes, manifest size)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror.config import parse
from mirror.server.app import create_app
from tests.auth_keys import ISSUER, SERVICE, make_pki, mint, repo
from tests.scripted_upstream import ScriptedUpstream

Factory = Callable[..., Any]
REALM = "https://auth.example/token"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def error(r: Any) -> str:
    body = await r.json()
    return str(body["errors"][0]["code"])


def htpasswd_file(tmp_path: Path, users: dict[str, str]) -> str:
    path = tmp_path / "htpasswd"
    path.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
                            for u, p in users.items()))
    return str(path)


USERS = {"alice": "alice-pw", "bob": "bob-pw", "ci": "ci-pw"}
RULES = [{"repositories": ["team/secret/**"], "pull": ["alice"], "push": ["alice"]},
         {"repositories": ["team/**"], "push": ["alice", "ci"], "delete": ["alice"]}]


@pytest.fixture
async def basic_mirror(registry: Factory, upstream: tuple[ScriptedUpstream, TestServer],
                       tmp_path: Path) -> TestClient:
    script, server = upstream
    script.add_manifest("library/small", "latest", {"schemaVersion": 2, "layers": []})
    client: TestClient = await registry(
        upstreams=[{"name": "hub", "url": str(server.make_url("")), "dockerhub": True}],
        private={"patterns": ["team/**"]},
        storage={"filesystem": {"rootdirectory": str(tmp_path / "data")}, "delete": {"enabled": True}},
        auth={"htpasswd": {"realm": "test-realm", "path": htpasswd_file(tmp_path, USERS)}},
        access={"anonymous_pull": True, "rules": RULES},
        limits={"uploads_per_client": 2, "body_timeout": "1s", "manifest_size": "2KiB"})
    return client


async def upload(client: TestClient, name: str, data: bytes, headers: dict[str, str]) -> Any:
    return await client.post(f"/v2/{name}/blobs/uploads/?digest={sha(data)}", data=data, headers=headers)


# --- htpasswd ------------------------------------------------------------------------------------

async def test_basic_challenge_login_and_wrong_password(basic_mirror: TestClient) -> None:
    c = basic_mirror
    r = await c.get("/v2/")
    assert r.status == 401 and await error(r) == "UNAUTHORIZED"
    assert r.headers["WWW-Authenticate"] == 'Basic realm="test-realm"'
    assert (await c.get("/v2/", headers=basic("alice", "alice-pw"))).status == 200
    for headers in (basic("alice", "wrong"), basic("nobody", "x"), {"Authorization": "Basic !!!"},
                    {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}):
        r = await c.get("/v2/", headers=headers)
        assert r.status == 401 and await error(r) == "UNAUTHORIZED", headers
        assert r.headers["WWW-Authenticate"] == 'Basic realm="test-realm"'


async def test_push_allowed_and_denied_by_rule(basic_mirror: TestClient) -> None:
    c = basic_mirror
    assert (await upload(c, "team/app", b"by ci", basic("ci", "ci-pw"))).status == 201
    r = await upload(c, "team/app", b"by bob", basic("bob", "bob-pw"))
    assert r.status == 403 and await error(r) == "DENIED"
    assert "WWW-Authenticate" not in r.headers  # bob is known: more credentials would not help
    r = await c.post("/v2/team/app/blobs/uploads/", headers=basic("bob", "bob-pw"))
    assert r.status == 403
    # anonymous: asked to authenticate
    r = await upload(c, "team/app", b"anon", {})
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
    # pull is not limited on team/** (the rule lists push and delete only)
    r = await c.get(f"/v2/team/app/blobs/{sha(b'by ci')}", headers=basic("bob", "bob-pw"))
    assert r.status == 200 and await r.read() == b"by ci"
    assert (await c.get(f"/v2/team/app/blobs/{sha(b'by ci')}")).status == 401  # private: no anonymous pull
    # delete: alice only
    r = await c.delete(f"/v2/team/app/blobs/{sha(b'by ci')}", headers=basic("ci", "ci-pw"))
    assert r.status == 403
    assert (await c.delete(f"/v2/team/app/blobs/{sha(b'by ci')}", headers=basic("alice", "alice-pw"))).status == 202


async def test_anonymous_pull_of_proxied_content(basic_mirror: TestClient, registry: Factory,
                                                 upstream: tuple[ScriptedUpstream, TestServer],
                                                 tmp_path: Path) -> None:
    r = await basic_mirror.get("/v2/library/small/manifests/latest")
    assert r.status == 200, await r.text()
    assert (await basic_mirror.get("/v2/small/manifests/latest")).status == 200
    assert (await basic_mirror.put("/v2/library/small/manifests/x", data=b"{}")).status == 401
    # the same mirror with anonymous_pull off: 401 with the challenge, nothing fetched
    script, server = upstream
    before = sum(script.calls.values())
    closed = await registry(root=tmp_path / "closed",
                            upstreams=[{"name": "hub", "url": str(server.make_url("")), "dockerhub": True}],
                            auth={"htpasswd": {"realm": "r", "path": htpasswd_file(tmp_path, USERS)}})
    r = await closed.get("/v2/library/small/manifests/latest")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="r"'
    assert sum(script.calls.values()) == before
    r = await closed.get("/v2/library/small/manifests/latest", headers=basic("bob", "bob-pw"))
    assert r.status == 200


async def test_private_rule_limits_pull_and_mount_falls_back(basic_mirror: TestClient) -> None:
    c = basic_mirror
    secret = b"secret layer"
    assert (await upload(c, "team/secret/app", secret, basic("alice", "alice-pw"))).status == 201
    r = await c.get(f"/v2/team/secret/app/blobs/{sha(secret)}", headers=basic("ci", "ci-pw"))
    assert r.status == 403 and await error(r) == "DENIED"
    # ci may push team/app but not pull team/secret/app: a mount from there is a plain upload session
    r = await c.post(f"/v2/team/app/blobs/uploads/?mount={sha(secret)}&from=team/secret/app",
                     headers=basic("ci", "ci-pw"))
    assert r.status == 202, await r.text()
    assert (await c.head(f"/v2/team/app/blobs/{sha(secret)}", headers=basic("alice", "alice-pw"))).status == 404
    # alice may pull it: mounted
    r = await c.post(f"/v2/team/app/blobs/uploads/?mount={sha(secret)}&from=team/secret/app",
                     headers=basic("alice", "alice-pw"))
    assert r.status == 201


async def test_catalog_lists_what_the_caller_may_pull(basic_mirror: TestClient) -> None:
    c = basic_mirror
    for name in ("team/app", "team/secret/app"):
        config = f'{{"n":"{name}"}}'.encode()
        assert (await upload(c, name, config, basic("alice", "alice-pw"))).status == 201
        body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(config), "size": len(config)}, "layers": []}).encode()
        r = await c.put(f"/v2/{name}/manifests/v1", data=body, headers={
            **basic("alice", "alice-pw"), "Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert r.status == 201, await r.text()
    assert (await c.get("/v2/_catalog")).status == 401
    r = await c.get("/v2/_catalog", headers=basic("alice", "alice-pw"))
    assert (await r.json())["repositories"] == ["team/app", "team/secret/app"]
    r = await c.get("/v2/_catalog", headers=basic("bob", "bob-pw"))
    assert (await r.json())["repositories"] == ["team/app"]


async def test_metrics_on_the_main_port_need_authentication(basic_mirror: TestClient) -> None:
    assert (await basic_mirror.get("/metrics")).status == 401
    r = await basic_mirror.get("/metrics", headers=basic("bob", "bob-pw"))
    assert r.status == 200 and b"mirror_http_requests_total" in await r.read()


# --- limits ---------------------------------------------------------------------------------------

async def test_uploads_per_client_limit(basic_mirror: TestClient) -> None:
    c = basic_mirror
    alice = basic("alice", "alice-pw")
    sessions = []
    for _ in range(3):
        r = await c.post("/v2/team/app/blobs/uploads/", headers=alice)
        assert r.status == 202
        sessions.append(r.headers["Location"])
    # two PATCHes whose bodies are still arriving; a third request from alice is refused
    host, port = c.server.host, c.server.port
    auth = alice["Authorization"]
    writers = []
    for location in sessions[:2]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"PATCH {location} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                     f"Content-Length: 100\r\n\r\nabc".encode())
        await writer.drain()
        writers.append((reader, writer))
    await asyncio.sleep(0.2)
    r = await c.patch(sessions[2], data=b"x", headers=alice)
    assert r.status == 429 and await error(r) == "TOOMANYREQUESTS" and r.headers["Retry-After"] == "1"
    # another client is not affected
    assert (await c.patch(sessions[2], data=b"x", headers=basic("ci", "ci-pw"))).status == 202
    for _, writer in writers:
        writer.close()
    for _ in range(40):  # the stalled ones end (closed, or cut after body_timeout): alice may upload again
        await asyncio.sleep(0.1)
        r = await c.post("/v2/team/app/blobs/uploads/", headers=alice)
        if r.status == 202:
            break
    assert r.status == 202


async def test_stalled_patch_is_cut_and_keeps_what_arrived(basic_mirror: TestClient) -> None:
    c = basic_mirror
    alice = basic("alice", "alice-pw")
    r = await c.post("/v2/team/app/blobs/uploads/", headers=alice)
    location = r.headers["Location"]
    reader, writer = await asyncio.open_connection(c.server.host, c.server.port)
    writer.write(f"PATCH {location} HTTP/1.1\r\nHost: x\r\nAuthorization: {alice['Authorization']}\r\n"
                 f"Content-Length: 1000\r\n\r\n".encode() + b"z" * 300)
    await writer.drain()
    # body_timeout is 1 s: the server closes the connection without waiting for the other 700 bytes
    data = await asyncio.wait_for(reader.read(), timeout=10)
    assert b" 202 " not in data.split(b"\r\n", 1)[0]
    writer.close()
    r = await c.get(location, headers=alice)
    assert r.status == 204 and r.headers["Range"] == "0-299"
    # and resumes from there (this waits for the cut request to have released the upload)
    r = await c.patch(location, data=b"z" * 700, headers={**alice, "Content-Range": "300-999"})
    assert r.status == 202 and r.headers["Range"] == "0-999"


async def test_manifest_size_limit(basic_mirror: TestClient) -> None:
    body = json.dumps({"schemaVersion": 2, "annotations": {"pad": "x" * 4096}}).encode()
    r = await basic_mirror.put("/v2/team/app/manifests/big", data=body, headers=basic("alice", "alice-pw"))
    assert r.status == 413 and await error(r) == "TOO_LARGE"


async def test_header_limits(tmp_path: Path) -> None:
    config = parse({"storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}},
                    "limits": {"header_size": "2KiB", "headers": 20}})
    server = TestServer(create_app(config))
    # what `mirror serve` passes to aiohttp (mirror/cli.py)
    await server.start_server(max_line_size=config.limits.header_size, max_field_size=config.limits.header_size,
                              max_headers=config.limits.headers)
    async with TestClient(server) as c:
        assert (await c.get("/v2/", headers={"X-Big": "y" * 1000})).status == 200
        assert (await c.get("/v2/", headers={"X-Big": "y" * 4000})).status in (400, 431)
        assert (await c.get("/v2/" + "a" * 4000)).status in (400, 414)
        assert (await c.get("/v2/", headers={f"X-H{i}": "1" for i in range(30)})).status in (400, 431)


# --- token ---------------------------------------------------------------------------------------

@pytest.fixture
async def token_mirror(registry: Factory, tmp_path: Path) -> tuple[TestClient, Any]:
    pki = make_pki()
    client = await registry(
        auth={"token": {"realm": REALM, "service": SERVICE, "issuer": ISSUER,
                        "rootcertbundle": str(pki.bundle(tmp_path / "bundle.pem"))}},
        access={"rules": [{"repositories": ["team/locked/**"], "push": ["admin"]}]},
        storage={"filesystem": {"rootdirectory": str(tmp_path / "data")}, "delete": {"enabled": True}})
    return client, pki


def challenge(scope: str | None = None, error: str | None = None) -> str:
    value = f'Bearer realm="{REALM}",service="{SERVICE}"'
    if scope:
        value += f',scope="{scope}"'
    if error:
        value += f',error="{error}"'
    return value


async def test_token_challenges_and_grants(token_mirror: tuple[TestClient, Any]) -> None:
    c, pki = token_mirror
    r = await c.get("/v2/")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == challenge()
    assert (await c.get("/v2/", headers=bearer(mint(pki.root, [])))).status == 200  # docker login's token

    r = await c.post("/v2/team/a/blobs/uploads/")
    assert r.status == 401 and await error(r) == "UNAUTHORIZED"
    assert r.headers["WWW-Authenticate"] == challenge("repository:team/a:pull,push")

    push_a = mint(pki.root, [repo("team/a", "pull", "push")])
    assert (await upload(c, "team/a", b"a blob", bearer(push_a))).status == 201
    r = await c.get(f"/v2/team/a/blobs/{sha(b'a blob')}", headers=bearer(push_a))
    assert r.status == 200 and await r.read() == b"a blob"

    # a token for repo A on repo B
    r = await upload(c, "team/b", b"b blob", bearer(push_a))
    assert r.status == 403 and await error(r) == "DENIED"
    assert r.headers["WWW-Authenticate"] == challenge("repository:team/b:pull,push", "insufficient_scope")
    r = await c.get(f"/v2/team/b/blobs/{sha(b'a blob')}", headers=bearer(push_a))
    assert r.status == 403
    assert r.headers["WWW-Authenticate"] == challenge("repository:team/b:pull", "insufficient_scope")

    # pull-only token used to push
    pull_a = mint(pki.root, [repo("team/a", "pull")])
    assert (await c.head(f"/v2/team/a/blobs/{sha(b'a blob')}", headers=bearer(pull_a))).status == 200
    r = await upload(c, "team/a", b"more", bearer(pull_a))
    assert r.status == 403 and await error(r) == "DENIED"
    assert r.headers["WWW-Authenticate"] == challenge("repository:team/a:pull,push", "insufficient_scope")

    # delete needs the delete action; "*" grants every action
    r = await c.delete(f"/v2/team/a/blobs/{sha(b'a blob')}", headers=bearer(push_a))
    assert r.status == 403 and "repository:team/a:delete" in r.headers["WWW-Authenticate"]
    r = await c.delete(f"/v2/team/a/blobs/{sha(b'a blob')}", headers=bearer(mint(pki.root, [repo("team/a", "*")])))
    assert r.status == 202

    # the catalog needs registry:catalog:*
    r = await c.get("/v2/_catalog", headers=bearer(push_a))
    assert r.status == 403 and r.headers["WWW-Authenticate"] == challenge("registry:catalog:*", "insufficient_scope")
    catalog = mint(pki.root, [{"type": "registry", "name": "catalog", "actions": ["*"]}])
    assert (await c.get("/v2/_catalog", headers=bearer(catalog))).status == 200


@pytest.mark.parametrize("case", ["expired", "wrong signature", "wrong audience", "wrong issuer", "garbage"])
async def test_invalid_tokens_are_401_with_invalid_token(token_mirror: tuple[TestClient, Any], case: str) -> None:
    c, pki = token_mirror
    access = [repo("team/a", "pull", "push")]
    token = {
        "expired": lambda: mint(pki.root, access, expires_in=-120),
        "wrong signature": lambda: mint(make_pki().root, access),
        "wrong audience": lambda: mint(pki.root, access, aud="another-registry"),
        "wrong issuer": lambda: mint(pki.root, access, iss="someone"),
        "garbage": lambda: "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
    }[case]()
    r = await c.get(f"/v2/team/a/manifests/{sha(b'x')}", headers=bearer(token))
    assert r.status == 401 and await error(r) == "UNAUTHORIZED"
    assert r.headers["WWW-Authenticate"] == challenge("repository:team/a:pull", "invalid_token")
    r = await c.get("/v2/", headers=bearer(token))
    assert r.status == 401 and r.headers["WWW-Authenticate"] == challenge(error="invalid_token")


async def test_token_subject_meets_access_rules(token_mirror: tuple[TestClient, Any]) -> None:
    c, pki = token_mirror
    full = [repo("team/locked/x", "pull", "push")]
    r = await upload(c, "team/locked/x", b"locked", bearer(mint(pki.root, full, sub="bob")))
    assert r.status == 403 and await error(r) == "DENIED"
    assert (await upload(c, "team/locked/x", b"locked", bearer(mint(pki.root, full, sub="admin")))).status == 201


async def test_token_autoredirect_realm(registry: Factory, tmp_path: Path) -> None:
    pki = make_pki("ec")
    c = await registry(auth={"token": {"realm": REALM, "service": SERVICE, "issuer": ISSUER, "autoredirect": True,
                                       "rootcertbundle": str(pki.bundle(tmp_path / "bundle.pem"))}})
    r = await c.get("/v2/", headers={"Host": "registry.example:5000"})
    assert r.headers["WWW-Authenticate"] == f'Bearer realm="https://registry.example:5000/auth/token",' \
                                            f'service="{SERVICE}"'
    assert (await c.get("/v2/", headers=bearer(mint(pki.root, [])))).status == 200  # ES256
