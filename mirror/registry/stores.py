"""Registry objects in storage: manifests (hot ones kept in memory), tags, and the links that say
which repository may serve which manifest or blob. No upstream here: mirror/cache/ adds the
pull-through rules on top, and private repositories use these stores directly.

Every write here is told to the ledger in the same step (mirror/ledger/): what a private write
references is journaled, and fenced against deletion passes, before the write returns (`durable`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mirror.errors import RegistryError
from mirror.ledger import ops
from mirror.ledger.ledger import Ledger
from mirror.names import Digest, parse_digest
from mirror.registry import integrity, manifest_schema, mediatypes
from mirror.server.metrics import Metrics
from mirror.storage import NotFound, Stat, Storage, inventory, layout

log = logging.getLogger("mirror.stores")
LINKS_REMEMBERED = 200_000
TAGS_REMEMBERED = 100_000  # private tags last read, served from memory while storage is down
DAMAGE_REPORTED = 10_000  # digests whose damage was logged (once each)


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class StoredBlob:
    key: str
    size: int
    path: Path | None  # on local disk (sendfile), or None: stream it from storage


class _Links:
    """(repository, digest) pairs known to be linked, so hot requests skip the link stat."""

    def __init__(self) -> None:
        self._known: set[tuple[str, str]] = set()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._known

    def add(self, repository: str, digest: str) -> None:
        if len(self._known) > LINKS_REMEMBERED:
            self._known.clear()
        self._known.add((repository, digest))

    def discard(self, repository: str, digest: str) -> None:
        self._known.discard((repository, digest))


async def record(ledger: Ledger, changes: list[ops.Op], durable: bool, code: str) -> None:
    """Tell the ledger; a durable write whose blobs a deletion pass removed meanwhile fails with `code`
    (the client sends them again)."""
    gone = await ledger.record(changes, durable=durable)
    if gone:
        raise RegistryError(code, f"blob unknown to registry: {sorted(gone)[0]} (deleted by gc or eviction "
                                  f"while this write was under way; push it again)", detail=sorted(gone)[0])


class ManifestStore:
    """Manifests are verified whenever their bytes come from storage (they are small): a damaged
    one is never served (a cached one is fetched again, a private one is unknown until re-pushed
    or scrubbed), and a put replaces a damaged stored copy."""

    def __init__(self, storage: Storage, ledger: Ledger, memory: int, added: Callable[[int], None]) -> None:
        self.storage = storage
        self.ledger = ledger
        self.added = added  # BlobStore.added: bytes entered storage
        self.memory_limit = memory
        self._memory: OrderedDict[str, Manifest] = OrderedDict()
        self._memory_size = 0
        self._links = _Links()
        self._reported: set[str] = set()
        self._tags: OrderedDict[tuple[str, str], str] = OrderedDict()

    async def get(self, repository: str, digest: str) -> Manifest | None:
        """The manifest if `repository` has it: a dict lookup when hot."""
        manifest = self._memory.get(digest)
        if manifest is not None and (repository, digest) in self._links:
            self._memory.move_to_end(digest)
            return manifest
        d = parse_digest(digest)
        if await self.storage.stat(layout.revision(repository, d)) is None:
            return None
        if manifest is None:
            try:
                body = await self.storage.get_bytes(layout.blob(d))
            except NotFound:
                return None
            if Digest.of(body, d.algorithm) != d:
                self._damaged(digest)
                return None
            manifest = Manifest(digest, mediatypes.detect(body), body)
            self._remember(manifest)
        self._links.add(repository, digest)
        return manifest

    async def put(self, repository: str, manifest: Manifest, *, durable: bool) -> None:
        """Store a manifest and link it to `repository` (a push: `durable`; a cache fill: not)."""
        d = parse_digest(manifest.digest)
        stored = await integrity.intact(self.storage, layout.blob(d), d)
        if stored is not True:  # absent, or damaged: these bytes verified, they replace it
            if stored is False:
                log.warning("replacing the damaged stored copy of manifest %s", manifest.digest)
            await self.storage.put_bytes(layout.blob(d), manifest.body)
        await self.storage.put_bytes(layout.revision(repository, d), layout.link(d))
        self._remember(manifest)
        self._links.add(repository, manifest.digest)
        references = [str(r) for r in manifest_schema.references(manifest.body)]
        now = self.ledger.clock.time()
        await record(self.ledger, [ops.blob(manifest.digest, len(manifest.body), now),
                                   ops.refs(manifest.digest, references),
                                   ops.link(repository, manifest.digest, ops.REVISION, now)],
                     durable, "MANIFEST_BLOB_UNKNOWN")
        if stored is None:
            self.added(len(manifest.body))  # after the ledger has it: an eviction pass this wakes counts it

    async def unlink(self, repository: str, digest: Digest) -> bool:
        """Remove `repository`'s link to a manifest (its bytes stay until gc)."""
        self._links.discard(repository, str(digest))
        if not await _remove(self.storage, layout.revision(repository, digest)):
            return False
        await self.ledger.record([ops.unlink(repository, str(digest), ops.REVISION)], durable=False)
        return True

    async def tag(self, repository: str, tag: str) -> str | None:
        digest = await inventory.tag_target(self.storage, repository, tag)
        if digest is None:
            self._tags.pop((repository, tag), None)
            return None
        self._remember_tag(repository, tag, digest)
        return digest

    def remembered_tag(self, repository: str, tag: str) -> str | None:
        """What `tag` pointed to when last read or written here: for when storage cannot be asked."""
        return self._tags.get((repository, tag))

    def _remember_tag(self, repository: str, tag: str, digest: str) -> None:
        self._tags[(repository, tag)] = digest
        self._tags.move_to_end((repository, tag))
        if len(self._tags) > TAGS_REMEMBERED:
            self._tags.popitem(last=False)

    async def set_tag(self, repository: str, tag: str, digest: str, fetched: float | None = None) -> None:
        """Point a tag at a manifest (its index entry, then current, as registry:2): a push (`fetched`
        None: durable), or a cache's tag confirmed by its upstream at `fetched`."""
        for key, data in layout.tag_links(repository, tag, parse_digest(digest)):
            await self.storage.put_bytes(key, data)
        self._remember_tag(repository, tag, digest)
        await self.ledger.record([ops.tag(repository, tag, digest, fetched or 0.0)], durable=fetched is None)

    async def delete_tag(self, repository: str, tag: str) -> bool:
        """The tag and its index of past targets, as registry:2 deletes one. Removes a reference, never
        creates one: told to the ledger without waiting (on a full disk too)."""
        self._tags.pop((repository, tag), None)
        if not await _remove(self.storage, layout.tag(repository, tag), layout.tag_entry(repository, tag)):
            return False
        await self.ledger.record([ops.untag(repository, tag)], durable=False)
        return True

    def forget_memory(self) -> None:
        """Storage changed behind our back (a rebuilt ledger): read it again."""
        self._memory.clear()
        self._memory_size = 0
        self._links = _Links()
        self._tags.clear()

    def _damaged(self, digest: str) -> None:
        if digest not in self._reported:
            if len(self._reported) > DAMAGE_REPORTED:
                self._reported.clear()
            self._reported.add(digest)
            log.error("stored manifest %s does not match its digest: not served (a cached one is fetched "
                      "again; push it again or run mirror scrub)", digest)

    def forget(self, digest: str) -> None:
        """Drop a manifest from memory (it was evicted from storage)."""
        old = self._memory.pop(digest, None)
        if old is not None:
            self._memory_size -= len(old.body)

    def heard(self, changes: Sequence[ops.Op] | None) -> None:
        """Another process's writes (the ledger's journal): forget what memory holds of what they removed."""
        if changes is None:
            self.forget_memory()
            return
        for op in changes:
            if op[0] == "-link" and op[2] == ops.REVISION:
                self._links.discard(op[1], op[3])
            elif op[0] == "-blob":
                self.forget(op[1])
            elif op[0] in ("tag", "-tag"):
                self._tags.pop((op[1], op[2]), None)

    def _remember(self, manifest: Manifest) -> None:
        if manifest.digest in self._memory:
            return
        self._memory[manifest.digest] = manifest
        self._memory_size += len(manifest.body)
        while self._memory_size > self.memory_limit and len(self._memory) > 1:
            _, old = self._memory.popitem(last=False)
            self._memory_size -= len(old.body)


