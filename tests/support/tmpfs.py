"""A small tmpfs a test mounts (as root) to run storage out of space for real, then grows with
`mount -o remount,size=...` while everything on it stays open. Only what a test mounted is
unmounted, and a crashed test's mounts are unmounted at exit."""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
from pathlib import Path

_MOUNTED: set[Path] = set()


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class Tmpfs:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def mount(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path))
        _MOUNTED.add(self.path)
        return self

    def resize(self, size: int) -> None:
        _run("mount", "-o", f"remount,size={size}", str(self.path))
        self.size = size

    @property
    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, name: str = "filler", leave: int = 0) -> Path:
        """A file taking all free space but `leave` bytes (a multiple of the 4 KiB page)."""
        path = self.path / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            block = b"\0" * (64 << 10)
            size = os.fstat(fd).st_size
            while True:
                try:
                    size += os.write(fd, block if self.free >= len(block) else block[:4096])
                except OSError:
                    break
            os.ftruncate(fd, max(0, size - leave))
        finally:
            os.close(fd)
        return path

    def unmount(self) -> None:
        if self.path in _MOUNTED:
            # lazy: a server thread may still hold a file open; the mount goes once it lets go
            _run("umount", "-l", str(self.path))
            _MOUNTED.discard(self.path)


@atexit.register
def _unmount_leftovers() -> None:
    for path in list(_MOUNTED):
        with contextlib.suppress(Exception):
            _run("umount", "-l", str(path))
