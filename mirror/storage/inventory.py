"""Reading the layout back: the listings of one repository (markers, links, tags, referrer records)
and the repository names of a whole walk (export), for what reads storage itself. Keys are built by
layout.py and parsed by `layout.parse`, nowhere else. Everything that asks about all of storage (the
catalog, the UI's list, gc, eviction, `du`, the gauges) asks the ledger (mirror/ledger/) instead; only
its rebuild walks storage, through `Storage.scan` and `layout.parse`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from mirror.names import ALGORITHMS, Digest
from mirror.storage import layout
from mirror.storage.base import NotFound, Storage


class Progress(Protocol):
    """What a command's progress bar offers (tqdm's): counts, and a new total for a new phase."""

    def update(self, n: int = 1) -> object: ...

    def reset(self, total: int | None = None) -> object: ...

    def set_description(self, desc: str) -> object: ...


async def repository_names(storage: Storage) -> list[tuple[str, list[str]]]:
    """Every repository in storage with the `_`-children it has (`_manifests`, `_uploads`, ...), sorted."""
    found: list[tuple[str, list[str]]] = []

    async def walk(prefix: str, name: str) -> None:
        children = await storage.list(prefix)
        marks = [c for c in children if c.startswith("_")]
        if marks and name:
            found.append((name, marks))
        for child in children:
            if not child.startswith("_"):
                await walk(f"{prefix}/{child}", f"{name}/{child}" if name else child)

    await walk(layout.REPOSITORIES, "")
    return sorted(found)


async def marks(storage: Storage, name: str) -> set[str]:
    """What this mirror has decided repository `name` is (layout.MARKS it carries)."""
    return {m for m in await storage.list(layout.markers(name)) if m in layout.MARKS}


async def has_content(storage: Storage, name: str) -> bool:
    """Whether repository `name` holds manifests or blob links (one listing)."""
    return not {"_manifests", "_layers"}.isdisjoint(await storage.list(layout.repository(name)))


async def _linked(storage: Storage, prefix: str) -> list[Digest]:
    found = []
    for algorithm in await storage.list(prefix):
        if algorithm not in ALGORITHMS:
            continue
        for hexpart in await storage.list(f"{prefix}/{algorithm}"):
            digest = layout.digest_of(algorithm, hexpart)
            if digest is not None:
                found.append(digest)
    return found


async def manifests(storage: Storage, name: str) -> list[Digest]:
    """The manifests repository `name` links."""
    return await _linked(storage, layout.revisions(name))


async def layers(storage: Storage, name: str) -> list[Digest]:
    """The blobs repository `name` may serve."""
    return await _linked(storage, layout.layers(name))


async def tag_names(storage: Storage, name: str) -> list[str]:
    return await storage.list(layout.tags(name))


async def tag_target(storage: Storage, name: str, tag: str) -> str | None:
    """What tag `tag` of `name` points to as stored (a digest if it is one); None if there is no such tag."""
    try:
        return (await storage.get_bytes(layout.tag(name, tag))).decode(errors="replace").strip()
    except NotFound:
        return None


async def referrer_records(storage: Storage, name: str) -> list[tuple[Digest, Digest, str]]:
    """(subject, referring manifest, key of its record) for every referrer record of `name`."""
    found = []
    root = layout.all_referrers(name)
    for algorithm in await storage.list(root):
        for subject in await storage.list(f"{root}/{algorithm}"):
            for entry in await storage.list(f"{root}/{algorithm}/{subject}"):
                key = f"{root}/{algorithm}/{subject}/{entry}"
                parsed = layout.parse(key)
                if parsed is not None and parsed.subject is not None and parsed.digest is not None:
                    found.append((parsed.subject, parsed.digest, key))
    return found


def digests(values: Iterable[str]) -> list[Digest]:
    """Digest strings this module produced back into digests."""
    return [Digest(*value.split(":", 1)) for value in values]
