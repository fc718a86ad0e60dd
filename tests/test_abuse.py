"""Cheap attacks get cheap answers: a manifest nested a thousand deep is 400 MANIFEST_INVALID (not a
500 from a RecursionError), malformed request lines are INFO lines without tracebacks and at most
ten a minute, and a body that drips (a byte every so often) is cut like one that stalls, so it
cannot hold an upload slot for ever."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.config import LogConfig
from mirror.registry import jsondoc
from mirror.server import logs

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
Factory = Callable[..., Any]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def nested(depth: int) -> bytes:
    """A manifest whose annotations nest `depth` arrays deep."""
    return (b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + b'", "annotations": {"x": '
            + b"[" * depth + b"]" * depth + b"}}")


@pytest.mark.parametrize("depth", [1000, 100_000, jsondoc.MAX_DEPTH])
async def test_a_deeply_nested_manifest_is_invalid(registry: Factory, depth: int) -> None:
    client = await registry(limits={"manifest_size": "1MiB"})
    r = await client.put("/v2/team/app/manifests/v1", data=nested(depth), headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400, await r.text()
    (error,) = (await r.json())["errors"]
    assert error["code"] == "MANIFEST_INVALID"
    assert ("deeper than" in error["message"]) == (depth > jsondoc.MAX_DEPTH - 2), error


def test_nesting_is_counted_outside_strings_only() -> None:
    assert not jsondoc.too_deep(b'{"a": "[[[[[[[[[[", "b": "\\"[[[["}', limit=2)
    assert jsondoc.too_deep(b'{"a": [[{"b": 1}]]}', limit=3)
    assert not jsondoc.too_deep(b'{"a": [[{"b": 1}]]}', limit=4)
    with pytest.raises(ValueError):
        jsondoc.loads(b"[" * 5000 + b"]" * 5000)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The server's logging as `mirror serve` sets it up, into a string."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    logs.setup(LogConfig(), out)
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_malformed_requests_are_info_lines_without_tracebacks_ten_a_minute(
        registry: Factory, log_stream: io.StringIO) -> None:
    client = await registry()
    host, port = client.server.host, client.server.port
    for i in range(30):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /v2/ HTTP/1.1\r\n" if i % 2 else b"\x16\x03\x01 not http at all\r\n\r\n")
        writer.write(b"Host: x\r\nBad Header Without Colon\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.0 400"), answer[:100]
        writer.close()
    await asyncio.sleep(0.1)
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    malformed = [e for e in lines if "malformed request" in e.get("msg", "")]
    assert 1 <= len(malformed) <= 10, malformed
    assert all(e["level"] == "info" and "error" not in e for e in malformed)
    assert not [e for e in lines if e["level"] in ("error", "critical") or "Traceback" in json.dumps(e)]
    assert (await client.get("/v2/")).status == 200


async def drip(client: TestClient, request_line: str, headers: str, every: float, seconds: float) -> float:
    """Send a request whose body comes a byte at a time; how long until the server cuts it."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(f"{request_line}\r\nHost: x\r\n{headers}Content-Length: 100000\r\n\r\n".encode())
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            writer.write(b"z")
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(1), every)  # closed (b""), or answered: cut either way
            except TimeoutError:
                continue
            return time.monotonic() - start
    except ConnectionError:
        return time.monotonic() - start
    finally:
        writer.close()
    return time.monotonic() - start


async def test_a_dripping_body_is_cut_and_frees_its_upload_slot(registry: Factory) -> None:
    client = await registry(limits={"uploads_per_client": 1, "body_timeout": "500ms", "body_min_bytes": "1KiB"})
    location = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    took = await drip(client, f"PATCH {location} HTTP/1.1", "", every=0.05, seconds=10)
    assert took < 2, f"a drip held the upload for {took:.1f}s"
    r = await client.get(location)
    assert r.status == 204 and int(r.headers["Range"].split("-")[1]) >= 1  # what arrived is kept
    r = await client.patch(location, data=io.BytesIO(b"more"))  # the slot is free again
    assert r.status == 202
    took = await drip(client, "PUT /v2/team/app/manifests/v1 HTTP/1.1", f"Content-Type: {OCI_MANIFEST}\r\n",
                      every=0.05, seconds=10)
    assert took < 2, f"a manifest drip held its connection for {took:.1f}s"


async def test_a_body_above_the_minimum_rate_is_not_cut(registry: Factory) -> None:
    client = await registry(limits={"body_timeout": "250ms", "body_min_bytes": 512})
    data = b"y" * 6000

    async def slow() -> Any:
        for i in range(0, len(data), 500):  # 10 KB a second, over 0.6 s: two windows and more
            yield data[i:i + 500]
            await asyncio.sleep(0.05)

    r = await client.post(f"/v2/team/app/blobs/uploads/?digest={sha(data)}", data=slow())
    assert r.status == 201, await r.text()
