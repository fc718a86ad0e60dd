"""Garbage collection: sweep the blobs no manifest reaches.

What a manifest reaches is in the ledger (mirror/ledger/): a revision link makes a manifest reached,
and a reached manifest what it references, kept as counts by the ledger as every write lands, so gc
asks one index for its candidates instead of marking from every manifest. Safe while servers run:
a blob is only swept when it is older than the grace period, was not linked within it, and is older
than the oldest upload still in progress (its manifest may not be pushed yet); and the sweep goes
through the ledger's fence, so a push on any replica that references a candidate meanwhile keeps it.
An upload that has received nothing for `upload_idle` is abandoned, not in progress: it protects
nothing (else one upload left behind would keep every younger blob until upload purging removes
it, days later).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sqlite3
from dataclasses import dataclass, field

from mirror.commands import runner
from mirror.ledger import ops, queries
from mirror.ledger.ledger import BlobState, Ledger
from mirror.names import parse_digest
from mirror.registry.upload_sessions import live_uploads
from mirror.storage import layout

log = logging.getLogger("mirror.gc")
CHUNK = 1000  # candidates read from the index per step
PASS_CHUNK = 5000  # candidates collected, then swept, at a time
UPLOAD_IDLE = 3600.0


@dataclass
class GcResult:
    marked: int = 0
    swept: list[str] = field(default_factory=list)
    swept_bytes: int = 0
    kept_young: int = 0
    dangling_links: int = 0


@dataclass(frozen=True, slots=True)
class Candidate:
    digest: str
    size: int
    layer_links: int


def candidates(conn: sqlite3.Connection, cutoff: float, after: int, limit: int) -> tuple[list[Candidate], int, int]:
    """Blobs in storage no manifest reaches, older than `cutoff` and not linked since, from id `after`,
    at most `limit`; with how many were kept as young on the way, and where the next chunk starts (0:
    done)."""
    found: list[Candidate] = []
    young = 0
    while rows := queries.unreached(conn, after, CHUNK):
        for digest, size, mtime, linked, blob_id in rows:
            if len(found) >= limit:
                return found, young, after
            after = blob_id
            if (mtime or 0.0) > cutoff or (linked or 0.0) > cutoff:
                young += 1
                continue
            links, _ = queries.users(conn, digest)
            found.append(Candidate(digest, size, sum(1 for _, kind in links if kind == ops.LAYER)))
    return found, young, 0


def reached(conn: sqlite3.Connection) -> int:
    """How many blobs in storage a manifest reaches (gc's 'in use')."""
    unreached = conn.execute("SELECT count(*) FROM blobs INDEXED BY blobs_unreached WHERE size IS NOT NULL "
                             "AND held = 0 AND reach = 0").fetchone()[0]
    return queries.totals(conn).blobs - int(unreached)


async def collect(ledger: Ledger, *, dry_run: bool = False, grace: float = 3600.0,
                  upload_idle: float = UPLOAD_IDLE) -> GcResult:
    now = ledger.clock.time()
    cutoff = now - grace
    live = [u for u in await live_uploads(ledger.storage, ledger, activity=True) if u.active >= now - upload_idle]
    if live:
        cutoff = min(cutoff, min(u.started for u in live))
    result = GcResult(marked=await ledger.read(reached))
    by_digest: dict[str, Candidate] = {}  # the chunk under way

    def swept(state: BlobState) -> None:
        result.swept.append(state.digest)
        result.swept_bytes += by_digest[state.digest].size
        result.dangling_links += by_digest[state.digest].layer_links

    after = -1
    while after:  # a chunk at a time: a collection of any size holds one chunk
        found, young, after = await ledger.read(candidates, cutoff, max(after, 0), PASS_CHUNK)
        result.kept_young += young
        by_digest.clear()
        by_digest.update((c.digest, c) for c in found)
        if dry_run:
            for c in found:
                swept(BlobState(c.digest, c.size, None, False, False, None))
        else:
            # asked again behind the pass's marker: reached or linked meanwhile (here or on another replica)
            await ledger.remove(by_digest, lambda s: s.reached or (s.linked or 0.0) > cutoff, removed=swept)
    result.swept.sort()
    # Layer links to blobs that are gone would only cost a stat each: drop them too.
    dangling = await ledger.read(queries.dangling_layers)
    result.dangling_links += len(dangling)
    if dangling and not dry_run:
        await ledger.storage.delete_many([layout.layer(repo, parse_digest(d)) for repo, d in dangling])
        await ledger.record([ops.unlink(repo, d, ops.LAYER) for repo, d in dangling], durable=False)
    log.info("gc: %d marked, %d blobs (%d bytes) %s, %d young kept", result.marked, len(result.swept),
             result.swept_bytes, "would be swept" if dry_run else "swept", result.kept_young)
    return result


def command(args: argparse.Namespace) -> int:
    """`mirror gc [--dry-run] [--grace] [--upload-idle] [--json]`."""
    config = runner.load_config(args.config)
    result = runner.run_with_ledger(config, lambda ledger: collect(ledger, dry_run=args.dry_run, grace=args.grace,
                                                                   upload_idle=args.upload_idle),
                                    show=runner.show_progress(args.json))
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **dataclasses.asdict(result)}))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for digest in result.swept:
        print(f"{verb} {digest}")
    print(f"{result.marked} blobs in use; {verb} {len(result.swept)} blobs ({result.swept_bytes} bytes); "
          f"kept {result.kept_young} younger than the grace period")
    return 0
