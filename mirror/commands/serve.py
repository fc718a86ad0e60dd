"""`mirror serve`: run the registry. Every start-up failure is one line on stderr naming the cause and
the fix, exit 2, no traceback; "listening" is logged only once the port is bound."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sqlite3
import sys
import tempfile
from pathlib import Path

from mirror.auth import Gate
from mirror.auth.htpasswd import HtpasswdError
from mirror.auth.token import TokenSetupError
from mirror.commands import runner
from mirror.commands.runner import USAGE, CommandError
from mirror.config import Config, ConfigError
from mirror.server import listener, logs
from mirror.server.app import create_app
from mirror.server.loop import freeze_heap
from mirror.server.tls import server_context
from mirror.storage import StorageUnavailable

# What the files a config names can be wrong with (certificates, htpasswd, token root bundle).
FILE_ERRORS = (ConfigError, HtpasswdError, TokenSetupError)
log = logging.getLogger("mirror")


def check_writable(path: Path, key: str) -> None:
    """`path` exists (made if need be) and this process may create files in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CommandError(f"{key} {path} is not writable: {e.strerror}{_ownership_hint(path, e)}", USAGE) from None


def _ownership_hint(path: Path, error: OSError) -> str:
    if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ""
    try:
        owner = path.stat().st_uid
    except OSError:
        return ""
    me = os.geteuid()
    if owner == me:
        return " (check its permissions and that it is not mounted read-only)"
    return (f"; it is owned by uid {owner} and mirror runs as uid {me}: `chown -R {me} {path}` (in a container, "
            f"the host directory mounted there), or run mirror as uid {owner}")


def _local_dirs(config: Config) -> list[tuple[Path, str]]:
    """The directories a server writes to on this machine, with the key that names each."""
    local = config.cache.local_dir(config.storage)
    dirs = [(local, "cache.directory" if config.storage.oss else "storage.filesystem.rootdirectory")]
    index = Path(config.cache.index_dir(config.storage))
    if index != local / "_index" or index.exists():
        dirs.append((index, "cache.index"))
    return dirs


def serve(config: Config) -> int:
    logs.setup(config.log)
    for warning in config.warnings:
        log.warning(warning)
    for path, key in _local_dirs(config):
        check_writable(path, key)
    try:
        ssl_context = server_context(config.http.tls) if config.http.tls else None
        app = create_app(config)
        app.on_startup.append(freeze_heap)  # last: after every step of the app's own start
    except FILE_ERRORS as e:
        raise CommandError(f"configuration error: {e}", USAGE) from None
    auth = "htpasswd" if config.auth and config.auth.htpasswd else "token" if config.auth else "none"
    oss = config.storage.oss
    local = config.cache.local_dir(config.storage)
    where = f"oss://{oss.bucket}/{oss.rootdirectory} at {oss.url} (hot tier in {local})" if oss else str(local)
    host = config.http.host or "*"

    def listening() -> None:  # once the port is bound
        log.info("listening on %s:%d (%s), storage %s, upstreams %s, auth %s", host, config.http.port,
                 "https" if ssl_context else "http", where, ", ".join(u.name for u in config.upstreams) or "none",
                 auth)

    limits = config.limits
    try:
        listener.run_app(
            app,
            config.http.host or None,
            config.http.port,
            ssl_context,
            listening,
            access_log=logs.access if config.log.accesslog else None,
            access_log_class=logs.AccessLogger,
            shutdown_timeout=config.http.draintimeout,
            keepalive_timeout=75.0,  # run_app's
            max_line_size=limits.header_size,
            max_field_size=limits.header_size,
            max_headers=limits.headers,
        )
        log.info("stopped")
    except StorageUnavailable as e:
        raise CommandError(f"storage error: {e}", USAGE) from None
    except sqlite3.Error as e:
        index = config.cache.index_dir(config.storage)
        raise CommandError(f"cache.index {index} is not usable: {e} (make it writable by uid {os.geteuid()}, "
                           f"or delete it: `mirror index rebuild` recreates it)", USAGE) from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CommandError(f"cannot listen on {host}:{config.http.port}: the address is already in use "
                               f"(stop what holds it, or set http.addr / REGISTRY_HTTP_ADDR)", USAGE) from None
        if e.errno in (errno.EACCES, errno.EADDRNOTAVAIL):
            raise CommandError(f"cannot listen on {host}:{config.http.port}: {e.strerror} (set http.addr / "
                               f"REGISTRY_HTTP_ADDR to an address and port this user may bind)", USAGE) from None
        raise CommandError(f"{e.filename or 'start-up'}: {e.strerror or e}", USAGE) from None
    return 0


def command(args: argparse.Namespace) -> int:
    return serve(runner.load_config(args.config))


def check_config(args: argparse.Namespace) -> int:
    """`mirror check-config [FILE | --config FILE]`: the config and the files it names load."""
    path = args.config_option or args.config
    config = runner.load_config(path)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        if config.http.tls:
            server_context(config.http.tls)
        if config.auth:
            Gate(config)
    except FILE_ERRORS as e:
        raise CommandError(f"configuration error: {e}", USAGE) from None
    print(f"{path or 'embedded default'}: ok ({len(config.upstreams)} upstreams)")
    return 0
