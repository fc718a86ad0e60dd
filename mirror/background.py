"""Background jobs: loops owned by the object they serve (eviction, upload purging, index flushes, ...),
started and stopped together by whoever owns that object."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("mirror")


async def every(seconds: float, job: Callable[[], Awaitable[None]], first: bool = True) -> None:
    """Run `job` now (if `first`) and every `seconds`; a failure is logged and the next run comes."""
    if not first:
        await asyncio.sleep(seconds)
    while True:
        try:
            await job()
        except Exception:
            log.exception("background job %s failed", getattr(job, "__qualname__", job))
        await asyncio.sleep(seconds)


class Jobs:
    """Tasks that run until `stop()` cancels them."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, *loops: Coroutine[Any, Any, None]) -> None:
        self._tasks += [asyncio.create_task(loop) for loop in loops]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
