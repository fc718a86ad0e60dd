"""The ledger's tables, and the triggers that keep what is derived from the facts true in the same
transaction as the fact that changes it. Facts: `blobs.size` (in storage, or NULL: only named),
`links`, `tags`, `refs` (what a manifest references), `repos.marks`, `uploads`, and the times
(`blobs.used`, `repos.pulled`, `links.pulled`, `tags.fetched`). Derived: a repository's counts,
size and kind; a blob's link counts, whether private content pins it (`private`, `pins`) and
whether a manifest reaches it (`held`, `reach`); the totals per class.

A blob is *pinned* when a private repository links it or a pinned manifest references it: never
evicted. It is *reached* when a repository links it as a manifest or a reached manifest references
it: never collected by gc. Both propagate down `refs` by counting (a manifest's children get +1
when it becomes pinned or reached, -1 when it stops), so each is one indexed column to ask.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mirror.registry.namespace import PRIVATE, classify
from mirror.storage import layout

VERSION = 2
PRIVATE_BIT, CACHED_BIT = 1, 2  # repos.marks
MARK_BITS = {layout.PRIVATE_MARK: PRIVATE_BIT, layout.CACHED_MARK: CACHED_BIT}
LAYER, REVISION = 0, 1  # links.kind
CATALOGED = "(layers > 0 OR manifests > 0 OR tags > 0)"  # in the catalog, as registry:2 (layout.CATALOGED)
LISTED = f"({CATALOGED} AND (manifests > 0 OR tags > 0))"  # on the UI's list: blob links alone make no row


def sort_key(name: str) -> str:
    """registry:2 lists repositories in path order (`a/b` before `a-b`): '/' as ' ', which sorts
    below every character a name may hold."""
    return name.replace("/", " ")


def _class(row: str) -> str:
    return (f"(CASE WHEN {row}.size IS NULL THEN NULL WHEN {row}.private + {row}.pins > 0 THEN 'private' "
            f"WHEN {row}.links > 0 THEN 'cached' ELSE 'loose' END)")


TABLES = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;

CREATE TABLE repos (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key TEXT NOT NULL,                       -- sort_key(name)
    marks INTEGER NOT NULL DEFAULT 0,        -- PRIVATE_BIT | CACHED_BIT
    kind TEXT NOT NULL DEFAULT 'open',       -- namespace.classify: private | cached | open
    manifests INTEGER NOT NULL DEFAULT 0,    -- revision links
    layers INTEGER NOT NULL DEFAULT 0,       -- layer links
    tags INTEGER NOT NULL DEFAULT 0,
    uploads INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,         -- bytes of the blobs in storage it links (shared ones in each)
    pulled REAL                              -- last manifest GET
);
CREATE INDEX repos_by_key ON repos(key) WHERE {CATALOGED};
CREATE INDEX repos_by_size ON repos(size DESC, key) WHERE {LISTED};
CREATE INDEX repos_by_pulled ON repos(pulled DESC, key) WHERE {LISTED};

CREATE TABLE blobs (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    size INTEGER,                            -- NULL: not in storage, only named by a link or a reference
    mtime REAL,
    used REAL,                               -- last use: the last access, else mtime
    linked REAL,                             -- when a link to it was last created
    links INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,         -- revision links
    private INTEGER NOT NULL DEFAULT 0,      -- links from private repositories
    pins INTEGER NOT NULL DEFAULT 0,         -- references from pinned manifests
    reach INTEGER NOT NULL DEFAULT 0         -- references from reached manifests
);
-- eviction's candidates, least recently used first; gc's
CREATE INDEX blobs_unpinned ON blobs(used, id) WHERE size IS NOT NULL AND private = 0 AND pins = 0;
CREATE INDEX blobs_unreached ON blobs(id) WHERE size IS NOT NULL AND held = 0 AND reach = 0;
CREATE INDEX blobs_absent ON blobs(id) WHERE size IS NULL;

CREATE TABLE links (
    repo INTEGER NOT NULL,
    kind INTEGER NOT NULL,                   -- LAYER | REVISION
    blob INTEGER NOT NULL,
    created REAL NOT NULL DEFAULT 0,
    pulled REAL,                             -- a revision's last GET
    PRIMARY KEY (repo, kind, blob)
) WITHOUT ROWID;
CREATE INDEX links_by_blob ON links(blob);

CREATE TABLE tags (
    repo INTEGER NOT NULL,
    tag TEXT NOT NULL,
    blob INTEGER NOT NULL,
    fetched REAL NOT NULL DEFAULT 0,         -- a cached tag: when the upstream last confirmed it (0: never)
    PRIMARY KEY (repo, tag)
) WITHOUT ROWID;
CREATE INDEX tags_by_blob ON tags(blob);

CREATE TABLE refs (parent INTEGER NOT NULL, child INTEGER NOT NULL, PRIMARY KEY (parent, child)) WITHOUT ROWID;
CREATE INDEX refs_by_child ON refs(child);

CREATE TABLE uploads (
    repo INTEGER NOT NULL, id TEXT NOT NULL, started REAL NOT NULL, PRIMARY KEY (repo, id)
) WITHOUT ROWID;
CREATE INDEX uploads_by_start ON uploads(started);

CREATE TABLE totals (class TEXT PRIMARY KEY, blobs INTEGER NOT NULL, bytes INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO totals VALUES ('private', 0, 0), ('cached', 0, 0), ('loose', 0, 0);
"""

