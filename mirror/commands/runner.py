"""What every operator command shares: the config, logs on stderr (stdout is the result), storage
without the hot tier (it belongs to the running server), exit codes, progress bars for people at a
terminal, and sizes for people."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from tqdm import tqdm

from mirror.config import Config, ConfigError, load
from mirror.ledger.ledger import Ledger, for_config
from mirror.registry.namespace import configured_private
from mirror.server import logs
from mirror.storage import Storage, StorageUnavailable, migrate, open_storage, without_hot_tier

T = TypeVar("T")
FAILED = 1  # the command ran and failed (the message says why)
USAGE = 2  # it could not run: bad arguments, configuration or unusable storage


class CommandError(Exception):
    """A command ends with `message` on stderr (and as JSON with --json) and exit `code`."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


def load_config(path: str | None) -> Config:
    try:
        return load(path, os.environ)
    except ConfigError as e:
        raise CommandError(f"configuration error: {e}", USAGE) from None


def fail(error: CommandError, as_json: bool = False) -> int:
    if as_json:
        print(json.dumps({"ok": False, "error": str(error)}))
    print(f"mirror: {error}", file=sys.stderr)
    return error.code


@asynccontextmanager
async def opened(config: Config) -> AsyncIterator[Storage]:
    """The configured storage, straight (no hot tier: a second process filling and evicting the
    server's tier directory would fight it, and a bulk read must not evict what is hot), in
    registry:2's layout (mirror's old one is moved over first, as `serve` does)."""
    storage = open_storage(without_hot_tier(config))
    try:
        try:
            await storage.check()
            await migrate.run(storage, configured_private(config.private, bool(config.upstreams)))
        except StorageUnavailable as e:
            raise CommandError(f"storage error: {e}", USAGE) from None
        yield storage
    finally:
        await storage.close()


def run(config: Config, job: Callable[[Storage], Awaitable[T]]) -> T:
    """Run `job` on the configured storage, logging warnings to stderr: a storage failure is a
    message and an exit code, not a traceback."""
    logs.setup(config.log, sys.stderr, "warning")

    async def main() -> T:
        async with opened(config) as storage:
            return await job(storage)

    try:
        return asyncio.run(main())
    except StorageUnavailable as e:
        raise CommandError(f"storage error: {e}") from None
    except OSError as e:
        raise CommandError(f"{e.filename or 'I/O'}: {e.strerror or e}") from None
    except sqlite3.Error as e:
        raise CommandError(f"cache.index {config.cache.index_dir(config.storage)}: {e}") from None


def run_with_ledger(config: Config, job: Callable[[Ledger], Awaitable[T]], show: bool = False) -> T:
    """`run`, with the ledger of this machine brought up to date first (rebuilt from storage if it has
    none yet, else the journal caught up): what the storage commands read instead of walking."""

    async def with_ledger(storage: Storage) -> T:
        async with opened_ledger(config, storage, show) as ledger:
            return await job(ledger)

    return run(config, with_ledger)


@asynccontextmanager
async def opened_ledger(config: Config, storage: Storage, show: bool = False) -> AsyncIterator[Ledger]:
    ledger = await for_config(config, storage).open()
    try:
        what = "reading storage into the ledger" if ledger.needs_rebuild else "catching up with the journal"
        with bar(show, what) as progress:
            await ledger.prepare(progress)
        yield ledger
    finally:
        await ledger.close()


def show_progress(as_json: bool) -> bool:
    """Bars for people at a terminal; never with --json (scripts read stdout, and stderr stays clean)."""
    return not as_json and sys.stderr.isatty()


def bar(show: bool, desc: str, unit: str = " objects", total: int | None = None, **kwargs: Any) -> tqdm[Any]:
    return tqdm(desc=desc, unit=unit, total=total, disable=not show, file=sys.stderr, leave=False, **kwargs)


def byte_bar(show: bool, desc: str, total: int) -> tqdm[Any]:
    return bar(show, desc, "B", total, unit_scale=True, unit_divisor=1024)


def human_size(n: float) -> str:
    """1536 -> `1.5 KiB`: what people read in tables and summaries."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def mb_per_s(n: int, seconds: float) -> str:
    return f"{n / 1e6 / seconds:.0f} MB/s" if seconds > 0 else "-"
