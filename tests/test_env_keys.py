"""Every key the README's configuration table lists has the `REGISTRY_*` variable the table names, and
setting that variable alone (no file: the embedded default, as `docker run -e REGISTRY_...` does)
changes that key."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.config import Config, load

README = Path(__file__).resolve().parents[1] / "README.md"

# key -> (value of its variable, what the loaded config must then say)
SAMPLES: dict[str, tuple[str, Callable[[Config], Any], Any]] = {
    "http.addr": ("127.0.0.1:5999", lambda c: (c.http.host, c.http.port), ("127.0.0.1", 5999)),
    "http.secret": ("s3cret", lambda c: c.http.secret, "s3cret"),
    "http.draintimeout": ("3s", lambda c: c.http.draintimeout, 3.0),
    "log.level": ("debug", lambda c: c.log.level, "debug"),
    "log.formatter": ("text", lambda c: c.log.formatter, "text"),
    "log.accesslog.disabled": ("true", lambda c: c.log.accesslog, False),
    "storage.filesystem.rootdirectory": ("/srv/m", lambda c: c.storage.rootdirectory, "/srv/m"),
    "storage.delete.enabled": ("true", lambda c: c.storage.delete_enabled, True),
    "storage.maintenance.uploadpurging.enabled": ("false", lambda c: c.storage.uploadpurging.enabled, False),
    "storage.maintenance.uploadpurging.age": ("2h", lambda c: c.storage.uploadpurging.age, 7200.0),
    "storage.maintenance.uploadpurging.interval": ("1h", lambda c: c.storage.uploadpurging.interval, 3600.0),
    "storage.maintenance.uploadpurging.dryrun": ("true", lambda c: c.storage.uploadpurging.dryrun, True),
    "private.patterns": ("team/**,infra/*", lambda c: c.private.patterns, ("team/**", "infra/*")),
    "private.claim_on_push": ("false", lambda c: c.private.claim_on_push, "false"),
    "proxy.remoteurl": ("http://127.0.0.1:9/", lambda c: c.upstreams[0].url, "http://127.0.0.1:9"),
    "proxy.username": ("robot", lambda c: c.upstreams[0].username, "robot"),
    "proxy.password": ("pw", lambda c: c.upstreams[0].password, "pw"),
    "proxy.ttl": ("24h", lambda c: c.cache.content_ttl, 86400.0),
    "proxy.tag_ttl": ("1m", lambda c: c.upstreams[0].tag_ttl, 60.0),
    "proxy.dockerhub": ("false", lambda c: c.upstreams[0].dockerhub, False),
    "proxy.mutable_tags": ("latest,edge", lambda c: c.upstreams[0].mutable_tags, ("latest", "edge")),
    "proxy.immutable_tags": ("v*", lambda c: c.upstreams[0].immutable_tags, ("v*",)),
    "proxy.repositories": ("library/*", lambda c: c.upstreams[0].repositories, ("library/*",)),
    "cache.memory": ("8MiB", lambda c: c.cache.memory, 8 << 20),
    "cache.max_size": ("50GiB", lambda c: c.cache.max_size, 50 << 30),
    "cache.high_watermark": ("0.9", lambda c: c.cache.high_watermark, 0.9),
    "cache.low_watermark": ("0.5", lambda c: c.cache.low_watermark, 0.5),
    "cache.min_idle": ("30s", lambda c: c.cache.min_idle, 30.0),
    "cache.index": ("/srv/index", lambda c: c.cache.index, "/srv/index"),
    "cache.directory": ("/srv/local", lambda c: c.cache.directory, "/srv/local"),
    "cache.hot_size": ("1GiB", lambda c: c.cache.hot_size, 1 << 30),
    "storage.redirect.disable": ("true", lambda c: c.storage.redirect, False),
    "http.tls.minimumtls": ("tls1.3", lambda c: c.http.tls and c.http.tls.minimumtls, "tls1.3"),
    "access.anonymous_pull": ("true", lambda c: c.access.anonymous_pull, True),
    "limits.manifest_size": ("1MiB", lambda c: c.limits.manifest_size, 1 << 20),
    "limits.uploads_per_client": ("4", lambda c: c.limits.uploads_per_client, 4),
    "limits.body_timeout": ("5s", lambda c: c.limits.body_timeout, 5.0),
    "limits.body_min_bytes": ("1KiB", lambda c: c.limits.body_min_bytes, 1024),
    "limits.header_size": ("4096", lambda c: c.limits.header_size, 4096),
    "limits.headers": ("64", lambda c: c.limits.headers, 64),
    "metrics.enabled": ("false", lambda c: c.metrics.enabled, False),
    "metrics.addr": ("127.0.0.1:9100", lambda c: c.metrics.addr, ("127.0.0.1", 9100)),
    "metrics.path": ("/m", lambda c: c.metrics.path, "/m"),
    "ui.enabled": ("false", lambda c: c.ui.enabled, False),
    "http.advertise": ("http://10.0.0.7:5000", lambda c: c.http.advertise, "http://10.0.0.7:5000"),
    "redis.addr": ("127.0.0.1:6380", lambda c: c.redis and c.redis.addr, "127.0.0.1:6380"),
    "redis.password": ("pw", lambda c: c.redis and c.redis.password, "pw"),
    "redis.db": ("3", lambda c: c.redis and c.redis.db, 3),
    "redis.dialtimeout": ("2s", lambda c: c.redis and c.redis.dialtimeout, 2.0),
    "redis.readtimeout": ("3s", lambda c: c.redis and c.redis.readtimeout, 3.0),
    "redis.writetimeout": ("4s", lambda c: c.redis and c.redis.writetimeout, 4.0),
    "redis.pool.maxactive": ("8", lambda c: c.redis and c.redis.maxactive, 8),
    "redis.pool.idletimeout": ("1m", lambda c: c.redis and c.redis.idletimeout, 60.0),
    "redis.tls.enabled": ("true", lambda c: c.redis and c.redis.tls, True),
    "scrub.enabled": ("false", lambda c: c.scrub.enabled, False),
    "scrub.rate": ("5MiB", lambda c: c.scrub.rate, 5 << 20),
    "scrub.interval": ("24h", lambda c: c.scrub.interval, 86400.0),
}
# Keys that only make sense together: what the sample of each needs beside it.
TOGETHER: dict[str, dict[str, str]] = {
    "http.tls.certificate": {"REGISTRY_HTTP_TLS_KEY": "/k.pem"},
    "http.tls.key": {"REGISTRY_HTTP_TLS_CERTIFICATE": "/c.pem"},
    "http.tls.clientcas": {"REGISTRY_HTTP_TLS_CERTIFICATE": "/c.pem", "REGISTRY_HTTP_TLS_KEY": "/k.pem"},
    "http.tls.minimumtls": {"REGISTRY_HTTP_TLS_CERTIFICATE": "/c.pem", "REGISTRY_HTTP_TLS_KEY": "/k.pem"},
    "auth.htpasswd.realm": {"REGISTRY_AUTH_HTPASSWD_PATH": "/h"},
    "access.anonymous_pull": {"REGISTRY_AUTH_HTPASSWD_PATH": "/h"},
    **{f"auth.token.{k}": {f"REGISTRY_AUTH_TOKEN_{o.upper()}": "x" for o in ("realm", "service", "issuer",
                                                                             "rootcertbundle") if o != k}
       for k in ("realm", "service", "issuer", "rootcertbundle", "autoredirect")},
    "cache.low_watermark": {"REGISTRY_CACHE_HIGH_WATERMARK": "0.95"},
    # redis needs its address and the secret replicas sign their internal requests with
    **{key: {"REGISTRY_REDIS_ADDR": "127.0.0.1:6379", "REGISTRY_HTTP_SECRET": "s"}
       for key in ("redis.password", "redis.db", "redis.dialtimeout", "redis.readtimeout", "redis.writetimeout",
                   "redis.pool.maxactive", "redis.pool.idletimeout", "redis.tls.enabled")},
    "redis.addr": {"REGISTRY_HTTP_SECRET": "s"},
}
SAMPLES.update({
    "http.tls.certificate": ("/c.pem", lambda c: c.http.tls and c.http.tls.certificate, "/c.pem"),
    "http.tls.key": ("/k.pem", lambda c: c.http.tls and c.http.tls.key, "/k.pem"),
    "http.tls.clientcas": ("/a.pem,/b.pem", lambda c: c.http.tls and c.http.tls.clientcas, ("/a.pem", "/b.pem")),
    "auth.htpasswd.realm": ("corp", lambda c: c.auth and c.auth.htpasswd and c.auth.htpasswd.realm, "corp"),
    "auth.htpasswd.path": ("/h", lambda c: c.auth and c.auth.htpasswd and c.auth.htpasswd.path, "/h"),
    "auth.token.realm": ("https://a/t", lambda c: c.auth and c.auth.token and c.auth.token.realm, "https://a/t"),
    "auth.token.service": ("svc", lambda c: c.auth and c.auth.token and c.auth.token.service, "svc"),
    "auth.token.issuer": ("iss", lambda c: c.auth and c.auth.token and c.auth.token.issuer, "iss"),
    "auth.token.rootcertbundle": ("/ca.pem", lambda c: c.auth and c.auth.token and c.auth.token.rootcertbundle,
                                  "/ca.pem"),
    "auth.token.autoredirect": ("true", lambda c: c.auth and c.auth.token and c.auth.token.autoredirect, True),
})


def readme_rows() -> list[tuple[str, str]]:
    """(key, variable) for every key of the configuration table that has a variable."""
    lines = README.read_text().splitlines()
    start = lines.index("| key | variable | meaning | default |")
    pairs = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        keys_cell, vars_cell = line.split("|")[1:3]
        keys = re.findall(r"`([a-z_.*]+)`", keys_cell)
        variables = re.findall(r"`(REGISTRY_[A-Z_]+)`", vars_cell)
        if "file only" in vars_cell or keys == ["storage.oss.*"]:
            continue
        assert len(keys) == len(variables), line
        pairs += list(zip(keys, variables, strict=True))
    return pairs


ROWS = readme_rows()


def test_the_table_names_registry_2_s_variables() -> None:
    assert len(ROWS) >= 40
    for key, variable in ROWS:
        assert variable == "REGISTRY_" + key.upper().replace(".", "_"), (key, variable)
    assert {key for key, _ in ROWS} == set(SAMPLES), "a key of the README's table has no sample here, or the reverse"


@pytest.mark.parametrize(("key", "variable"), ROWS, ids=[k for k, _ in ROWS])
def test_each_variable_sets_its_key_on_the_embedded_default(key: str, variable: str) -> None:
    value, read, expected = SAMPLES[key]
    config = load(None, {variable: value, **TOGETHER.get(key, {})})
    assert read(config) == expected
    assert not [w for w in config.warnings if "unknown environment variable" in w]
