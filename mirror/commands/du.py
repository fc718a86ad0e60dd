"""`mirror du`: storage used by repository and upstream, private vs cached, and what gc would free."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from mirror.cache.eviction import Census, take_census
from mirror.commands import runner
from mirror.config import Config
from mirror.registry import namespace
from mirror.storage import Storage


@dataclass
class RepositoryUsage:
    name: str
    kind: str  # private | cached
    upstream: str | None
    objects: int  # manifests and blobs it links
    bytes: int  # their sizes (shared ones count in every repository that links them)


@dataclass
class UsageReport:
    repositories: list[RepositoryUsage] = field(default_factory=list)
    private_bytes: int = 0  # each blob once
    cached_bytes: int = 0
    unreferenced_bytes: int = 0  # linked by nothing: gc's to remove
    total_bytes: int = 0
    by_upstream: dict[str, int] = field(default_factory=dict)


def usage_report(config: Config, census: Census) -> UsageReport:
    report = UsageReport(total_bytes=census.total)
    sizes = {digest: st.size for digest, st in census.blobs.items()}
    cached: set[str] = set()
    for name, repo in census.inventory.repositories.items():
        if repo.empty and not repo.layers:
            continue  # uploads only, or emptied by deletes
        private = census.repositories[name]
        present = [d for d in repo.linked if d in sizes]
        size = sum(sizes[d] for d in present)
        upstream = None if private else namespace.upstream_of(config.upstreams, name)
        report.repositories.append(RepositoryUsage(name, "private" if private else "cached", upstream,
                                                   len(present), size))
        if upstream is not None:
            report.by_upstream[upstream] = report.by_upstream.get(upstream, 0) + size
        if not private:
            cached.update(d for d in present if d not in census.private)
    report.cached_bytes = sum(sizes[d] for d in cached)
    report.private_bytes = sum(sizes[d] for d in census.private if d in sizes)
    report.unreferenced_bytes = report.total_bytes - report.cached_bytes - report.private_bytes
    return report


async def disk_usage(config: Config, storage: Storage, progress: bool = False) -> UsageReport:
    is_private = namespace.configured_private(config.private, bool(config.upstreams))
    with runner.bar(progress, "walking storage") as bar:
        census = await take_census(storage, is_private, progress=bar)
    return usage_report(config, census)


def command(args: argparse.Namespace) -> int:
    config = runner.load_config(args.config)
    report = runner.run(config, lambda storage: disk_usage(config, storage, runner.show_progress(args.json)))
    if args.json:
        print(json.dumps(dataclasses.asdict(report)))
        return 0
    size = runner.human_size
    print(f"{'REPOSITORY':50} {'KIND':8} {'UPSTREAM':12} {'OBJECTS':>8} {'SIZE':>10}")
    for r in sorted(report.repositories, key=lambda r: (-r.bytes, r.name)):
        print(f"{r.name:50} {r.kind:8} {r.upstream or '-':12} {r.objects:>8} {size(r.bytes):>10}")
    print(f"\nprivate {size(report.private_bytes)}, cached {size(report.cached_bytes)}"
          + "".join(f" ({name} {size(n)})" for name, n in sorted(report.by_upstream.items()))
          + f", unreferenced {size(report.unreferenced_bytes)}, total {size(report.total_bytes)}")
    return 0
