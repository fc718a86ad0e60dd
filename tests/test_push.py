"""The OCI distribution spec's push, pull, content-discovery and content-management workflows
over HTTP, plus private-vs-proxied rules and resumable uploads."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror.server.state import LEDGER
from mirror.storage import layout
from tests.scripted_upstream import ScriptedUpstream
from tests.test_cache import image as upstream_image

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


Factory = Callable[..., Any]


async def upload(client: TestClient, name: str, data: bytes) -> str:
    d = sha(data)
    r = await client.post(f"/v2/{name}/blobs/uploads/?digest={d}", data=data)
    assert r.status == 201, await r.text()
    return d


def image_manifest(config: bytes, layers: list[bytes], **extra: Any) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(x), "size": len(x)}
                   for x in layers],
        **extra}).encode()


async def push_image(client: TestClient, name: str, tag: str, seed: bytes = b"x") -> tuple[str, bytes]:
    config, layer = b'{"os":"linux","seed":"' + seed + b'"}', b"layer-" + seed * 1000
    await upload(client, name, config)
    await upload(client, name, layer)
    body = image_manifest(config, [layer])
    r = await client.put(f"/v2/{name}/manifests/{tag}", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    assert r.headers["Docker-Content-Digest"] == sha(body)
    assert r.headers["Location"] == f"/v2/{name}/manifests/{sha(body)}"
    return sha(body), body


async def error_code(r: Any) -> str:
    return (await r.json())["errors"][0]["code"]


# --- push -------------------------------------------------------------------------------------

async def test_chunked_upload_with_status_and_resume_headers(registry: Factory) -> None:
    client = await registry()
    data = bytes(range(256)) * 1000
    r = await client.post("/v2/team/app/blobs/uploads/")
    assert r.status == 202 and r.headers["Range"] == "0-0"
    location, upload_id = r.headers["Location"], r.headers["Docker-Upload-UUID"]
    assert location == f"/v2/team/app/blobs/uploads/{upload_id}"
    pos = 0
    for chunk in (data[:100_000], data[100_000:200_000], data[200_000:]):
        r = await client.patch(location, data=chunk, headers={
            "Content-Range": f"{pos}-{pos + len(chunk) - 1}", "Content-Type": "application/octet-stream"})
        assert r.status == 202, await r.text()
        pos += len(chunk)
        assert r.headers["Range"] == f"0-{pos - 1}"
    r = await client.get(location)
    assert r.status == 204 and r.headers["Range"] == f"0-{len(data) - 1}"
    r = await client.put(f"{location}?digest={sha(data)}")
    assert r.status == 201 and r.headers["Docker-Content-Digest"] == sha(data)
    assert r.headers["Location"] == f"/v2/team/app/blobs/{sha(data)}"
    r = await client.get(f"/v2/team/app/blobs/{sha(data)}")
    assert await r.read() == data
    assert (await client.get(location)).status == 404  # finished uploads are gone


async def test_out_of_order_chunk_gets_416_with_range(registry: Factory) -> None:
    client = await registry()
    location = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    await client.patch(location, data=b"a" * 10, headers={"Content-Range": "0-9"})
    r = await client.patch(location, data=b"b" * 10, headers={"Content-Range": "20-29"})
    assert r.status == 416 and r.headers["Range"] == "0-9"
    assert await error_code(r) == "RANGE_INVALID"
    r = await client.patch(location, data=b"b" * 5, headers={"Content-Range": "10-19"})  # length mismatch
    assert r.status == 416


async def test_put_with_final_chunk_and_streamed_patch(registry: Factory) -> None:
    client = await registry()
    location = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    await client.patch(location, data=b"first-")  # no Content-Range: docker streams like this
    r = await client.put(f"{location}?digest={sha(b'first-last')}", data=b"last")
    assert r.status == 201
    assert await (await client.get(f"/v2/team/app/blobs/{sha(b'first-last')}")).read() == b"first-last"


async def test_bad_digest_leaves_nothing(registry: Factory, tmp_path: Path) -> None:
    client = await registry()
    wrong = sha(b"something else")
    r = await client.post(f"/v2/team/app/blobs/uploads/?digest={wrong}", data=b"data")
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    location = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    r = await client.put(f"{location}?digest={wrong}", data=b"data")
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    assert (await client.head(f"/v2/team/app/blobs/{wrong}")).status == 404
    assert not list((tmp_path / "data" / "blobs").rglob("*")) if (tmp_path / "data" / "blobs").exists() else True
    await client.app[LEDGER].writer.flush()  # its journal records (written in the background) are in place
    assert not list((tmp_path / "data" / "_staging").iterdir())
    r = await client.put(f"{location}?digest=sha256:nothex")
    assert r.status in (400, 404)


async def test_cross_repository_mount(registry: Factory) -> None:
    client = await registry()
    d = await upload(client, "team/a", b"shared layer")
    r = await client.post(f"/v2/team/b/blobs/uploads/?mount={d}&from=team/a")
    assert r.status == 201 and r.headers["Location"] == f"/v2/team/b/blobs/{d}"
    assert await (await client.get(f"/v2/team/b/blobs/{d}")).read() == b"shared layer"
    r = await client.post(f"/v2/team/c/blobs/uploads/?mount={sha(b'nope')}&from=team/a")
    assert r.status == 202 and "Docker-Upload-UUID" in r.headers  # not mountable: a session instead


async def test_blobs_are_per_repository(registry: Factory) -> None:
    client = await registry()
    d = await upload(client, "team/a", b"secret")
    assert (await client.get(f"/v2/team/other/blobs/{d}")).status == 404


async def test_cancel_upload(registry: Factory) -> None:
    client = await registry()
    location = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    assert (await client.delete(location)).status == 204
    r = await client.patch(location, data=b"x")
    assert r.status == 404 and await error_code(r) == "BLOB_UPLOAD_UNKNOWN"
    r = await client.get("/v2/team/app/blobs/uploads/../../etc")
    assert r.status in (400, 404)
    r = await client.get("/v2/team/app/blobs/uploads/not-an-upload-id")
    assert r.status == 404 and await error_code(r) == "BLOB_UPLOAD_UNKNOWN"


async def test_interrupted_patch_resumes_in_another_process(registry: Factory, tmp_path: Path) -> None:
    """A client that drops mid-PATCH reads the Range, and the rest can go to another instance."""
    first = await registry()
    data = bytes(range(256)) * 4096  # 1 MiB
    location = (await first.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    _reader, writer = await asyncio.open_connection(first.host, first.port)
    writer.write(f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode())
    writer.write(data[:300_000])
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()  # gone mid-body
    received = 0
    for _ in range(50):
        r = await first.get(location)
        received = int(r.headers["Range"].split("-")[1]) + 1
        if received >= 300_000:
            break
        await asyncio.sleep(0.05)
    assert received == 300_000
    # Half an upload is never a blob.
    assert (await first.head(f"/v2/team/app/blobs/{sha(data)}")).status == 404
    # A second instance on the same storage continues from the saved hash state.
    second = await registry()
    r = await second.patch(location, data=data[received:], headers={"Content-Range": f"{received}-{len(data) - 1}"})
    assert r.status == 202, await r.text()
    r = await second.put(f"{location}?digest={sha(data)}")
    assert r.status == 201, await r.text()
    assert await (await first.get(f"/v2/team/app/blobs/{sha(data)}")).read() == data


async def test_upload_purging(registry: Factory, tmp_path: Path) -> None:
    client = await registry(storage={"filesystem": {"rootdirectory": str(tmp_path / "data")},
                                     "maintenance": {"uploadpurging": {"age": "1s", "interval": "200ms"}}})
    location = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    await client.patch(location, data=b"abandoned")
    for _ in range(50):
        if (await client.get(location)).status == 404:
            break
        await asyncio.sleep(0.1)
    assert (await client.get(location)).status == 404
    uploads = tmp_path / "data" / layout.repository("team/app") / "_uploads"
    assert not uploads.exists() or not list(uploads.iterdir())


# --- manifests -----------------------------------------------------------------------------------

async def test_push_pull_image_by_tag_and_digest(registry: Factory) -> None:
    client = await registry()
    digest, body = await push_image(client, "team/app", "v1")
    for ref in ("v1", digest):
        r = await client.get(f"/v2/team/app/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
        assert r.status == 200 and await r.read() == body
        assert r.headers["Content-Type"] == OCI_MANIFEST and r.headers["Docker-Content-Digest"] == digest
    r = await client.head("/v2/team/app/manifests/v1")
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(body)
    assert (await client.get("/v2/team/app/manifests/v2")).status == 404


async def test_manifest_validation(registry: Factory) -> None:
    client = await registry()
    config = b"{}"
    await upload(client, "team/app", config)
    missing = image_manifest(config, [b"never uploaded"])
    r = await client.put("/v2/team/app/manifests/v1", data=missing, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 404 and await error_code(r) == "MANIFEST_BLOB_UNKNOWN"
    for bad in (b"not json", b"[]", b'{"schemaVersion": 1}', json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                                                        "config": {"digest": "x"}}).encode()):
        r = await client.put("/v2/team/app/manifests/v1", data=bad, headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 400 and await error_code(r) == "MANIFEST_INVALID", bad
    good = image_manifest(config, [])
    r = await client.put(f"/v2/team/app/manifests/{sha(b'other')}", data=good, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    r = await client.put("/v2/team/app/manifests/v1", data=good, headers={"Content-Type": DOCKER_MANIFEST})
    assert r.status == 400 and await error_code(r) == "MANIFEST_INVALID"  # mediaType vs Content-Type
    r = await client.put("/v2/team/app/manifests/v1", data=io.BytesIO(b" " * (4 << 20 | 1)),
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 413
    r = await client.put(f"/v2/team/app/manifests/{sha(good)}", data=good, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201


async def test_index_needs_its_children(registry: Factory) -> None:
    client = await registry()
    child, child_body = await push_image(client, "team/multi", "amd64")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": child, "size": len(child_body),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    r = await client.put("/v2/team/other/manifests/latest", data=index, headers={"Content-Type": OCI_INDEX})
    assert r.status == 404 and await error_code(r) == "MANIFEST_BLOB_UNKNOWN"
    r = await client.put("/v2/team/multi/manifests/latest", data=index, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201
    r = await client.get("/v2/team/multi/manifests/latest", headers={"Accept": OCI_MANIFEST})
    assert r.headers["Docker-Content-Digest"] == child  # index -> linux/amd64 for a client without index support


@pytest.mark.parametrize("reference", [".INVALID_MANIFEST_NAME", "-bad", "sha256:abc", "md5:" + "a" * 32])
async def test_a_reference_neither_tag_nor_digest_is_an_unknown_manifest(registry: Factory, tmp_path: Path,
                                                                         reference: str) -> None:
    """GET, HEAD and DELETE find no such manifest (404, the conformance suite's "nonexistent
    manifest"); a PUT to it is refused as invalid, as the spec asks."""
    client = await registry(storage={"filesystem": {"rootdirectory": str(tmp_path / "data")},
                                     "delete": {"enabled": True}})
    _, body = await push_image(client, "team/app", "v1")
    for method in ("GET", "DELETE"):
        r = await client.request(method, f"/v2/team/app/manifests/{reference}")
        assert r.status == 404 and await error_code(r) == "MANIFEST_UNKNOWN", method
    assert (await client.head(f"/v2/team/app/manifests/{reference}")).status == 404
    r = await client.put(f"/v2/team/app/manifests/{reference}", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400 and await error_code(r) == ("DIGEST_INVALID" if ":" in reference else "TAG_INVALID")


# --- content discovery ------------------------------------------------------------------------------

async def test_tags_and_catalog_pagination(registry: Factory) -> None:
    client = await registry()
    for tag in ("a", "b", "c"):
        await push_image(client, "team/app", tag, seed=tag.encode())
    await push_image(client, "team/zeta", "x")
    r = await client.get("/v2/team/app/tags/list?n=2")
    assert (await r.json()) == {"name": "team/app", "tags": ["a", "b"]}
    assert r.headers["Link"] == '</v2/team/app/tags/list?n=2&last=b>; rel="next"'
    r = await client.get("/v2/team/app/tags/list?n=2&last=b")
    assert (await r.json())["tags"] == ["c"] and "Link" not in r.headers
    r = await client.get("/v2/_catalog?n=1")
    assert (await r.json())["repositories"] == ["team/app"] and "last=team/app" in r.headers["Link"]
    r = await client.get("/v2/team/none/tags/list")
    assert r.status == 404 and await error_code(r) == "NAME_UNKNOWN"


async def test_referrers(registry: Factory) -> None:
    client = await registry()
    subject, subject_body = await push_image(client, "team/app", "v1")
    empty = b"{}"
    await upload(client, "team/app", empty)
    sig_blob, sbom_blob = b"signature", b"sbom"
    await upload(client, "team/app", sig_blob)
    await upload(client, "team/app", sbom_blob)
    refs = {}
    for kind, blob in (("application/vnd.example.signature", sig_blob), ("application/spdx+json", sbom_blob)):
        body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": kind,
            "config": {"mediaType": EMPTY_CONFIG, "digest": sha(empty), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sha(blob), "size": len(blob)}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_body)},
            "annotations": {"org.example": kind}}).encode()
        r = await client.put(f"/v2/team/app/manifests/{sha(body)}", data=body, headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 201 and r.headers["OCI-Subject"] == subject
        refs[kind] = sha(body)
    r = await client.get(f"/v2/team/app/referrers/{subject}")
    index = await r.json()
    assert r.status == 200 and index["mediaType"] == OCI_INDEX and r.headers["Content-Type"] == OCI_INDEX
    assert {m["digest"] for m in index["manifests"]} == set(refs.values())
    assert {m["artifactType"] for m in index["manifests"]} == set(refs)
    r = await client.get(f"/v2/team/app/referrers/{subject}?artifactType=application/spdx%2Bjson")
    index = await r.json()
    assert [m["digest"] for m in index["manifests"]] == [refs["application/spdx+json"]]
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    r = await client.get(f"/v2/team/app/referrers/{sha(b'nothing')}")
    assert r.status == 200 and (await r.json())["manifests"] == []
    r = await client.get("/v2/team/app/referrers/sha256:bad")
    assert r.status == 400


# --- content management ---------------------------------------------------------------------------

async def test_deletes_disabled(registry: Factory) -> None:
    client = await registry()
    digest, _ = await push_image(client, "team/app", "v1")
    for path in (f"/v2/team/app/manifests/{digest}", "/v2/team/app/manifests/v1"):
        r = await client.delete(path)
        assert r.status == 405 and await error_code(r) == "UNSUPPORTED"


async def test_deletes_enabled(registry: Factory, tmp_path: Path) -> None:
    client = await registry(storage={"filesystem": {"rootdirectory": str(tmp_path / "data")},
                                     "delete": {"enabled": True}})
    digest, body = await push_image(client, "team/app", "v1")
    await client.put("/v2/team/app/manifests/v2", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert (await client.delete("/v2/team/app/manifests/v2")).status == 202  # a tag only
    assert (await (await client.get("/v2/team/app/tags/list")).json())["tags"] == ["v1"]
    assert (await client.get(f"/v2/team/app/manifests/{digest}")).status == 200
    assert (await client.delete(f"/v2/team/app/manifests/{digest}")).status == 202
    assert (await client.get(f"/v2/team/app/manifests/{digest}")).status == 404
    assert (await client.get("/v2/team/app/manifests/v1")).status == 404  # its tags went with it
    r = await client.delete(f"/v2/team/app/manifests/{digest}")
    assert r.status == 404 and await error_code(r) == "MANIFEST_UNKNOWN"
    layer = sha(b"layer-" + b"x" * 1000)
    assert (await client.delete(f"/v2/team/app/blobs/{layer}")).status == 202
    assert (await client.get(f"/v2/team/app/blobs/{layer}")).status == 404
    r = await client.delete(f"/v2/team/app/blobs/{layer}")
    assert r.status == 404 and await error_code(r) == "BLOB_UNKNOWN"


# --- private and proxied on one port ------------------------------------------------------------------

@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedUpstream, str]]:
    script = ScriptedUpstream()
    server = TestServer(script.app())
    await server.start_server()
    yield script, str(server.make_url("")).rstrip("/")
    await server.close()


