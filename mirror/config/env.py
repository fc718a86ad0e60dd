"""`REGISTRY_*` environment overrides: an explicit table of registry:2's variable names (and ours)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

# REGISTRY_<SECTION>_<KEY> -> key path, as registry:2 names them. Explicit on purpose: a typo'd
# variable must not silently create a key.
ENV_KEYS: dict[str, tuple[str, ...]] = {
    "REGISTRY_VERSION": ("version",),
    "REGISTRY_LOG_LEVEL": ("log", "level"),
    "REGISTRY_LOG_FORMATTER": ("log", "formatter"),
    "REGISTRY_LOG_ACCESSLOG_DISABLED": ("log", "accesslog", "disabled"),
    "REGISTRY_HTTP_ADDR": ("http", "addr"),
    "REGISTRY_HTTP_NET": ("http", "net"),
    "REGISTRY_HTTP_HOST": ("http", "host"),
    "REGISTRY_HTTP_SECRET": ("http", "secret"),
    "REGISTRY_HTTP_ADVERTISE": ("http", "advertise"),
    "REGISTRY_HTTP_RELATIVEURLS": ("http", "relativeurls"),
    "REGISTRY_HTTP_DRAINTIMEOUT": ("http", "draintimeout"),
    "REGISTRY_HTTP_TLS_CERTIFICATE": ("http", "tls", "certificate"),
    "REGISTRY_HTTP_TLS_KEY": ("http", "tls", "key"),
    "REGISTRY_HTTP_TLS_CLIENTCAS": ("http", "tls", "clientcas"),
    "REGISTRY_HTTP_TLS_MINIMUMTLS": ("http", "tls", "minimumtls"),
    "REGISTRY_AUTH_HTPASSWD_REALM": ("auth", "htpasswd", "realm"),
    "REGISTRY_AUTH_HTPASSWD_PATH": ("auth", "htpasswd", "path"),
    "REGISTRY_AUTH_TOKEN_REALM": ("auth", "token", "realm"),
    "REGISTRY_AUTH_TOKEN_SERVICE": ("auth", "token", "service"),
    "REGISTRY_AUTH_TOKEN_ISSUER": ("auth", "token", "issuer"),
    "REGISTRY_AUTH_TOKEN_ROOTCERTBUNDLE": ("auth", "token", "rootcertbundle"),
    "REGISTRY_AUTH_TOKEN_AUTOREDIRECT": ("auth", "token", "autoredirect"),
    "REGISTRY_AUTH_TOKEN_AUTOREDIRECTPATH": ("auth", "token", "autoredirectpath"),
    "REGISTRY_ACCESS_ANONYMOUS_PULL": ("access", "anonymous_pull"),
    "REGISTRY_LIMITS_MANIFEST_SIZE": ("limits", "manifest_size"),
    "REGISTRY_LIMITS_UPLOADS_PER_CLIENT": ("limits", "uploads_per_client"),
    "REGISTRY_LIMITS_BODY_TIMEOUT": ("limits", "body_timeout"),
    "REGISTRY_LIMITS_HEADER_SIZE": ("limits", "header_size"),
    "REGISTRY_LIMITS_HEADERS": ("limits", "headers"),
    "REGISTRY_PRIVATE_PATTERNS": ("private", "patterns"),
    "REGISTRY_PRIVATE_CLAIM_ON_PUSH": ("private", "claim_on_push"),
    "REGISTRY_LIMITS_BODY_MIN_BYTES": ("limits", "body_min_bytes"),
    "REGISTRY_HTTP_DEBUG_ADDR": ("http", "debug", "addr"),
    "REGISTRY_HTTP_DEBUG_PROMETHEUS_ENABLED": ("http", "debug", "prometheus", "enabled"),
    "REGISTRY_HTTP_DEBUG_PROMETHEUS_PATH": ("http", "debug", "prometheus", "path"),
    "REGISTRY_METRICS_ENABLED": ("metrics", "enabled"),
    "REGISTRY_METRICS_ADDR": ("metrics", "addr"),
    "REGISTRY_METRICS_PATH": ("metrics", "path"),
    "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": ("storage", "filesystem", "rootdirectory"),
    **{f"REGISTRY_STORAGE_OSS_{key.upper()}": ("storage", "oss", key) for key in (
        "accesskeyid", "accesskeysecret", "region", "endpoint", "internal", "bucket", "encrypt",
        "encryptionkeyid", "secure", "skipverify", "chunksize", "rootdirectory")},
    "REGISTRY_STORAGE_REDIRECT_DISABLE": ("storage", "redirect", "disable"),
    "REGISTRY_STORAGE_DELETE_ENABLED": ("storage", "delete", "enabled"),
    "REGISTRY_STORAGE_MAINTENANCE_UPLOADPURGING_ENABLED": ("storage", "maintenance", "uploadpurging", "enabled"),
    "REGISTRY_STORAGE_MAINTENANCE_UPLOADPURGING_AGE": ("storage", "maintenance", "uploadpurging", "age"),
    "REGISTRY_STORAGE_MAINTENANCE_UPLOADPURGING_INTERVAL": ("storage", "maintenance", "uploadpurging", "interval"),
    "REGISTRY_STORAGE_MAINTENANCE_UPLOADPURGING_DRYRUN": ("storage", "maintenance", "uploadpurging", "dryrun"),
    "REGISTRY_PROXY_REMOTEURL": ("proxy", "remoteurl"),
    "REGISTRY_PROXY_USERNAME": ("proxy", "username"),
    "REGISTRY_PROXY_PASSWORD": ("proxy", "password"),
    "REGISTRY_PROXY_TTL": ("proxy", "ttl"),
    "REGISTRY_PROXY_TAG_TTL": ("proxy", "tag_ttl"),
    "REGISTRY_PROXY_DOCKERHUB": ("proxy", "dockerhub"),
    "REGISTRY_PROXY_MUTABLE_TAGS": ("proxy", "mutable_tags"),
    "REGISTRY_PROXY_IMMUTABLE_TAGS": ("proxy", "immutable_tags"),
    "REGISTRY_PROXY_REPOSITORIES": ("proxy", "repositories"),
    "REGISTRY_CACHE_INDEX": ("cache", "index"),
    "REGISTRY_CACHE_MEMORY": ("cache", "memory"),
    "REGISTRY_CACHE_DIRECTORY": ("cache", "directory"),
    "REGISTRY_CACHE_HOT_SIZE": ("cache", "hot_size"),
    "REGISTRY_CACHE_MAX_SIZE": ("cache", "max_size"),
    "REGISTRY_CACHE_HIGH_WATERMARK": ("cache", "high_watermark"),
    "REGISTRY_CACHE_LOW_WATERMARK": ("cache", "low_watermark"),
    "REGISTRY_CACHE_MIN_IDLE": ("cache", "min_idle"),
    "REGISTRY_UI_ENABLED": ("ui", "enabled"),
    **{f"REGISTRY_REDIS_{key.upper()}": ("redis", key) for key in (
        "addr", "password", "db", "dialtimeout", "readtimeout", "writetimeout")},
    "REGISTRY_REDIS_POOL_MAXACTIVE": ("redis", "pool", "maxactive"),
    "REGISTRY_REDIS_POOL_IDLETIMEOUT": ("redis", "pool", "idletimeout"),
    "REGISTRY_REDIS_TLS_ENABLED": ("redis", "tls", "enabled"),
    "REGISTRY_SCRUB_ENABLED": ("scrub", "enabled"),
    "REGISTRY_SCRUB_RATE": ("scrub", "rate"),
    "REGISTRY_SCRUB_INTERVAL": ("scrub", "interval"),
}
STORAGE_DRIVERS = ("filesystem", "inmemory", "s3", "azure", "gcs", "swift", "oss")
AUTH_DRIVERS = ("htpasswd", "token", "silly")


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Apply REGISTRY_* overrides in place; return warnings for variables we do not know.

    Unknown variables only warn: Kubernetes sets REGISTRY_PORT etc. for a service named registry.
    """
    warnings = []
    for var in sorted(environ):
        if not var.startswith("REGISTRY_"):
            continue
        if var == "REGISTRY_STORAGE":
            _select_driver(raw, "storage", STORAGE_DRIVERS, environ[var])
            continue
        if var == "REGISTRY_AUTH":
            _select_driver(raw, "auth", AUTH_DRIVERS, environ[var])
            continue
        keys = ENV_KEYS.get(var)
        if keys is None:
            warnings.append(f"ignoring unknown environment variable {var}")
            continue
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = node[k] = {}
            node = child
        # registry:2 reads each value as YAML, so `true` and `10` keep their types.
        try:
            node[keys[-1]] = yaml.safe_load(environ[var]) if environ[var] != "" else ""
        except yaml.YAMLError:
            node[keys[-1]] = environ[var]
    return warnings


def _select_driver(raw: dict[str, Any], section: str, drivers: tuple[str, ...], driver: str) -> None:
    """REGISTRY_STORAGE=oss or REGISTRY_AUTH=htpasswd, as registry:2: this driver replaces the file's
    (its params come from REGISTRY_STORAGE_OSS_* or REGISTRY_AUTH_HTPASSWD_*, applied after this one
    because they sort after it). An empty REGISTRY_AUTH turns the file's auth off."""
    node = raw.get(section)
    if not isinstance(node, dict):
        node = raw[section] = {}
    kept = node.get(driver) if isinstance(node.get(driver), dict) else {}
    for other in drivers:
        node.pop(other, None)
    if driver:
        node[driver] = kept
    elif not node:
        del raw[section]