class BlobStore:
    def __init__(self, storage: Storage, ledger: Ledger, metrics: Metrics) -> None:
        self.storage = storage
        self.ledger = ledger
        self.metrics = metrics
        self._links = _Links()
        self.on_growth: Callable[[int, bool], None] | None = None  # the evictor: (bytes, committed)

    def forget_memory(self) -> None:
        self._links = _Links()

    def heard(self, changes: Sequence[ops.Op] | None) -> None:
        """Another process's writes: forget the links they removed."""
        if changes is None:
            self.forget_memory()
            return
        for op in changes:
            if op[0] == "-link" and op[2] == ops.LAYER:
                self._links.discard(op[1], op[3])

    def added(self, size: int) -> None:
        """A new blob entered storage (the one place that is said)."""
        self.metrics.blob_added(size)
        if self.on_growth is not None:
            self.on_growth(size, True)

    def expect(self, size: int) -> None:
        """A blob of `size` bytes is on its way in: room can be made before it lands."""
        if self.on_growth is not None:
            self.on_growth(size, False)

    async def stat(self, digest: Digest) -> Stat | None:
        return await self.storage.stat(layout.blob(digest))

    async def intact(self, digest: Digest) -> bool | None:
        """Whether the stored blob hashes to its digest (reads it whole); None if it is not there."""
        return await integrity.intact(self.storage, layout.blob(digest), digest)

    async def find(self, repository: str, digest: Digest) -> StoredBlob | None:
        """The blob in storage if `repository` may serve it."""
        key = str(digest)
        if (repository, key) not in self._links:
            if await self.storage.stat(layout.layer(repository, digest)) is None:
                return None
            self._links.add(repository, key)
        blob = layout.blob(digest)
        st = await self.storage.stat(blob)
        if st is None:
            self._links.discard(repository, key)
            return None
        self.ledger.touch(key)
        return StoredBlob(blob, st.size, self.storage.local_path(blob))

    async def link(self, repository: str, digest: Digest, stat: Stat | None, *, durable: bool,
                   new: bool = False) -> None:
        """`repository` may serve blob `digest` (in storage: `stat`, what the caller found or wrote, `new`
        if it just did; None: not yet, a fetch is under way). A push or mount is `durable`: it returns
        once no deletion pass can take the blob from under it."""
        await self.storage.put_bytes(layout.layer(repository, digest), layout.link(digest))
        self._links.add(repository, str(digest))
        found = [ops.blob(str(digest), stat.size, stat.mtime)] if stat is not None else []
        await record(self.ledger, [*found, ops.link(repository, str(digest), ops.LAYER, self.ledger.clock.time())],
                     durable, "BLOB_UNKNOWN")
        if new and stat is not None:
            self.added(stat.size)  # after the ledger has it: an eviction pass this wakes counts it

    async def unlink(self, repository: str, digest: Digest) -> bool:
        self._links.discard(repository, str(digest))
        if not await _remove(self.storage, layout.layer(repository, digest)):
            return False
        await self.ledger.record([ops.unlink(repository, str(digest), ops.LAYER)], durable=False)
        return True


async def _remove(storage: Storage, key: str, entry: str | None = None) -> bool:
    """Delete `key` (or everything of `entry`, which holds it); whether it was there (DELETE answers 404
    otherwise)."""
    if await storage.stat(key) is None:
        return False
    await storage.delete(entry or key)
    return True
