"""Configuration: registry:2's config.yml keys plus our own, parsed once into typed dataclasses.

`load(path, environ)` reads YAML, applies `REGISTRY_*` environment overrides from an explicit
table, and refuses unknown keys and bad values with an error naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mirror.names import _COMPONENT

DEFAULT_CONFIG = Path(__file__).with_name("mirror.yml")  # symlink to config/mirror.yml


class ConfigError(Exception):
    """A bad configuration: the message names the key."""


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    hosts: tuple[str, ...] = ()  # containerd `?ns=` values routed here; "*" = any
    prefixes: tuple[str, ...] = ()  # first path component routed here, e.g. /v2/ghcr.io/owner/repo
    dockerhub: bool = False  # `alpine` -> `library/alpine`
    tag_ttl: float = 300.0  # seconds a tag manifest is served without asking upstream
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 3  # attempts on connect errors and 5xx
    mutable_tags: tuple[str, ...] = ()  # tag globs revalidated on every pull (`latest`)
    immutable_tags: tuple[str, ...] = ()  # tag globs never revalidated once cached (`v*.*.*`)
    repositories: tuple[str, ...] = ()  # repository globs (upstream names) allowed; () = any


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    fields: Mapping[str, Any] = field(default_factory=dict)
    accesslog: bool = True


TLS_VERSIONS = ("tls1.2", "tls1.3")


@dataclass(frozen=True)
class TLSConfig:
    """http.tls, as registry:2: a certificate and key, optionally client CAs (then client
    certificates are required)."""

    certificate: str
    key: str
    clientcas: tuple[str, ...] = ()
    minimumtls: str = "tls1.2"


@dataclass(frozen=True)
class HttpConfig:
    host: str = ""  # "" = all interfaces
    port: int = 5000
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    draintimeout: float = 10.0
    tls: TLSConfig | None = None
    secret: str | None = field(default=None, repr=False)  # signs the web UI's delete forms (else random per process)


@dataclass(frozen=True)
class UploadPurging:
    """storage.maintenance.uploadpurging, as registry:2: abandoned uploads are removed."""

    enabled: bool = True
    age: float = 168 * 3600.0
    interval: float = 24 * 3600.0
    dryrun: bool = False


@dataclass(frozen=True)
class OssConfig:
    """storage.oss, with registry:2's keys: an Aliyun OSS bucket holds everything."""

    accesskeyid: str
    accesskeysecret: str = field(repr=False)
    region: str
    bucket: str
    endpoint: str | None = None  # host[:port]; default <region>[-internal].aliyuncs.com
    internal: bool = False
    secure: bool = True
    skipverify: bool = False
    encrypt: bool = False
    encryptionkeyid: str | None = None  # KMS key; without it encrypt means AES256
    chunksize: int = 10 << 20  # multipart part size (registry:2's default; OSS needs >= 100 KiB)
    rootdirectory: str = ""  # key prefix inside the bucket

    @property
    def url(self) -> str:
        host = self.endpoint or f"{self.region}{'-internal' if self.internal else ''}.aliyuncs.com"
        return f"{'https' if self.secure else 'http'}://{host}"


@dataclass(frozen=True)
class StorageConfig:
    rootdirectory: str = "/var/lib/mirror"
    delete_enabled: bool = False
    uploadpurging: UploadPurging = field(default_factory=UploadPurging)
    oss: OssConfig | None = None  # set: the bucket is the storage, local disk only a hot tier
    redirect: bool = False  # answer blob GETs not on local disk with a signed URL to the bucket


@dataclass(frozen=True)
class PrivateConfig:
    """Which repositories are hosted here (pushed to, never looked up upstream)."""

    patterns: tuple[str, ...] = ()  # globs: `*` within one name component, `**` across them
    claim_on_push: bool = False  # a push to any other name makes it private instead of DENIED


