"""Time, injectable: the caches and the upstream client ask a Clock, so tests move time instead of
sleeping through TTLs and back-offs."""

from __future__ import annotations

import time


class Clock:
    """The system's wall-clock and monotonic time."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM = Clock()