TRIGGERS = f"""
CREATE TRIGGER repo_kind AFTER UPDATE OF marks, layers, manifests ON repos
WHEN mirror_kind(NEW.name, NEW.marks, NEW.layers + NEW.manifests > 0) != NEW.kind BEGIN
    UPDATE repos SET kind = mirror_kind(NEW.name, NEW.marks, NEW.layers + NEW.manifests > 0) WHERE id = NEW.id;
END;
CREATE TRIGGER repo_private AFTER UPDATE OF kind ON repos
WHEN (OLD.kind = 'private') != (NEW.kind = 'private') BEGIN
    UPDATE blobs SET private = private + (CASE WHEN NEW.kind = 'private' THEN 1 ELSE -1 END)
        * (SELECT count(*) FROM links WHERE repo = NEW.id AND links.blob = blobs.id)
        WHERE id IN (SELECT blob FROM links WHERE repo = NEW.id);
END;

CREATE TRIGGER link_added AFTER INSERT ON links BEGIN
    UPDATE blobs SET links = links + 1, held = held + (NEW.kind = {REVISION}),
        private = private + ((SELECT kind FROM repos WHERE id = NEW.repo) = 'private'),
        linked = max(coalesce(linked, 0), NEW.created) WHERE id = NEW.blob;
    -- after the blob's counts: a kind this link changes recounts every link of the repository
    UPDATE repos SET layers = layers + (NEW.kind = {LAYER}), manifests = manifests + (NEW.kind = {REVISION}),
        size = size + coalesce((SELECT size FROM blobs WHERE id = NEW.blob), 0) WHERE id = NEW.repo;
END;
CREATE TRIGGER link_removed AFTER DELETE ON links BEGIN
    UPDATE blobs SET links = links - 1, held = held - (OLD.kind = {REVISION}),
        private = private - ((SELECT kind FROM repos WHERE id = OLD.repo) = 'private') WHERE id = OLD.blob;
    UPDATE repos SET layers = layers - (OLD.kind = {LAYER}), manifests = manifests - (OLD.kind = {REVISION}),
        size = size - coalesce((SELECT size FROM blobs WHERE id = OLD.blob), 0) WHERE id = OLD.repo;
END;

CREATE TRIGGER tag_added AFTER INSERT ON tags BEGIN
    UPDATE repos SET tags = tags + 1 WHERE id = NEW.repo;
END;
CREATE TRIGGER tag_removed AFTER DELETE ON tags BEGIN
    UPDATE repos SET tags = tags - 1 WHERE id = OLD.repo;
END;

CREATE TRIGGER upload_added AFTER INSERT ON uploads BEGIN
    UPDATE repos SET uploads = uploads + 1 WHERE id = NEW.repo;
END;
CREATE TRIGGER upload_removed AFTER DELETE ON uploads BEGIN
    UPDATE repos SET uploads = uploads - 1 WHERE id = OLD.repo;
END;

CREATE TRIGGER ref_added AFTER INSERT ON refs BEGIN
    UPDATE blobs SET
        pins = pins + coalesce((SELECT private + pins > 0 FROM blobs WHERE id = NEW.parent), 0),
        reach = reach + coalesce((SELECT held + reach > 0 FROM blobs WHERE id = NEW.parent), 0)
        WHERE id = NEW.child;
END;
CREATE TRIGGER ref_removed AFTER DELETE ON refs BEGIN
    UPDATE blobs SET
        pins = pins - coalesce((SELECT private + pins > 0 FROM blobs WHERE id = OLD.parent), 0),
        reach = reach - coalesce((SELECT held + reach > 0 FROM blobs WHERE id = OLD.parent), 0)
        WHERE id = OLD.child;
END;

CREATE TRIGGER blob_pinned AFTER UPDATE OF private, pins ON blobs
WHEN (OLD.private + OLD.pins > 0) != (NEW.private + NEW.pins > 0) BEGIN
    UPDATE blobs SET pins = pins + (CASE WHEN NEW.private + NEW.pins > 0 THEN 1 ELSE -1 END)
        WHERE id IN (SELECT child FROM refs WHERE parent = NEW.id);
END;
CREATE TRIGGER blob_reached AFTER UPDATE OF held, reach ON blobs
WHEN (OLD.held + OLD.reach > 0) != (NEW.held + NEW.reach > 0) BEGIN
    UPDATE blobs SET reach = reach + (CASE WHEN NEW.held + NEW.reach > 0 THEN 1 ELSE -1 END)
        WHERE id IN (SELECT child FROM refs WHERE parent = NEW.id);
END;
CREATE TRIGGER blob_sized AFTER UPDATE OF size ON blobs WHEN OLD.size IS NOT NEW.size BEGIN
    UPDATE repos SET size = size + (coalesce(NEW.size, 0) - coalesce(OLD.size, 0))
        * (SELECT count(*) FROM links WHERE links.repo = repos.id AND links.blob = NEW.id)
        WHERE id IN (SELECT repo FROM links WHERE blob = NEW.id);
END;

CREATE TRIGGER totals_insert AFTER INSERT ON blobs WHEN NEW.size IS NOT NULL BEGIN
    UPDATE totals SET blobs = blobs + 1, bytes = bytes + NEW.size WHERE class = {_class("NEW")};
END;
CREATE TRIGGER totals_delete AFTER DELETE ON blobs WHEN OLD.size IS NOT NULL BEGIN
    UPDATE totals SET blobs = blobs - 1, bytes = bytes - OLD.size WHERE class = {_class("OLD")};
END;
CREATE TRIGGER totals_update AFTER UPDATE ON blobs
WHEN {_class("OLD")} IS NOT {_class("NEW")} OR OLD.size IS NOT NEW.size BEGIN
    UPDATE totals SET blobs = blobs - 1, bytes = bytes - OLD.size WHERE class = {_class("OLD")};
    UPDATE totals SET blobs = blobs + 1, bytes = bytes + NEW.size WHERE class = {_class("NEW")};
END;
"""