@dataclass(frozen=True)
class CacheConfig:
    index: str | None = None  # diskcache directory; default <local directory>/_index
    memory: int = 64 << 20  # bytes of manifests kept in memory for the hot path
    content_ttl: float | None = 168 * 3600.0  # proxy.ttl: unused proxied content expires (issue 8)
    directory: str | None = None  # local disk in front of remote storage; default the filesystem root
    hot_size: int = 10 << 30  # bytes of blobs kept on local disk in front of OSS (LRU)
    max_size: int | None = None  # bytes of storage; past it proxied content is evicted, least recently used first
    high_watermark: float = 0.95  # eviction starts above this share of max_size...
    low_watermark: float = 0.85  # ...and stops below this one
    min_idle: float = 600.0  # content used more recently than this is never evicted (pulls in progress)

    def local_dir(self, storage: StorageConfig) -> Path:
        """Where the index, staging files and the hot tier live on this machine."""
        return Path(self.directory or storage.rootdirectory)

    def index_dir(self, storage: StorageConfig) -> str:
        return self.index or str(self.local_dir(storage) / "_index")


@dataclass(frozen=True)
class HtpasswdConfig:
    realm: str
    path: str


SIGNING_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")


@dataclass(frozen=True)
class TokenConfig:
    """auth.token: JWTs per the Docker token spec, signed by a key the root cert bundle trusts."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: str
    autoredirect: bool = False  # realm = https://<request Host><autoredirectpath>
    autoredirectpath: str = "/auth/token"
    signingalgorithms: tuple[str, ...] = SIGNING_ALGORITHMS


@dataclass(frozen=True)
class AuthConfig:
    """Exactly one of htpasswd or token, as registry:2."""

    htpasswd: HtpasswdConfig | None = None
    token: TokenConfig | None = None


ACTIONS = ("pull", "push", "delete")
ANY_USER = "*"  # in an access rule: every authenticated user
ANONYMOUS = "anonymous"  # in an access rule: clients that did not authenticate


@dataclass(frozen=True)
class AccessRule:
    """Who may pull, push or delete the repositories matching `repositories`. None = the action is
    not limited by this rule (every authenticated user)."""

    repositories: tuple[str, ...]
    pull: tuple[str, ...] | None = None
    push: tuple[str, ...] | None = None
    delete: tuple[str, ...] | None = None

    def users(self, action: str) -> tuple[str, ...] | None:
        return {"pull": self.pull, "push": self.push, "delete": self.delete}[action]


@dataclass(frozen=True)
class AccessConfig:
    """Our access rules on top of auth (see README, Access rules)."""

    anonymous_pull: bool = False  # clients without credentials may pull proxied (cached upstream) content
    rules: tuple[AccessRule, ...] = ()  # the first rule matching a repository decides


@dataclass(frozen=True)
class LimitsConfig:
    """Limits against abuse (ours)."""

    manifest_size: int = 4 << 20  # pushed and fetched manifests
    uploads_per_client: int = 16  # upload requests in progress per user (or address); 0 = no limit
    body_timeout: float = 60.0  # a request body that sends nothing this long is cut
    header_size: int = 8190  # longest request line or header field (aiohttp's max_line_size/max_field_size)
    headers: int = 128  # most header fields in one request


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    addr: tuple[str, int] | None = None  # a listener of its own; None = the main port
    path: str = "/metrics"


@dataclass(frozen=True)
class EndpointConfig:
    """notifications.endpoints[], registry:2's keys: where events go and which are left out."""

    name: str
    url: str
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False)  # may hold credentials
    timeout: float = 1.0
    threshold: int = 10  # failures in a row before retries wait `backoff`
    backoff: float = 1.0
    ignored_mediatypes: tuple[str, ...] = ()
    ignored_actions: tuple[str, ...] = ()
    disabled: bool = False
    queue_size: int = 100_000  # ours: events kept (on disk) while the endpoint is down; oldest dropped past it


@dataclass(frozen=True)
class NotificationsConfig:
    endpoints: tuple[EndpointConfig, ...] = ()
    include_references: bool = False  # registry:2's events.includereferences (layers of a pushed manifest)


@dataclass(frozen=True)
class UIConfig:
    """The web UI at /ui/ (ours): browse repositories, tags and manifests, cache overview, deletes."""

    enabled: bool = True


