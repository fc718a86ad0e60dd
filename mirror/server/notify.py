"""Notifications as registry:2 sends them (`notifications.endpoints`): an event for each manifest and
blob pushed, pulled, mounted or deleted, posted to every endpoint in registry:2's envelope. Our
extension: action `fetch`, a cache fill from upstream (the pull that caused it follows it).

Delivery never slows a request: the request only appends its event to a list in memory. Every
FLUSH_SECONDS a task moves them to a queue on disk per endpoint (diskcache), and one sender per
endpoint posts them in order, in batches, keeping each until the endpoint answered 2xx; while it
fails, the sender retries, after `threshold` failures in a row every `backoff`. Delivery is at
least once: an event is resent if its 2xx was lost, and events carry unique ids. A restart loses
nothing (shutdown writes what is in memory); a crash loses at most the last FLUSH_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import diskcache
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api.endpoints import area
from mirror.config import Config, EndpointConfig
from mirror.registry import mediatypes
from mirror.server.logs import CACHE, PUSHED_BYTES, REPOSITORY, REQUEST_ID, SERVED_BYTES, USER
from mirror.server.metrics import Metrics

log = logging.getLogger("mirror.notify")
ENVELOPE = "application/vnd.docker.distribution.events.v1+json"
FLUSH_SECONDS = 0.1
BATCH = 32  # events per POST
RETRY_SECONDS = 0.2  # between failures until `threshold`, then the endpoint's `backoff`


class Sink:
    """One endpoint: its filters, its queue on disk, its sender."""

    def __init__(self, config: EndpointConfig, directory: Path, metrics: Metrics) -> None:
        self.config = config
        self.queue = diskcache.Deque(directory=str(directory / config.name))
        self.metrics = metrics
        self.wake = asyncio.Event()
        self.headers = {name: ", ".join(values) for name, values in config.headers.items()}
        self.headers["Content-Type"] = ENVELOPE
        metrics.notifications_queued.labels(config.name).set_function(lambda: len(self.queue))
        for counter in (metrics.notifications_sent, metrics.notifications_failed, metrics.notifications_dropped):
            counter.labels(config.name)  # every series exists from the first scrape

    def wants(self, event: dict[str, Any]) -> bool:
        return (event["action"] not in self.config.ignored_actions
                and event["target"].get("mediaType") not in self.config.ignored_mediatypes)

    def store(self, events: list[dict[str, Any]]) -> int:
        """Append to the queue on disk, dropping the oldest past queue_size (in a thread)."""
        dropped = 0
        with self.queue.transact():
            for event in events:
                self.queue.append(event)
            while len(self.queue) > self.config.queue_size:
                self.queue.popleft()
                dropped += 1
        return dropped

    def peek(self) -> list[dict[str, Any]]:
        batch = []
        for event in self.queue:
            batch.append(event)
            if len(batch) == BATCH:
                break
        return batch

    def remove(self, sent: list[dict[str, Any]]) -> None:
        """Drop the events just delivered from the head of the queue. By id: an overflow may have dropped
        some of them meanwhile, and what follows them is not sent yet."""
        ids = {event["id"] for event in sent}
        with self.queue.transact():
            while self.queue and self.queue[0]["id"] in ids:
                self.queue.popleft()

    async def send_forever(self, session: aiohttp.ClientSession) -> None:
        failures = 0
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        name = self.config.name
        while True:
            batch = await asyncio.to_thread(self.peek)
            if not batch:
                self.wake.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # arrives as the event is set, and shutdown would wait on this loop forever
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await self.wake.wait()
                continue
            try:
                body = json.dumps({"events": batch}).encode()
                async with session.post(self.config.url, data=body, headers=self.headers, timeout=timeout) as resp:
                    ok = 200 <= resp.status < 300
                    why = f"answered {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                ok, why = False, f"{type(e).__name__}: {e}"
            if ok:
                await asyncio.to_thread(self.remove, batch)
                self.metrics.notifications_sent.labels(name).inc(len(batch))
                failures = 0
                continue
            failures += 1
            self.metrics.notifications_failed.labels(name).inc()
            if failures == 1 or failures == self.config.threshold:
                log.warning("notification endpoint %s: %s; %d events wait", name, why, len(self.queue))
            await asyncio.sleep(self.config.backoff if failures >= self.config.threshold else RETRY_SECONDS)


class Notifier:
    """Events from requests to every endpoint that wants them."""

    def __init__(self, config: Config, directory: Path, metrics: Metrics) -> None:
        self.sinks = [Sink(e, directory, metrics) for e in config.notifications.endpoints if not e.disabled]
        self.metrics = metrics
        host = config.http.host or "0.0.0.0"
        self.source = {"addr": f"{host}:{config.http.port}", "instanceID": str(uuid.uuid4())}
        self.pending: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, session: aiohttp.ClientSession) -> None:
        self._tasks = [asyncio.create_task(self._flush_forever())]
        self._tasks += [asyncio.create_task(sink.send_forever(session)) for sink in self.sinks]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._store, self._take())  # what requests left in memory is on disk before we go
        for sink in self.sinks:
            sink.queue.cache.close()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            if self.pending:
                await asyncio.to_thread(self._store, self._take())

    def _take(self) -> list[dict[str, Any]]:
        """The events requests added, swapped out on the loop (the thread only writes them)."""
        events, self.pending = self.pending, []
        return events

    def _store(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        for sink in self.sinks:
            wanted = [e for e in events if sink.wants(e)]
            if wanted:
                dropped = sink.store(wanted)
                if dropped:
                    self.metrics.notifications_dropped.labels(sink.config.name).inc(dropped)
                sink.wake.set()

    def observe(self, request: web.Request, response: web.StreamResponse, area: str) -> None:
        """The events a finished request means, if any (cheap: runs on every request)."""
        method = request.method
        name = request.get(REPOSITORY)
        if name is None or method == "HEAD":
            return
        info = request.match_info
        if area == "manifests":
            reference = info.get("reference", "")
            digest = response.headers.get("Docker-Content-Digest") or (reference if ":" in reference else "")
            tag = reference if ":" not in reference else None
            if method == "GET":
                target = self._target(request, name, "manifests", digest, response.headers.get("Content-Type"),
                                      request.get(SERVED_BYTES), tag)
                self._pull(request, target)
            elif method == "PUT":
                media_type = request.headers.get("Content-Type") or mediatypes.OCI_MANIFEST
                target = self._target(request, name, "manifests", digest, media_type.split(";")[0],
                                      request.get(PUSHED_BYTES), tag)
                self._add(request, "push", target)
            elif method == "DELETE":
                self._add(request, "delete", self._target(request, name, "manifests", digest, None, None, tag))
        elif area == "blobs":
            digest = info.get("digest", "")
            if method == "GET":
                self._pull(request, self._target(request, name, "blobs", digest, "application/octet-stream",
                                                 request.get(SERVED_BYTES), None))
            elif method == "DELETE":
                self._add(request, "delete", self._target(request, name, "blobs", digest, None, None, None))
        elif area == "uploads" and response.status == 201:
            digest = response.headers.get("Docker-Content-Digest", "")
            target = self._target(request, name, "blobs", digest, "application/octet-stream",
                                  request.get(PUSHED_BYTES), None)
            if "mount" in request.query:
                target["fromRepository"] = request.query.get("from", "")
                self._add(request, "mount", target)
            else:
                self._add(request, "push", target)

    def _pull(self, request: web.Request, target: dict[str, Any]) -> None:
        if request.get(CACHE) == "miss":  # this request filled the cache from upstream
            self._add(request, "fetch", target)
        self._add(request, "pull", target)

    def _target(self, request: web.Request, name: str, kind: str, digest: str, media_type: str | None,
                size: int | None, tag: str | None) -> dict[str, Any]:
        target: dict[str, Any] = {"repository": name, "digest": digest,
                                  "url": f"{request.scheme}://{request.host}/v2/{name}/{kind}/{digest}"}
        if media_type:
            target["mediaType"] = media_type
        if size is not None:
            target["size"] = target["length"] = size
        if tag:
            target["tag"] = tag
        return target

    def _add(self, request: web.Request, action: str, target: dict[str, Any]) -> None:
        event = {
            "id": str(uuid.uuid4()),
            "timestamp": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            "action": action,
            "target": target,
            "request": {"id": request.get(REQUEST_ID, ""), "addr": request.remote or "", "host": request.host,
                        "method": request.method, "useragent": request.headers.get("User-Agent", "")},
            "actor": {"name": request.get(USER, "")},
            "source": self.source,
        }
        self.pending.append(event)


NOTIFIER = web.AppKey("notifier", Notifier)


@web.middleware
async def events(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Each successful registry request becomes its events (after the handler: a warm blob's bytes
    follow by sendfile)."""
    response = await handler(request)
    if 200 <= response.status < 300:
        kind = area(request)
        if kind in ("manifests", "blobs", "uploads"):
            request.app[NOTIFIER].observe(request, response, kind)
    return response

