"""Operator commands that work on storage directly, safe while a server runs on it:
`mirror du`, `mirror evict`, `mirror index rebuild`."""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from tqdm import tqdm

from mirror.cache.eviction import Census, EvictionResult, Evictor, take_census
from mirror.cache.index import Index
from mirror.config import Config
from mirror.registry import namespace
from mirror.registry.namespace import glob_to_regex
from mirror.registry.stores import BlobStore, ManifestStore
from mirror.server.metrics import Metrics
from mirror.storage import Storage, open_storage


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


@asynccontextmanager
async def _opened(config: Config) -> AsyncIterator[tuple[Storage, Index, Callable[[str], bool]]]:
    storage = open_storage(config)
    index = Index(config.cache.index_dir(config.storage))
    try:
        await storage.check()
        globs = config.private.patterns
        private = re.compile("|".join(f"(?:{glob_to_regex(g)})" for g in globs)) if globs else None

        def is_private(name: str) -> bool:  # as the Router decides (pushed-to names carry a marker)
            return not config.upstreams or (private is not None and private.fullmatch(name) is not None)

        yield storage, index, is_private
    finally:
        index.close()
        await storage.close()


def upstream_of(config: Config, name: str) -> str | None:
    return namespace.upstream_of(config.upstreams, name)


def usage_report(config: Config, census: Census) -> UsageReport:
    report = UsageReport(total_bytes=census.total)
    linked: dict[str, set[str]] = {name: set() for name in census.repositories}
    for links in (census.layer_links, census.revisions):
        for digest, names in links.items():
            for name in names:
                linked[name].add(digest)
    cached: set[str] = set()
    for name, digests in linked.items():
        if census.repositories[name]:
            continue
        present = [d for d in digests if d in census.blobs]
        size = sum(census.blobs[d][0] for d in present)
        upstream = upstream_of(config, name)
        report.repositories.append(RepositoryUsage(name, "cached", upstream, len(present), size))
        if upstream is not None:
            report.by_upstream[upstream] = report.by_upstream.get(upstream, 0) + size
        cached.update(d for d in present if d not in census.private)
    report.cached_bytes = sum(census.blobs[d][0] for d in cached)
    report.private_bytes = sum(census.blobs[d][0] for d in census.private if d in census.blobs)
    report.unreferenced_bytes = report.total_bytes - report.cached_bytes - report.private_bytes
    return report


def _bar(show: bool) -> tqdm:
    """Objects walked (then evicted) on stderr, for people at a terminal (never with --json)."""
    return tqdm(desc="walking storage", unit=" objects", disable=not show, file=sys.stderr, leave=False)


async def disk_usage(config: Config, progress: bool = False) -> tuple[UsageReport, Census]:
    async with _opened(config) as (storage, _, is_private):
        with _bar(progress) as bar:
            census = await take_census(storage, is_private, progress=bar)
    report = usage_report(config, census)
    return report, census


async def evict(config: Config, older_than: float | None, max_size: int | None, dry_run: bool,
                progress: bool = False) -> EvictionResult:
    """One eviction pass from the command line (the server runs the same in the background)."""
    async with _opened(config) as (storage, index, is_private):
        metrics = Metrics(backend="oss" if config.storage.oss else "filesystem")
        blobs = BlobStore(storage, index, metrics)
        manifests = ManifestStore(storage, 0, blobs.added)
        evictor = Evictor(storage, index, manifests, blobs, is_private, min_idle=config.cache.min_idle,
                          high=config.cache.high_watermark, low=config.cache.low_watermark)
        with _bar(progress) as bar:
            result = await evictor.run(ttl=older_than, max_size=max_size, dry_run=dry_run, progress=bar)
        if result.evicted and not dry_run:
            index.bump_epoch()
        return result


@dataclass
class RebuildResult:
    tags: int = 0
    blobs: int = 0


async def rebuild_index(config: Config) -> RebuildResult:
    """Recreate the diskcache index from storage: every cached tag, to be revalidated on first use
    (stale-if-error still serves it); last use falls back to each blob's mtime."""
    async with _opened(config) as (storage, index, is_private):
        census = await take_census(storage, is_private)
        index.clear()
        result = RebuildResult(blobs=len(census.blobs))
        for digest, tags in census.tags.items():
            for repository, tag in tags:
                index.set_tag(repository, tag, digest, 0.0)
                result.tags += 1
        return result
