"""What a write changed, as data: the facts the ledger holds and the journal carries between
replicas. An op is a small JSON list, `[verb, *arguments]`; applying one is idempotent, and a run of
them applied in order leaves the tables as storage is after the writes they describe (schema.py's
triggers derive the rest).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from mirror.ledger.schema import LAYER, MARK_BITS, REVISION

Op = list[Any]

# --- the vocabulary ---------------------------------------------------------------------------------


def blob(digest: str, size: int, mtime: float) -> Op:
    """`digest` is in storage, `size` bytes, written at `mtime`."""
    return ["blob", digest, size, mtime]


def blob_gone(digest: str) -> Op:
    return ["-blob", digest]


def link(repo: str, digest: str, kind: int, at: float) -> Op:
    """`repo` links `digest` as a layer (LAYER) or a manifest (REVISION), since `at`."""
    return ["link", repo, kind, digest, at]


def unlink(repo: str, digest: str, kind: int) -> Op:
    return ["-link", repo, kind, digest]


def tag(repo: str, name: str, digest: str, fetched: float = 0.0) -> Op:
    """Tag `name` of `repo` points to `digest` (a cached one confirmed by its upstream at `fetched`)."""
    return ["tag", repo, name, digest, fetched]


def untag(repo: str, name: str) -> Op:
    return ["-tag", repo, name]


def fetched(repo: str, name: str, digest: str, at: float) -> Op:
    """The upstream confirmed a cached tag (no storage write: a time only)."""
    return ["fetched", repo, name, digest, at]


def refs(manifest: str, children: Iterable[str]) -> Op:
    """What manifest `manifest` references (config, layers, an index's children): immutable."""
    return ["refs", manifest, sorted(set(children))]


def mark(repo: str, name: str) -> Op:
    return ["mark", repo, name]


def unmark(repo: str, name: str) -> Op:
    return ["-mark", repo, name]


def upload(repo: str, upload_id: str, started: float) -> Op:
    return ["upload", repo, upload_id, started]


def upload_gone(repo: str, upload_id: str) -> Op:
    return ["-upload", repo, upload_id]


def used(times: Mapping[str, float]) -> Op:
    """Blobs (and manifests) served, and when: eviction's order."""
    return ["used", dict(times)]


def pulled(times: Mapping[tuple[str, str], float]) -> Op:
    """Manifest GETs: (repository, digest) -> when."""
    return ["pulled", [[repo, digest, at] for (repo, digest), at in times.items()]]


REFERENCING = frozenset({"link", "refs"})  # ops that make a blob needed


def referenced(ops: Iterable[Op]) -> set[str]:
    """The digests `ops` make something depend on (a write fences these: fence.py)."""
    found: set[str] = set()
    for op in ops:
        if op[0] == "link":
            found.add(op[3])
        elif op[0] == "refs":
            found.update(op[2])
    return found


# --- applying ---------------------------------------------------------------------------------------

def apply(conn: sqlite3.Connection, ops: Iterable[Op]) -> None:
    """Apply `ops` in order (the caller holds the transaction). Unknown verbs are skipped: a newer
    replica's records do not stop an older one."""
    for op in ops:
        handler = _HANDLERS.get(op[0])
        if handler is not None:
            handler(conn, *op[1:])


def load(conn: sqlite3.Connection, facts: Iterable[Op]) -> None:
    """Facts found by a walk of storage into a ledger without triggers, in bulk (a rebuild; then
    schema.derive computes what the triggers would have): only the positive verbs a walk finds."""
    rows: dict[str, list[tuple[Any, ...]]] = {v: [] for v in ("blob", "link", "tag", "refs", "mark", "upload")}
    names: set[str] = set()
    digests: set[str] = set()
    for op in facts:
        verb = op[0]
        if verb == "blob":
            rows[verb].append((op[1], op[2], op[3], op[3]))
        elif verb == "link":
            rows[verb].append((op[1], op[2], op[3], op[4]))
            names.add(op[1])
            digests.add(op[3])
        elif verb == "tag":
            rows[verb].append((op[1], op[2], op[3], op[4]))
            names.add(op[1])
            digests.add(op[3])
        elif verb == "refs":
            rows[verb] += [(op[1], child) for child in op[2]]
            digests.add(op[1])
            digests.update(op[2])
        elif verb == "mark" and op[2] in MARK_BITS:
            rows[verb].append((op[1], op[1].replace("/", " "), MARK_BITS[op[2]]))
        elif verb == "upload":
            rows[verb].append((op[1], op[2], op[3]))
            names.add(op[1])
    conn.executemany("INSERT INTO blobs(digest, size, mtime, used) VALUES (?, ?, ?, ?) ON CONFLICT(digest) DO UPDATE "
                     "SET size = excluded.size, mtime = excluded.mtime, used = excluded.used", rows["blob"])
    conn.executemany("INSERT OR IGNORE INTO blobs(digest) VALUES (?)", [(d,) for d in sorted(digests)])
    conn.executemany("INSERT INTO repos(name, key, marks) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE "
                     "SET marks = marks | excluded.marks", rows["mark"])
    conn.executemany("INSERT OR IGNORE INTO repos(name, key) VALUES (?, ?)",
                     [(n, n.replace("/", " ")) for n in sorted(names)])
    conn.executemany(f"INSERT OR IGNORE INTO links(repo, kind, blob, created) VALUES ({REPO}, ?, {BLOB}, ?)",
                     rows["link"])
    conn.executemany(f"INSERT OR REPLACE INTO tags(repo, tag, blob, fetched) VALUES ({REPO}, ?, {BLOB}, ?)",
                     rows["tag"])
    conn.executemany(f"INSERT OR IGNORE INTO refs(parent, child) VALUES ({BLOB}, {BLOB})", rows["refs"])
    conn.executemany(f"INSERT OR IGNORE INTO uploads(repo, id, started) VALUES ({REPO}, ?, ?)", rows["upload"])


REPO = "(SELECT id FROM repos WHERE name = ?)"
BLOB = "(SELECT id FROM blobs WHERE digest = ?)"


def repo_id(conn: sqlite3.Connection, name: str, create: bool = True) -> int | None:
    found = conn.execute("SELECT id FROM repos WHERE name = ?", (name,)).fetchone()
    if found is not None or not create:
        return found[0] if found else None
    return int(conn.execute("INSERT INTO repos(name, key, kind) VALUES (?1, replace(?1, '/', ' '), "
                            "mirror_kind(?1, 0, 0)) RETURNING id", (name,)).fetchone()[0])


def blob_id(conn: sqlite3.Connection, digest: str, create: bool = True) -> int | None:
    found = conn.execute("SELECT id FROM blobs WHERE digest = ?", (digest,)).fetchone()
    if found is not None or not create:
        return found[0] if found else None
    return int(conn.execute("INSERT INTO blobs(digest) VALUES (?) RETURNING id", (digest,)).fetchone()[0])


def _blob(conn: sqlite3.Connection, digest: str, size: int, mtime: float) -> None:
    conn.execute("""INSERT INTO blobs(digest, size, mtime, used) VALUES (?1, ?2, ?3, ?3)
                    ON CONFLICT(digest) DO UPDATE SET size = excluded.size,
                        mtime = CASE WHEN blobs.size IS NULL THEN excluded.mtime ELSE blobs.mtime END,
                        used = max(coalesce(blobs.used, 0), excluded.used)""", (digest, size, mtime))


def _blob_gone(conn: sqlite3.Connection, digest: str) -> None:
    blob = blob_id(conn, digest, create=False)
    if blob is None:
        return
    children = [row[0] for row in conn.execute("SELECT child FROM refs WHERE parent = ?", (blob,))]
    conn.execute("DELETE FROM refs WHERE parent = ?", (blob,))  # what it referenced loses a reference
    conn.execute("UPDATE blobs SET size = NULL, mtime = NULL, used = NULL WHERE id = ?", (blob,))
    for child in children:
        _tidy_blob(conn, child)
    _tidy_blob(conn, blob)


def _link(conn: sqlite3.Connection, repo: str, kind: int, digest: str, at: float) -> None:
    conn.execute("INSERT OR IGNORE INTO links(repo, kind, blob, created) VALUES (?, ?, ?, ?)",
                 (repo_id(conn, repo), kind, blob_id(conn, digest), at))


def _unlink(conn: sqlite3.Connection, repo: str, kind: int, digest: str) -> None:
    rid, blob = repo_id(conn, repo, create=False), blob_id(conn, digest, create=False)
    if rid is None or blob is None:
        return
    conn.execute("DELETE FROM links WHERE repo = ? AND kind = ? AND blob = ?", (rid, kind, blob))
    _tidy_blob(conn, blob)
    _tidy_repo(conn, rid)


def _tag(conn: sqlite3.Connection, repo: str, name: str, digest: str, fetched_at: float) -> None:
    conn.execute("""INSERT INTO tags(repo, tag, blob, fetched) VALUES (?, ?, ?, ?)
                    ON CONFLICT(repo, tag) DO UPDATE SET blob = excluded.blob, fetched = excluded.fetched""",
                 (repo_id(conn, repo), name, blob_id(conn, digest), fetched_at))


def _untag(conn: sqlite3.Connection, repo: str, name: str) -> None:
    rid = repo_id(conn, repo, create=False)
    if rid is None:
        return
    found = conn.execute("DELETE FROM tags WHERE repo = ? AND tag = ? RETURNING blob", (rid, name)).fetchone()
    if found is not None:
        _tidy_blob(conn, found[0])
    _tidy_repo(conn, rid)


def _fetched(conn: sqlite3.Connection, repo: str, name: str, digest: str, at: float) -> None:
    conn.execute(f"UPDATE tags SET fetched = max(fetched, ?) WHERE repo = {REPO} AND tag = ? AND blob = {BLOB}",
                 (at, repo, name, digest))


def _refs(conn: sqlite3.Connection, manifest: str, children: list[str]) -> None:
    parent = blob_id(conn, manifest)
    conn.executemany("INSERT OR IGNORE INTO refs(parent, child) VALUES (?, ?)",
                     [(parent, blob_id(conn, child)) for child in children])


def _mark(conn: sqlite3.Connection, repo: str, name: str) -> None:
    bit = MARK_BITS.get(name)
    if bit is not None:
        conn.execute("UPDATE repos SET marks = marks | ? WHERE id = ?", (bit, repo_id(conn, repo)))


def _unmark(conn: sqlite3.Connection, repo: str, name: str) -> None:
    bit, rid = MARK_BITS.get(name), repo_id(conn, repo, create=False)
    if bit is not None and rid is not None:
        conn.execute("UPDATE repos SET marks = marks & ~? WHERE id = ?", (bit, rid))
        _tidy_repo(conn, rid)


def _upload(conn: sqlite3.Connection, repo: str, upload_id: str, started: float) -> None:
    conn.execute("INSERT OR IGNORE INTO uploads(repo, id, started) VALUES (?, ?, ?)",
                 (repo_id(conn, repo), upload_id, started))


def _upload_gone(conn: sqlite3.Connection, repo: str, upload_id: str) -> None:
    rid = repo_id(conn, repo, create=False)
    if rid is not None:
        conn.execute("DELETE FROM uploads WHERE repo = ? AND id = ?", (rid, upload_id))
        _tidy_repo(conn, rid)


def _used(conn: sqlite3.Connection, times: dict[str, float]) -> None:
    conn.executemany("UPDATE blobs SET used = max(coalesce(used, 0), ?) WHERE digest = ? AND size IS NOT NULL",
                     [(at, digest) for digest, at in times.items()])


def _pulled(conn: sqlite3.Connection, times: list[list[Any]]) -> None:
    for repo, digest, at in times:
        conn.execute("UPDATE repos SET pulled = max(coalesce(pulled, 0), ?) WHERE name = ?", (at, repo))
        conn.execute(f"UPDATE links SET pulled = max(coalesce(pulled, 0), ?) WHERE repo = {REPO} AND kind = "
                     f"{REVISION} AND blob = {BLOB}", (at, repo, digest))


def _tidy_repo(conn: sqlite3.Connection, repo: int) -> None:
    """A repository that holds nothing any more has no row (as a walk of storage would find)."""
    conn.execute("DELETE FROM repos WHERE id = ? AND marks = 0 AND manifests = 0 AND layers = 0 AND tags = 0 "
                 "AND uploads = 0", (repo,))


def _tidy_blob(conn: sqlite3.Connection, blob: int) -> None:
    """A blob not in storage that nothing names any more has no row."""
    conn.execute("DELETE FROM blobs WHERE id = ?1 AND size IS NULL AND links = 0 "
                 "AND NOT EXISTS (SELECT 1 FROM refs WHERE child = ?1) "
                 "AND NOT EXISTS (SELECT 1 FROM tags WHERE blob = ?1)", (blob,))


_HANDLERS: dict[str, Any] = {
    "blob": _blob, "-blob": _blob_gone, "link": _link, "-link": _unlink, "tag": _tag, "-tag": _untag,
    "fetched": _fetched, "refs": _refs, "mark": _mark, "-mark": _unmark, "upload": _upload,
    "-upload": _upload_gone, "used": _used, "pulled": _pulled,
}

__all__ = ["LAYER", "REVISION", "Op", "apply"]
