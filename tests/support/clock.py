"""A clock tests move forward instead of sleeping through TTLs and back-offs."""

from __future__ import annotations

import time

from mirror.clock import Clock


class ManualClock(Clock):
    """System time plus whatever the test `advance`d: time still flows (access times stay
    distinct), and a TTL passes at once."""

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset
