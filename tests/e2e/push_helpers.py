"""Helpers for tests/e2e/test_push_clients.py: the private+proxied mirror config, a PATCH cut
off mid-body on a raw socket, upload-status polling, an image that shares a layer with `small`,
and `mirror gc` run as its own process."""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.images import Layout, _Writer
from tests.support.procs import REPO_ROOT, Mirror, client_env, http, mirror_config, run

PRIVATE = ["team/**"]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_config(default_url: str, quay_url: str | None = None) -> dict[str, Any]:
    """The standard test config (Docker Hub-like upstream) plus private `team/**` and deletes."""
    config = mirror_config(default_url, quay_url)
    config["private"] = {"patterns": list(PRIVATE), "claim_on_push": False}
    config["storage"] = {"delete": {"enabled": True}}
    return config


# --- uploads on the wire ---------------------------------------------------------------------------------

def start_upload(mirror: Mirror, repo: str) -> str:
    r = http("POST", f"{mirror.url}/v2/{repo}/blobs/uploads/")
    assert r.status == 202, (r.status, r.body[:300])
    location = r.headers["Location"]
    assert location.startswith(f"/v2/{repo}/blobs/uploads/"), location
    return str(location)


def received(mirror: Mirror, location: str) -> int:
    """Bytes the upload holds, from `GET <location>`'s `Range: 0-<last>` ("0-0" is read as an
    empty upload: the tests never cut after exactly one byte)."""
    r = http("GET", mirror.url + location)
    assert r.status == 204, (r.status, r.body[:300])
    first, last = (int(x) for x in r.headers["Range"].split("-"))
    assert first == 0, r.headers["Range"]
    return 0 if last == 0 else last + 1


def wait_received(mirror: Mirror, location: str, expected: int, timeout: float = 10.0) -> int:
    """Poll the upload status until it reports `expected` bytes (the server may still be writing
    what arrived before the cut); return the last value seen."""
    deadline = time.monotonic() + timeout
    got = received(mirror, location)
    while got != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        got = received(mirror, location)
    return got


def cut_patch(port: int, location: str, data: bytes, sent: int, chunked: bool = False,
              chunk: int = 64 * 1024) -> None:
    """A PATCH announcing all of `data` whose connection is closed after `sent` body bytes.

    With `chunked`, the body goes as docker sends it (Transfer-Encoding: chunked, no
    Content-Range), and the cut falls inside a chunk; otherwise it has Content-Length and a
    Content-Range for the whole of `data`.
    """
    head = [f"PATCH {location} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/octet-stream"]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        # the encoded stream up to (and including) `sent` payload bytes, cut mid-chunk
        out, payload = bytearray(), 0
        for i in range(0, len(data), chunk):
            piece = data[i:i + chunk]
            take = min(len(piece), sent - payload)
            if take <= 0:
                break
            out += f"{len(piece):x}\r\n".encode() + piece[:take]
            payload += take
            if take == len(piece):
                out += b"\r\n"
        body = bytes(out)
    else:
        head += [f"Content-Length: {len(data)}", f"Content-Range: 0-{len(data) - 1}"]
        body = data[:sent]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        s.sendall(body)
        time.sleep(0.3)  # let the server read what was sent before the connection goes
    # closed here: no more body, no FIN-then-wait; the server sees the body end early


# --- images --------------------------------------------------------------------------------------------

def build_sharing(path: Path, base: Layout, name: str = "sharing", tag: str = "v1") -> Layout:
    """An image whose first layer is `base`'s first layer (same bytes, same digest) and whose
    second layer and config are its own."""
    w = _Writer(path)
    src = base.image()
    shared = w.put(base.read(src.layers[0].digest), src.layers[0].media_type)
    assert shared.digest == src.layers[0].digest
    own = w.layer({f"data/{name}.txt": f"{name} own layer\n".encode() * 32})
    image = w.image([(shared, src.diff_ids[0]), own], "amd64", name)
    return w.finish(name, tag, image.manifest, [image])


# --- mirror gc -----------------------------------------------------------------------------------------

def run_gc(mirror: Mirror, *extra: str, timeout: float = 60.0) -> dict[str, Any]:
    """`python -m mirror gc --config <the mirror's config> --grace 0 --json`, as a separate process
    next to the running server; returns the JSON result (the last JSON object on stdout)."""
    env = {k: v for k, v in client_env({"PYTHONPATH": str(REPO_ROOT)}).items() if not k.startswith("REGISTRY_")}
    r = run([sys.executable, "-m", "mirror", "gc", "--config", str(mirror.config_path), "--grace", "0", "--json",
             *extra], timeout=timeout, env=env, cwd=REPO_ROOT)
    for line in reversed(r.stdout.splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "swept" in doc:
            return doc
    raise AssertionError(f"no JSON result from mirror gc:\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
