"""The ledger's derived columns (repository counts, sizes and kinds; blobs pinned by private content or
reached from a manifest; the totals) are what the facts say, however the facts came: the triggers one
op at a time, and a rebuild's bulk derivation, both against a plain Python reading of the facts."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.ledger import ops, queries, rebuild, schema
from mirror.registry.namespace import classify

REPOS = ["team/a", "team/b", "library/c", "library/d", "other/e"]
DIGESTS = [f"sha256:{c * 64}" for c in "0123456789ab"]


def configured(name: str) -> bool:
    return name.startswith("team/")


def connect(path: Path, bulk: bool = False) -> sqlite3.Connection:
    return schema.connect(path, schema.Kinds(configured), writer=True, bulk=bulk)


def oracle(conn: sqlite3.Connection) -> dict[str, Any]:
    """What the facts in `conn` imply, computed in Python from the fact tables alone."""
    links = conn.execute("SELECT r.name, l.kind, b.digest, l.created FROM links l JOIN repos r ON r.id = l.repo "
                         "JOIN blobs b ON b.id = l.blob").fetchall()
    tags = conn.execute("SELECT r.name, t.tag FROM tags t JOIN repos r ON r.id = t.repo").fetchall()
    uploads = conn.execute("SELECT r.name FROM uploads u JOIN repos r ON r.id = u.repo").fetchall()
    marks = dict(conn.execute("SELECT name, marks FROM repos").fetchall())
    sizes = dict(conn.execute("SELECT digest, size FROM blobs").fetchall())
    refs = conn.execute("SELECT p.digest, c.digest FROM refs JOIN blobs p ON p.id = refs.parent "
                        "JOIN blobs c ON c.id = refs.child").fetchall()
    repos: dict[str, dict[str, Any]] = defaultdict(lambda: {"manifests": 0, "layers": 0, "tags": 0, "uploads": 0,
                                                            "size": 0})
    for name, kind, digest, _ in links:
        repos[name]["layers" if kind == schema.LAYER else "manifests"] += 1
        repos[name]["size"] += sizes.get(digest) or 0
    for name, _ in tags:
        repos[name]["tags"] += 1
    for (name,) in uploads:
        repos[name]["uploads"] += 1
    for name, bits in marks.items():
        found = {m for m, bit in schema.MARK_BITS.items() if bits & bit}
        repos[name]["kind"] = classify(configured(name), found, bool(repos[name]["layers"] + repos[name]["manifests"]))
    children: dict[str, list[str]] = defaultdict(list)
    for parent, child in refs:
        children[parent].append(child)

    def closure(roots: set[str]) -> set[str]:
        seen, pending = set(roots), list(roots)
        while pending:
            for child in children[pending.pop()]:
                if child not in seen:
                    seen.add(child)
                    pending.append(child)
        return seen

    private_links = {d for name, _, d, _ in links if repos[name].get("kind") == "private"}
    pinned = closure(private_links)
    reached = closure({d for _, kind, d, _ in links if kind == schema.REVISION})
    linked = {d for _, _, d, _ in links}
    totals: dict[str, list[int]] = {"private": [0, 0], "cached": [0, 0], "loose": [0, 0]}
    for digest, size in sizes.items():
        if size is None:
            continue
        cls = "private" if digest in pinned else "cached" if digest in linked else "loose"
        totals[cls][0] += 1
        totals[cls][1] += size
    return {"repos": {n: r for n, r in repos.items() if n in marks}, "pinned": pinned & set(sizes),
            "reached": reached & set(sizes), "totals": totals}


def derived(conn: sqlite3.Connection) -> dict[str, Any]:
    """The same, as the ledger's derived columns hold it."""
    repos = {name: {"manifests": m, "layers": la, "tags": t, "uploads": u, "size": s, "kind": k}
             for name, k, m, la, t, u, s in conn.execute(
                 "SELECT name, kind, manifests, layers, tags, uploads, size FROM repos")}
    pinned = {d for (d,) in conn.execute("SELECT digest FROM blobs WHERE private + pins > 0")}
    reached = {d for (d,) in conn.execute("SELECT digest FROM blobs WHERE held + reach > 0")}
    t = queries.totals(conn)
    totals = {"private": [t.private_blobs, t.private_bytes], "cached": [t.cached_blobs, t.cached_bytes],
              "loose": [t.loose_blobs, t.loose_bytes]}
    return {"repos": repos, "pinned": pinned, "reached": reached, "totals": totals}


