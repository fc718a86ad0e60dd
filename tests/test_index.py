"""The local index: batched access and pull times reach SQLite in a worker thread, never on the loop."""

from __future__ import annotations

import threading
from pathlib import Path

from mirror.cache.index import Index


async def test_flush_writes_off_the_event_loop(tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index"))
    threads: list[threading.Thread] = []
    write = index._write

    def spy(pending: dict[str, float], pulled: dict[tuple[str, ...], float]) -> None:
        threads.append(threading.current_thread())
        write(pending, pulled)

    index._write = spy  # type: ignore[method-assign]
    try:
        index.touch_blob("sha256:" + "a" * 64)
        index.pulled("team/app", "sha256:" + "a" * 64)
        await index.flush()
        assert threads and threads[0] is not threading.main_thread()
        assert index.last_access("sha256:" + "a" * 64) is not None
    finally:
        index._write = write  # type: ignore[method-assign]
        index.close()