@dataclass(frozen=True)
class Config:
    log: LogConfig = field(default_factory=LogConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    private: PrivateConfig = field(default_factory=PrivateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    auth: AuthConfig | None = None
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    ui: UIConfig = field(default_factory=UIConfig)
    warnings: tuple[str, ...] = ()  # things accepted but worth telling the operator at start


# --- environment overrides -------------------------------------------------------------------

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
    "REGISTRY_HTTP_DEBUG_ADDR": ("http", "debug", "addr"),
    "REGISTRY_HTTP_DEBUG_PROMETHEUS_ENABLED": ("http", "debug", "prometheus", "enabled"),
    "REGISTRY_HTTP_DEBUG_PROMETHEUS_PATH": ("http", "debug", "prometheus", "path"),
    "REGISTRY_METRICS_ENABLED": ("metrics", "enabled"),
    "REGISTRY_METRICS_ADDR": ("metrics", "addr"),
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
    "REGISTRY_CACHE_INDEX": ("cache", "index"),
    "REGISTRY_CACHE_MEMORY": ("cache", "memory"),
    "REGISTRY_CACHE_DIRECTORY": ("cache", "directory"),
    "REGISTRY_CACHE_HOT_SIZE": ("cache", "hot_size"),
    "REGISTRY_CACHE_MAX_SIZE": ("cache", "max_size"),
    "REGISTRY_UI_ENABLED": ("ui", "enabled"),
}
STORAGE_DRIVERS = ("filesystem", "inmemory", "s3", "azure", "gcs", "swift", "oss")


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Apply REGISTRY_* overrides in place; return warnings for variables we do not know.

    Unknown variables only warn: Kubernetes sets REGISTRY_PORT etc. for a service named registry.
    """
    warnings = []
    for var in sorted(environ):
        if not var.startswith("REGISTRY_"):
            continue
        if var == "REGISTRY_STORAGE":
            _select_driver(raw, environ[var])
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


def _select_driver(raw: dict[str, Any], driver: str) -> None:
    """REGISTRY_STORAGE=oss, as registry:2: this driver replaces the file's (its params come from
    REGISTRY_STORAGE_OSS_*, applied after this one because they sort after it)."""
    storage = raw.get("storage")
    if not isinstance(storage, dict):
        storage = raw["storage"] = {}
    kept = storage.get(driver) if isinstance(storage.get(driver), dict) else {}
    for other in STORAGE_DRIVERS:
        storage.pop(other, None)
    storage[driver] = kept


# --- value parsers -----------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any, key: str) -> float:
    """Go-style durations (`168h`, `1h30m`, `500ms`; also `30d`) or plain seconds -> seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like 10s or 168h, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if text == "0":  # Go accepts a bare 0
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ConfigError(f"{key}: expected a duration like 10s or 168h, got {value!r}")
    return total


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(value: Any, key: str) -> int:
    """`64MiB`, `50GiB`, `1g`, or plain bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.fullmatch(str(value).strip())
    unit = m.group(2).lower().removesuffix("b") if m else None
    if not m or unit not in _SIZE_UNITS:
        raise ConfigError(f"{key}: expected a size like 64MiB or 50GiB, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_addr(value: Any, key: str) -> tuple[str, int]:
    """`:5000`, `0.0.0.0:5000`, `[::1]:5000` -> (host, port)."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected host:port or :port, got {value!r}")
    return host.strip("[]"), int(port)


class Section:
    """One mapping of the YAML: typed getters that consume keys, then `done()` refuses leftovers."""

    def __init__(self, raw: Any, path: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__}")
        self.raw = dict(raw)
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.raw

    def take(self, name: str, default: Any = None) -> Any:
        return self.raw.pop(name, default)

    def section(self, name: str) -> Section:
        return Section(self.take(name), self.key(name))

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.take(name, default)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{self.key(name)}: expected a string, got {value!r}")

    def required(self, name: str, why: str) -> str:
        value = self.string(name)
        if not value:
            raise ConfigError(f"{self.key(name)}: {why}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.take(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.take(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.key(name)}: expected an integer >= {minimum}, got {value!r}")
        return value

    def duration(self, name: str, default: float) -> float:
        return parse_duration(self.take(name, default), self.key(name))

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.take(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(name)}: expected a list of strings, got {value!r}")
        return tuple(value)

    def ignore(self, *names: str) -> None:
        """registry:2 keys that change nothing here (e.g. storage.cache: we always cache in memory)."""
        for name in names:
            self.raw.pop(name, None)

    def refuse(self, *names: str, why: str) -> None:
        """registry:2 keys we do not implement and must not silently skip (auth, TLS)."""
        for name in names:
            if name in self.raw:
                raise ConfigError(f"{self.key(name)}: not supported by this version of mirror ({why})")

    def done(self) -> None:
        if self.raw:
            name = sorted(self.raw, key=str)[0]
            raise ConfigError(f"{self.key(str(name))}: unknown configuration key")