repo = st.sampled_from(REPOS)
digest = st.sampled_from(DIGESTS)
op = st.one_of(
    st.builds(lambda d, n: ops.blob(d, n, 1.0), digest, st.integers(1, 1000)),
    st.builds(ops.blob_gone, digest),
    st.builds(lambda r, d, k: ops.link(r, d, k, 2.0), repo, digest, st.sampled_from([schema.LAYER, schema.REVISION])),
    st.builds(lambda r, d, k: ops.unlink(r, d, k), repo, digest, st.sampled_from([schema.LAYER, schema.REVISION])),
    st.builds(lambda r, t, d: ops.tag(r, t, d), repo, st.sampled_from(["v1", "v2", "latest"]), digest),
    st.builds(ops.untag, repo, st.sampled_from(["v1", "v2", "latest"])),
    # manifests reference by digest: a reference only ever points to a later digest here (no cycles)
    st.integers(0, len(DIGESTS) - 2).flatmap(lambda i: st.builds(
        lambda cs: ops.refs(DIGESTS[i], cs), st.lists(st.sampled_from(DIGESTS[i + 1:]), min_size=1, max_size=3))),
    st.builds(ops.mark, repo, st.sampled_from(["private", "cached"])),
    st.builds(ops.unmark, repo, st.sampled_from(["private", "cached"])),
    st.builds(lambda r, i: ops.upload(r, i, 3.0), repo, st.sampled_from(["u1", "u2"])),
    st.builds(ops.upload_gone, repo, st.sampled_from(["u1", "u2"])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(op, min_size=5, max_size=80))
def test_triggers_keep_what_the_facts_say(tmp_path_factory: Any, changes: list[ops.Op]) -> None:
    path = tmp_path_factory.mktemp("ledger") / "l.sqlite"
    conn = connect(path)
    for change in changes:
        conn.execute("BEGIN")
        ops.apply(conn, [change])
        conn.execute("COMMIT")
    assert derived(conn) == oracle(conn)
    # The same facts loaded in bulk and derived set-based: the very same ledger.
    bulk = connect(path.with_name("bulk.sqlite"), bulk=True)
    facts = [ops.blob(d, s, m) for d, s, m in conn.execute("SELECT digest, size, mtime FROM blobs WHERE size "
                                                           "IS NOT NULL")]
    facts += [ops.link(r, d, k, c) for r, k, d, c in conn.execute(
        "SELECT r.name, l.kind, b.digest, l.created FROM links l JOIN repos r ON r.id = l.repo "
        "JOIN blobs b ON b.id = l.blob")]
    facts += [ops.tag(r, t, d) for r, t, d in conn.execute(
        "SELECT r.name, t.tag, b.digest FROM tags t JOIN repos r ON r.id = t.repo JOIN blobs b ON b.id = t.blob")]
    refs: dict[str, list[str]] = defaultdict(list)
    for p, c in conn.execute("SELECT p.digest, c.digest FROM refs JOIN blobs p ON p.id = refs.parent "
                             "JOIN blobs c ON c.id = refs.child"):
        refs[p].append(c)
    facts += [ops.refs(p, cs) for p, cs in refs.items()]
    for name, bits in conn.execute("SELECT name, marks FROM repos"):
        facts += [ops.mark(name, m) for m, bit in schema.MARK_BITS.items() if bits & bit]
    facts += [ops.upload(r, i, s) for r, i, s in conn.execute(
        "SELECT r.name, u.id, u.started FROM uploads u JOIN repos r ON r.id = u.repo")]
    bulk.execute("BEGIN")
    ops.load(bulk, facts)
    schema.derive(bulk)
    bulk.execute("COMMIT")
    assert rebuild.differences(conn, bulk) == {}
    assert derived(bulk) == derived(conn)


def test_a_kind_follows_the_configuration(tmp_path: Path) -> None:
    """Private patterns that change between runs: the kinds are recomputed, and with them what is pinned."""
    conn = connect(tmp_path / "l.sqlite")
    conn.execute("BEGIN")
    ops.apply(conn, [ops.blob(DIGESTS[0], 10, 1.0), ops.mark("library/c", "cached"),
                     ops.link("library/c", DIGESTS[0], schema.LAYER, 1.0)])
    conn.execute("COMMIT")
    assert derived(conn)["pinned"] == set()
    conn.create_function("mirror_kind", 3, schema.kind_function(schema.Kinds(lambda name: True)), deterministic=True)
    conn.execute("UPDATE repos SET kind = mirror_kind(name, marks, layers + manifests > 0)")
    assert derived(conn)["pinned"] == {DIGESTS[0]} and queries.totals(conn).private_bytes == 10
