"""`mirror evict`: one eviction pass from the command line (the server runs the same in the
background); never touches private content."""

from __future__ import annotations

import argparse
import dataclasses
import json

from mirror.cache.eviction import EvictionResult, Evictor
from mirror.commands import runner
from mirror.config import Config
from mirror.registry import namespace
from mirror.registry.stores import BlobStore, ManifestStore
from mirror.server.metrics import Metrics
from mirror.storage import Storage


async def evict(config: Config, storage: Storage, older_than: float | None, max_size: int | None, dry_run: bool,
                progress: bool = False) -> EvictionResult:
    index = runner.open_index(config)
    try:
        metrics = Metrics(backend="oss" if config.storage.oss else "filesystem")
        blobs = BlobStore(storage, index, metrics)
        manifests = ManifestStore(storage, 0, blobs.added)
        is_private = namespace.configured_private(config.private, bool(config.upstreams))
        evictor = Evictor(storage, index, manifests, blobs, is_private, min_idle=config.cache.min_idle,
                          high=config.cache.high_watermark, low=config.cache.low_watermark)
        with runner.bar(progress, "walking storage") as bar:
            result = await evictor.run(ttl=older_than, max_size=max_size, dry_run=dry_run, progress=bar)
        if result.evicted and not dry_run:
            index.bump_epoch()  # a server on this storage forgets what it remembers of it
        return result
    finally:
        index.close()


def command(args: argparse.Namespace) -> int:
    config = runner.load_config(args.config)
    result = runner.run(config, lambda storage: evict(config, storage, args.older_than, args.max_size,
                                                      args.dry_run, runner.show_progress(args.json)))
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