# --- sections ----------------------------------------------------------------------------------

LOG_LEVELS = ("debug", "info", "warn", "warning", "error")


def _log(s: Section) -> LogConfig:
    level = (s.string("level", "info") or "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{s.key('level')}: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    formatter = s.string("formatter", "json")
    if formatter not in ("json", "text", "logstash"):
        raise ConfigError(f"{s.key('formatter')}: expected json, text or logstash, got {formatter!r}")
    fields = s.take("fields", {}) or {}
    if not isinstance(fields, dict):
        raise ConfigError(f"{s.key('fields')}: expected a mapping")
    access = s.section("accesslog")
    disabled = access.flag("disabled", False)
    access.done()
    s.ignore("hooks", "reportcaller")
    s.done()
    return LogConfig(level="warning" if level == "warn" else level, fields=fields, accesslog=not disabled)


def _headers(s: Section) -> dict[str, tuple[str, ...]]:
    """`headers: {Name: [values]}` as registry:2 writes them (a single string is one value)."""
    raw = s.take("headers", {}) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{s.key('headers')}: expected a mapping of header -> list of values")
    headers = {}
    for name, values in raw.items():
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list):
            raise ConfigError(f"{s.key('headers')}.{name}: expected a list of strings")
        headers[str(name)] = tuple(str(v) for v in values)
    return headers


EVENT_ACTIONS = ("push", "pull", "delete", "mount", "fetch")


def _notifications(s: Section) -> NotificationsConfig:
    events = s.section("events")
    include_references = events.flag("includereferences", False)
    events.done()
    items = s.take("endpoints", []) or []
    if not isinstance(items, list):
        raise ConfigError(f"{s.key('endpoints')}: expected a list")
    endpoints: list[EndpointConfig] = []
    for i, item in enumerate(items):
        e = Section(item, f"{s.key('endpoints')}[{i}]")
        name, url = e.required("name", "every endpoint needs a name"), e.required("url", "every endpoint needs a url")
        ignore = e.section("ignore")
        actions = ignore.strings("actions")
        for action in actions:
            if action not in EVENT_ACTIONS:
                raise ConfigError(f"{ignore.key('actions')}: expected some of {', '.join(EVENT_ACTIONS)}, "
                                  f"got {action!r}")
        endpoint = EndpointConfig(
            name=name, url=_url(url, e.key("url")), headers=_headers(e),
            timeout=e.duration("timeout", EndpointConfig.timeout),
            threshold=e.integer("threshold", EndpointConfig.threshold, minimum=1),
            backoff=e.duration("backoff", EndpointConfig.backoff),
            ignored_mediatypes=e.strings("ignoredmediatypes") + ignore.strings("mediatypes"),
            ignored_actions=actions, disabled=e.flag("disabled", False),
            queue_size=e.integer("queue_size", EndpointConfig.queue_size, minimum=1),
        )
        ignore.done()
        e.done()
        if any(other.name == name for other in endpoints):
            raise ConfigError(f"{e.key('name')}: {name!r} names two endpoints")
        endpoints.append(endpoint)
    s.done()
    return NotificationsConfig(endpoints=tuple(endpoints), include_references=include_references)


def _http(s: Section) -> HttpConfig:
    host, port = parse_addr(s.take("addr", ":5000"), s.key("addr"))
    net = s.string("net", "tcp")
    if net != "tcp":
        raise ConfigError(f"{s.key('net')}: only tcp is supported, got {net!r}")
    headers = _headers(s)
    draintimeout = s.duration("draintimeout", 10.0)
    tls = _tls(s.section("tls")) if s.has("tls") else None
    s.refuse("prefix", why="serve mirror at the root path")
    # secret: as registry:2, what replicas share to trust each other's signed state; here only the
    # web UI's delete forms are signed (upload state lives in storage).
    secret = s.string("secret") or None
    # Accepted: host and relativeurls (we answer with relative Location headers), http2. http.debug
    # is read by _debug_metrics.
    s.ignore("host", "relativeurls", "http2", "h2c")
    s.done()
    return HttpConfig(host=host, port=port, headers=headers, draintimeout=draintimeout, tls=tls, secret=secret)


