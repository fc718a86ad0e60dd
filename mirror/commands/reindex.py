"""`mirror index rebuild`: recreate the local index from storage."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

from mirror.cache.eviction import take_census
from mirror.commands import runner
from mirror.config import Config
from mirror.registry import namespace
from mirror.storage import Storage


@dataclass
class RebuildResult:
    tags: int = 0
    blobs: int = 0


async def rebuild_index(config: Config, storage: Storage) -> RebuildResult:
    """Every cached tag, to be revalidated on first use (stale-if-error still serves it); last use
    falls back to each blob's mtime."""
    is_private = namespace.configured_private(config.private, bool(config.upstreams))
    census = await take_census(storage, is_private)
    index = runner.open_index(config, required=True)
    try:
        index.clear()
        result = RebuildResult(blobs=len(census.blobs))
        for digest, tags in census.tags.items():
            for repository, tag in tags:
                index.set_tag(repository, tag, digest, 0.0)
                result.tags += 1
        return result
    finally:
        index.close()


def command(args: argparse.Namespace) -> int:
    config = runner.load_config(args.config)
    result = runner.run(config, lambda storage: rebuild_index(config, storage))
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(f"index rebuilt from storage: {result.tags} cached tags (revalidated on first use), "
              f"{result.blobs} blobs")
    return 0
