"""`_catalog` and `tags/list` pages side by side with registry:2's (the distribution binary), both
pushed the same repositories: the same names in the same order (path components: `a/b` before
`a-b`), the same default page (100) and maximum (1,000), the same `Link` to the next page, walked to
the end; tags the same set (registry:2 2.8 ignores `n` on tags; ours pages them, as the OCI spec
says, sorted)."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import require
from tests.support.procs import DISTRIBUTION, Distribution, Mirror, free_port, http

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
NAMES = ["a", "a-b", "a/b", "a/b/c", "a.b", "b", "z", *(f"r/{i:03d}" for i in range(120))]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push(url: str, name: str, tag: str) -> None:
    config, layer = b'{"os":"linux"}', b"layer"
    for data in (config, layer):  # POST, then PUT with the bytes: the form both take
        r = http("POST", f"{url}/v2/{name}/blobs/uploads/")
        assert r.status == 202, (name, r.status, r.body[:200])
        location = r.headers["Location"]
        location = location if location.startswith("http") else url + location
        r = http("PUT", f"{location}{'&' if '?' in location else '?'}digest={sha(data)}", data=data,
                 headers={"Content-Type": "application/octet-stream"})
        assert r.status == 201, (name, r.status, r.body[:200])
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config),
                                  "size": len(config)},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer),
                                   "size": len(layer)}]}).encode()
    r = http("PUT", f"{url}/v2/{name}/manifests/{tag}", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, (name, r.status, r.body[:200])


def answer(url: str, path: str) -> tuple[int, Any, dict[str, str] | None]:
    """(status, body, the next page's query) of one GET."""
    r = http("GET", url + path)
    link = r.headers.get("Link")
    nxt = None
    if link:
        target = link.split(";")[0].strip().strip("<>")
        nxt = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(target).query))
    body = json.loads(r.body) if r.body else None
    if r.status >= 400 and body:
        body = body["errors"][0]["code"]
    return r.status, body, nxt


def walk(url: str, n: int) -> list[list[str]]:
    pages: list[list[str]] = []
    path = f"/v2/_catalog?n={n}"
    while path and len(pages) < 200:
        status, body, nxt = answer(url, path)
        assert status == 200
        pages.append(body["repositories"])
        path = f"/v2/_catalog?{urllib.parse.urlencode(nxt)}" if nxt else ""
    return pages


def test_catalog_and_tag_pages_as_registry2_gives_them(mirror_factory: Callable[..., Mirror], tmp_path: Path) -> None:
    require(DISTRIBUTION)
    theirs = Distribution(tmp_path / "registry2").start()
    try:
        port = free_port()
        ours = mirror_factory({"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
                               "http": {"addr": f"127.0.0.1:{port}"}}, port=port)  # no upstream: all private
        for name in NAMES:
            for url in (theirs.url, ours.url):
                push(url, name, "v1")
        for tag in ("t3", "t1", "t2", "t10"):
            for url in (theirs.url, ours.url):
                push(url, "a", tag)

        for path in ["/v2/_catalog", "/v2/_catalog?n=3", "/v2/_catalog?n=3&last=a/b/c", "/v2/_catalog?n=2&last=a-b",
                     "/v2/_catalog?n=0", "/v2/_catalog?n=1000", "/v2/_catalog?n=1001", "/v2/_catalog?last=r/118",
                     f"/v2/_catalog?n={len(NAMES)}", f"/v2/_catalog?n={len(NAMES) - 1}", "/v2/nothing/tags/list"]:
            assert answer(ours.url, path) == answer(theirs.url, path), path
        for n in (1, 7, 50, 100):
            assert walk(ours.url, n) == walk(theirs.url, n), n
        assert [name for page in walk(ours.url, 7) for name in page] == sorted(NAMES, key=lambda n: n.replace("/", " "))

        _, body, _ = answer(theirs.url, "/v2/a/tags/list")
        assert answer(ours.url, "/v2/a/tags/list") == (200, {"name": "a", "tags": sorted(body["tags"])}, None)
        assert answer(ours.url, "/v2/a/tags/list?n=2&last=t10") == (
            200, {"name": "a", "tags": ["t2", "t3"]}, {"n": "2", "last": "t3"})
    finally:
        theirs.stop()