def _tls(s: Section) -> TLSConfig:
    certificate, key = s.string("certificate"), s.string("key")
    if not certificate or not key:
        missing = "certificate" if not certificate else "key"
        raise ConfigError(f"{s.key(missing)}: required with http.tls (PEM file)")
    minimum = (s.string("minimumtls", "tls1.2") or "tls1.2").lower()
    if minimum not in TLS_VERSIONS:
        raise ConfigError(f"{s.key('minimumtls')}: expected one of {', '.join(TLS_VERSIONS)}, got {minimum!r}")
    tls = TLSConfig(certificate=certificate, key=key, clientcas=s.strings("clientcas"), minimumtls=minimum)
    s.refuse("letsencrypt", why="get a certificate elsewhere and set http.tls.certificate and key")
    s.refuse("ciphersuites", why="Python's defaults for the minimum TLS version are used")
    s.done()
    return tls


def _debug_metrics(s: Section) -> MetricsConfig | None:
    """registry:2's `http.debug.prometheus`: metrics on the debug address."""
    addr = s.take("addr")
    prometheus = s.section("prometheus")
    enabled = prometheus.flag("enabled", False)
    path = prometheus.string("path", "/metrics") or "/metrics"
    prometheus.done()
    s.done()
    if not enabled:
        return None
    return MetricsConfig(addr=parse_addr(addr, s.key("addr")) if addr else None, path=path)


def _metrics(s: Section) -> MetricsConfig:
    addr = s.take("addr")
    path = s.string("path", "/metrics") or "/metrics"
    if not path.startswith("/") or path.startswith("/v2"):
        raise ConfigError(f"{s.key('path')}: expected a path outside /v2, got {path!r}")
    metrics = MetricsConfig(enabled=s.flag("enabled", True),
                            addr=parse_addr(addr, s.key("addr")) if addr else None, path=path)
    s.done()
    return metrics


def _storage(s: Section) -> StorageConfig:
    backends = [b for b in STORAGE_DRIVERS if s.has(b)]
    if len(backends) > 1:
        raise ConfigError(f"storage: choose one driver, got {' and '.join(backends)}")
    if backends and backends[0] not in ("filesystem", "oss"):
        raise ConfigError(f"storage.{backends[0]}: storage driver not supported by this version of mirror")
    fs = s.section("filesystem")
    root = fs.string("rootdirectory", StorageConfig.rootdirectory) or StorageConfig.rootdirectory
    fs.ignore("maxthreads")
    fs.done()
    oss = _oss(s.section("oss")) if s.has("oss") else None
    delete = s.section("delete")
    delete_enabled = delete.flag("enabled", False)
    delete.done()
    maintenance = s.section("maintenance")
    p = maintenance.section("uploadpurging")
    purging = UploadPurging(
        enabled=p.flag("enabled", UploadPurging.enabled),
        age=p.duration("age", UploadPurging.age),
        interval=p.duration("interval", UploadPurging.interval),
        dryrun=p.flag("dryrun", UploadPurging.dryrun),
    )
    p.done()
    readonly = maintenance.section("readonly")
    if readonly.flag("enabled", False):
        raise ConfigError("storage.maintenance.readonly.enabled: read-only mode is not supported")
    readonly.done()
    maintenance.done()
    # cache.blobdescriptor: we always keep descriptors in memory.
    s.ignore("cache")
    # registry:2 redirects by default; here the hot tier is the point, so redirects are opt-in.
    r = s.section("redirect")
    redirect = not r.flag("disable", True)
    r.done()
    if redirect and oss is None:
        raise ConfigError("storage.redirect.disable: redirects need the oss driver; the filesystem has no URLs")
    s.done()
    return StorageConfig(rootdirectory=root, delete_enabled=delete_enabled, uploadpurging=purging, oss=oss,
                         redirect=redirect)


