"""Configuration: registry:2's config.yml keys plus our own, parsed once into typed dataclasses.

`load(path, environ)` reads YAML, applies `REGISTRY_*` environment overrides from an explicit
table (env.py), and refuses unknown keys and bad values with an error naming the key. The model
is in model.py, value parsers in values.py, one parser per section in sections.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from mirror.config.env import ENV_KEYS, apply_env
from mirror.config.model import (
    ACTIONS,
    ANONYMOUS,
    ANY_USER,
    SIGNING_ALGORITHMS,
    TLS_VERSIONS,
    AccessConfig,
    AccessRule,
    AuthConfig,
    CacheConfig,
    Config,
    ConfigError,
    EndpointConfig,
    HtpasswdConfig,
    HttpConfig,
    LimitsConfig,
    LogConfig,
    MetricsConfig,
    NotificationsConfig,
    OssConfig,
    PrivateConfig,
    RedisConfig,
    ScrubConfig,
    StorageConfig,
    TLSConfig,
    TokenConfig,
    UIConfig,
    UploadPurging,
    UpstreamConfig,
)
from mirror.config.sections import parse
from mirror.config.values import parse_addr, parse_duration, parse_size

DEFAULT_CONFIG = Path(__file__).with_name("mirror.yml")  # symlink to config/mirror.yml


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read a config file (default: the embedded config/mirror.yml) and REGISTRY_* overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    warnings = apply_env(raw, environ if environ is not None else {})
    return parse(raw, warnings)


__all__ = [
    "ACTIONS", "ANONYMOUS", "ANY_USER", "DEFAULT_CONFIG", "ENV_KEYS", "SIGNING_ALGORITHMS", "TLS_VERSIONS",
    "AccessConfig", "AccessRule", "AuthConfig", "CacheConfig", "Config", "ConfigError", "EndpointConfig",
    "HtpasswdConfig", "HttpConfig", "LimitsConfig", "LogConfig", "MetricsConfig", "NotificationsConfig",
    "OssConfig", "PrivateConfig", "RedisConfig", "ScrubConfig", "StorageConfig", "TLSConfig", "TokenConfig",
    "UIConfig", "UploadPurging", "UpstreamConfig", "apply_env", "load", "parse", "parse_addr", "parse_duration",
    "parse_size",
]
