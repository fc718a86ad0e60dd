"""Reading the layout back: the listings of one repository (markers, links, tags, referrer records)
and the repository names of a whole walk (export), for what reads storage itself. Keys are built by
layout.py and parsed by `layout.parse`, nowhere else. Everything that asks about all of storage (the
catalog, the UI's list, gc, eviction, `du`, the gauges) asks the ledger (mirror/ledger/) instead; only
its rebuild, the scrub and an export walk storage, through `Storage.scan` and `layout.parse`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from mirror.names import Digest
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


def cataloged(children: list[str]) -> bool:
    """Whether a repository with these `_`-children (repository_names) is in the catalog."""
    return any(c in layout.CATALOGED for c in children)


async def marks(storage: Storage, name: str) -> set[str]:
    """What this mirror has decided repository `name` is (layout.MARKS it carries)."""
    return {m for m in await storage.list(layout.markers(name)) if m in layout.MARKS}


async def has_content(storage: Storage, name: str) -> bool:
    """Whether repository `name` holds manifests or blob links, i.e. is in the catalog (one listing; what
    deletes empty stays, as in registry:2)."""
    return cataloged(await storage.list(layout.repository(name)))


async def unmarked(storage: Storage, name: str) -> bool:
    """Repository `name` has content (a manifest or a tag) and no mark: registry:2 wrote it, mirror
    never decided what it is (`Contents.unmarked` for one repository, three listings)."""
    if await marks(storage, name):
        return False
    return bool(await storage.list(layout.tags(name)) or await storage.list(layout.revisions(name)))


async def was_pull_through_cache(storage: Storage) -> bool:
    """registry:2 ran this root as a pull-through cache (its `scheduler-state.json` is there)."""
    return await storage.stat(layout.SCHEDULER_STATE) is not None


async def _linked(storage: Storage, prefix: str, kind: str) -> list[Digest]:
    """The digests linked below `prefix`: link files only (registry:2 deletes a link and leaves its
    directory; schema 1 signatures live beside the links)."""
    found = []
    async for key, _ in storage.scan(prefix):
        parsed = layout.parse(key)
        if parsed is not None and parsed.kind == kind and parsed.digest is not None:
            found.append(parsed.digest)
    return sorted(found, key=str)


async def manifests(storage: Storage, name: str) -> list[Digest]:
    """The manifests repository `name` links."""
    return await _linked(storage, layout.revisions(name), layout.REVISION)


async def layers(storage: Storage, name: str) -> list[Digest]:
    """The blobs repository `name` may serve."""
    return await _linked(storage, layout.layers(name), layout.LAYER)


async def tag_names(storage: Storage, name: str) -> list[str]:
    """The tags of `name`, as registry:2 lists them (its tag directories)."""
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


async def referrers_of(storage: Storage, name: str, subject: Digest) -> list[tuple[Digest, str]]:
    """(referring manifest, key of its record) for every referrer record of `subject` in `name`."""
    found = []
    prefix = layout.referrers(name, subject)
    for entry in await storage.list(prefix):
        parsed = layout.parse(f"{prefix}/{entry}")
        if parsed is not None and parsed.kind == layout.REFERRER and parsed.digest is not None:
            found.append((parsed.digest, f"{prefix}/{entry}"))
    return found


def digests(values: Iterable[str]) -> list[Digest]:
    """Digest strings this module produced back into digests."""
    return [Digest(*value.split(":", 1)) for value in values]