@dataclass(frozen=True)
class Kinds:
    """What decides a repository's kind besides its marks (namespace.classify): whether the
    configuration alone makes a name private, and what unmarked content is in this root."""

    configured: Callable[[str], bool]
    adopted: str = PRIVATE  # namespace.adopted_kind: CACHED in a root registry:2 ran as a pull-through cache


def kind_function(kinds: Kinds) -> Callable[[str, int, int], str]:
    """namespace.classify over a row: what `repos.kind` holds (and what the triggers recompute)."""

    def kind(name: str, marks: int, has_content: int) -> str:
        found = {mark for mark, bit in MARK_BITS.items() if marks & bit}
        return classify(kinds.configured(name), found, bool(has_content), kinds.adopted)

    return kind


def connect(path: Path, kinds: Kinds, *, writer: bool, bulk: bool = False) -> sqlite3.Connection:
    """A connection to the ledger at `path`; the writer's creates the tables if need be (with `bulk`,
    without the triggers: a rebuild loads facts, then `derive`s, then `add_triggers`)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # local state a rebuild restores: no fsync per commit
    conn.execute("PRAGMA recursive_triggers = ON")  # pins and reach propagate down refs
    conn.execute("PRAGMA cache_size = -16384")  # KiB
    conn.create_function("mirror_kind", 3, kind_function(kinds), deterministic=True)
    if writer and not _has(conn, "meta"):
        conn.execute("BEGIN IMMEDIATE")
        if not _has(conn, "meta"):
            for statement in _statements(TABLES if bulk else TABLES + TRIGGERS):
                conn.execute(statement)
            conn.execute("INSERT INTO meta VALUES ('version', ?)", (VERSION,))
        conn.execute("COMMIT")
    return conn


def _has(conn: sqlite3.Connection, table: str) -> bool:
    return bool(conn.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0])


def add_triggers(conn: sqlite3.Connection) -> None:
    for statement in _statements(TRIGGERS):
        conn.execute(statement)


CLOSURE = """CREATE TEMP TABLE {name} AS WITH RECURSIVE c(d) AS (
    SELECT id FROM blobs WHERE {roots} UNION SELECT refs.child FROM refs JOIN c ON refs.parent = c.d
) SELECT d FROM c"""

DERIVE = f"""
UPDATE repos SET
    layers = (SELECT count(*) FROM links WHERE repo = repos.id AND kind = {LAYER}),
    manifests = (SELECT count(*) FROM links WHERE repo = repos.id AND kind = {REVISION}),
    tags = (SELECT count(*) FROM tags WHERE repo = repos.id),
    uploads = (SELECT count(*) FROM uploads WHERE repo = repos.id);
