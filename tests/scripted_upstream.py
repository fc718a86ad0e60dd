"""A small upstream registry for the faults a real distribution cannot be made to produce:
wrong bytes, cut transfers, 429/503, slow streams, bearer/basic auth, redirects to a CDN.
It speaks real HTTP on loopback; tests script it through its attributes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class ScriptedUpstream:
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)  # (repo, ref) -> body, type
    blobs: dict[str, bytes] = field(default_factory=dict)
    repo_tags: dict[str, list[str]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)  # "GET /v2/..." -> count
    requests: list[web.Request] = field(default_factory=list)
    status: int | None = None  # answer every /v2/ request with this status
    retry_after: str | None = None
    corrupt: set[str] = field(default_factory=set)  # blob digests served with wrong bytes
    cut_after: dict[str, int] = field(default_factory=dict)  # digest -> bytes sent before cutting (once)
    slow: float = 0.0  # seconds between 64 KiB chunks
    supports_range: bool = True
    token: str | None = None  # require Bearer <token>
    basic: tuple[str, str] | None = None  # require Basic user:pass
    token_requests: int = 0
    redirect_blobs_to: str | None = None  # base URL of a CDN app serving /cdn/<digest>
    page_size: int = 0  # paginate tags/list with Link when > 0
    headers: dict[str, str] = field(default_factory=dict)  # added to every /v2/ answer (e.g. ratelimit-*)
    streaming: int = 0  # blob bodies being sent right now (a client that lets go ends its one)

    def add_manifest(self, repo: str, tag: str | None, body: dict | bytes,
                     media_type: str = "application/vnd.oci.image.manifest.v1+json") -> str:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        d = digest(raw)
        self.manifests[(repo, d)] = (raw, media_type)
        if tag:
            self.manifests[(repo, tag)] = (raw, media_type)
            self.repo_tags.setdefault(repo, []).append(tag)
        return d

    def add_blob(self, data: bytes) -> str:
        d = digest(data)
        self.blobs[d] = data
        return d

    def app(self) -> web.Application:
        async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
            if request.path.startswith("/v2/"):
                response.headers.update(self.headers)

        app = web.Application()
        app.on_response_prepare.append(add_headers)
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2/{tail:.*}", self._v2)
        app.router.add_get("/cdn/{digest}", self._cdn)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        self.requests.append(request)
        if self.basic and request.headers.get("Authorization") != _basic(*self.basic):
            return web.Response(status=401)
        return web.json_response({"token": self.token, "expires_in": 300})

    def _authorized(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization")
        if self.token is not None and auth != f"Bearer {self.token}":
            realm = f"http://{request.host}/token"
            return web.Response(status=401, headers={
                "WWW-Authenticate": f'Bearer realm="{realm}",service="scripted",scope="repository:x:pull"'})
        if self.token is None and self.basic is not None and auth != _basic(*self.basic):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="scripted"'})
        return None

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        self.calls[f"{request.method} {request.path}"] += 1
        self.requests.append(request)
        if self.status is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=self.status, headers=headers)
        denied = self._authorized(request)
        if denied is not None:
            return denied
        tail = request.match_info["tail"]
        if tail == "":
            return web.json_response({})
        repo, _, rest = tail.rpartition("/manifests/")
        if rest and repo:
            return self._manifest(repo, rest)
        repo, _, d = tail.rpartition("/blobs/")
        if d and repo:
            return await self._blob(request, d)
        if tail.endswith("/tags/list"):
            return self._tags(request, tail.removesuffix("/tags/list"))
        return web.Response(status=404)

    def _manifest(self, repo: str, ref: str) -> web.Response:
        found = self.manifests.get((repo, ref))
        if found is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        body, media_type = found
        return web.Response(body=body, content_type=media_type, headers={"Docker-Content-Digest": digest(body)})

    async def _blob(self, request: web.Request, d: str) -> web.StreamResponse:
        data = self.blobs.get(d)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        if self.redirect_blobs_to:
            return web.Response(status=307, headers={"Location": f"{self.redirect_blobs_to}/cdn/{d}"})
        if d in self.corrupt:
            data = bytes(b ^ 0xFF for b in data[:1]) + data[1:]
        start, status, headers = 0, 200, {}
        rng = request.headers.get("Range")
        if rng and self.supports_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data) - start
        await resp.prepare(request)
        cut = self.cut_after.pop(d, None)
        pos = start
        self.streaming += 1
        try:
            while pos < len(data):
                if cut is not None and pos >= cut:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                end = min(pos + 65536, len(data), cut if cut is not None and cut > pos else len(data))
                await resp.write(data[pos:end])
                pos = end
                if self.slow:
                    await asyncio.sleep(self.slow)
            await resp.write_eof()
        finally:
            self.streaming -= 1
        return resp

    async def _cdn(self, request: web.Request) -> web.Response:
        self.calls[f"CDN {request.path}"] += 1
        self.requests.append(request)
        return web.Response(body=self.blobs[request.match_info["digest"]])

    def _tags(self, request: web.Request, repo: str) -> web.Response:
        tags = sorted(self.repo_tags.get(repo, []))
        if not tags:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        headers = {}
        if self.page_size:
            last = request.query.get("last")
            rest = [t for t in tags if last is None or t > last]
            tags = rest[: self.page_size]
            if len(rest) > self.page_size:
                headers["Link"] = f'</v2/{repo}/tags/list?n={self.page_size}&last={tags[-1]}>; rel="next"'
        return web.json_response({"name": repo, "tags": tags}, headers=headers)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
