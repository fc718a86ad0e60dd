"""Mirror's old storage layout moved to registry:2's, at start, before anything reads storage.

Before it adopted registry:2's layout (layout.py), mirror kept `blobs/` and `repositories/` at the
storage root, with plain files for links and tags (`layout.parse_legacy`). `run()` finds them and
moves everything under `docker/registry/v2/`; nothing is run by hand. It is idempotent object by
object, so a process killed midway, or two replicas starting on one bucket, leave a root that the
next start finishes:

1. Marks first. Every old repository gets its new `_mirror/private` (old `_mirror/private` or
   `_private` marker, or private by the configuration) or `_mirror/cached` (content pulled through)
   before anything moves; the old markers stay until the end, so a second run decides the same, and
   a mark already in the new layout is kept.
2. Blobs: renamed (filesystem) or copied then deleted (OSS). One already at its new key with the
   same size only loses its old copy.
3. Each repository's links, tags, referrer records and uploads: written at the new key, then the
   old one deleted. A tag already in the new layout is kept. Saved hash states (mirror's own
   format) are dropped: a resumed upload hashes its data again.
4. The old markers, then the emptied old trees. Keys it does not recognise are left where they are,
   and logged.

The hot tier's local copies move too (`local_blobs`), so they stay hot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from mirror.errors import RegistryError
from mirror.names import Digest, parse_digest
from mirror.storage import inventory, layout
from mirror.storage.base import NotFound, Stat, Storage, StorageUnavailable
from mirror.storage.filesystem import FilesystemStorage

log = logging.getLogger("mirror.storage")
T = TypeVar("T")
PARALLEL = 16  # objects in flight (OSS copies; filesystem renames hop to threads)
PROGRESS_SECONDS = 10.0


class LayoutError(StorageUnavailable):
    """Storage holds something mirror must not guess about (registry:2's layout at the wrong level)."""


@dataclass
class _Repository:
    marks: set[str] = field(default_factory=set)  # old markers: private (either form), cached
    marker_keys: list[str] = field(default_factory=list)
    records: list[tuple[str, layout.Parsed, Stat]] = field(default_factory=list)
    content: bool = False  # links, tags or referrer records (not only uploads)


@dataclass
class Migrated:
    """What one run moved (and what it left alone)."""

    blobs: int = 0
    bytes: int = 0
    records: int = 0  # links, tags, referrer records, upload files
    private: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # old-tree keys not recognised: left in place
    seconds: float = 0.0


@dataclass
class _Plan:
    blobs: list[tuple[str, Digest, Stat]] = field(default_factory=list)
    repositories: dict[str, _Repository] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)

    @property
    def objects(self) -> int:
        return len(self.blobs) + sum(len(r.records) + len(r.marker_keys) for r in self.repositories.values())


async def check_root(storage: Storage) -> None:
    """Refuse a root pointed one or two levels into a registry:2 root (at `docker/` or `docker/registry/`):
    served as it is, it would look empty."""
    for inner, pointed_at in (("registry/v2", "docker"), ("v2", "docker/registry")):
        if await storage.list(f"{inner}/repositories") or await storage.list(f"{inner}/blobs"):
            raise LayoutError(_misplaced(pointed_at))


def _misplaced(pointed_at: str) -> str:
    return (f"the storage root is registry:2's {pointed_at}/ directory: point storage.filesystem.rootdirectory "
            f"(or storage.oss.rootdirectory) at the directory that holds docker/, as registry:2's is")


async def present(storage: Storage) -> bool:
    """Whether the old layout's trees are there (cheap: two listings)."""
    return bool(await storage.list(layout.LEGACY_BLOBS) or await storage.list(layout.LEGACY_REPOSITORIES))


