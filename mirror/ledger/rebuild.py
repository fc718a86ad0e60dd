"""A ledger from storage: one streamed walk (blobs, then repositories: markers, links, tags, uploads),
then every manifest read once for what it references, loaded in bulk into a new file and derived
(schema.derive). Memory stays bounded by the chunk sizes, whatever storage holds: the walk comes
page by page, and the manifests are read back from the new file by id.

`differences` compares two ledgers fact by fact: `mirror index rebuild --verify` builds one from
storage and holds the one in use against it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

from mirror.ledger import ops, schema
from mirror.ledger.database import Database
from mirror.registry import manifest_schema
from mirror.storage import NotFound, Stat, Storage, inventory, layout

CHUNK = 5000  # facts per bulk insert
PAGE = 2000  # keys parsed per worker call
READS = 16  # small reads (tags, upload times, manifests) at once


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...


Emit = Callable[[list[ops.Op]], Awaitable[None]]


async def walk(storage: Storage, emit: Emit, progress: Progress | None = None) -> None:
    """Every fact in storage, in chunks (tags' targets and uploads' start times read on the way). Keys
    are parsed in a worker, a page at a time: a walk of millions never holds the loop."""
    chunk: list[ops.Op] = []
    tags: list[tuple[str, str]] = []
    uploads: dict[tuple[str, str], bool] = {}  # (repository, id) -> whether its start time was found

    async def take(entries: list[tuple[str, Stat]]) -> None:
        nonlocal chunk, tags
        if progress is not None:
            progress.update(len(entries))
        facts, named, started = await asyncio.to_thread(_facts, entries)
        chunk += facts
        tags += named
        for repo, upload_id, key in started:
            if key is None:
                uploads.setdefault((repo, upload_id), False)
            else:
                chunk.append(ops.upload(repo, upload_id, await _started(storage, key)))
                uploads[(repo, upload_id)] = True
        if len(tags) >= CHUNK // 10:
            chunk += await _tags(storage, tags)
            tags = []
        if len(chunk) >= CHUNK:
            await emit(chunk)
            chunk = []

    for prefix in (layout.BLOBS, layout.REPOSITORIES):
        entries: list[tuple[str, Stat]] = []
        async for entry in storage.scan(prefix):
            entries.append(entry)
            if len(entries) >= PAGE:
                await take(entries)
                entries = []
        await take(entries)
    chunk += await _tags(storage, tags)
    chunk += [ops.upload(repo, upload_id, 0.0) for (repo, upload_id), found in uploads.items() if not found]
    if chunk:
        await emit(chunk)


def _facts(entries: list[tuple[str, Stat]]) -> tuple[list[ops.Op], list[tuple[str, str]],
                                                     list[tuple[str, str, str | None]]]:
    """What a page of keys says (blocking: a worker's), with the tags whose targets and the uploads
    whose start times are still to read."""
    facts: list[ops.Op] = []
    tags: list[tuple[str, str]] = []
    uploads: list[tuple[str, str, str | None]] = []
    for key, st in entries:
        parsed = layout.parse(key)
        if parsed is None:
            continue
        if parsed.kind == layout.BLOB:
            facts.append(ops.blob(str(parsed.digest), st.size, st.mtime))
        elif parsed.kind == layout.LAYER or parsed.kind == layout.REVISION:
            kind = schema.LAYER if parsed.kind == layout.LAYER else schema.REVISION
            facts.append(ops.link(parsed.repository, str(parsed.digest), kind, st.mtime))
        elif parsed.kind == layout.MARKER:
            facts.append(ops.mark(parsed.repository, parsed.mark))
        elif parsed.kind == layout.TAG:
            tags.append((parsed.repository, parsed.tag))
        elif parsed.kind == layout.UPLOAD:
            started = key == layout.upload_started(parsed.repository, parsed.upload_id)
            uploads.append((parsed.repository, parsed.upload_id, key if started else None))
    return facts, tags, uploads


async def _tags(storage: Storage, tags: list[tuple[str, str]]) -> list[ops.Op]:
    limit = asyncio.Semaphore(READS)

    async def target(repo: str, name: str) -> ops.Op | None:
        async with limit:
            found = await inventory.tag_target(storage, repo, name)
        digest = layout.digest_of(*found.split(":", 1)) if found and ":" in found else None
        return ops.tag(repo, name, str(digest)) if digest is not None else None

    return [op for op in await asyncio.gather(*(target(r, t) for r, t in tags)) if op is not None]


async def _started(storage: Storage, key: str) -> float:
    try:
        return layout.parse_started(await storage.get_bytes(key)) or 0.0  # unreadable: as old as can be
    except NotFound:
        return 0.0  # half-created: as old as can be


MANIFEST_MAX = 4 << 20  # what is read as a manifest at most (limits.manifest_size's default): never a layer


async def references(storage: Storage, db: Database, progress: Progress | None = None) -> None:
    """What every manifest a repository links references, and what those an index names do, read once
    each through a work table in the new file (memory stays bounded: a page of it at a time)."""
    await db.write(_seed_work)
    limit = asyncio.Semaphore(READS)

    async def read(digest: str, size: int) -> tuple[ops.Op, list[str]] | None:
        if size > MANIFEST_MAX:
            return None
        async with limit:
            try:
                body = await storage.get_bytes(layout.blob(inventory.digests([digest])[0]))
            except NotFound:
                return None
        if progress is not None:
            progress.update()
        refs = ops.refs(digest, [str(d) for d in manifest_schema.references(body)])
        return refs, [str(d) for d in manifest_schema.child_manifests(body)]

    while page := await db.read(_work_page, CHUNK // 20):
        found = [r for r in await asyncio.gather(*(read(d, n) for d, n in page)) if r is not None]
        await db.write(_worked, [d for d, _ in page], [op for op, _ in found], [c for _, cs in found for c in cs])
    await db.write(lambda conn: conn.execute("DROP TABLE work"))


def _seed_work(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE work (digest TEXT PRIMARY KEY, done INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID")
    conn.execute(f"INSERT INTO work(digest) SELECT DISTINCT digest FROM links JOIN blobs ON blobs.id = links.blob "
                 f"WHERE links.kind = {schema.REVISION} AND blobs.size IS NOT NULL")


def _work_page(conn: sqlite3.Connection, n: int) -> list[tuple[str, int]]:
    return conn.execute("SELECT work.digest, blobs.size FROM work JOIN blobs ON blobs.digest = work.digest "
                        "WHERE done = 0 AND blobs.size IS NOT NULL LIMIT ?", (n,)).fetchall()


def _worked(conn: sqlite3.Connection, read: list[str], refs: list[ops.Op], children: list[str]) -> None:
    ops.load(conn, refs)
    conn.executemany("UPDATE work SET done = 1 WHERE digest = ?", [(d,) for d in read])
    conn.executemany("INSERT OR IGNORE INTO work(digest) VALUES (?)", [(c,) for c in children])


async def build(storage: Storage, path: Path, kinds: schema.Kinds, horizon_ms: int,
                previous: Path | None = None, progress: Progress | None = None) -> None:
    """A complete ledger at `path` from a walk of storage; local times (last use, pulls, tag
    revalidations) carried over from `previous`. The caller replays the journal from `horizon_ms`."""
    db = await Database(path, kinds, bulk=True).open()
    try:
        await walk(storage, lambda chunk: db.write(ops.load, chunk), progress)
        await references(storage, db, progress)
        await db.write(_derive)
        if previous is not None:
            await db.write(_carry_times, previous, transaction=False)
        await db.write(_complete, horizon_ms)
    finally:
        await db.close()


def _derive(conn: sqlite3.Connection) -> None:
    schema.derive(conn)
    schema.add_triggers(conn)


def _complete(conn: sqlite3.Connection, horizon_ms: int) -> None:
    schema.set_meta(conn, "horizon", horizon_ms)
    schema.set_meta(conn, "complete", 1)


def _carry_times(conn: sqlite3.Connection, previous: Path) -> None:
    """What only this replica knew (journaled too, but perhaps pruned by now): last uses, pulls, tag
    revalidations. The last uses by a join; pulls and revalidations are few, row by row."""
    if not previous.exists():
        return
    conn.execute("ATTACH DATABASE ? AS old", (str(previous),))
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("""UPDATE blobs SET used = max(blobs.used, o.used) FROM old.blobs AS o
                        WHERE o.digest = blobs.digest AND o.used IS NOT NULL AND blobs.size IS NOT NULL""")
        conn.execute("UPDATE repos SET pulled = o.pulled FROM old.repos AS o WHERE o.name = repos.name")
        pulls = conn.execute("SELECT r.name, b.digest, l.pulled FROM old.links l JOIN old.repos r ON r.id = l.repo "
                             "JOIN old.blobs b ON b.id = l.blob WHERE l.pulled IS NOT NULL").fetchall()
        ops.apply(conn, [ops.pulled({(name, digest): at for name, digest, at in pulls})])
        revalidated = conn.execute("SELECT r.name, t.tag, b.digest, t.fetched FROM old.tags t JOIN old.repos r "
                                   "ON r.id = t.repo JOIN old.blobs b ON b.id = t.blob WHERE t.fetched > 0").fetchall()
        ops.apply(conn, [ops.fetched(*row) for row in revalidated])
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute("DETACH DATABASE old")


# --- comparing two ledgers -----------------------------------------------------------------------

FACTS = {
    "repositories": "SELECT name, marks, kind, manifests, layers, tags, uploads, size FROM repos "
                    "WHERE marks + manifests + layers + tags + uploads > 0 ORDER BY name",
    "blobs": "SELECT digest, size, links, held, private, pins, reach FROM blobs WHERE size IS NOT NULL "
             "OR links > 0 ORDER BY digest",
    "links": "SELECT r.name, l.kind, b.digest FROM links l JOIN repos r ON r.id = l.repo JOIN blobs b "
             "ON b.id = l.blob ORDER BY 1, 2, 3",
    "tags": "SELECT r.name, t.tag, b.digest FROM tags t JOIN repos r ON r.id = t.repo JOIN blobs b "
            "ON b.id = t.blob ORDER BY 1, 2",
    # what a reached manifest references (a rebuild reads those; an unlinked one's references matter to nothing)
    "references": "SELECT p.digest, c.digest FROM refs JOIN blobs p ON p.id = refs.parent JOIN blobs c "
                  "ON c.id = refs.child WHERE p.size IS NOT NULL AND p.held + p.reach > 0 ORDER BY 1, 2",
    "uploads": "SELECT r.name, u.id FROM uploads u JOIN repos r ON r.id = u.repo ORDER BY 1, 2",
    "totals": "SELECT class, blobs, bytes FROM totals ORDER BY class",
}


def facts(conn: sqlite3.Connection, what: str) -> Iterator[tuple[object, ...]]:
    yield from conn.execute(FACTS[what])


def differences(held: sqlite3.Connection, found: sqlite3.Connection, limit: int = 20) -> dict[str, list[str]]:
    """What the ledger in use (`held`) says that storage (`found`, a fresh rebuild) does not, and the
    reverse, per kind of fact: a merge of two sorted streams, so both may be large."""
    report: dict[str, list[str]] = {}
    for what in FACTS:
        lines: list[str] = []
        a, b = facts(held, what), facts(found, what)
        x, y = next(a, None), next(b, None)
        while (x is not None or y is not None) and len(lines) < limit:
            key_x = x[:_key_len(what)] if x is not None else None
            key_y = y[:_key_len(what)] if y is not None else None
            if y is None or (x is not None and key_x is not None and key_y is not None and key_x < key_y):
                lines.append(f"only in the ledger: {x}")
                x = next(a, None)
            elif x is None or (key_x is not None and key_y is not None and key_y < key_x):
                lines.append(f"only in storage: {y}")
                y = next(b, None)
            else:
                if x != y:
                    lines.append(f"ledger {x} / storage {y}")
                x, y = next(a, None), next(b, None)
        if lines:
            report[what] = lines
    return report


def compare(held: Path, found: Path, kinds: schema.Kinds) -> dict[str, list[str]]:
    """`differences` of two ledger files (blocking: call it in a thread)."""
    a = schema.connect(held, kinds, writer=False)
    b = schema.connect(found, kinds, writer=False)
    try:
        a.execute("BEGIN")
        b.execute("BEGIN")
        return differences(a, b)
    finally:
        a.close()
        b.close()


def _key_len(what: str) -> int:
    return {"repositories": 1, "blobs": 1, "links": 3, "tags": 2, "references": 2, "uploads": 2, "totals": 1}[what]
