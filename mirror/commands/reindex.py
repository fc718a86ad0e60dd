"""`mirror index rebuild [--verify]`: the ledger of this machine from a walk of storage (streamed, in
bounded memory). A server on the same local directory switches to it within a second. With
`--verify`, nothing is replaced: the ledger in use is held against a fresh one, fact by fact, and
the differences are the result (exit 1 when there are any).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mirror.commands import runner
from mirror.config import Config
from mirror.ledger import journal, queries, rebuild
from mirror.ledger.database import Database
from mirror.ledger.ledger import Ledger, for_config
from mirror.storage import Storage


@dataclass
class RebuildResult:
    repositories: int = 0
    tags: int = 0
    blobs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    verified: bool = False
    differences: dict[str, list[str]] = field(default_factory=dict)


async def rebuild_index(config: Config, storage: Storage, verify: bool = False, show: bool = False) -> RebuildResult:
    t0 = time.perf_counter()
    ledger = await for_config(config, storage).open()
    try:
        with runner.bar(show, "reading storage") as progress:
            if verify:
                result = await _verify(ledger, progress)
            else:
                await ledger.rebuild(progress)
                result = RebuildResult()
        totals = await ledger.totals()
        result.blobs, result.bytes = totals.blobs, totals.bytes
        result.repositories, result.tags = await ledger.read(_counts)
    finally:
        await ledger.close()
    result.seconds = round(time.perf_counter() - t0, 2)
    return result


def _counts(conn: object) -> tuple[int, int]:
    listed = queries.repositories_page(conn, "", "", "name", 0, 0, None)[2]  # type: ignore[arg-type]
    tags = conn.execute("SELECT count(*) FROM tags").fetchone()[0]  # type: ignore[attr-defined]
    return listed, int(tags)


async def _verify(ledger: Ledger, progress: rebuild.Progress) -> RebuildResult:
    """A fresh ledger beside the one in use, both caught up with the journal to the same point, then
    compared (what changed while the walk ran is in both through the journal)."""
    with tempfile.TemporaryDirectory(prefix="verify-", dir=ledger.directory) as tmp:
        path = Path(tmp) / "fresh.sqlite"
        began = journal.now_ms(ledger.clock) - int(ledger.lag * 1000)
        await rebuild.build(ledger.storage, path, ledger.kinds, began, None, progress)
        fresh = Ledger(tmp, ledger.storage, ledger.configured_private, ledger.fingerprint, ledger.clock)
        fresh.kinds = ledger.kinds
        fresh.db = await Database(path, ledger.kinds).open()
        fresh.tail = journal.Tail(began)
        try:
            await fresh.catch_up()
            await ledger.catch_up()
            assert ledger.db is not None
            report = await asyncio.to_thread(rebuild.compare, ledger.db.path, path, ledger.kinds)
        finally:
            await fresh.db.close()
    return RebuildResult(verified=not report, differences=report)


def command(args: argparse.Namespace) -> int:
    config = runner.load_config(args.config)
    show = runner.show_progress(args.json)
    result = runner.run(config, lambda storage: rebuild_index(config, storage, args.verify, show))
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    elif args.verify:
        if result.verified:
            print(f"the ledger matches storage: {result.repositories} repositories, {result.tags} tags, "
                  f"{result.blobs} blobs ({runner.human_size(result.bytes)}) in {result.seconds}s")
        for what, lines in result.differences.items():
            print(f"{what}:")
            for line in lines:
                print(f"  {line}")
    else:
        print(f"ledger rebuilt from storage in {result.seconds}s: {result.repositories} repositories, "
              f"{result.tags} tags, {result.blobs} blobs ({runner.human_size(result.bytes)}); cached tags are "
              f"revalidated on first use")
    return 0 if not args.verify or result.verified else runner.FAILED
