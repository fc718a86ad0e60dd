"""Path traversal: names, references, digests, upload ids and query parameters that try to leave
the storage root (`..`, `%2e%2e`, absolute paths, NUL, encoded slashes) never read, create or
delete a file outside it, and every answer is an OCI error (400 or 404), never a 500.

Requests go out byte for byte on a raw socket: an HTTP client library would normalise the dots
and the percent-escapes before they reach the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.storage import layout

CANARY = b"CANARY-SECRET-" * 64
D = "sha256:" + "a" * 64


def snapshot(base: Path, skip: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `base` except those under `skip`: (size, mtime_ns, first bytes)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            if p == skip:
                continue
            st = p.lstat()
            out[str(p.relative_to(base))] = (st.st_size, st.st_mtime_ns, p.read_bytes()[:64] if p.is_file() else b"")
    return out


async def raw(port: int, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
              ) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
                f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


NAMES = ["..%2F..%2Fcanary", "%2e%2e/%2e%2e/canary", "team/%2e%2e/%2e%2e/%2e%2e/canary", "team/..%2F..%2F..",
         "%2Fetc%2Fpasswd", "team%2F..%2F..%2Fcanary", "a%00b", "team/app%00", "..", "team/.%2e/app",
         "team%5C..%5Ccanary", "%252e%252e/canary"]
REFERENCES = ["..%2F..%2F..%2F..%2Fcanary", "%2e%2e", "..", "a%00b", "sha256:..%2F..%2Fcanary",
              "sha256:" + "%2e" * 64, "..%5C..%5Ccanary", "%2Fetc%2Fpasswd"]
DIGESTS = ["sha256:..%2F..%2F..%2Fcanary", "sha256%3A%2e%2e", "..%2F..%2Fcanary", "sha256:%00" + "a" * 63,
           "sha256:" + "../" * 21 + "a", "sha512:..", "%2Fetc%2Fpasswd", "sha256:" + "A" * 64]
UPLOAD_IDS = ["..%2F..%2F..%2F..%2Fcanary", "%2e%2e", "..", "%2Fetc%2Fpasswd", "abc%00def", "." * 32,
              "0" * 31 + "%2F", "_uploads"]
QUERIES = ["digest=sha256:..%2F..%2Fcanary", "digest=..%2F..%2Fcanary", "digest=%2Fetc%2Fpasswd",
           "mount=sha256:..%2Fcanary&from=..%2F..%2Fcanary", f"mount={D}&from=..%2F..%2Fcanary",
           f"mount={D}&from=%2Fetc", "digest=sha256:" + "0" * 63 + "%00"]


def attacks() -> list[tuple[str, str]]:
    out = []
    for n in NAMES:
        out += [("GET", f"/v2/{n}/manifests/latest"), ("PUT", f"/v2/{n}/manifests/latest"),
                ("DELETE", f"/v2/{n}/manifests/{D}"), ("GET", f"/v2/{n}/tags/list"),
                ("POST", f"/v2/{n}/blobs/uploads/"), ("GET", f"/v2/{n}/blobs/{D}"),
                ("GET", f"/v2/{n}/referrers/{D}")]
    for ref in REFERENCES:
        out += [("GET", f"/v2/team/app/manifests/{ref}"), ("PUT", f"/v2/team/app/manifests/{ref}"),
                ("DELETE", f"/v2/team/app/manifests/{ref}")]
    for d in DIGESTS:
        out += [("GET", f"/v2/team/app/blobs/{d}"), ("DELETE", f"/v2/team/app/blobs/{d}"),
                ("GET", f"/v2/team/app/referrers/{d}")]
    for u in UPLOAD_IDS:
        out += [("GET", f"/v2/team/app/blobs/uploads/{u}"), ("PATCH", f"/v2/team/app/blobs/uploads/{u}"),
                ("PUT", f"/v2/team/app/blobs/uploads/{u}?digest={D}"), ("DELETE", f"/v2/team/app/blobs/uploads/{u}")]
    for q in QUERIES:
        out += [("POST", f"/v2/team/app/blobs/uploads/?{q}")]
    return out


async def test_traversal_never_leaves_the_root(registry: Callable[..., Any], tmp_path: Path) -> None:
    box = tmp_path / "box"
    root = box / "data"
    root.mkdir(parents=True)
    for canary in (box / "canary", tmp_path / "canary", box / "etc-passwd"):
        canary.write_bytes(CANARY)
    client = await registry(root=root, storage={"filesystem": {"rootdirectory": str(root)},
                                                "delete": {"enabled": True}})
    # real content, so that a lookup that went astray would have something to find
    layer = b"layer bytes"
    r = await client.post(f"/v2/team/app/blobs/uploads/?digest=sha256:{hashlib.sha256(layer).hexdigest()}",
                          data=layer)
    assert r.status == 201
    r = await client.post("/v2/team/app/blobs/uploads/")
    upload_id = r.headers["Docker-Upload-UUID"]

    before = snapshot(tmp_path, root)
    port = client.server.port
    assert port is not None
    bad = []
    for method, target in attacks():
        status, body = await raw(port, method, target, b"x" * 16 if method in ("PUT", "PATCH", "POST") else b"")
        assert CANARY[:14] not in body, (method, target)
        try:
            doc = json.loads(body)
            ok = status in (400, 404) and isinstance(doc.get("errors"), list) and doc["errors"][0].get("code")
        except ValueError:
            ok = False
        if not ok:
            bad.append((method, target, status, body[:200]))
    assert not bad, "\n".join(map(str, bad))
    assert snapshot(tmp_path, root) == before  # nothing outside the root was created, changed or deleted
    # and inside the root everything still is where it belongs
    assert sorted(p.name for p in (root / layout.REPOSITORIES).iterdir()) == ["team"]
    r = await client.get(f"/v2/team/app/blobs/uploads/{upload_id}")
    assert r.status == 204


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_dot_segments_in_the_request_line(registry: Callable[..., Any], tmp_path: Path, method: str) -> None:
    """`/v2/../../x` is normalised by the server before routing: it never reaches a handler with dots."""
    client = await registry(root=tmp_path / "data", storage={"filesystem": {"rootdirectory": str(tmp_path / "data")},
                                                             "delete": {"enabled": True}})
    (tmp_path / "canary").write_bytes(CANARY)
    for target in ("/v2/../canary", "/v2/team/../../canary/manifests/x", "/v2/./../../canary/blobs/" + D,
                   "//v2/team/app/manifests/%2e%2e%2f%2e%2e%2fcanary"):
        status, body = await raw(client.server.port, method, target)
        assert status in (400, 404), (target, status, body[:200])
        assert json.loads(body)["errors"][0]["code"], body
    assert (tmp_path / "canary").read_bytes() == CANARY
