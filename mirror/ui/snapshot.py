"""The web UI's catalog: every repository (private and cached) with its upstream, size, tag count
and last pull, held in memory so a page over thousands of repositories is a list filter and a
render, never a walk of storage.

Built at start from one inventory walk (storage/inventory.py), rebuilt in the background (every
REFRESH_SECONDS, or ten times as long as the last build took on a large store), and patched between
rebuilds: whatever changes a repository's manifests, tags or blob links (a pull through the cache,
a push, a delete, eviction; Registry.watch) marks it dirty and only that repository is read again,
within a second. Last pulls
are recorded per manifest GET in a dict (and batched into the diskcache index by its flush, so
they survive a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mirror.cache.index import Index
from mirror.storage import Storage, inventory, layout

log = logging.getLogger("mirror.ui")

REFRESH_SECONDS = 45.0  # filesystem; a bucket is walked ten times less often (a LIST per 1,000 keys)
RETRY_SECONDS = 10.0  # after a failed build (storage unavailable)
DIRTY_DELAY = 0.5  # a push touches several keys: read the repository once it settled


@dataclass(frozen=True, slots=True)
class Repository:
    name: str
    private: bool
    upstream: str | None  # the configured upstream a cached repository comes from
    size: int  # bytes of the manifests and blobs it links (shared ones count in each repository)
    manifests: int
    tags: int

    @property
    def kind(self) -> str:
        return "private" if self.private else "cached"


class Catalog:
    """The snapshot and its upkeep. Read by request handlers on the loop; written only on the loop."""

    def __init__(self, storage: Storage, index: Index, is_private: Callable[[inventory.Contents], bool],
                 upstream_of: Callable[[str], str | None]) -> None:
        self.storage = storage
        self.index = index
        self.is_private = is_private
        self.upstream_of = upstream_of
        self.refresh_seconds = REFRESH_SECONDS * (1 if storage.name == "filesystem" else 10)
        self.repositories: dict[str, Repository] = {}
        self.names: list[str] = []  # sorted
        self.pulled: dict[tuple[str, ...], float] = {}  # (repository,) / (repository, digest) -> time
        self.blob_sizes: dict[str, int] = {}
        self.ready = asyncio.Event()  # the first build ended (or failed: then `error` says why)
        self.error: str | None = None
        self.built_at = 0.0
        self.build_seconds = 0.0
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._by_size: list[str] | None = None  # names largest first, until the snapshot changes
        self._pulls_loaded = False

    # --- reads (request handlers) ---------------------------------------------------------------

    def last_pulled(self, repository: str, digest: str | None = None) -> float | None:
        return self.pulled.get((repository,) if digest is None else (repository, digest))

    def ordered(self, sort: str) -> list[str]:
        """Every name by `name`, `size` (largest first, kept until the snapshot changes) or
        `pulled` (most recent first, sorted per call: pulls move it all the time)."""
        if sort == "size":
            if self._by_size is None:
                self._by_size = sorted(self.names, key=lambda n: (-self.repositories[n].size, n))
            return self._by_size
        if sort == "pulled":
            return sorted(self.names, key=lambda n: (-(self.pulled.get((n,)) or 0.0), n))
        return self.names

    # --- writes (the API's middleware, the registry's stores) -----------------------------------

    def pull(self, repository: str, digest: str) -> None:
        """A manifest GET was answered: two dict stores here, two in the index's pending batch."""
        now = time.time()
        self.pulled[(repository,)] = now
        self.pulled[(repository, digest)] = now
        self.index.pulled(repository, digest, now)
        if repository not in self.repositories:  # stored by another process (an import, another replica)
            self.changed(repository)

    def changed(self, repository: str) -> None:
        """`repository` gained or lost a manifest, tag or blob link: read it again soon."""
        self._dirty.add(repository)
        self._wake.set()

    # --- building -------------------------------------------------------------------------------

    async def rebuild(self) -> None:
        """One walk of storage into a new snapshot (the old one serves until it is ready)."""
        start = time.perf_counter()
        found = await inventory.take(self.storage)
        sizes = {digest: st.size for digest, st in found.blobs.items()}
        repositories: dict[str, Repository] = {}
        for name, contents in found.repositories.items():
            repo = self._row(contents, sizes)
            if repo is not None:
                repositories[name] = repo
        if not self._pulls_loaded:  # the index is this process's: after the first read, memory is newer
            pulled = await asyncio.to_thread(self.index.pulled_times)
            self._pulls_loaded = True
            for key, at in pulled.items():
                if at > self.pulled.get(key, 0.0):
                    self.pulled[key] = at
        self.blob_sizes = sizes
        self.repositories = repositories
        self.names = sorted(repositories)
        self._by_size = None
        self.built_at = time.time()
        self.build_seconds = time.perf_counter() - start
        self.error = None
        self.ready.set()
        log.info("ui catalog: %d repositories in %.2fs", len(repositories), self.build_seconds)

    def _row(self, contents: inventory.Contents, sizes: dict[str, int]) -> Repository | None:
        if contents.empty:
            return None  # uploads only, or emptied by deletes
        private = self.is_private(contents)
        return Repository(contents.name, private, None if private else self.upstream_of(contents.name),
                          sum(sizes.get(d, 0) for d in contents.linked), len(contents.manifests), len(contents.tags))

    async def refresh(self, name: str) -> None:
        """Read one repository again (after a push or delete)."""
        contents = await inventory.repository(self.storage, name)
        for digest in contents.linked - self.blob_sizes.keys():
            st = await self.storage.stat(layout.blob(inventory.digests([digest])[0]))
            if st is not None:
                self.blob_sizes[digest] = st.size
        self._by_size = None
        repo = self._row(contents, self.blob_sizes)
        if repo is None:
            if self.repositories.pop(name, None) is not None:
                self.names = sorted(self.repositories)
            return
        new = name not in self.repositories
        self.repositories[name] = repo
        if new:
            self.names = sorted(self.repositories)

    async def run(self) -> None:
        """Build now, then keep the snapshot fresh until cancelled."""
        next_build = 0.0
        while True:
            if time.monotonic() >= next_build:
                try:
                    await self.rebuild()
                    wait = max(self.refresh_seconds, 10 * self.build_seconds)
                except Exception as e:
                    log.exception("ui catalog build failed")
                    self.error = str(e) or type(e).__name__
                    self.ready.set()  # pages say so rather than wait for it
                    wait = RETRY_SECONDS
                next_build = time.monotonic() + wait
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that comes as
            # the event is set, and the stores set it all the time: the UI's shutdown would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_build - time.monotonic())):
                    await self._wake.wait()
            if self._dirty:
                await asyncio.sleep(DIRTY_DELAY)
                self._wake.clear()
                dirty, self._dirty = self._dirty, set()
                for name in sorted(dirty):
                    try:
                        await self.refresh(name)
                    except Exception:
                        log.exception("ui catalog: reading %s failed", name)
