"""The reads the rest of mirror asks the ledger, each an indexed query whose cost is what it returns
(a page, the candidates of one pass), run in the reading thread (database.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mirror.ledger.ops import BLOB, REPO
from mirror.ledger.schema import CATALOGED, LAYER, LISTED, REVISION, get_meta, sort_key

Visible = Callable[[str, bool], bool]  # (name, private) -> whether the caller may see it
SCAN_CHUNK = 512  # rows read per step when a caller's rules filter the listing


@dataclass(frozen=True, slots=True)
class Row:
    """A repository as the ledger holds it."""

    name: str
    kind: str  # private | cached | open (namespace.classify)
    size: int  # bytes of the blobs in storage it links (shared ones count in each repository)
    manifests: int
    layers: int
    tags: int
    uploads: int
    pulled: float | None

    @property
    def private(self) -> bool:
        return self.kind == "private"


ROW = "name, kind, size, manifests, layers, tags, uploads, pulled"


def repository(conn: sqlite3.Connection, name: str) -> Row | None:
    found = conn.execute(f"SELECT {ROW} FROM repos WHERE name = ?", (name,)).fetchone()
    return Row(*found) if found else None


# --- listings ------------------------------------------------------------------------------------


def catalog_page(conn: sqlite3.Connection, last: str | None, n: int | None,
                 visible: Visible | None) -> tuple[list[str], bool]:
    """Listed repositories after `last` in registry:2's order, at most `n` (None: all) the caller may
    see, and whether more follow. Each step reads an index range; a caller whose rules hide most
    repositories pays for the rows skipped, never for the whole catalog at once."""
    page: list[str] = []
    key = sort_key(last) if last else ""
    want = None if n is None else n + 1
    while want is None or len(page) < want:
        chunk = conn.execute(f"SELECT key, name, kind FROM repos INDEXED BY repos_by_key WHERE {CATALOGED} AND key > ? "
                             f"ORDER BY key LIMIT ?", (key, SCAN_CHUNK if visible else (want or -1))).fetchall()
        page += [name for _, name, kind in chunk if visible is None or visible(name, kind == "private")]
        if visible is None or len(chunk) < SCAN_CHUNK:
            break
        key = chunk[-1][0]
    if n is not None and len(page) > n:
        return page[:n], True
    return page, False


def tags_page(conn: sqlite3.Connection, repo: str, last: str | None, n: int | None) -> tuple[list[str], bool]:
    """Tags of `repo` after `last` (sorted), at most `n` (None: all), and whether more follow."""
    limit = -1 if n is None else n + 1
    names = [row[0] for row in conn.execute(f"SELECT tag FROM tags WHERE repo = {REPO} AND tag > ? ORDER BY tag "
                                             f"LIMIT ?", (repo, last or "", limit))]
    if n is not None and len(names) > n:
        return names[:n], True
    return names, False


def tag(conn: sqlite3.Connection, repo: str, name: str) -> tuple[str, float] | None:
    """(digest, when its upstream last confirmed it) of a tag."""
    found = conn.execute(f"SELECT digest, fetched FROM tags JOIN blobs ON blobs.id = tags.blob WHERE repo = {REPO} "
                         f"AND tag = ?", (repo, name)).fetchone()
    return (found[0], found[1]) if found else None


def tags_of(conn: sqlite3.Connection, repo: str, offset: int, n: int) -> list[tuple[str, str]]:
    """One page of (tag, digest) of `repo`, by tag."""
    return [(t, d) for t, d in conn.execute(f"SELECT tag, digest FROM tags JOIN blobs ON blobs.id = tags.blob "
                                            f"WHERE repo = {REPO} ORDER BY tag LIMIT ? OFFSET ?", (repo, n, offset))]


def tags_pointing(conn: sqlite3.Connection, repo: str, digest: str) -> list[str]:
    return [row[0] for row in conn.execute(f"SELECT tag FROM tags WHERE repo = {REPO} AND blob = {BLOB} ORDER BY tag",
                                           (repo, digest))]


def manifests_of(conn: sqlite3.Connection, repo: str, untagged: bool, n: int) -> list[tuple[str, float | None]]:
    """(digest, last pulled) of the manifests `repo` links (only those no tag names, if `untagged`)."""
    extra = "AND NOT EXISTS (SELECT 1 FROM tags WHERE tags.repo = links.repo AND tags.blob = links.blob)" \
        if untagged else ""
    return [(d, p) for d, p in conn.execute(
        f"SELECT digest, pulled FROM links JOIN blobs ON blobs.id = links.blob WHERE repo = {REPO} "
        f"AND kind = {REVISION} {extra} ORDER BY digest LIMIT ?", (repo, n))]


def revision_pulled(conn: sqlite3.Connection, repo: str, digests: list[str]) -> dict[str, float | None]:
    found: dict[str, float | None] = {}
    for digest in digests:
        row = conn.execute(f"SELECT pulled FROM links WHERE repo = {REPO} AND kind = {REVISION} AND blob = {BLOB}",
                           (repo, digest)).fetchone()
        found[digest] = row[0] if row else None
    return found


def has_link(conn: sqlite3.Connection, repo: str, kind: int, digest: str) -> bool:
    return conn.execute(f"SELECT 1 FROM links WHERE repo = {REPO} AND kind = ? AND blob = {BLOB}",
                        (repo, kind, digest)).fetchone() is not None


SORTS = {"name": "key", "size": "size DESC, key", "pulled": "pulled DESC, key"}
INDEXES = {"name": "repos_by_key", "size": "repos_by_size", "pulled": "repos_by_pulled"}


def repositories_page(conn: sqlite3.Connection, q: str, kind: str, sort: str, offset: int, n: int,
                      visible: Visible | None) -> tuple[list[Row], int, int]:
    """The UI's list: rows `offset`.. of those matching `q` (a substring) and `kind`, in `sort` order,
    at most `n`; with how many match and how many are listed in all (the caller sees all only
    without `visible`)."""
    where, args = [LISTED], []
    if q:
        where.append("instr(name, ?) > 0")
        args.append(q)
    if kind:
        where.append("kind = ?")
        args.append(kind)
    select = f"SELECT {ROW} FROM repos INDEXED BY {INDEXES[sort]} WHERE {' AND '.join(where)} ORDER BY {SORTS[sort]}"
    listed = conn.execute(f"SELECT count(*) FROM repos INDEXED BY repos_by_key WHERE {LISTED}").fetchone()[0]
    if visible is None:
        total = conn.execute(f"SELECT count(*) FROM repos WHERE {' AND '.join(where)}", args).fetchone()[0]
        rows = [Row(*r) for r in conn.execute(f"{select} LIMIT ? OFFSET ?", (*args, n, offset))]
        return rows, total, listed
    rows, total = [], 0
    for r in conn.execute(select, args):  # a caller's rules decide row by row: this reads every match
        if visible(r[0], r[1] == "private"):
            if offset <= total < offset + n:
                rows.append(Row(*r))
            total += 1
    return rows, total, total


# --- totals, du ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Totals:
    """Blobs in storage by class: pinned by private content, linked by caches only, or linked by nothing."""

    private_blobs: int = 0
    private_bytes: int = 0
    cached_blobs: int = 0
    cached_bytes: int = 0
    loose_blobs: int = 0
    loose_bytes: int = 0
    uploads: int = 0

    @property
    def blobs(self) -> int:
        return self.private_blobs + self.cached_blobs + self.loose_blobs

    @property
    def bytes(self) -> int:
        return self.private_bytes + self.cached_bytes + self.loose_bytes

    @property
    def unpinned_bytes(self) -> int:
        """What eviction may remove and the cap is about: everything not pinned by private content."""
        return self.cached_bytes + self.loose_bytes


def totals(conn: sqlite3.Connection) -> Totals:
    found = {c: (b, n) for c, b, n in conn.execute("SELECT class, blobs, bytes FROM totals")}
    uploads = conn.execute("SELECT count(*) FROM uploads").fetchone()[0]
    return Totals(*found["private"], *found["cached"], *found["loose"], uploads)


def usage_rows(conn: sqlite3.Connection, after: str, n: int) -> list[tuple[str, Row]]:
    """(key, row) of repositories holding anything linked, after key `after`: `du` streams them."""
    return [(r[-1], Row(*r[:-1])) for r in conn.execute(
        f"SELECT {ROW}, key FROM repos WHERE key > ? AND manifests + layers + tags > 0 ORDER BY key LIMIT ?",
        (after, n))]


# --- eviction and gc -------------------------------------------------------------------------------


def unpinned(conn: sqlite3.Connection, after: tuple[float, int], n: int) -> list[tuple[str, int, float, int]]:
    """(digest, size, last use) of blobs nothing private needs, least recently used first, after `after`."""
    return conn.execute("SELECT digest, size, used, id FROM blobs INDEXED BY blobs_unpinned WHERE size IS NOT NULL "
                        "AND private = 0 AND pins = 0 AND (used, id) > (?, ?) ORDER BY used, id LIMIT ?",
                        (*after, n)).fetchall()


def unreached(conn: sqlite3.Connection, after: int, n: int) -> list[tuple[str, int, float, float | None, int]]:
    """(digest, size, mtime, last linked, id) of blobs no manifest reaches, after id `after`."""
    return conn.execute("SELECT digest, size, mtime, linked, id FROM blobs INDEXED BY blobs_unreached "
                        "WHERE size IS NOT NULL AND held = 0 AND reach = 0 AND id > ? ORDER BY id LIMIT ?",
                        (after, n)).fetchall()


def served_since(conn: sqlite3.Connection, since: float) -> list[tuple[str, float]]:
    """(digest, when) of manifests in storage served at or after `since`: pulls that may be under way."""
    return conn.execute(f"SELECT digest, used FROM blobs INDEXED BY blobs_unpinned WHERE size IS NOT NULL "
                        f"AND private = 0 AND pins = 0 AND used >= ? "
                        f"AND EXISTS (SELECT 1 FROM links WHERE links.blob = blobs.id AND kind = {REVISION})",
                        (since,)).fetchall()


def children(conn: sqlite3.Connection, manifest: str) -> list[tuple[str, float | None]]:
    """(digest, last use) of what `manifest` references."""
    return conn.execute(f"SELECT digest, used FROM refs JOIN blobs ON blobs.id = refs.child WHERE parent = {BLOB}",
                        (manifest,)).fetchall()


def blob_state(conn: sqlite3.Connection, digest: str) -> tuple[int | None, float | None, bool, bool, float | None]:
    """(size, last use, pinned, reached, last linked) of a blob, as the ledger has it now."""
    found = conn.execute("SELECT size, used, private + pins > 0, held + reach > 0, linked FROM blobs WHERE digest = ?",
                         (digest,)).fetchone()
    return (found[0], found[1], bool(found[2]), bool(found[3]), found[4]) if found else (None, None, False, False, None)


def users(conn: sqlite3.Connection, digest: str) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Who needs `digest`: (repository, link kind) of its links and (repository, tag) of tags naming it."""
    links = conn.execute(f"SELECT name, links.kind FROM links JOIN repos ON repos.id = links.repo "
                         f"WHERE blob = {BLOB} ORDER BY name, links.kind", (digest,)).fetchall()
    tags = conn.execute(f"SELECT name, tag FROM tags JOIN repos ON repos.id = tags.repo WHERE blob = {BLOB} "
                        f"ORDER BY name, tag", (digest,)).fetchall()
    return [(r, k) for r, k in links], [(r, t) for r, t in tags]


def dangling_layers(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(repository, digest) of layer links to blobs not in storage (few: an index of them)."""
    return conn.execute(f"SELECT name, digest FROM blobs INDEXED BY blobs_absent JOIN links ON links.blob = blobs.id "
                        f"JOIN repos ON repos.id = links.repo WHERE blobs.size IS NULL AND links.kind = {LAYER} "
                        f"ORDER BY name, digest").fetchall()


def uploads_before(conn: sqlite3.Connection, started: float) -> list[tuple[str, str, float]]:
    return conn.execute("SELECT name, uploads.id, started FROM uploads INDEXED BY uploads_by_start JOIN repos "
                        "ON repos.id = uploads.repo WHERE started < ? ORDER BY started", (started,)).fetchall()


def meta(conn: sqlite3.Connection, key: str, default: object = None) -> object:
    return get_meta(conn, key, default)


def walk_rows(conn: sqlite3.Connection, table: str, columns: str, order: str) -> Iterator[tuple[object, ...]]:
    """Every row of a table in `order` (verify and the tests compare two ledgers with it)."""
    yield from conn.execute(f"SELECT {columns} FROM {table} ORDER BY {order}")