def _oss(s: Section) -> OssConfig:
    def required(name: str) -> str:
        return s.required(name, "required by the oss driver")

    chunksize = parse_size(s.take("chunksize", OssConfig.chunksize), s.key("chunksize"))
    if chunksize < 5 << 20:  # registry:2's minimum; OSS itself refuses parts under 100 KiB
        raise ConfigError(f"{s.key('chunksize')}: expected at least 5MiB, got {chunksize}")
    oss = OssConfig(
        accesskeyid=required("accesskeyid"),
        accesskeysecret=required("accesskeysecret"),
        region=required("region"),
        bucket=required("bucket"),
        endpoint=s.string("endpoint") or None,
        internal=s.flag("internal", False),
        secure=s.flag("secure", True),
        skipverify=s.flag("skipverify", False),
        encrypt=s.flag("encrypt", False),
        encryptionkeyid=s.string("encryptionkeyid") or None,
        chunksize=chunksize,
        rootdirectory=(s.string("rootdirectory") or "").strip("/"),
    )
    if oss.endpoint and "://" in oss.endpoint:
        raise ConfigError(f"{s.key('endpoint')}: expected host[:port] (`secure` picks http or https), "
                          f"got {oss.endpoint!r}")
    s.done()
    return oss


def _private(s: Section) -> PrivateConfig:
    patterns = tuple(_pattern(p, s.key("patterns")) for p in s.strings("patterns"))
    private = PrivateConfig(patterns=patterns, claim_on_push=s.flag("claim_on_push", False))
    s.done()
    return private


def _pattern(pattern: str, key: str) -> str:
    if not re.fullmatch(r"[a-z0-9._*/-]+", pattern) or "//" in pattern:
        raise ConfigError(f"{key}: {pattern!r} is not a repository name pattern")
    return pattern


def _auth(s: Section) -> AuthConfig | None:
    s.refuse("silly", why="registry:2's development-only scheme accepts any credentials; use htpasswd or token")
    kinds = [k for k in ("htpasswd", "token") if s.has(k)]
    if len(kinds) > 1:
        raise ConfigError("auth: configure one of htpasswd or token, not both")
    auth = AuthConfig()
    if s.has("htpasswd"):
        h = s.section("htpasswd")
        realm, path = h.string("realm") or "", h.string("path") or ""
        if not path:
            raise ConfigError(f"{h.key('path')}: required (an htpasswd file of bcrypt entries)")
        h.done()
        auth = AuthConfig(htpasswd=HtpasswdConfig(realm=realm or "mirror", path=path))
    elif s.has("token"):
        t = s.section("token")
        values = {}
        for name in ("realm", "service", "issuer", "rootcertbundle"):
            values[name] = t.string(name) or ""
            if not values[name]:
                raise ConfigError(f"{t.key(name)}: required with auth.token")
        algorithms = t.strings("signingalgorithms") or SIGNING_ALGORITHMS
        for alg in algorithms:
            if alg not in SIGNING_ALGORITHMS:
                raise ConfigError(f"{t.key('signingalgorithms')}: {alg!r} is not one of "
                                  f"{', '.join(SIGNING_ALGORITHMS)}")
        t.refuse("jwks", why="put the signing certificates in rootcertbundle")
        token = TokenConfig(**values, autoredirect=t.flag("autoredirect", False),
                            autoredirectpath=t.string("autoredirectpath", "/auth/token") or "/auth/token",
                            signingalgorithms=algorithms)
        t.done()
        auth = AuthConfig(token=token)
    s.done()
    return auth if auth.htpasswd or auth.token else None


def _access(s: Section, auth: AuthConfig | None) -> AccessConfig:
    anonymous_pull = s.flag("anonymous_pull", False)
    items = s.take("rules", []) or []
    if not isinstance(items, list):
        raise ConfigError(f"{s.key('rules')}: expected a list of rules")
    rules = []
    for i, item in enumerate(items):
        r = Section(item, f"{s.key('rules')}[{i}]")
        patterns = tuple(_pattern(p, r.key("repositories")) for p in r.strings("repositories"))
        if not patterns:
            raise ConfigError(f"{r.key('repositories')}: every rule needs repository patterns")
        users = {a: r.strings(a) if r.has(a) else None for a in ACTIONS}
        r.done()
        rules.append(AccessRule(repositories=patterns, **users))
    s.done()
    access = AccessConfig(anonymous_pull=anonymous_pull, rules=tuple(rules))
    if auth is None and access != AccessConfig():
        raise ConfigError("access: access rules need auth (auth.htpasswd or auth.token): "
                          "without it every client is anonymous and may do everything")
    return access


