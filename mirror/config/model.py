"""The configuration model: typed, frozen dataclasses, one per section (parsed in sections.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    formatter: str = "json"  # json | text | logstash
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
    secret: str | None = field(default=None, repr=False)  # signs the UI's delete forms, and replicas' requests
    advertise: str | None = None  # the URL other replicas reach this one at (with redis:)


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
    # Whether a push to a name not in `patterns` claims it as private: `auto` unless the upstream serves that
    # name as mirror clients ask for it, `true` always (trusted pushers), `false` never. Never a name
    # holding cached content.
    claim_on_push: str = "auto"


@dataclass(frozen=True)
class CacheConfig:
    index: str | None = None  # the ledger's directory (local state); default <local directory>/_index
    memory: int = 64 << 20  # bytes of manifests kept in memory for the hot path
    content_ttl: float | None = 168 * 3600.0  # proxy.ttl: unused proxied content expires (issue 8)
    directory: str | None = None  # local disk in front of remote storage; default the filesystem root
    hot_size: int = 10 << 30  # bytes of blobs kept on local disk in front of OSS (LRU)
    max_size: int | None = None  # bytes of storage; past it proxied content is evicted, least recently used first
    high_watermark: float = 0.95  # eviction starts above this share of max_size...
    low_watermark: float = 0.85  # ...and stops below this one
    min_idle: float = 30.0  # a manifest served this recently keeps the blobs it references until they are fetched

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
    body_timeout: float = 60.0  # a request body that sends less than body_min_bytes in this long is cut
    body_min_bytes: int = 16 << 10  # ...so a drip (a byte every 10 s) cannot hold an upload slot for ever
    header_size: int = 8190  # longest request line or header field (aiohttp's max_line_size/max_field_size)
    headers: int = 128  # most header fields in one request


@dataclass(frozen=True)
class ScrubConfig:
    """The server's background scrub (ours): every blob and manifest hashed against its digest."""

    enabled: bool = True
    rate: int = 20 << 20  # bytes hashed a second: what a pass may take from the disk
    interval: float = 7 * 24 * 3600.0  # a pass at most this often (the first 10 minutes after the first start)


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
class RedisConfig:
    """redis, registry:2's keys: shared state of the replicas that serve one storage (issue 18)."""

    addr: str  # host:port
    password: str | None = field(default=None, repr=False)
    db: int = 0
    dialtimeout: float = 1.0  # a replica that cannot reach Redis in this long works on its own
    readtimeout: float = 1.0
    writetimeout: float = 1.0
    maxactive: int = 64  # pool.maxactive: connections at most
    idletimeout: float = 300.0  # pool.idletimeout: a connection idle this long is pinged before it is used
    tls: bool = False  # tls.enabled
    certificate: str | None = None  # tls.certificate, tls.key: a client certificate
    key: str | None = None
    clientcas: tuple[str, ...] = ()  # tls.clientcas: CAs the server's certificate is checked against


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
    redis: RedisConfig | None = None  # shared state of replicas; None: one replica on its own
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    warnings: tuple[str, ...] = ()  # things accepted but worth telling the operator at start