async def test_private_names_never_go_upstream(registry: Factory, scripted: tuple[ScriptedUpstream, str]) -> None:
    script, url = scripted
    client = await registry(proxy={"remoteurl": url}, private={"patterns": ["team/**"]})
    _digest, _ = await push_image(client, "team/app", "v1")
    assert (await client.get("/v2/team/app/manifests/v1")).status == 200
    assert (await client.get("/v2/team/app/manifests/missing")).status == 404
    assert (await client.get("/v2/team/other/tags/list")).status == 404
    assert not [k for k in script.calls if "team/" in k]


async def test_push_to_a_proxied_name_is_denied(registry: Factory, scripted: tuple[ScriptedUpstream, str],
                                                 tmp_path: Path) -> None:
    script, url = scripted
    upstream_image(script, "library/alpine")
    # claim_on_push: false, as registry:2: only private.patterns are pushed to
    client = await registry(root=tmp_path / "strict", proxy={"remoteurl": url},
                            private={"patterns": ["team/*"], "claim_on_push": False})
    r = await client.post("/v2/library/alpine/blobs/uploads/")
    assert r.status == 403 and await error_code(r) == "DENIED"
    r = await client.put("/v2/team/a/b/manifests/v1", data=b"{}")  # `*` stays within one component
    assert r.status == 403
    # auto (the default): a name the upstream serves is refused, one it does not have is claimed
    client = await registry(root=tmp_path / "auto", proxy={"remoteurl": url}, private={"patterns": ["team/*"]})
    r = await client.post("/v2/library/alpine/blobs/uploads/")
    assert r.status == 403 and "private.patterns" in (await r.json())["errors"][0]["message"]
    assert (await client.post("/v2/team/a/b/blobs/uploads/")).status == 202
    assert script.calls["GET /v2/library/alpine/tags/list"] == 1 and script.calls["GET /v2/team/a/b/tags/list"] == 1
    r = await client.post("/v2/library/alpine/blobs/uploads/")  # remembered: not asked again
    assert r.status == 403 and script.calls["GET /v2/library/alpine/tags/list"] == 1


async def test_claim_on_push_makes_a_name_private(registry: Factory, scripted: tuple[ScriptedUpstream, str],
                                                  tmp_path: Path) -> None:
    script, url = scripted
    client = await registry(proxy={"remoteurl": url}, private={"claim_on_push": True})
    await push_image(client, "someone/app", "v1")
    # Pushed once: private from now on, also for a restarted process.
    again = await registry(proxy={"remoteurl": url})
    assert (await again.get("/v2/someone/app/manifests/v1")).status == 200
    assert (await again.get("/v2/someone/app/manifests/other")).status == 404
    assert not [k for k in script.calls if "someone/" in k]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v2/Bad/blobs/uploads/"), ("PUT", "/v2/a--/manifests/v1"),
    ("PATCH", "/v2/a/../b/blobs/uploads/" + "a" * 32), ("DELETE", "/v2/UP/manifests/v1"),
])
async def test_writes_to_invalid_names(registry: Factory, method: str, path: str) -> None:
    client = await registry()
    reader, writer = await asyncio.open_connection(client.host, client.port)  # raw: no path normalising
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode())
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400" and json.loads(body)["errors"][0]["code"] == "NAME_INVALID"
