"""`mirror evict`: one eviction pass from the command line (the server runs the same in the
background); never touches private content."""

from __future__ import annotations

import argparse
import dataclasses
import json

from mirror.cache.eviction import EvictionResult, Evictor
from mirror.commands import runner
from mirror.config import Config
from mirror.ledger.ledger import Ledger
from mirror.registry.stores import ManifestStore
from mirror.server.metrics import Metrics


async def evict(config: Config, ledger: Ledger, older_than: float | None, max_size: int | None, dry_run: bool,
                progress: bool = False) -> EvictionResult:
    metrics = Metrics(backend="oss" if config.storage.oss else "filesystem")
    manifests = ManifestStore(ledger.storage, ledger, 0, metrics.blob_added)
    evictor = Evictor(ledger, manifests, metrics, min_idle=config.cache.min_idle, high=config.cache.high_watermark,
                      low=config.cache.low_watermark)
    with runner.bar(progress, "evicting") as bar:
        return await evictor.run(ttl=older_than, max_size=max_size, dry_run=dry_run, progress=bar)


def command(args: argparse.Namespace) -> int:
    config = runner.load_config(args.config)
    show = runner.show_progress(args.json)
    result = runner.run_with_ledger(config, lambda ledger: evict(config, ledger, args.older_than, args.max_size,
                                                                 args.dry_run, show), show)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **dataclasses.asdict(result)}))
        return 0
    size = runner.human_size
    verb = "would evict" if args.dry_run else "evicted"
    for digest in result.evicted:
        print(f"{verb} {digest}")
    print(f"{verb} {len(result.evicted)} objects ({size(result.evicted_bytes)}; {result.manifests} manifests, "
          f"{result.dropped_tags} tags); storage {size(result.usage_before)} -> {size(result.usage_after)}; "
          f"kept {result.kept_private} private, {result.kept_recent} of pulls in progress (cache.min_idle)")
    return 0
