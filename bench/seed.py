"""Push a one-layer image whose layer is a large incompressible blob, straight over the v2 API.

Streamed: the bytes come from a seeded PRNG (same size -> same digest on every run), are hashed
as they go out in one chunked PATCH, and the digest is named only in the closing PUT, so the blob
is never held in memory or written to a temporary file. The layer is not a real tar: only blob
GETs are measured, and a registry checks nothing but the digest.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

CHUNK = 4 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class _Stream:
    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = random.Random(seed)
        self.hasher = hashlib.sha256()

    async def chunks(self) -> AsyncIterator[bytes]:
        left = self.size
        while left > 0:
            chunk = self.rng.randbytes(min(CHUNK, left))
            self.hasher.update(chunk)
            left -= len(chunk)
            yield chunk

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


async def _push_blob(session: aiohttp.ClientSession, base: str, repo: str, body: bytes | _Stream) -> str:
    async with session.post(f"{base}/v2/{repo}/blobs/uploads/") as resp:
        if resp.status != 202:
            raise RuntimeError(f"start upload to {repo}: {resp.status} {await resp.text()}")
        location = URL(base).join(URL(resp.headers["Location"]))
    if isinstance(body, bytes):
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        put = location.update_query(digest=digest)
        async with session.put(put, data=body, headers={"Content-Type": "application/octet-stream"}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"upload to {repo}: {resp.status} {await resp.text()}")
        return digest
    async with session.patch(location, data=body.chunks(),
                             headers={"Content-Type": "application/octet-stream"}) as resp:
        if resp.status != 202:
            raise RuntimeError(f"stream to {repo}: {resp.status} {await resp.text()}")
        location = URL(base).join(URL(resp.headers["Location"]))
    async with session.put(location.update_query(digest=body.digest)) as resp:
        if resp.status != 201:
            raise RuntimeError(f"commit upload to {repo}: {resp.status} {await resp.text()}")
    return body.digest


async def push_big_blob_image(base: str, repo: str, tag: str, size: int, seed: int = 1) -> tuple[str, str]:
    """Push repo:tag = one layer of `size` random bytes. Returns (manifest digest, layer digest)."""
    timeout = aiohttp.ClientTimeout(total=900, sock_connect=10, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        layer = await _push_blob(s, base, repo, _Stream(size, seed))
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer]},
        }, separators=(",", ":")).encode()
        config_digest = await _push_blob(s, base, repo, config)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer, "size": size}],
        }, separators=(",", ":")).encode()
        async with s.put(f"{base}/v2/{repo}/manifests/{tag}", data=manifest,
                         headers={"Content-Type": OCI_MANIFEST}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"push manifest {repo}:{tag}: {resp.status} {await resp.text()}")
        return "sha256:" + hashlib.sha256(manifest).hexdigest(), layer
