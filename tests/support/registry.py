"""Direct registry-API checks for the e2e tests: a streaming, hashing puller (aiohttp) for the
concurrency test, a raw blob GET that tells a cut connection from a complete body, and checks of
what skopeo wrote to an OCI layout."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.images import OCI_INDEX, OCI_MANIFEST, Layout, sha256_digest
from tests.support.procs import http as request

MANIFEST_ACCEPT = ", ".join([
    OCI_INDEX, OCI_MANIFEST,
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def get_manifest(base_url: str, repo: str, ref: str) -> tuple[str, bytes]:
    """(digest, body) of a manifest a registry serves, the digest it names checked against the bytes."""
    r = request("GET", f"{base_url}/v2/{repo}/manifests/{ref}", {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200, (repo, ref, r.status, r.body[:300])
    digest = sha256_digest(r.body)
    assert r.headers["Docker-Content-Digest"] == digest
    return digest, r.body


def manifest_digest(base_url: str, repo: str, ref: str) -> str:
    return get_manifest(base_url, repo, ref)[0]


@dataclass
class PullResult:
    manifest_digest: str = ""
    blobs: dict[str, str] = field(default_factory=dict)  # digest asked -> sha256 of the bytes received
    sizes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def pull_image(session: aiohttp.ClientSession, base: str, repo: str, ref: str, start_layer: int = 0,
                     chunk: int = 1 << 20) -> PullResult:
    """What a client does for one platform image: manifest by tag, config, then every layer,
    streamed and hashed (layers in rotated order from `start_layer`)."""
    result = PullResult()
    t0 = time.monotonic()
    async with session.get(f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT}) as r:
        body = await r.read()
        if r.status != 200:
            result.errors.append(f"manifest {ref}: {r.status} {body[:300]!r}")
            return result
        result.manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()
    manifest = json.loads(body)
    layers = [d["digest"] for d in manifest["layers"]]
    k = start_layer % len(layers) if layers else 0
    for digest in [manifest["config"]["digest"], *layers[k:], *layers[:k]]:
        h = hashlib.sha256()
        size = 0
        try:
            async with session.get(f"{base}/v2/{repo}/blobs/{digest}") as r:
                if r.status != 200:
                    result.errors.append(f"blob {digest}: {r.status} {(await r.read())[:300]!r}")
                    continue
                async for part in r.content.iter_chunked(chunk):
                    h.update(part)
                    size += len(part)
        except aiohttp.ClientError as e:
            result.errors.append(f"blob {digest}: {type(e).__name__}: {e}")
            continue
        result.blobs[digest] = "sha256:" + h.hexdigest()
        result.sizes[digest] = size
    result.seconds = time.monotonic() - t0
    return result


@dataclass
class RawBlob:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool  # the whole body as announced arrived and the response ended cleanly
    error: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)


def get_raw(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> RawBlob:
    """GET on 127.0.0.1:port that reports a connection cut mid-body instead of raising."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
        except (ConnectionError, http.client.HTTPException, TimeoutError) as e:
            return RawBlob(0, {}, b"", False, f"{type(e).__name__}: {e}")
        hdrs = {k: v for k, v in resp.getheaders()}
        try:
            body = resp.read()
        except http.client.IncompleteRead as e:
            return RawBlob(resp.status, hdrs, e.partial, False, f"IncompleteRead: {len(e.partial)} bytes")
        except (ConnectionError, http.client.HTTPException, TimeoutError) as e:
            return RawBlob(resp.status, hdrs, b"", False, f"{type(e).__name__}: {e}")
        return RawBlob(resp.status, hdrs, body, True)
    finally:
        conn.close()


def check_oci_copy(out_dir: Path, layout: Layout, arches: tuple[str, ...] | None = None) -> None:
    """What skopeo wrote to `oci:out_dir` has the upstream's top digest and every blob intact."""
    index = json.loads((out_dir / "index.json").read_text())
    digests = [m["digest"] for m in index["manifests"]]
    assert digests == [layout.digest], f"{out_dir}: index.json names {digests}, upstream has {layout.digest}"
    images = layout.images if arches is None else [i for i in layout.images if i.platform["architecture"] in arches]
    wanted = [layout.top] + [i.manifest for i in images] + [b for i in images for b in i.blobs]
    for blob in wanted:
        path = out_dir / "blobs" / "sha256" / blob.digest.split(":", 1)[1]
        assert path.is_file(), f"{blob.digest} missing from {out_dir}"
        data = path.read_bytes()
        assert len(data) == blob.size and "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest, \
            f"{blob.digest}: wrong bytes in {out_dir}"


def oci_error(body: bytes) -> list[dict[str, Any]]:
    """The `errors` list of an OCI error body (AssertionError if it is not one)."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise AssertionError(f"not an OCI error body: {body[:300]!r}") from None
    assert isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"], \
        f"not an OCI error body: {body[:300]!r}"
    for e in doc["errors"]:
        assert isinstance(e.get("code"), str) and e["code"], f"error without a code: {body[:300]!r}"
    return list(doc["errors"])
