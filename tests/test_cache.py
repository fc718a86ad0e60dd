"""Pull-through rules against a scripted upstream over real HTTP: tag TTL and revalidation,
stale-if-error, single-flight blobs, digest verification, resumed and cut transfers, auth."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.config import parse
from mirror.server.app import create_app
from mirror.storage import layout
from tests.scripted_upstream import ScriptedUpstream, digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
BLOB = bytes(range(256)) * 4096 * 3  # 3 MiB


def image(script: ScriptedUpstream, repo: str = "library/app", tag: str = "latest") -> tuple[str, str]:
    blob = script.add_blob(BLOB)
    config = script.add_blob(b'{"os":"linux"}')
    m = script.add_manifest(repo, tag, {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                                        "config": {"digest": config, "size": 14},
                                        "layers": [{"digest": blob, "size": len(BLOB)}]},
                            media_type=DOCKER_MANIFEST)
    return m, blob


def stored_blobs(tmp_path: Path) -> list[str]:
    """The hex of every blob in the storage root."""
    return [p.parent.name for p in (tmp_path / "data" / layout.BLOBS).rglob("data") if p.is_file()]


async def committed(tmp_path: Path, digest: str) -> None:
    """The blob is stored and its commit done (the link written: nothing left in staging)."""
    for _ in range(200):
        if digest.split(":")[1] in stored_blobs(tmp_path) and not staging(tmp_path):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{digest} was never committed")


def staging(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "data" / "_staging").iterdir())


# --- manifests and tags -------------------------------------------------------------------------

async def test_tag_is_served_from_cache_within_ttl(upstream, mirror) -> None:
    script, _ = upstream
    m, _ = image(script)
    client = await mirror()
    for _ in range(3):
        r = await client.get("/v2/app/manifests/latest")
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == m
        assert r.headers["Content-Type"] == DOCKER_MANIFEST
        assert r.headers["ETag"] == f'"{m}"'
        assert int(r.headers["Content-Length"]) == len(await r.read())
    assert script.calls["GET /v2/library/app/manifests/latest"] == 1
    assert script.calls["HEAD /v2/library/app/manifests/latest"] == 0


async def test_stale_tag_is_revalidated_with_one_head(upstream, mirror, clock) -> None:
    script, _ = upstream
    m, _ = image(script)
    client = await mirror(tag_ttl="5m")
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    clock.advance(301)
    r = await client.get("/v2/app/manifests/latest")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == m
    assert script.calls["HEAD /v2/library/app/manifests/latest"] == 1
    assert script.calls["GET /v2/library/app/manifests/latest"] == 1  # unchanged: no second GET

    # The tag moves upstream: after the TTL one HEAD sees it, one GET by digest fetches it.
    new = script.add_manifest("library/app", "latest", {"schemaVersion": 2, "layers": []})
    clock.advance(301)
    r = await client.get("/v2/app/manifests/latest")
    assert r.headers["Docker-Content-Digest"] == new
    assert script.calls[f"GET /v2/library/app/manifests/{new}"] == 1


async def test_digest_manifests_are_immutable(upstream, mirror) -> None:
    script, _ = upstream
    m, _ = image(script)
    client = await mirror(tag_ttl=0)
    for _ in range(3):
        r = await client.head(f"/v2/app/manifests/{m}")
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == m
    assert sum(n for k, n in script.calls.items() if "/manifests/" in k) == 1


@pytest.mark.parametrize(("status", "retry_after"), [(503, None), (429, "30")])
async def test_stale_if_error(upstream, mirror, clock, status: int, retry_after: str | None) -> None:
    script, _ = upstream
    m, _ = image(script)
    client = await mirror(tag_ttl="5m")
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    clock.advance(301)
    script.status, script.retry_after = status, retry_after
    r = await client.get("/v2/app/manifests/latest")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == m
    assert "110" in r.headers["Warning"]
    # Nothing cached to stand in: the client learns why.
    r = await client.get("/v2/other/manifests/latest")
    body = await r.json()
    if status == 429:
        assert r.status == 429 and body["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert r.headers["Retry-After"] == "30"
    else:
        assert r.status == 502 and body["errors"][0]["code"] == "UPSTREAM_UNAVAILABLE"


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_refusing_a_revalidation_serves_stale(upstream, mirror, clock, status: int) -> None:
    """Credentials revoked or the repository made private upstream: what is cached still serves,
    and what is not is DENIED, never a 500."""
    script, _ = upstream
    m, _ = image(script)
    client = await mirror(tag_ttl="5m")
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    clock.advance(301)
    script.status = status
    r = await client.get("/v2/app/manifests/latest")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == m and "110" in r.headers["Warning"]
    r = await client.get("/v2/other/manifests/latest")
    assert r.status == 403 and (await r.json())["errors"][0]["code"] == "DENIED"
    r = await client.get("/v2/app/tags/list")  # what is cached still lists
    assert r.status == 200 and (await r.json())["tags"] == ["latest"]


async def test_upstream_down_serves_cache_and_fails_fast_otherwise(upstream, mirror) -> None:
    script, server = upstream
    m, blob = image(script)
    client = await mirror(tag_ttl=0, connect_timeout=1)
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    assert (await client.get(f"/v2/app/blobs/{blob}")).status == 200
    await server.close()
    r = await client.get("/v2/app/manifests/latest")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == m
    assert (await client.get(f"/v2/app/manifests/{m}")).status == 200
    assert await (await client.get(f"/v2/app/blobs/{blob}")).read() == BLOB
    r = await client.get("/v2/app/manifests/other")
    assert r.status == 502 and (await r.json())["errors"][0]["code"] == "UPSTREAM_UNAVAILABLE"


async def test_unknown_manifest_and_tag_gone_upstream(upstream, mirror, clock) -> None:
    script, _ = upstream
    m, _ = image(script)
    client = await mirror(tag_ttl="5m")
    r = await client.get("/v2/app/manifests/nope")
    assert r.status == 404 and (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    del script.manifests[("library/app", "latest")]
    clock.advance(301)
    assert (await client.get("/v2/app/manifests/latest")).status == 404
    assert (await client.get(f"/v2/app/manifests/{m}")).status == 200  # content stays by digest


async def test_index_for_a_client_that_cannot_read_indexes(upstream, mirror) -> None:
    script, _ = upstream
    amd = script.add_manifest("library/multi", None, {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST},
                              DOCKER_MANIFEST)
    idx = script.add_manifest("library/multi", "latest", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"digest": "sha256:" + "0" * 64, "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": amd, "platform": {"os": "linux", "architecture": "amd64"}}]}, OCI_INDEX)
    client = await mirror()
    r = await client.get("/v2/multi/manifests/latest", headers={"Accept": f"{OCI_INDEX}, {DOCKER_MANIFEST}"})
    assert r.headers["Docker-Content-Digest"] == idx and r.headers["Content-Type"] == OCI_INDEX
    r = await client.get("/v2/multi/manifests/latest", headers={"Accept": DOCKER_MANIFEST})
    assert r.headers["Docker-Content-Digest"] == amd and r.headers["Content-Type"] == DOCKER_MANIFEST


async def test_upstream_manifest_with_wrong_digest_is_refused(upstream, mirror, tmp_path) -> None:
    script, _ = upstream
    m, _ = image(script)
    script.manifests[("library/app", m)] = (b'{"schemaVersion":2,"evil":1}', DOCKER_MANIFEST)
    client = await mirror()
    r = await client.get(f"/v2/app/manifests/{m}")
    assert r.status == 502
    assert not stored_blobs(tmp_path)


# --- blobs ----------------------------------------------------------------------------------------

async def test_concurrent_cold_blob_is_fetched_once(upstream, mirror, tmp_path) -> None:
    script, _ = upstream
    _, blob = image(script)
    script.slow = 0.002
    client = await mirror()

    async def pull() -> bytes:
        r = await client.get(f"/v2/app/blobs/{blob}")
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == blob
        assert int(r.headers["Content-Length"]) == len(BLOB)
        return await r.read()

    bodies = await asyncio.gather(*(pull() for _ in range(8)))
    assert all(b == BLOB for b in bodies)
    assert script.calls[f"GET /v2/library/app/blobs/{blob}"] == 1
    await committed(tmp_path, blob)  # clients are released once the digest checks; the commit follows
    assert not staging(tmp_path)
    r = await client.get(f"/v2/app/blobs/{blob}")  # warm
    assert await r.read() == BLOB and script.calls[f"GET /v2/library/app/blobs/{blob}"] == 1


async def test_bytes_not_matching_the_digest_are_never_cached(upstream, mirror, tmp_path) -> None:
    script, _ = upstream
    _, blob = image(script)
    script.corrupt.add(blob)
    client = await mirror()
    with pytest.raises(aiohttp.ClientPayloadError):
        r = await client.get(f"/v2/app/blobs/{blob}")
        await r.read()  # cut short: never a complete body with wrong bytes
    await asyncio.sleep(0.1)
    assert blob.split(":")[1] not in stored_blobs(tmp_path)
    assert not staging(tmp_path)
    script.corrupt.clear()
    assert await (await client.get(f"/v2/app/blobs/{blob}")).read() == BLOB  # a later fetch succeeds


async def test_cut_transfer_resumes_with_range(upstream, mirror) -> None:
    script, _ = upstream
    _, blob = image(script)
    script.cut_after[blob] = 1 << 20
    client = await mirror()
    r = await client.get(f"/v2/app/blobs/{blob}")
    assert await r.read() == BLOB
    ranged = [q for q in script.requests if q.path.endswith(blob) and "Range" in q.headers]
    # One resume, from what had arrived (aiohttp drops what it buffered when the cut came).
    (resume,) = ranged
    start = int(resume.headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 1 << 20


async def test_cut_transfer_without_range_leaves_nothing(upstream, mirror, tmp_path) -> None:
    script, _ = upstream
    _, blob = image(script)
    script.cut_after[blob] = 1 << 20
    script.supports_range = False
    client = await mirror()
    with pytest.raises(aiohttp.ClientPayloadError):
        await (await client.get(f"/v2/app/blobs/{blob}")).read()
    await asyncio.sleep(0.1)
    assert blob.split(":")[1] not in stored_blobs(tmp_path) and not staging(tmp_path)


async def test_client_leaving_does_not_cancel_the_fetch(upstream, mirror, tmp_path) -> None:
    script, _ = upstream
    _, blob = image(script)
    script.slow = 0.005
    client = await mirror()
    r = await client.get(f"/v2/app/blobs/{blob}")
    await r.content.read(1000)
    r.close()
    await committed(tmp_path, blob)
    assert await (await client.get(f"/v2/app/blobs/{blob}")).read() == BLOB
    assert script.calls[f"GET /v2/library/app/blobs/{blob}"] == 1


@pytest.mark.parametrize("warm", [False, True])
async def test_blob_ranges(upstream, mirror, warm: bool) -> None:
    script, _ = upstream
    _, blob = image(script)
    client = await mirror()
    if warm:
        await (await client.get(f"/v2/app/blobs/{blob}")).read()
    r = await client.get(f"/v2/app/blobs/{blob}", headers={"Range": "bytes=100-199"})
    assert r.status == 206 and await r.read() == BLOB[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(BLOB)}"
    r = await client.get(f"/v2/app/blobs/{blob}", headers={"Range": f"bytes={len(BLOB)}-"})
    assert r.status == 416 and (await r.json())["errors"][0]["code"] == "RANGE_INVALID"


async def test_blob_head_does_not_fetch(upstream, mirror) -> None:
    script, _ = upstream
    _, blob = image(script)
    client = await mirror()
    r = await client.head(f"/v2/app/blobs/{blob}")
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(BLOB)
    assert script.calls[f"GET /v2/library/app/blobs/{blob}"] == 0
    r = await client.head(f"/v2/app/blobs/sha256:{'1' * 64}")
    assert r.status == 404


async def test_blob_cached_for_one_repo_is_checked_upstream_for_another(upstream, mirror) -> None:
    script, _ = upstream
    _, blob = image(script)
    client = await mirror()
    assert await (await client.get(f"/v2/app/blobs/{blob}")).read() == BLOB
    # library/other has no such blob upstream: the cached copy must not leak through it.
    script.manifests[("library/other", "x")] = (b"{}", DOCKER_MANIFEST)
    original = dict(script.blobs)
    script.blobs.clear()
    r = await client.get(f"/v2/other/blobs/{blob}")
    assert r.status == 404 and (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    script.blobs.update(original)
    assert await (await client.get(f"/v2/other/blobs/{blob}")).read() == BLOB
    assert script.calls[f"GET /v2/library/other/blobs/{blob}"] == 0  # HEAD only


# --- auth, redirects ------------------------------------------------------------------------------

async def test_bearer_token_dance_with_credentials(upstream, mirror) -> None:
    script, _ = upstream
    _m, blob = image(script)
    script.token, script.basic = "t0k3n", ("user", "pass")
    client = await mirror(username="user", password="pass")
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    assert await (await client.get(f"/v2/app/blobs/{blob}")).read() == BLOB
    assert script.token_requests == 1  # cached until expiry
    token_req = next(q for q in script.requests if q.path == "/token")
    assert token_req.query["scope"] == "repository:x:pull" and token_req.query["service"] == "scripted"


async def test_wrong_credentials_are_denied(upstream, mirror) -> None:
    script, _ = upstream
    image(script)
    script.token, script.basic = "t0k3n", ("user", "pass")
    client = await mirror(username="user", password="wrong")
    r = await client.get("/v2/app/manifests/latest")
    body = await r.json()
    assert r.status == 403 and body["errors"][0]["code"] == "DENIED"
    assert "wrong" not in json.dumps(body)


async def test_basic_auth_upstream(upstream, mirror) -> None:
    script, _ = upstream
    image(script)
    script.basic = ("user", "pass")
    client = await mirror(username="user", password="pass")
    assert (await client.get("/v2/app/manifests/latest")).status == 200


async def test_redirect_to_cdn_drops_the_registry_token(upstream, mirror) -> None:
    script, _ = upstream
    _, blob = image(script)
    cdn_script = ScriptedUpstream(blobs=script.blobs)
    cdn = TestServer(cdn_script.app(), host="127.0.0.2")
    await cdn.start_server()
    try:
        script.token = "t0k3n"
        script.redirect_blobs_to = str(cdn.make_url("")).rstrip("/")
        client = await mirror()
        assert await (await client.get(f"/v2/app/blobs/{blob}")).read() == BLOB
        (cdn_request,) = [q for q in cdn_script.requests if q.path.startswith("/cdn/")]
        assert "Authorization" not in cdn_request.headers
    finally:
        await cdn.close()


# --- tags and catalog ----------------------------------------------------------------------------

async def test_tags_merge_upstream_pages_and_paginate(upstream, mirror) -> None:
    script, _ = upstream
    for tag in ["a", "b", "c", "d", "e"]:
        script.add_manifest("library/app", tag, {"schemaVersion": 2, "tag": tag})
    script.page_size = 2
    client = await mirror()
    r = await client.get("/v2/app/tags/list")
    assert (await r.json())["tags"] == ["a", "b", "c", "d", "e"]
    r = await client.get("/v2/app/tags/list?n=2")
    assert (await r.json())["tags"] == ["a", "b"]
    assert r.headers["Link"] == '</v2/app/tags/list?n=2&last=b>; rel="next"'
    r = await client.get("/v2/app/tags/list?n=2&last=d")
    assert (await r.json())["tags"] == ["e"] and "Link" not in r.headers
    r = await client.get("/v2/app/tags/list?n=x")
    assert r.status == 400 and (await r.json())["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
    r = await client.get("/v2/nothing/tags/list")
    assert r.status == 404 and (await r.json())["errors"][0]["code"] == "NAME_UNKNOWN"


async def test_catalog_lists_cached_repositories(upstream, mirror) -> None:
    script, _ = upstream
    for repo in ["library/a", "library/b", "team/c"]:
        image(script, repo)
    client = await mirror()
    for name in ["a", "b", "team/c"]:
        assert (await client.get(f"/v2/{name}/manifests/latest")).status == 200
    r = await client.get("/v2/_catalog")
    assert (await r.json())["repositories"] == ["library/a", "library/b", "team/c"]
    r = await client.get("/v2/_catalog?n=1&last=library/a")
    assert (await r.json())["repositories"] == ["library/b"] and "last=library/b" in r.headers["Link"]


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "status", "code"), [
    ("/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/a/../b/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/a/%2e%2e/b/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/..%2fetc/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/a%00b/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/app/blobs/sha256:%2e%2e", 400, "DIGEST_INVALID"),
    ("/v2/" + "a" * 256 + "/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/app/manifests/-bad", 404, "MANIFEST_UNKNOWN"),  # neither tag nor digest: no such manifest
    ("/v2/app/manifests/sha256:abc", 404, "MANIFEST_UNKNOWN"),
    ("/v2/app/blobs/sha256:abc", 400, "DIGEST_INVALID"),
    ("/v2/app/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
    ("/v2/app/nothing", 404, "NOT_FOUND"),
])
async def test_bad_input_gets_an_oci_error(upstream, mirror, path: str, status: int, code: str) -> None:
    client = await mirror()
    # Raw HTTP: client libraries would normalise `..` away before the server ever saw it.
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode()
    assert json.loads(body)["errors"][0]["code"] == code
    assert b"Docker-Distribution-API-Version: registry/2.0" in head


async def test_methods_not_supported(upstream, mirror) -> None:
    client = await mirror()
    r = await client.delete("/v2/app/manifests/latest")
    assert r.status == 405 and (await r.json())["errors"][0]["code"] == "UNSUPPORTED"


def test_blob_digest_helper() -> None:
    assert digest(b"x") == "sha256:" + hashlib.sha256(b"x").hexdigest()


def test_app_factory_is_typed() -> None:
    app = create_app(parse({}))
    assert isinstance(app, web.Application)


async def test_staging_leftovers_idle_for_an_hour_go_live_ones_stay(registry, tmp_path: Path) -> None:
    staging = tmp_path / "data" / "_staging"
    staging.mkdir(parents=True)
    dead, live = staging / "f-dead", staging / "f-live"
    dead.write_bytes(b"x")
    live.write_bytes(b"y")
    past = time.time() - 7200
    os.utime(dead, (past, past))
    await registry()  # another process starting on the same root
    for _ in range(100):
        if not dead.exists():
            break
        await asyncio.sleep(0.02)
    assert not dead.exists() and live.exists()


async def test_oversized_upstream_manifest_is_refused(upstream, mirror, tmp_path) -> None:
    script, _ = upstream
    script.add_manifest("library/huge", "latest", b'{"schemaVersion":2,"pad":"' + b"x" * (4 << 20) + b'"}')
    client = await mirror()
    r = await client.get("/v2/huge/manifests/latest")
    assert r.status == 502 and "larger than" in (await r.json())["errors"][0]["message"]
    assert not stored_blobs(tmp_path)


async def test_tag_policies_and_allowed_repositories(upstream, mirror, clock) -> None:
    script, _ = upstream
    for tag in ("latest", "v1.2.3", "stable"):
        image(script, tag=tag)
    image(script, repo="someone/app")
    client = await mirror(tag_ttl="5m", mutable_tags=["latest"], immutable_tags=["v*.*.*"],
                          repositories=["library/*"])
    for tag in ("latest", "v1.2.3", "stable"):
        assert (await client.get(f"/v2/app/manifests/{tag}")).status == 200
    before = sum(script.calls.values())
    assert (await client.get("/v2/app/manifests/latest")).status == 200  # mutable: asked every time
    assert sum(script.calls.values()) == before + 1
    clock.advance(301)
    before = sum(script.calls.values())
    assert (await client.get("/v2/app/manifests/v1.2.3")).status == 200  # immutable: never again
    assert sum(script.calls.values()) == before
    assert (await client.get("/v2/app/manifests/stable")).status == 200  # the TTL as usual
    assert sum(script.calls.values()) == before + 1
    r = await client.get("/v2/someone/app/manifests/latest")
    assert r.status == 403 and (await r.json())["errors"][0]["code"] == "DENIED"
    assert not any("someone" in call for call in script.calls)


async def test_tag_in_storage_without_index_entry_is_served(upstream, registry, tmp_path: Path) -> None:
    """The index is an accelerator: a tag file in storage (an import, another replica, a lost index)
    is revalidated like a cached tag, and served stale when the upstream is down."""
    script, server = upstream
    m, _ = image(script)
    hub = {"name": "hub", "url": str(server.make_url("")), "dockerhub": True, "retries": 1}
    first = await registry(upstreams=[hub])
    assert (await first.get("/v2/app/manifests/latest")).status == 200
    assert script.calls["GET /v2/library/app/manifests/latest"] == 1

    fresh = await registry(upstreams=[hub], cache={"index": str(tmp_path / "other-index")})
    r = await fresh.get("/v2/app/manifests/latest")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == m
    assert script.calls["HEAD /v2/library/app/manifests/latest"] == 1  # revalidated, not fetched again
    assert script.calls["GET /v2/library/app/manifests/latest"] == 1

    script.status = 503
    down = await registry(upstreams=[hub], cache={"index": str(tmp_path / "third-index")})
    r = await down.get("/v2/app/manifests/latest")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == m and "110" in r.headers["Warning"]
