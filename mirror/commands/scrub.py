"""`mirror scrub`: hash every stored blob and manifest against its digest; remove damaged cached
content (the next pull fetches it again), quarantine damaged private content and name the
repositories that reference it. Exit 1 when anything was damaged. Safe while a server runs."""

from __future__ import annotations

import argparse
import dataclasses
import json

from mirror.cache.scrub import Scrubber, ScrubResult
from mirror.commands import runner
from mirror.ledger.ledger import Ledger
from mirror.registry.integrity import Pace


async def scrub(ledger: Ledger, rate: int | None, dry_run: bool, progress: bool) -> ScrubResult:
    """What it takes out reaches servers through the ledger's journal (they forget it from memory)."""
    with runner.byte_bar(progress, "scrubbing", 0) as bar:
        return await Scrubber(ledger.storage, ledger).run(dry_run=dry_run, pace=Pace(rate), progress=bar)


def command(args: argparse.Namespace) -> int:
    config = runner.load_config(args.config)
    show = runner.show_progress(args.json)
    result = runner.run_with_ledger(config, lambda ledger: scrub(ledger, args.rate, args.dry_run, show), show)
    failed = runner.FAILED if result.damaged else 0
    if args.json:
        print(json.dumps({"ok": not result.damaged, "dry_run": args.dry_run, "MBps": round(result.mb_per_s, 1),
                          **dataclasses.asdict(result)}))
        return failed
    size = runner.human_size
    for d in result.damaged:
        kind = "private" if d.private else "cached"
        what = {"quarantined": "quarantined", "removed": "removed (the next pull fetches it again)",
                "none": "would be " + ("quarantined" if d.private else "removed")}[d.action]
        refs = f"; referenced by {', '.join(d.repositories)}" if d.repositories else ""
        print(f"damaged {d.digest} ({size(d.size)}, {kind}): {what}{refs}")
    print(f"scrubbed {result.objects} objects ({size(result.bytes)}) in {result.seconds:.1f} s "
          f"({runner.mb_per_s(result.bytes, result.seconds)}): {len(result.damaged)} damaged"
          + (f", {result.vanished} removed meanwhile" if result.vanished else ""))
    if any(d.private for d in result.damaged) and not args.dry_run:
        print("push the damaged private blobs again to repair them (the repositories above)")
    return failed
