"""Reading what a command wrote to a pseudo-terminal (progress bars appear only on a terminal)."""

from __future__ import annotations

import os


def drain(fd: int) -> bytes:
    """Everything written to a pty until its other side closes."""
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)
