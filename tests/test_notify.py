"""Notifications in-process: which requests become which events, endpoint filters, config errors.
(tests/e2e/test_notifications.py covers real clients, order, outages and restarts.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.config import ConfigError, EndpointConfig, parse
from mirror.server.metrics import Metrics
from mirror.server.notify import Sink

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def receivers() -> AsyncIterator[dict[str, list[dict[str, Any]]]]:
    """Two endpoints on one receiver app: /all and /manifests."""
    got: dict[str, list[dict[str, Any]]] = {"all": [], "manifests": []}

    async def handle(request: web.Request) -> web.Response:
        got[request.match_info["which"]].extend(json.loads(await request.read())["events"])
        return web.Response()

    app = web.Application()
    app.router.add_post("/{which}", handle)
    server = TestServer(app)
    await server.start_server()
    got["_url"] = [{"url": str(server.make_url("/"))}]
    yield got
    await server.close()


async def arrive(events: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while len(events) < count:
        assert time.monotonic() < deadline, f"{len(events)} of {count} events arrived: {events}"
        await asyncio.sleep(0.05)
    return events


async def test_push_mount_and_delete_events_and_filters(registry: Callable[..., Any], tmp_path: Path,
                                                        receivers: dict[str, list[dict[str, Any]]]) -> None:
    base = receivers["_url"][0]["url"]
    storage = {"filesystem": {"rootdirectory": str(tmp_path / "data")}, "delete": {"enabled": True}}
    client = await registry(storage=storage, notifications={"endpoints": [
        {"name": "all", "url": f"{base}all"},
        {"name": "manifests", "url": f"{base}manifests", "ignoredmediatypes": ["application/octet-stream"],
         "ignore": {"actions": ["delete"]}},
        {"name": "off", "url": f"{base}off", "disabled": True}]})
    config = b'{"architecture":"amd64","os":"linux"}'
    assert (await client.post(f"/v2/app/blobs/uploads/?digest={sha(config)}", data=config)).status == 201
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": []}).encode()
    r = await client.put("/v2/app/manifests/v1", data=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201
    r = await client.post(f"/v2/other/blobs/uploads/?mount={sha(config)}&from=app")
    assert r.status == 201
    assert (await client.delete("/v2/app/manifests/v1")).status == 202  # the tag
    assert (await client.delete(f"/v2/app/manifests/{sha(manifest)}")).status == 202
    assert (await client.delete(f"/v2/app/blobs/{sha(config)}")).status == 202
    assert (await client.get("/v2/app/manifests/v1")).status == 404  # failures are no events

    events = await arrive(receivers["all"], 6)
    assert [(e["action"], e["target"]["digest"], e["target"].get("tag")) for e in events] == [
        ("push", sha(config), None), ("push", sha(manifest), "v1"), ("mount", sha(config), None),
        ("delete", "", "v1"), ("delete", sha(manifest), None), ("delete", sha(config), None)]
    assert events[0]["target"]["size"] == len(config) and events[1]["target"]["size"] == len(manifest)
    assert events[1]["target"]["mediaType"] == OCI_MANIFEST and events[2]["target"]["fromRepository"] == "app"
    assert events[2]["target"]["repository"] == "other"
    only = await arrive(receivers["manifests"], 1)
    await asyncio.sleep(0.3)
    assert [(e["action"], e["target"]["digest"]) for e in only] == [("push", sha(manifest))]
    assert "off" not in receivers

    for _ in range(100):  # the sender counts a batch once its answer is back, just after the receiver has it
        metrics = (await (await client.get("/metrics")).read()).decode()
        if 'mirror_notifications_sent_total{endpoint="all"} 6.0' in metrics:
            break
        await asyncio.sleep(0.05)
    assert 'mirror_notifications_sent_total{endpoint="all"} 6.0' in metrics
    assert 'mirror_notifications_queued{endpoint="manifests"} 0.0' in metrics


@pytest.mark.parametrize(("endpoint", "message"), [
    ({"url": "http://x"}, r"endpoints\[0\]\.name"),
    ({"name": "a"}, r"endpoints\[0\]\.url"),
    ({"name": "a", "url": "ftp://x"}, r"endpoints\[0\]\.url"),
    ({"name": "a", "url": "http://x", "ignore": {"actions": ["wave"]}}, r"endpoints\[0\]\.ignore\.actions"),
    ({"name": "a", "url": "http://x", "threshold": 0}, r"endpoints\[0\]\.threshold"),
    ({"name": "a", "url": "http://x", "colour": "red"}, r"endpoints\[0\]\.colour: unknown"),
])
def test_endpoint_config_errors_name_the_key(endpoint: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse({"version": 0.1, "notifications": {"endpoints": [endpoint]}})


def test_registry_2_endpoint_config_is_read() -> None:
    config = parse({"version": 0.1, "notifications": {"events": {"includereferences": True}, "endpoints": [
        {"name": "alistener", "disabled": False, "url": "https://my.listener.com/event",
         "headers": {"Authorization": ["Bearer <token>"]}, "timeout": "1s", "threshold": 10, "backoff": "1s",
         "ignoredmediatypes": ["application/octet-stream"],
         "ignore": {"mediatypes": ["application/x"], "actions": ["pull"]}}]}})
    e = config.notifications.endpoints[0]
    assert (e.name, e.url, e.timeout, e.threshold, e.backoff) == ("alistener", "https://my.listener.com/event",
                                                                  1.0, 10, 1.0)
    assert e.ignored_mediatypes == ("application/octet-stream", "application/x") and e.ignored_actions == ("pull",)
    assert "Bearer" not in repr(e)


def test_an_overflow_while_sending_keeps_the_unsent_events(tmp_path: Path) -> None:
    """The sender peeks a batch; before its 2xx comes back, an overflow drops the oldest events (that
    very batch). Removing what was delivered must not take the newer, unsent events with it."""
    sink = Sink(EndpointConfig(name="e", url="http://127.0.0.1:9/", queue_size=3), tmp_path, Metrics())
    try:
        sink.store([{"id": str(i)} for i in range(3)])
        batch = sink.peek()
        assert [e["id"] for e in batch] == ["0", "1", "2"]
        assert sink.store([{"id": str(i)} for i in range(3, 5)]) == 2  # "0" and "1" dropped
        sink.remove(batch)
        assert [e["id"] for e in sink.peek()] == ["3", "4"]
    finally:
        sink.queue.cache.close()
