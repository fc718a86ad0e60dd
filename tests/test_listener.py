"""The TLS listener (server/listener.py): TLS clients are served as by aiohttp's own TLS site, client
certificates included; plain HTTP on the TLS port gets a 400 OCI error with a hint, as registry:2
answers one, where TLS alone closes the connection without a word; a client that sends nothing goes."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from mirror.server import listener
from tests.auth_keys import certificate, new_key
from tests.support.procs import free_port


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    ca = certificate("listener CA", new_key("ec"))
    server = certificate("127.0.0.1", new_key("ec"), issuer=ca, ca=False,
                         san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = certificate("a client", new_key("ec"), issuer=ca, ca=False, client=True)
    paths = {}
    for name, signer in (("ca", ca), ("server", server), ("client", client)):
        paths[f"{name}.crt"] = tmp_path / f"{name}.crt"
        paths[f"{name}.crt"].write_bytes(signer.pem)
        paths[f"{name}.key"] = tmp_path / f"{name}.key"
        paths[f"{name}.key"].write_bytes(signer.key_pem)
    return paths


async def hello(request: web.Request) -> web.Response:
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    return web.json_response({"secure": request.secure, "client": bool(peer)})


@pytest.fixture
async def port(certs: dict[str, Path]) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/v2/", hello)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs["server.crt"], certs["server.key"])
    context.load_verify_locations(cafile=certs["ca.crt"])
    context.verify_mode = ssl.CERT_OPTIONAL
    runner = web.AppRunner(app)
    await runner.setup()
    number = free_port()
    await listener.TlsSite(runner, "127.0.0.1", number, ssl_context=context).start()
    yield number
    await runner.cleanup()


async def test_tls_clients_are_served_with_their_certificates(port: int, certs: dict[str, Path]) -> None:
    trusting = ssl.create_default_context(cafile=str(certs["ca.crt"]))
    with_cert = ssl.create_default_context(cafile=str(certs["ca.crt"]))
    with_cert.load_cert_chain(certs["client.crt"], certs["client.key"])
    async with aiohttp.ClientSession() as session:
        for context, client in ((trusting, False), (with_cert, True)):
            for _ in range(2):  # keep-alive: the second request on the same TLS connection
                async with session.get(f"https://127.0.0.1:{port}/v2/", ssl=context) as r:
                    assert r.status == 200 and await r.json() == {"secure": True, "client": client}


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def test_plain_http_gets_a_400_that_says_what_to_do(port: int) -> None:
    answer = await raw(port, f"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: docker\r\n\r\n".encode())
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head
    assert b"Docker-Distribution-API-Version: registry/2.0" in head
    (error,) = json.loads(body)["errors"]
    assert error["code"] == "TLS_REQUIRED"
    assert error["message"].startswith("client sent an HTTP request to an HTTPS server")
    assert f"use https://127.0.0.1:{port}/" in error["message"]
    # a hostile Host header is not echoed
    answer = await raw(port, b"GET / HTTP/1.1\r\nHost: <script>\r\n\r\n")
    assert b"<script>" not in answer and b"TLS_REQUIRED" in answer


async def test_a_client_that_sends_nothing_is_let_go(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener, "FIRST_BYTES_SECONDS", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server, nothing said
    writer.close()