async def run(storage: Storage, is_private: Callable[[str], bool]) -> Migrated | None:
    """Move the old layout over, if there is one (None: there was nothing to do). `is_private` is the
    configuration's answer for names that carry no old marker."""
    await check_root(storage)
    if not await present(storage):
        return None
    start = time.perf_counter()
    plan = await _plan(storage)
    result = Migrated(left=plan.left)
    if plan.objects:
        log.warning("storage: mirror's old layout found (blobs/, repositories/): moving %d blobs (%d bytes) and "
                    "%d repositories to registry:2's layout under docker/registry/v2/ before serving",
                    len(plan.blobs), sum(st.size for _, _, st in plan.blobs), len(plan.repositories))
        progress = _Progress(plan.objects)
        await _mark(storage, plan, is_private, result)
        await _each(plan.blobs, lambda b: _blob(storage, b, result, progress))
        records = [(name, *record) for name, repo in plan.repositories.items() for record in repo.records]
        await _each(records, lambda r: _record(storage, r, result, progress))
        await _each([k for r in plan.repositories.values() for k in r.marker_keys],
                    lambda key: _delete(storage, key, progress))
    await _remove_emptied(storage, result.left)
    result.seconds = time.perf_counter() - start
    if plan.objects:
        log.warning("storage: moved to registry:2's layout in %.1fs: %d blobs (%d bytes), %d links, tags and "
                    "upload files; %d private and %d cached repositories", result.seconds, result.blobs,
                    result.bytes, result.records, len(result.private), len(result.cached))
    if result.left:
        log.warning("storage: %d files under blobs/ and repositories/ are not mirror's and were left there: %s%s",
                    len(result.left), ", ".join(result.left[:5]), " ..." if len(result.left) > 5 else "")
    return result


async def _plan(storage: Storage) -> _Plan:
    plan = _Plan()
    for top in (layout.LEGACY_BLOBS, layout.LEGACY_REPOSITORIES):
        async for key, st in storage.scan(top):
            parsed = layout.parse_legacy(key)
            if parsed is None:
                if layout.parse(f"{layout.ROOT}/{key}") is not None:
                    raise LayoutError(_misplaced("docker/registry/v2"))
                plan.left.append(key)
            elif parsed.kind == layout.BLOB:
                assert parsed.digest is not None
                plan.blobs.append((key, parsed.digest, st))
            else:
                repo = plan.repositories.setdefault(parsed.repository, _Repository())
                if parsed.kind in (layout.MARKER, layout.LEGACY_PRIVATE):
                    repo.marks.add(parsed.mark)
                    repo.marker_keys.append(key)
                else:
                    repo.records.append((key, parsed, st))
                    repo.content |= parsed.kind != layout.UPLOAD and parsed.kind != layout.HASHSTATE
    plan.left.sort()
    return plan


async def _mark(storage: Storage, plan: _Plan, is_private: Callable[[str], bool], result: Migrated) -> None:
    async def mark(name: str) -> None:
        repo = plan.repositories[name]
        marks = await inventory.marks(storage, name)  # decided before: by a run that stopped, or since
        if not marks:
            if layout.PRIVATE_MARK in repo.marks or is_private(name):
                marks = {layout.PRIVATE_MARK}
            elif repo.marks or repo.content:
                marks = {layout.CACHED_MARK}
            for mark in marks:
                await storage.put_bytes(layout.marker(name, mark), b"")
        if layout.PRIVATE_MARK in marks:
            result.private.append(name)
        elif marks:
            result.cached.append(name)

    await _each(sorted(plan.repositories), mark)


async def _move(storage: Storage, old: str, new: str, size: int) -> None:
    """`old` to `new`, idempotent: a copy already there (a run that stopped after the copy) costs a stat."""
    there = await storage.stat(new)
    if there is None or there.size != size:
        try:
            await storage.move(old, new)
            return
        except (NotFound, FileNotFoundError):  # moved meanwhile (another replica)
            if await storage.stat(new) is None:
                raise
    await storage.delete(old)


async def _blob(storage: Storage, blob: tuple[str, Digest, Stat], result: Migrated, progress: _Progress) -> None:
    key, digest, st = blob
    await _move(storage, key, layout.blob(digest), st.size)
    result.blobs += 1
    result.bytes += st.size
    progress.step()


