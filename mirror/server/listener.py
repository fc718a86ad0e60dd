"""The listener and the run loop of `mirror serve`: aiohttp's `run_app`, whose TLS site answers a plain
HTTP request with a 400 and a hint, as registry:2 answers one (TLS alone would close the connection
without a word, and docker would say only `EOF`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from aiohttp import web

from mirror.errors import RegistryError

TLS_HANDSHAKE = 0x16  # the first byte of every TLS connection: a handshake record
FIRST_BYTES_SECONDS = 60.0  # as asyncio's TLS handshake timeout: a client that sends nothing goes
_HOST = re.compile(rb"^host:[ \t]*([A-Za-z0-9.:\[\]-]{1,255})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


def plain_http_answer(request: bytes) -> bytes:
    """What a plain HTTP request to the TLS port gets: 400 and an OCI error saying what to do, as
    registry:2 answers 400 `Client sent an HTTP request to an HTTPS server.` (an empty reply leaves
    docker saying only `EOF`)."""
    found = _HOST.search(request[:8192])
    where = f"https://{found.group(1).decode()}/" if found else "https://"
    error = RegistryError("TLS_REQUIRED", f"client sent an HTTP request to an HTTPS server: this port speaks HTTPS "
                                          f"only; use {where} (docker: the registry's ca.crt, and client.cert and "
                                          f"client.key if it asks for one, in /etc/docker/certs.d/<host:port>/)")
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {error.status} Bad Request\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nDocker-Distribution-API-Version: registry/2.0\r\n"
            f"Connection: close\r\n\r\n")
    return head.encode() + body


class _TlsOrHint(asyncio.Protocol):
    """One connection to the TLS port, until its first bytes say what it is: a TLS handshake goes on
    to asyncio's own TLS protocol (the one `create_server(ssl=...)` uses) with those bytes; anything
    else is plain HTTP and gets `plain_http_answer`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, app: Callable[[], asyncio.BaseProtocol],
                 context: ssl.SSLContext) -> None:
        self.loop, self.app, self.context = loop, app, context
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.timer = self.loop.call_later(FIRST_BYTES_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.timer is not None:
            self.timer.cancel()
        if data[0] != TLS_HANDSHAKE:
            self.transport.write(plain_http_answer(data))
            self.transport.close()
            return
        handshake: asyncio.Future[None] = self.loop.create_future()  # a failed one is the client's: not logged
        handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
        tls = sslproto.SSLProtocol(self.loop, self.app(), self.context, handshake, server_side=True)
        self.transport.set_protocol(tls)
        tls.connection_made(self.transport)
        view = memoryview(data)
        while view:  # what was read already, handed over as if the TLS protocol had read it
            buffer = tls.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            tls.buffer_updated(n)
            view = view[n:]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class TlsSite(web.TCPSite):
    """aiohttp's TCP site for `http.tls`, whose connections start in `_TlsOrHint`."""

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server, context = self._runner.server, self._ssl_context
        assert server is not None and context is not None
        self._server = await loop.create_server(lambda: _TlsOrHint(loop, server, context), self._host, self._port,
                                                backlog=self._backlog, reuse_address=self._reuse_address,
                                                reuse_port=self._reuse_port)


def run_app(app: web.Application, host: str | None, port: int, ssl_context: ssl.SSLContext | None,
            listening: Callable[[], None], **runner: Any) -> None:
    """`web.run_app(app, host=, port=, ssl_context=)` with `TlsSite` for TLS: the same runner, signals
    (SIGTERM and SIGINT end it gracefully within `shutdown_timeout`) and shutdown order; `listening`
    once the port is bound."""
    loop = asyncio.new_event_loop()

    async def main() -> None:
        app_runner = web.AppRunner(app, handle_signals=True, **runner)
        await app_runner.setup()
        try:
            site = TlsSite(app_runner, host, port, ssl_context=ssl_context) if ssl_context else \
                web.TCPSite(app_runner, host, port)
            await site.start()
            listening()
            await asyncio.Event().wait()  # until a signal ends the loop
        finally:
            await app_runner.cleanup()

    task = loop.create_task(main())
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not task.done():  # the app's cleanup first, while what it waits for still runs
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
        finally:
            rest = asyncio.all_tasks(loop)
            for other in rest:
                other.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            asyncio.set_event_loop(None)