def _limits(s: Section) -> LimitsConfig:
    d = LimitsConfig()
    limits = LimitsConfig(
        manifest_size=parse_size(s.take("manifest_size", d.manifest_size), s.key("manifest_size")),
        uploads_per_client=s.integer("uploads_per_client", d.uploads_per_client),
        body_timeout=s.duration("body_timeout", d.body_timeout),
        header_size=parse_size(s.take("header_size", d.header_size), s.key("header_size")),
        headers=s.integer("headers", d.headers, minimum=16),
    )
    if limits.body_timeout <= 0:
        raise ConfigError(f"{s.key('body_timeout')}: expected a duration above 0")
    if limits.manifest_size < 1024 or limits.header_size < 1024:
        key = "manifest_size" if limits.manifest_size < 1024 else "header_size"
        raise ConfigError(f"{s.key(key)}: expected at least 1KiB")
    s.done()
    return limits


def _ui(s: Section) -> UIConfig:
    ui = UIConfig(enabled=s.flag("enabled", UIConfig.enabled))
    s.done()
    return ui


def _upstream(s: Section, index: int) -> UpstreamConfig:
    name = s.required("name", "every upstream needs a name")
    url = s.required("url", "every upstream needs a url")
    hosts = s.strings("hosts")
    prefixes = s.strings("prefixes")
    for prefix in prefixes:
        if not re.fullmatch(_COMPONENT, prefix):
            raise ConfigError(f"{s.key('prefixes')}: {prefix!r} is not a single repository-name component")
    dockerhub = s.take("dockerhub")
    if dockerhub is None:
        dockerhub = urlsplit(url).hostname == "registry-1.docker.io" or "docker.io" in hosts
    elif not isinstance(dockerhub, bool):
        raise ConfigError(f"{s.key('dockerhub')}: expected true or false, got {dockerhub!r}")
    up = UpstreamConfig(
        name=name,
        url=_url(url, s.key("url")),
        username=s.string("username"),
        password=s.string("password"),
        hosts=hosts,
        prefixes=prefixes,
        dockerhub=dockerhub,
        tag_ttl=s.duration("tag_ttl", UpstreamConfig.tag_ttl),
        connect_timeout=s.duration("connect_timeout", UpstreamConfig.connect_timeout),
        read_timeout=s.duration("read_timeout", UpstreamConfig.read_timeout),
        retries=s.integer("retries", UpstreamConfig.retries, minimum=1),
    )
    up = _tag_policy(s, up)
    s.done()
    return up


def _url(url: str, key: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}: expected an http(s) URL, got {url!r}")
    return url.rstrip("/")


def _proxy(s: Section) -> tuple[UpstreamConfig, float | None]:
    url = s.string("remoteurl")
    if not url:
        raise ConfigError(f"{s.key('remoteurl')}: required when proxy is set")
    url = _url(url, s.key("remoteurl"))
    hub = urlsplit(url).hostname == "registry-1.docker.io"
    ttl = s.take("ttl")
    up = UpstreamConfig(
        name="dockerhub" if hub else urlsplit(url).hostname or "proxy",  # in logs and metric labels
        url=url,
        username=s.string("username"),
        password=s.string("password"),
        hosts=("*",),  # registry:2 ignores ?ns=: whatever containerd names goes to remoteurl
        prefixes=("docker.io",) if hub else (),
        dockerhub=hub,
        tag_ttl=s.duration("tag_ttl", UpstreamConfig.tag_ttl),  # our extension
    )
    up = _tag_policy(s, up)
    s.done()
    return up, None if ttl is None else parse_duration(ttl, s.key("ttl"))