async def _record(storage: Storage, record: tuple[str, str, layout.Parsed, Stat], result: Migrated,
                  progress: _Progress) -> None:
    try:
        await _move_record(storage, record, result)
    except NotFound:
        pass  # the old key went meanwhile: another replica moved it
    progress.step()


async def _move_record(storage: Storage, record: tuple[str, str, layout.Parsed, Stat], result: Migrated) -> None:
    name, key, parsed, st = record
    d = parsed.digest
    if parsed.kind == layout.LAYER and d is not None:
        await storage.put_bytes(layout.layer(name, d), layout.link(d))
    elif parsed.kind == layout.REVISION and d is not None:
        await storage.put_bytes(layout.revision(name, d), layout.link(d))
    elif parsed.kind == layout.TAG:
        if not await _tag(storage, name, key, parsed.tag):
            result.left.append(key)  # not a digest: left in place (logged)
            return
    elif parsed.kind == layout.REFERRER and d is not None and parsed.subject is not None:
        new = layout.referrer(name, parsed.subject, d)
        if await storage.stat(new) is None:
            await storage.put_bytes(new, await storage.get_bytes(key))
    elif parsed.kind == layout.UPLOAD and parsed.tag == "data":
        await _move(storage, key, layout.upload_data(name, parsed.upload_id), st.size)
        result.records += 1
        return
    elif parsed.kind == layout.UPLOAD:  # startedat: registry:2's format
        started = layout.parse_started(await storage.get_bytes(key))
        await storage.put_bytes(layout.upload_started(name, parsed.upload_id),
                                layout.started_at(st.mtime if started is None else started))
    await storage.delete(key)  # a hash state in mirror's old format goes: resuming hashes the data again
    result.records += 1


async def _tag(storage: Storage, name: str, key: str, tag: str) -> bool:
    if await storage.stat(layout.tag(name, tag)) is not None:
        return True  # already in the new layout (a run that stopped, or a push since): it wins
    try:
        digest = parse_digest((await storage.get_bytes(key)).decode(errors="replace").strip())
    except RegistryError:
        log.warning("storage: tag %s:%s (%s) does not hold a digest: left in place", name, tag, key)
        return False
    for link_key, data in layout.tag_links(name, tag, digest):
        await storage.put_bytes(link_key, data)
    return True


async def _delete(storage: Storage, key: str, progress: _Progress) -> None:
    await storage.delete(key)
    progress.step()


async def _remove_emptied(storage: Storage, left: list[str]) -> None:
    """The old trees once nothing is left in them (empty directories on a filesystem)."""
    kept = {key.split("/", 1)[0] for key in left}
    for top in (layout.LEGACY_BLOBS, layout.LEGACY_REPOSITORIES):
        if top not in kept:
            await storage.delete(top)


async def _each(items: Iterable[T], call: Callable[[T], Awaitable[object]]) -> None:
    """`call` on every item, PARALLEL at a time (workers share one iterator: each item is taken once).
    The first failure stops the others: nothing moves after a run has failed."""
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            await call(item)

    workers = [asyncio.create_task(worker()) for _ in range(PARALLEL)]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise


class _Progress:
    """A log line every PROGRESS_SECONDS: a large bucket takes a while."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.logged = time.monotonic()

    def step(self) -> None:
        self.done += 1
        if time.monotonic() - self.logged > PROGRESS_SECONDS:
            self.logged = time.monotonic()
            log.warning("storage: moving to registry:2's layout: %d of %d objects", self.done, self.total)


def local_blobs(local: FilesystemStorage) -> int:
    """Blobs of a local copy (the hot tier) in the old layout, renamed into the new one (blocking, at
    start). The tier is a cache: anything else there is dropped."""
    moved = 0
    for key, _ in list(local.walk(layout.LEGACY_BLOBS)):
        parsed = layout.parse_legacy(key)
        if parsed is not None and parsed.kind == layout.BLOB and parsed.digest is not None:
            target = local.path(layout.blob(parsed.digest))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local.path(key), target)
            moved += 1
    shutil.rmtree(local.path(layout.LEGACY_BLOBS), ignore_errors=True)
    return moved
