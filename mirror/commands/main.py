"""`mirror serve | gc | du | evict | scrub | index | prefetch | export | import | check-config`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from mirror import __version__
from mirror.commands.runner import CommandError, fail, load_config
from mirror.config import ConfigError, parse_duration, parse_size


def _duration(value: str) -> float:
    try:
        return parse_duration(value, "duration")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bytes(value: str) -> int:
    try:
        return parse_size(value, "size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _lazy(module: str, function: str = "command") -> Callable[[argparse.Namespace], int]:
    """A command's entry, imported when it runs: `mirror du` need not load the server."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(f"mirror.commands.{module}"), function)(args))

    return run


def prefetch(args: argparse.Namespace) -> int:
    from mirror.commands.prefetch import command

    return command(args.images, args.platform, args.server, None if args.server else load_config(args.config),
                   args.json)


def export(args: argparse.Namespace) -> int:
    from mirror.commands.archive import export_command

    kind = "private" if args.private_only else "proxied" if args.cached_only else None
    return export_command(load_config(args.config), Path(args.output), args.repos, kind, args.json)


def import_(args: argparse.Namespace) -> int:
    from mirror.commands.archive import import_command

    return import_command(load_config(args.config), Path(args.archive), args.json)


CONFIG_HELP = "config.yml (registry:2 keys; default: the embedded one)"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the registry")
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(func=_lazy("serve"))
    p = sub.add_parser("gc", help="delete blobs no manifest references (safe while serving)")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.add_argument("--grace", type=_duration, default=3600.0,
                   help="keep blobs younger than this (default 1h)")
    p.add_argument("--upload-idle", type=_duration, default=3600.0,
                   help="an upload that received nothing this long is abandoned: it no longer keeps the blobs "
                        "younger than it (default 1h)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_lazy("gc"))
    p = sub.add_parser("du", help="storage used by repository and upstream, cached vs private")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_lazy("du"))
    p = sub.add_parser("evict", help="remove proxied content not used recently (never private content)")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--older-than", type=_duration, help="evict proxied content unused this long (e.g. 30d)")
    p.add_argument("--max-size", type=_bytes, help="and evict least recently used until under this size")
    p.add_argument("--dry-run", action="store_true", help="only list what would be evicted")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_lazy("evict"))
    p = sub.add_parser("scrub", help="hash every blob and manifest; take damaged ones out of what is served")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--rate", type=_bytes, help="hash at most this many bytes a second (e.g. 50MiB; default: "
                                               "as fast as storage reads)")
    p.add_argument("--dry-run", action="store_true", help="only report what is damaged")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_lazy("scrub"))
    p = sub.add_parser("index", help="the ledger of what storage holds (SQLite, on this machine)")
    p.add_argument("action", choices=["rebuild"], help="rebuild: recreate it from a walk of storage")
    p.add_argument("--verify", action="store_true", help="replace nothing: compare the ledger in use with storage "
                                                         "(exit 1 on a difference)")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_lazy("reindex"))
    p = sub.add_parser("prefetch", help="warm the cache: pull images through the mirror")
    p.add_argument("images", nargs="+", metavar="IMAGE[:TAG|@DIGEST]", help="alpine, user/app:1, ghcr.io/org/app")
    p.add_argument("--platform", help="os/arch[/variant] to take from an index, or all (default: this host's)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", help="the running mirror, e.g. http://127.0.0.1:5000 (default: run one "
                                        "in this process on --config's storage)")
    where.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=prefetch)
    p = sub.add_parser("export", help="write repositories (private and cached) to a tar file")
    p.add_argument("repos", nargs="*", metavar="REPO", help="names or patterns (team/**); default: all")
    p.add_argument("--output", "-o", required=True, help="the tar file to write")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--private-only", action="store_true", help="only repositories pushed here")
    only.add_argument("--cached-only", action="store_true", help="only pull-through cached repositories")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=export)
    p = sub.add_parser("import", help="verify a tar from `mirror export`, then add it to storage")
    p.add_argument("archive", metavar="FILE.tar")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=import_)
    p = sub.add_parser("check-config", help="validate a config file (and the files it names) and exit")
    p.add_argument("config", nargs="?", help=CONFIG_HELP)
    p.add_argument("--config", dest="config_option", metavar="CONFIG", help="the same, as every command takes it")
    p.set_defaults(func=_lazy("serve", "check_config"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CommandError as e:
        return fail(e, getattr(args, "json", False))


if __name__ == "__main__":
    sys.exit(main())
