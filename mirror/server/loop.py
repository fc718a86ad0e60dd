"""The event loop's own health: a task that sleeps 10 ms over and over and measures how late it wakes
(every request waits as long as it does), into mirror_event_loop_stall_seconds; and the heap the
server starts with, frozen out of the garbage collector's full passes, whose pauses would otherwise
hold every thread for as long as they take to walk it (tens of ms per 100,000 objects)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator

from aiohttp import web

from mirror.server.metrics import Metrics
from mirror.server.state import METRICS

STEP = 0.010


async def probe(metrics: Metrics) -> None:
    worst = 0.0
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(STEP)
        late = max(0.0, time.perf_counter() - t0 - STEP)
        metrics.loop_stall.observe(late)
        if late > worst:
            worst = late
            metrics.loop_stall_max.set(worst)


async def watched(app: web.Application) -> AsyncIterator[None]:
    """The probe, for as long as the app runs (a cleanup_ctx step)."""
    task = asyncio.create_task(probe(app[METRICS]))
    try:
        yield
    finally:
        task.cancel()


async def freeze_heap(app: web.Application) -> None:
    """What start-up made (modules, the app, its caches) stays for good: out of the collector's full
    passes from now on (an on_startup step of `mirror serve`, after everything else)."""
    gc.collect()
    gc.freeze()
