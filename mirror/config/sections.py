"""One parser per config section: registry:2's keys and ours, into the model's dataclasses."""

from __future__ import annotations

import dataclasses
import re
from typing import Any
from urllib.parse import urlsplit

from mirror.config.env import STORAGE_DRIVERS
from mirror.config.model import (
    ACTIONS,
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
from mirror.config.values import Section, parse_addr, parse_duration, parse_size
from mirror.names import _COMPONENT

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
    return LogConfig(level="warning" if level == "warn" else level, formatter=formatter or "json",
                     fields=fields, accesslog=not disabled)


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
    advertise = s.string("advertise") or None  # ours: where other replicas reach this one (redis:)
    if advertise is not None:
        advertise = _url(advertise, s.key("advertise"))
    # Accepted: host and relativeurls (we answer with relative Location headers), http2. http.debug
    # is read by _debug_metrics.
    s.ignore("host", "relativeurls", "http2", "h2c")
    s.done()
    return HttpConfig(host=host, port=port, headers=headers, draintimeout=draintimeout, tls=tls, secret=secret,
                      advertise=advertise)


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


CLAIM_MODES = ("auto", "true", "false")


def _private(s: Section) -> PrivateConfig:
    patterns = tuple(_pattern(p, s.key("patterns")) for p in s.strings("patterns"))
    claim = s.take("claim_on_push", PrivateConfig.claim_on_push)
    claim = {True: "true", False: "false"}.get(claim, claim) if isinstance(claim, bool) else claim
    if claim not in CLAIM_MODES:
        raise ConfigError(f"{s.key('claim_on_push')}: expected auto, true or false, got {claim!r}")
    private = PrivateConfig(patterns=patterns, claim_on_push=claim)
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
        body_min_bytes=parse_size(s.take("body_min_bytes", d.body_min_bytes), s.key("body_min_bytes")),
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


def _scrub(s: Section) -> ScrubConfig:
    scrub = ScrubConfig(
        enabled=s.flag("enabled", ScrubConfig.enabled),
        rate=parse_size(s.take("rate", ScrubConfig.rate), s.key("rate")),
        interval=s.duration("interval", ScrubConfig.interval),
    )
    if scrub.rate <= 0 or scrub.interval <= 0:
        raise ConfigError(f"{s.key('rate' if scrub.rate <= 0 else 'interval')}: expected a value above 0")
    s.done()
    return scrub


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
    # ours: Docker Hub's names (library/ for official images, docker.io prefix), detected from the URL;
    # `dockerhub: true` for a Docker Hub mirror elsewhere (a corporate pull-through of Docker Hub)
    hub = s.flag("dockerhub", urlsplit(url).hostname == "registry-1.docker.io")
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
    s.ignore("health", "validation", "compatibility")
    redis = _redis(s.section("redis")) if s.has("redis") else None
    if redis is not None and not http.secret:
        raise ConfigError("http.secret: required with redis (the same on every replica): replicas stream cold "
                          "blobs to each other, signed with it")
    auth = _auth(s.section("auth"))
    access = _access(s.section("access"), auth)
    limits = _limits(s.section("limits"))
    notifications = _notifications(s.section("notifications"))
    if notifications.include_references:
        warnings = [*(warnings or ()), "notifications.events.includereferences: events carry no references "
                                       "in this version (the rest of each event is as registry:2's)"]
    ui = _ui(s.section("ui"))
    scrub = _scrub(s.section("scrub"))
    s.done()
    return Config(log=log, http=http, storage=storage, cache=cache, upstreams=tuple(upstreams),
                  private=private, metrics=metrics, auth=auth, access=access, limits=limits,
                  notifications=notifications, ui=ui, redis=redis, scrub=scrub,
                  warnings=tuple(warnings or ()))


def _redis(s: Section) -> RedisConfig:
    addr = s.required("addr", "required with redis (host:port)")
    parse_addr(addr, s.key("addr"))
    pool = s.section("pool")
    tls = s.section("tls")
    redis = RedisConfig(
        addr=addr, password=s.string("password") or None, db=s.integer("db", 0),
        dialtimeout=s.duration("dialtimeout", RedisConfig.dialtimeout) or RedisConfig.dialtimeout,
        readtimeout=s.duration("readtimeout", RedisConfig.readtimeout) or RedisConfig.readtimeout,
        writetimeout=s.duration("writetimeout", RedisConfig.writetimeout) or RedisConfig.writetimeout,
        maxactive=pool.integer("maxactive", RedisConfig.maxactive, minimum=1),
        idletimeout=pool.duration("idletimeout", RedisConfig.idletimeout),
        tls=tls.flag("enabled", False), certificate=tls.string("certificate"), key=tls.string("key"),
        clientcas=tls.strings("clientcas"),
    )
    pool.ignore("maxidle")  # redis-py keeps what it opened, up to maxactive
    pool.done()
    tls.done()
    s.done()
    return redis


def _share(s: Section, name: str, default: float) -> float:
    value = s.take(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{s.key(name)}: expected a number between 0 and 1, got {value!r}")
    return float(value)


def _tag_policy(s: Section, up: UpstreamConfig) -> UpstreamConfig:
    """Our per-upstream extensions: tag globs always/never revalidated, allowed repositories."""
    policy = {name: s.strings(name) for name in ("mutable_tags", "immutable_tags", "repositories")}
    for key in ("mutable_tags", "immutable_tags"):
        for pattern in policy[key]:
            if not re.fullmatch(r"[\w.*-]+", pattern):
                raise ConfigError(f"{s.key(key)}: {pattern!r} is not a tag pattern")
    for pattern in policy["repositories"]:
        if not re.fullmatch(r"[a-z0-9._*/-]+", pattern):
            raise ConfigError(f"{s.key('repositories')}: {pattern!r} is not a repository name pattern")
    return dataclasses.replace(up, mutable_tags=policy["mutable_tags"], immutable_tags=policy["immutable_tags"],
                               repositories=policy["repositories"])


def _check_unique(upstreams: list[UpstreamConfig]) -> None:
    """Names label metrics and logs, hosts and prefixes route requests: each belongs to one upstream."""
    seen: dict[tuple[str, str], int] = {}
    for i, up in enumerate(upstreams):
        for kind, values in (("name", (up.name,)), ("host", up.hosts), ("prefix", up.prefixes)):
            for v in values:
                if v == "*":
                    continue
                first = seen.setdefault((kind, v), i)
                if first != i:
                    raise ConfigError(f"upstreams: {kind} {v!r} is used by two upstreams "
                                      f"({upstreams[first].name!r} and {up.name!r})")

