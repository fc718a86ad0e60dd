"""`mirror serve | gc | du | evict | index | prefetch | export | import | check-config`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from mirror import logs, maintenance
from mirror.app import create_app
from mirror.auth import Gate
from mirror.auth.htpasswd import HtpasswdError
from mirror.auth.token import TokenSetupError
from mirror.config import Config, ConfigError, load, parse_duration, parse_size
from mirror.gc import GcResult, collect
from mirror.storage import StorageUnavailable, open_storage, without_hot_tier
from mirror.tls import server_context

T = TypeVar("T")

# What the files a config names can be wrong with (certificates, htpasswd, token root bundle).
FILE_ERRORS = (ConfigError, HtpasswdError, TokenSetupError)


def _load(path: str | None) -> Config:
    try:
        return load(path, os.environ)
    except ConfigError as e:
        print(f"mirror: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    logs.setup(config.log.level, config.log.fields)
    log = logging.getLogger("mirror")
    for warning in config.warnings:
        log.warning(warning)
    local = config.cache.local_dir(config.storage)
    key = "cache.directory" if config.storage.oss else "storage.filesystem.rootdirectory"
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as e:
        print(f"mirror: cannot create {key} {local}: {e.strerror}", file=sys.stderr)
        return 2
    if not os.access(local, os.W_OK | os.X_OK):  # e.g. a root-owned volume for a non-root user
        uid = os.getuid()
        print(f"mirror: {key} {local} is not writable by uid {uid} (owner uid {os.stat(local).st_uid}): "
              f"chown it to {uid} or run as a user who may write it", file=sys.stderr)
        return 2
    try:
        ssl_context = server_context(config.http.tls) if config.http.tls else None
        app = create_app(config)
    except FILE_ERRORS as e:
        print(f"mirror: configuration error: {e}", file=sys.stderr)
        return 2
    auth = "htpasswd" if config.auth and config.auth.htpasswd else "token" if config.auth else "none"
    oss = config.storage.oss
    where = f"oss://{oss.bucket}/{oss.rootdirectory} at {oss.url} (hot tier in {local})" if oss else str(local)
    log.info("listening on %s:%d (%s), storage %s, upstreams %s, auth %s", config.http.host or "*",
             config.http.port, "https" if ssl_context else "http", where,
             ", ".join(u.name for u in config.upstreams) or "none", auth)
    limits = config.limits
    try:
        web.run_app(
            app,
            host=config.http.host or None,
            port=config.http.port,
            ssl_context=ssl_context,
            access_log=logs.access if config.log.accesslog else None,
            access_log_class=logs.AccessLogger,
            shutdown_timeout=config.http.draintimeout,
            print=None,
            max_line_size=limits.header_size,
            max_field_size=limits.header_size,
            max_headers=limits.headers,
        )
    except StorageUnavailable as e:
        print(f"mirror: storage error: {e}", file=sys.stderr)
        return 2
    log.info("stopped")
    return 0


def _duration(value: str) -> float:
    try:
        return parse_duration(value, "duration")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def gc(args: argparse.Namespace) -> int:
    config = _load(args.config)
    logs.setup("warning", config.log.fields, sys.stderr)  # stdout is the result
    try:
        result = asyncio.run(_gc(config, args.dry_run, args.grace))
    except StorageUnavailable as e:
        print(f"mirror: storage error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "marked": result.marked, "swept": result.swept,
                          "swept_bytes": result.swept_bytes, "kept_young": result.kept_young,
                          "dangling_links": result.dangling_links}))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        for digest in result.swept:
            print(f"{verb} {digest}")
        print(f"{result.marked} blobs in use; {verb} {len(result.swept)} blobs ({result.swept_bytes} bytes); "
              f"kept {result.kept_young} younger than the grace period")
    return 0


async def _gc(config: Config, dry_run: bool, grace: float) -> GcResult:
    storage = open_storage(without_hot_tier(config))  # the hot tier belongs to the running server
    try:
        await storage.check()
        return await collect(storage, dry_run=dry_run, grace=grace)
    finally:
        await storage.close()


def _on_storage(args: argparse.Namespace, work: Callable[[Config], Coroutine[Any, Any, T]]) -> T | None:
    """Run a command's work on the configured storage, logging to stderr (stdout is the result);
    a storage failure is a message (and exit 2), not a trace."""
    config = _load(args.config)
    logs.setup("warning", config.log.fields, sys.stderr)
    try:
        return asyncio.run(work(config))
    except StorageUnavailable as e:
        print(f"mirror: storage error: {e}", file=sys.stderr)
        return None


def _progress(args: argparse.Namespace) -> bool:
    """Bars for people at a terminal; never with --json (scripts read stdout, and stderr stays clean)."""
    return not args.json and sys.stderr.isatty()


def du(args: argparse.Namespace) -> int:
    found = _on_storage(args, lambda config: maintenance.disk_usage(config, _progress(args)))
    if found is None:
        return 2
    report, _ = found
    if args.json:
        print(json.dumps(dataclasses.asdict(report)))
        return 0
    print(f"{'REPOSITORY':50} {'KIND':8} {'UPSTREAM':12} {'OBJECTS':>8} {'SIZE':>10}")
    for r in sorted(report.repositories, key=lambda r: -r.bytes):
        print(f"{r.name:50} {r.kind:8} {r.upstream or '-':12} {r.objects:>8} {_size(r.bytes):>10}")
    print(f"\nprivate {_size(report.private_bytes)}, cached {_size(report.cached_bytes)}"
          + "".join(f" ({name} {_size(n)})" for name, n in sorted(report.by_upstream.items()))
          + f", unreferenced {_size(report.unreferenced_bytes)}, total {_size(report.total_bytes)}")
    return 0


def evict(args: argparse.Namespace) -> int:
    result = _on_storage(args, lambda config: maintenance.evict(config, args.older_than, args.max_size,
                                                                args.dry_run, _progress(args)))
    if result is None:
        return 2
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **dataclasses.asdict(result)}))
        return 0
    verb = "would evict" if args.dry_run else "evicted"
    for digest in result.evicted:
        print(f"{verb} {digest}")
    print(f"{verb} {len(result.evicted)} objects ({_size(result.evicted_bytes)}; {result.manifests} manifests, "
          f"{result.dropped_tags} tags); storage {_size(result.usage_before)} -> {_size(result.usage_after)}; "
          f"kept {result.kept_private} private, {result.kept_recent} used within cache.min_idle")
    return 0


def index(args: argparse.Namespace) -> int:
    result = _on_storage(args, maintenance.rebuild_index)
    if result is None:
        return 2
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(f"index rebuilt from storage: {result.tags} cached tags (revalidated on first use), "
              f"{result.blobs} blobs")
    return 0


def _size(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    step = 0
    while n >= 1024 ** (step + 1) and step < len(units) - 1:
        step += 1
    return f"{n} B" if step == 0 else f"{n / 1024 ** step:.1f} {units[step]}"


def _bytes(value: str) -> int:
    try:
        return parse_size(value, "size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
def prefetch(args: argparse.Namespace) -> int:
    from mirror.prefetch import command

    return command(args.images, args.platform, args.server, None if args.server else _load(args.config), args.json)


def export(args: argparse.Namespace) -> int:
    from mirror.archive import export_command

    kind = "private" if args.private_only else "proxied" if args.cached_only else None
    return export_command(_load(args.config), Path(args.output), args.repos, kind, args.json)


def import_(args: argparse.Namespace) -> int:
    from mirror.archive import import_command

    return import_command(_load(args.config), Path(args.archive), args.json)


def check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:  # the files it names load too
        if config.http.tls:
            server_context(config.http.tls)
        if config.auth:
            Gate(config)
    except FILE_ERRORS as e:
        print(f"mirror: configuration error: {e}", file=sys.stderr)
        return 2
    print(f"{args.config or 'embedded default'}: ok ({len(config.upstreams)} upstreams)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the registry")
    p.add_argument("--config", help="config.yml (registry:2 keys; default: the embedded one)")
    p.set_defaults(func=serve)
    p = sub.add_parser("gc", help="delete blobs no manifest references (safe while serving)")
    p.add_argument("--config", help="config.yml (default: the embedded one)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.add_argument("--grace", type=_duration, default=3600.0,
                   help="keep blobs younger than this (default 1h)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=gc)
    p = sub.add_parser("du", help="storage used by repository and upstream, cached vs private")
    p.add_argument("--config", help="config.yml (default: the embedded one)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=du)
    p = sub.add_parser("evict", help="remove proxied content not used recently (never private content)")
    p.add_argument("--config", help="config.yml (default: the embedded one)")
    p.add_argument("--older-than", type=_duration, help="evict proxied content unused this long (e.g. 30d)")
    p.add_argument("--max-size", type=_bytes, help="and evict least recently used until under this size")
    p.add_argument("--dry-run", action="store_true", help="only list what would be evicted")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=evict)
    p = sub.add_parser("index", help="the local index (diskcache)")
    p.add_argument("action", choices=["rebuild"], help="rebuild: recreate it from storage")
    p.add_argument("--config", help="config.yml (default: the embedded one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=index)
    p = sub.add_parser("prefetch", help="warm the cache: pull images through the mirror")
    p.add_argument("images", nargs="+", metavar="IMAGE[:TAG|@DIGEST]", help="alpine, user/app:1, ghcr.io/org/app")
    p.add_argument("--platform", help="os/arch[/variant] to take from an index, or all (default: this host's)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", help="the running mirror, e.g. http://127.0.0.1:5000 (default: run one "
                                        "in this process on --config's storage)")
    where.add_argument("--config", help="config.yml (default: the embedded one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=prefetch)
    p = sub.add_parser("export", help="write repositories (private and cached) to a tar file")
    p.add_argument("repos", nargs="*", metavar="REPO", help="names or patterns (team/**); default: all")
    p.add_argument("--output", "-o", required=True, help="the tar file to write")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--private-only", action="store_true", help="only repositories pushed here")
    only.add_argument("--cached-only", action="store_true", help="only pull-through cached repositories")
    p.add_argument("--config", help="config.yml (default: the embedded one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=export)
    p = sub.add_parser("import", help="verify a tar from `mirror export`, then add it to storage")
    p.add_argument("archive", metavar="FILE.tar")
    p.add_argument("--config", help="config.yml (default: the embedded one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=import_)
    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("config", nargs="?")
    p.set_defaults(func=check_config)
    args = parser.parse_args(argv)
    return int(args.func(args))
