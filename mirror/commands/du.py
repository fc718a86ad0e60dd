"""`mirror du`: storage used by repository and upstream, private vs cached, and what gc would free,
read from the ledger (rows streamed by name, totals kept as every write lands)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from mirror.commands import runner
from mirror.config import Config
from mirror.ledger import queries
from mirror.ledger.ledger import Ledger
from mirror.registry import namespace

ROWS = 2000


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


async def disk_usage(config: Config, ledger: Ledger) -> UsageReport:
    totals = await ledger.totals()
    report = UsageReport(private_bytes=totals.private_bytes, cached_bytes=totals.cached_bytes,
                         unreferenced_bytes=totals.loose_bytes, total_bytes=totals.bytes)
    after = ""
    while rows := await ledger.read(queries.usage_rows, after, ROWS):
        for key, row in rows:
            after = key
            private = row.kind != namespace.CACHED  # content without a marker is private (classify)
            upstream = None if private else namespace.upstream_of(config.upstreams, row.name)
            report.repositories.append(RepositoryUsage(row.name, "private" if private else "cached", upstream,
                                                       row.manifests + row.layers, row.size))
            if upstream is not None:
                report.by_upstream[upstream] = report.by_upstream.get(upstream, 0) + row.size
    return report


def command(args: argparse.Namespace) -> int:
    config = runner.load_config(args.config)
    report = runner.run_with_ledger(config, lambda ledger: disk_usage(config, ledger), runner.show_progress(args.json))
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
