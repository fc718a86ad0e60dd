"""A ledger for tests that drive storage without a server (imports, gc, eviction): its local
directory outside the storage root, so snapshots of the root see only what the code under test wrote."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from mirror.clock import SYSTEM, Clock
from mirror.ledger.ledger import Ledger
from mirror.storage import Storage


@asynccontextmanager
async def opened(storage: Storage, directory: Path, *, private: Callable[[str], bool] = lambda name: False,
                 clock: Clock = SYSTEM) -> AsyncIterator[Ledger]:
    """A ledger in `directory` (made unique per call), brought up to date with `storage`."""
    ledger = await Ledger(directory / f"ledger-{uuid.uuid4().hex[:8]}", storage, private, clock=clock).open()
    try:
        await ledger.prepare()
        yield ledger
    finally:
        await ledger.close()
