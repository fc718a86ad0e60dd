"""Whether local storage has room: the one place that says so.

A write refused for lack of space (ENOSPC, EDQUOT) makes storage full: that is logged as "storage
full" (once, not a traceback per request; at most every FULL_LOG_SECONDS however often it fills up
and drains), counted, and wakes whoever listens (eviction makes room at once). The next write that
succeeds makes it not full again. Clients see StorageFull as 507 STORAGE_FULL.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

log = logging.getLogger("mirror.storage")
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FULL_LOG_SECONDS = 600.0  # a disk at the brim fills and drains with every write: one line, not one each


class StorageFull(Exception):
    """No space left for a write: nothing of it is visible; clients get 507 STORAGE_FULL."""


def is_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in FULL_ERRNOS


class Space:
    def __init__(self) -> None:
        self.full = False
        self.refused = 0  # writes refused for lack of space, since start
        self._logged = -FULL_LOG_SECONDS  # monotonic time of the last "storage full" line
        self.on_refused: list[Callable[[], None]] = []  # every refused write (a counter)
        self.on_full: list[Callable[[], None]] = []  # the first refused write after room (eviction)

    def refuse(self, what: str, error: OSError) -> StorageFull:
        """The StorageFull to raise for a write of `what` that failed with `error`."""
        self.refused += 1
        for listener in self.on_refused:
            listener()
        if not self.full:
            self.full = True
            now = time.monotonic()
            if now - self._logged >= FULL_LOG_SECONDS:
                self._logged = now
                log.error("storage full: %s writing %s; writes answer 507 until space is freed (eviction runs "
                          "now; mirror_storage_full says when)", error.strerror or error, what)
            for listener in self.on_full:
                listener()
        return StorageFull(f"storage full: no space left to write {what}; free space or lower cache.max_size")

    def wrote(self) -> None:
        """A write succeeded: there is room (again)."""
        if self.full:
            self.full = False
            log.info("storage has room again: writes succeed")