def parse(raw: Any, warnings: list[str] | None = None) -> Config:
    s = Section(raw, "")
    version = s.take("version", "0.1")
    if str(version) != "0.1":
        raise ConfigError(f"version: expected 0.1, got {version!r}")
    log = _log(s.section("log"))
    http_section = s.section("http")
    debug_metrics = _debug_metrics(http_section.section("debug"))
    http = _http(http_section)
    storage = _storage(s.section("storage"))

    upstreams: list[UpstreamConfig] = []
    content_ttl = CacheConfig.content_ttl
    if s.has("proxy"):
        up, ttl = _proxy(s.section("proxy"))
        upstreams.append(up)
        if ttl is not None:
            content_ttl = ttl or None  # ttl 0 = never expire, as registry:2
    items = s.take("upstreams", []) or []
    if not isinstance(items, list):
        raise ConfigError("upstreams: expected a list")
    for i, item in enumerate(items):
        upstreams.append(_upstream(Section(item, f"upstreams[{i}]"), i))
    _check_unique(upstreams)

    c = s.section("cache")
    cache = CacheConfig(
        index=c.string("index"),
        memory=parse_size(c.take("memory", CacheConfig.memory), c.key("memory")),
        content_ttl=content_ttl,
        directory=c.string("directory"),
        hot_size=parse_size(c.take("hot_size", CacheConfig.hot_size), c.key("hot_size")),
        max_size=parse_size(c.take("max_size"), c.key("max_size")) if c.has("max_size") else None,
        high_watermark=_share(c, "high_watermark", CacheConfig.high_watermark),
        low_watermark=_share(c, "low_watermark", CacheConfig.low_watermark),
        min_idle=c.duration("min_idle", CacheConfig.min_idle),
    )
    if cache.low_watermark >= cache.high_watermark:
        raise ConfigError(f"cache.low_watermark: must be below cache.high_watermark ({cache.high_watermark})")
    c.done()

    private = _private(s.section("private"))
    metrics = _metrics(s.section("metrics")) if s.has("metrics") or debug_metrics is None else debug_metrics

    # Keys of registry:2 that do nothing for us: health checks of the storage driver, redis,
    # validation.manifests.urls (we never fetch foreign layers), compatibility (no schema 1).
    s.ignore("health", "redis", "validation", "compatibility")
    auth = _auth(s.section("auth"))
    access = _access(s.section("access"), auth)
    limits = _limits(s.section("limits"))
    notifications = _notifications(s.section("notifications"))
    if notifications.include_references:
        warnings = [*(warnings or ()), "notifications.events.includereferences: events carry no references "
                                       "in this version (the rest of each event is as registry:2's)"]
    ui = _ui(s.section("ui"))
    s.done()
    return Config(log=log, http=http, storage=storage, cache=cache, upstreams=tuple(upstreams),
                  private=private, metrics=metrics, auth=auth, access=access, limits=limits,
                  notifications=notifications, ui=ui, warnings=tuple(warnings or ()))


def _share(s: Section, name: str, default: float) -> float:
    value = s.take(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{s.key(name)}: expected a number between 0 and 1, got {value!r}")
    return float(value)


def _tag_policy(s: Section, up: UpstreamConfig) -> UpstreamConfig:
    """Our per-upstream extensions: tag globs always/never revalidated, allowed repositories."""
    policy = {name: s.strings(name) for name in ("mutable_tags", "immutable_tags", "repositories")}
    for pattern in policy["mutable_tags"] + policy["immutable_tags"]:
        if not re.fullmatch(r"[\w.*-]+", pattern):
            raise ConfigError(f"{s.key('mutable_tags')}: {pattern!r} is not a tag pattern")
    for pattern in policy["repositories"]:
        if not re.fullmatch(r"[a-z0-9._*/-]+", pattern):
            raise ConfigError(f"{s.key('repositories')}: {pattern!r} is not a repository name pattern")
    return dataclasses.replace(up, mutable_tags=policy["mutable_tags"], immutable_tags=policy["immutable_tags"],
                               repositories=policy["repositories"])


def _check_unique(upstreams: list[UpstreamConfig]) -> None:
    seen: dict[str, str] = {}
    for up in upstreams:
        for kind, values in (("name", (up.name,)), ("host", up.hosts), ("prefix", up.prefixes)):
            for v in values:
                if v == "*":
                    continue
                other = seen.setdefault(f"{kind}:{v}", up.name)
                if other != up.name:
                    raise ConfigError(f"upstreams: {kind} {v!r} is used by both {other!r} and {up.name!r}")


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
