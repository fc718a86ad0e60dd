"""Garbage collection: mark every blob a manifest still needs, sweep the rest.

Safe while the server runs: a blob is only swept when it is older than the grace period and
older than the oldest upload still in progress (its manifest may not be pushed yet), so a push
or a cache fill racing the collection keeps what it wrote. An upload that has received nothing
for `upload_idle` is abandoned, not in progress: it protects nothing (else one upload left
behind would keep every younger blob until upload purging removes it, days later).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field

from mirror.commands import runner
from mirror.registry.stores import manifest_refs
from mirror.registry.upload_sessions import live_uploads
from mirror.storage import Storage, inventory, layout
from mirror.storage.inventory import Inventory

log = logging.getLogger("mirror.gc")


@dataclass
class GcResult:
    marked: int = 0
    swept: list[str] = field(default_factory=list)
    swept_bytes: int = 0
    kept_young: int = 0
    dangling_links: int = 0


async def mark(repositories: Inventory, storage: Storage) -> set[str]:
    """Every blob reachable from a manifest revision of any repository (tags point at revisions)."""
    marked: set[str] = set()
    pending = inventory.digests({d for repo in repositories.repositories.values() for d in repo.manifests})
    while pending:
        digest = pending.pop()
        if str(digest) in marked:
            continue
        marked.add(str(digest))
        pending.extend(await manifest_refs(storage, digest))
    return marked


UPLOAD_IDLE = 3600.0


async def collect(storage: Storage, *, dry_run: bool = False, grace: float = 3600.0,
                  upload_idle: float = UPLOAD_IDLE) -> GcResult:
    result = GcResult()
    # Mark before listing blobs: a blob written after the mark is young, and kept.
    repositories = await inventory.take(storage, blobs=False)
    marked = await mark(repositories, storage)
    result.marked = len(marked)
    now = time.time()
    cutoff = now - grace
    live = [u for u in await live_uploads(storage, activity=True) if u.active >= now - upload_idle]
    if live:
        cutoff = min(cutoff, min(u.started for u in live))
    blobs = (await inventory.take(storage, repositories=False)).blobs
    for digest, st in sorted(blobs.items()):
        if digest in marked:
            continue
        if st.mtime > cutoff:
            result.kept_young += 1
            continue
        result.swept.append(digest)
        result.swept_bytes += st.size
        if not dry_run:
            await storage.delete(layout.blob_entry(inventory.digests([digest])[0]))
    # Layer links to blobs that are gone would only cost a stat each: drop them too.
    gone = set(result.swept)
    for name, repo in repositories.repositories.items():
        for link in inventory.digests(repo.layers):
            if str(link) in gone or (str(link) not in blobs and await storage.stat(layout.blob(link)) is None):
                result.dangling_links += 1
                if not dry_run:
                    await storage.delete(layout.layer(name, link))
    log.info("gc: %d marked, %d blobs (%d bytes) %s, %d young kept", result.marked, len(result.swept),
             result.swept_bytes, "would be swept" if dry_run else "swept", result.kept_young)
    return result


def command(args: argparse.Namespace) -> int:
    """`mirror gc [--dry-run] [--grace] [--upload-idle] [--json]`."""
    config = runner.load_config(args.config)
    result = runner.run(config, lambda storage: collect(storage, dry_run=args.dry_run, grace=args.grace,
                                                        upload_idle=args.upload_idle))
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **dataclasses.asdict(result)}))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for digest in result.swept:
        print(f"{verb} {digest}")
    print(f"{result.marked} blobs in use; {verb} {len(result.swept)} blobs ({result.swept_bytes} bytes); "
          f"kept {result.kept_young} younger than the grace period")
    return 0
