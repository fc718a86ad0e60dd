"""`mirror serve | check-config`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from aiohttp import web

from mirror import logs
from mirror.app import create_app
from mirror.config import Config, ConfigError, load


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
    try:
        os.makedirs(config.storage.rootdirectory, exist_ok=True)
    except OSError as e:
        print(f"mirror: cannot create storage.filesystem.rootdirectory "
              f"{config.storage.rootdirectory}: {e.strerror}", file=sys.stderr)
        return 2
    log.info("listening on %s:%d, storage %s, upstreams %s", config.http.host or "*", config.http.port,
             config.storage.rootdirectory, ", ".join(u.name for u in config.upstreams) or "none")
    web.run_app(
        create_app(config),
        host=config.http.host or None,
        port=config.http.port,
        access_log=logs.access if config.log.accesslog else None,
        access_log_class=logs.AccessLogger,
        shutdown_timeout=config.http.draintimeout,
        print=None,
    )
    return 0


def check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.config or 'embedded default'}: ok ({len(config.upstreams)} upstreams)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the registry")
    p.add_argument("--config", help="config.yml (registry:2 keys; default: the embedded one)")
    p.set_defaults(func=serve)
    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("config", nargs="?")
    p.set_defaults(func=check_config)
    args = parser.parse_args(argv)
    return int(args.func(args))
