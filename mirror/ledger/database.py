"""The ledger's SQLite file, off the event loop: one thread owns the writing connection (every write is
one short transaction, in order), another the reading one (WAL: reads never wait for writes, and see
every write that was awaited before them)."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from mirror.ledger import schema

T = TypeVar("T")


class Database:
    def __init__(self, path: Path, kinds: schema.Kinds, bulk: bool = False) -> None:
        self.path = path
        self.kinds = kinds
        self.bulk = bulk  # a new file for a rebuild: tables without triggers (schema.connect)
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="ledger-write")
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="ledger-read")
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None

    async def open(self) -> Database:
        self._writer = await self._run(self._write_thread, schema.connect, self.path, self.kinds, writer=True,
                                       bulk=self.bulk)
        self._reader = await self._run(self._read_thread, schema.connect, self.path, self.kinds, writer=False)
        return self

    @staticmethod
    async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    async def write(self, fn: Callable[..., T], *args: Any, transaction: bool = True) -> T:
        """`fn(connection, *args)` in one write transaction (or its own, without), in the writing thread."""
        return await self._run(self._write_thread, self._write, fn, *args, transaction=transaction)

    def _write(self, fn: Callable[..., T], *args: Any, transaction: bool = True) -> T:
        conn = self._writer
        assert conn is not None, "ledger database not open"
        if not transaction:
            return fn(conn, *args)
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` on one consistent snapshot, in the reading thread."""
        return await self._run(self._read_thread, self._read, fn, *args)

    def _read(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._reader
        assert conn is not None, "ledger database not open"
        conn.execute("BEGIN")
        try:
            return fn(conn, *args)
        finally:
            conn.execute("COMMIT")

    async def close(self) -> None:
        for pool, conn in ((self._write_thread, self._writer), (self._read_thread, self._reader)):
            if conn is not None:
                await self._run(pool, conn.close)
            pool.shutdown(wait=True)
        self._writer = self._reader = None