UPDATE repos SET kind = mirror_kind(name, marks, layers + manifests > 0);
CREATE TEMP TABLE link_counts AS SELECT links.blob AS id, count(*) AS links,
    sum(links.kind = {REVISION}) AS held, sum(repos.kind = 'private') AS private, max(links.created) AS linked
    FROM links JOIN repos ON repos.id = links.repo GROUP BY links.blob;
CREATE UNIQUE INDEX temp.link_counts_id ON link_counts(id);
UPDATE blobs SET (links, held, private, linked) = (SELECT links, held, private, linked FROM link_counts
    WHERE link_counts.id = blobs.id) WHERE id IN (SELECT id FROM link_counts);
{CLOSURE.format(name="pinned", roots="private > 0")};
CREATE UNIQUE INDEX temp.pinned_d ON pinned(d);
{CLOSURE.format(name="reached", roots="held > 0")};
CREATE UNIQUE INDEX temp.reached_d ON reached(d);
CREATE TEMP TABLE ref_counts AS SELECT child AS id,
    sum(parent IN (SELECT d FROM pinned)) AS pins, sum(parent IN (SELECT d FROM reached)) AS reach
    FROM refs GROUP BY child;
CREATE UNIQUE INDEX temp.ref_counts_id ON ref_counts(id);
UPDATE blobs SET (pins, reach) = (SELECT pins, reach FROM ref_counts WHERE ref_counts.id = blobs.id)
    WHERE id IN (SELECT id FROM ref_counts);
UPDATE repos SET size = coalesce((SELECT sum(blobs.size) FROM links JOIN blobs ON blobs.id = links.blob
    WHERE links.repo = repos.id), 0);
UPDATE totals SET (blobs, bytes) = (SELECT count(*), coalesce(sum(size), 0) FROM blobs
    WHERE {_class("blobs")} = totals.class);
DROP TABLE temp.link_counts;
DROP TABLE temp.pinned;
DROP TABLE temp.reached;
DROP TABLE temp.ref_counts;
"""


def derive(conn: sqlite3.Connection) -> None:
    """Every derived column from the facts at once, set-based (what the triggers keep one write at a
    time): a rebuild's load is a bulk insert, not a million trigger runs."""
    for statement in _statements(DERIVE):
        conn.execute(statement)


def _statements(script: str) -> list[str]:
    """A script's statements (triggers hold `;` in their bodies: sqlite3.complete_statement splits right)."""
    found, current = [], ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--") and not current.strip():
            continue
        current += line
        if sqlite3.complete_statement(current):
            found.append(current.strip())
            current = ""
    return [s for s in found if s]


def get_meta(conn: sqlite3.Connection, key: str, default: object = None) -> object:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def set_meta(conn: sqlite3.Connection, key: str, value: object) -> None:
    conn.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
