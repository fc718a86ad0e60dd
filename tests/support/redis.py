"""Debian's redis-server, as the tests start it: on loopback, a port of its own, no persistence."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support.procs import Proc, free_port

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServer:
    """A redis-server that stop() and start() again keep on its port (the replicas' `redis.addr`)."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc = Proc("redis", [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(tmp), "--protected-mode", "yes"], tmp)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        self.proc.start()
        self.proc.wait_ready(self._answers, 10)
        return self

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        self.proc.stop()
