"""A notification endpoint for the tests: a real aiohttp app on loopback, in a thread of its own,
recording every envelope it accepts; it can be stopped and started again on the same port, and
told to fail."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from aiohttp import web

from tests.support.procs import free_port

ENVELOPE = "application/vnd.docker.distribution.events.v1+json"


class Receiver:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.events: list[dict[str, Any]] = []
        self.content_types: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.status = 200  # what it answers; anything else is a failure for the sender
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    async def _events(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.status // 100 == 2:
            with self._lock:
                self.events.extend(json.loads(body)["events"])
                self.content_types.append(request.content_type)
                self.headers.append(dict(request.headers))
        return web.Response(status=self.status)

    def start(self) -> Receiver:
        ready = threading.Event()

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/events", self._events)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert ready.wait(10), "receiver did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def wait(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.snapshot()) < count:
            assert time.monotonic() < deadline, f"{len(self.snapshot())} of {count} events arrived"
            time.sleep(0.05)
        return self.snapshot()
