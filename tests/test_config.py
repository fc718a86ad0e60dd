from pathlib import Path

import pytest

from mirror.config import ConfigError, load, parse, parse_addr, parse_duration, parse_size

ROOT = Path(__file__).resolve().parents[1]

# registry:2's own shipped config.yml with a proxy section, as the seeds run it.
SEED = """
version: 0.1
log:
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: /var/lib/registry
http:
  addr: :5000
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
proxy:
  remoteurl: https://registry-1.docker.io
  username: user
  password: secret
  ttl: 72h
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yml"
    p.write_text(text)
    return p


def test_embedded_default_is_a_docker_hub_mirror_on_5000() -> None:
    c = load(None, {})
    assert c.http.port == 5000 and c.http.host == ""
    assert c.storage.rootdirectory == "/var/lib/mirror"
    (hub,) = c.upstreams
    assert hub.url == "https://registry-1.docker.io" and hub.dockerhub and hub.prefixes == ("docker.io",)
    assert hub.tag_ttl == 300 and hub.name == "dockerhub"
    assert parse({"proxy": {"remoteurl": "https://harbor.example.com:8443"}}).upstreams[0].name == "harbor.example.com"


def test_registry_env_overrides_apply_to_the_default() -> None:
    c = load(None, {"REGISTRY_PROXY_USERNAME": "me", "REGISTRY_PROXY_PASSWORD": "pw"})
    (hub,) = c.upstreams
    assert (hub.username, hub.password) == ("me", "pw")


def test_config_dir_file_is_the_embedded_default() -> None:
    assert load(ROOT / "config" / "mirror.yml", {}) == load(None, {})


def test_seed_registry_config_starts_unchanged(tmp_path: Path) -> None:
    c = load(write(tmp_path, SEED), {})
    assert c.storage.rootdirectory == "/var/lib/registry"
    assert c.http.headers == {"X-Content-Type-Options": ("nosniff",)}
    assert c.log.fields == {"service": "registry"}
    (up,) = c.upstreams
    assert (up.url, up.username, up.password, up.dockerhub) == ("https://registry-1.docker.io", "user", "secret", True)
    assert c.cache.content_ttl == 72 * 3600
    assert "secret" not in repr(up)  # credentials never end up in logs via repr


def test_env_overrides_win(tmp_path: Path) -> None:
    env = {
        "REGISTRY_PROXY_REMOTEURL": "http://127.0.0.1:9999",
        "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/data",
        "REGISTRY_HTTP_ADDR": "127.0.0.1:6000",
        "REGISTRY_STORAGE_DELETE_ENABLED": "true",
        "REGISTRY_LOG_LEVEL": "debug",
    }
    c = load(write(tmp_path, SEED), env)
    assert c.upstreams[0].url == "http://127.0.0.1:9999"
    assert c.storage.rootdirectory == "/data"
    assert (c.http.host, c.http.port) == ("127.0.0.1", 6000)
    assert c.storage.delete_enabled is True
    assert c.log.level == "debug"


def test_env_creates_missing_sections(tmp_path: Path) -> None:
    c = load(write(tmp_path, "version: 0.1\n"), {"REGISTRY_PROXY_REMOTEURL": "http://127.0.0.1:1"})
    assert c.upstreams[0].url == "http://127.0.0.1:1"


def test_unknown_env_var_warns_not_fails(tmp_path: Path) -> None:
    # Kubernetes sets these for a service named "registry".
    c = load(write(tmp_path, "version: 0.1\n"), {"REGISTRY_PORT": "tcp://10.0.0.1:5000"})
    assert any("REGISTRY_PORT" in w for w in c.warnings)


def test_bad_env_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"storage\.delete\.enabled"):
        load(write(tmp_path, "version: 0.1\n"), {"REGISTRY_STORAGE_DELETE_ENABLED": "maybe"})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("version: 0.1\nlog: {levle: info}\n", r"log\.levle: unknown"),
        ("version: 0.1\nhttp: {addr: nope}\n", r"http\.addr"),
        ("version: 0.2\n", r"version"),
        ("version: 0.1\nlog: {level: loud}\n", r"log\.level"),
        ("version: 0.1\nproxy: {}\n", r"proxy\.remoteurl"),
        ("version: 0.1\nproxy: {remoteurl: ftp://x}\n", r"proxy\.remoteurl"),
        ("version: 0.1\nproxy: {remoteurl: 'http://x', ttl: soon}\n", r"proxy\.ttl"),
        ("version: 0.1\nupstreams: [{name: a}]\n", r"upstreams\[0\]\.url"),
        ("version: 0.1\nupstreams: [{name: a, url: 'http://a', tag_ttl: -}]\n", r"upstreams\[0\]\.tag_ttl"),
        ("version: 0.1\nupstreams: [{name: a, url: 'http://a', prefixes: [Bad/x]}]\n", r"upstreams\[0\]\.prefixes"),
        ("version: 0.1\nupstreams: [{name: a, url: 'http://a', colour: red}]\n", r"upstreams\[0\]\.colour"),
        ("version: 0.1\nupstreams: [{name: a, url: 'http://a', hosts: [x]}, {name: b, url: 'http://b', hosts: [x]}]\n",
         r"host 'x'"),
        ("version: 0.1\nupstreams: [{name: a, url: 'http://a'}, {name: a, url: 'http://b'}]\n",
         r"^upstreams: name 'a' is used by two upstreams"),
        ("version: 0.1\nupstreams: [{name: a, url: 'http://a', immutable_tags: ['v 1']}]\n",
         r"^upstreams\[0\]\.immutable_tags: 'v 1'"),
        ("version: 0.1\nupstreams: [{name: a, url: 'http://a', mutable_tags: ['$x']}]\n",
         r"^upstreams\[0\]\.mutable_tags: '\$x'"),
        ("version: 0.1\nstorage: {s3: {bucket: b}}\n", r"storage\.s3"),
        ("version: 0.1\nstorage: {filesystem: {}, oss: {}}\n", r"storage: choose one driver"),
        ("version: 0.1\nstorage: {oss: {accesskeyid: a, accesskeysecret: s, region: r}}\n", r"storage\.oss\.bucket"),
        ("version: 0.1\nstorage: {oss: {accesskeyid: a, accesskeysecret: s, region: r, bucket: b, "
         "endpoint: 'http://x'}}\n", r"storage\.oss\.endpoint"),
        ("version: 0.1\nstorage: {oss: {accesskeyid: a, accesskeysecret: s, region: r, bucket: b, chunksize: 1MiB}}\n",
         r"storage\.oss\.chunksize"),
        ("version: 0.1\nstorage: {oss: {accesskeyid: a, accesskeysecret: s, region: r, bucket: b, colour: red}}\n",
         r"storage\.oss\.colour: unknown"),
        ("version: 0.1\nstorage: {redirect: {disable: false}}\n", r"storage\.redirect"),
        ("version: 0.1\nauth: {silly: {realm: r, service: s}}\n", r"^auth\.silly: not supported"),
        ("version: 0.1\nauth: {htpasswd: {path: /p}, token: {realm: r}}\n", r"^auth: configure one"),
        ("version: 0.1\nauth: {htpasswd: {realm: r}}\n", r"^auth\.htpasswd\.path: required"),
        ("version: 0.1\nauth: {htpasswd: {path: /p, colour: red}}\n", r"^auth\.htpasswd\.colour: unknown"),
        ("version: 0.1\nauth: {token: {realm: r, service: s, issuer: i}}\n", r"^auth\.token\.rootcertbundle"),
        ("version: 0.1\nauth: {token: {realm: r, service: s, issuer: i, rootcertbundle: b, jwks: j}}\n",
         r"^auth\.token\.jwks: not supported"),
        ("version: 0.1\nauth: {token: {realm: r, service: s, issuer: i, rootcertbundle: b, "
         "signingalgorithms: [HS256]}}\n", r"^auth\.token\.signingalgorithms"),
        ("version: 0.1\nauth: {ldap: {}}\n", r"^auth\.ldap: unknown"),
        ("version: 0.1\nhttp: {addr: ':5000', tls: {certificate: c}}\n", r"http\.tls\.key: required"),
        ("version: 0.1\nhttp: {tls: {certificate: c, key: k, minimumtls: tls1.0}}\n", r"http\.tls\.minimumtls"),
        ("version: 0.1\nhttp: {tls: {certificate: c, key: k, letsencrypt: {email: e}}}\n", r"http\.tls\.letsencrypt"),
        ("version: 0.1\naccess: {anonymous_pull: true}\n", r"^access: access rules need auth"),
        ("version: 0.1\nauth: {htpasswd: {path: /p}}\naccess: {rules: [{push: [a]}]}\n",
         r"^access\.rules\[0\]\.repositories"),
        ("version: 0.1\nauth: {htpasswd: {path: /p}}\naccess: {rules: [{repositories: [Team]}]}\n",
         r"^access\.rules\[0\]\.repositories: 'Team'"),
        ("version: 0.1\nauth: {htpasswd: {path: /p}}\naccess: {rules: [{repositories: [a], pull: 5}]}\n",
         r"^access\.rules\[0\]\.pull"),
        ("version: 0.1\nauth: {htpasswd: {path: /p}}\naccess: {rules: [{repositories: [a], write: [x]}]}\n",
         r"^access\.rules\[0\]\.write: unknown"),
        ("version: 0.1\nlimits: {body_timeout: 0}\n", r"^limits\.body_timeout"),
        ("version: 0.1\nlimits: {manifest_size: 10}\n", r"^limits\.manifest_size"),
        ("version: 0.1\nlimits: {uploads_per_client: -1}\n", r"^limits\.uploads_per_client"),
        ("version: 0.1\ncache: {memory: lots}\n", r"cache\.memory"),
        ("version: 0.1\nui: {enabled: sometimes}\n", r"^ui\.enabled: expected true or false"),
        ("version: 0.1\nui: {enabled: true, theme: dark}\n", r"^ui\.theme: unknown configuration key"),
        ("version: 0.1\nscrub: {rate: fast}\n", r"^scrub\.rate"),
        ("version: 0.1\nscrub: {rate: 0}\n", r"^scrub\.rate"),
        ("version: 0.1\nscrub: {interval: 0s}\n", r"^scrub\.interval"),
        ("version: 0.1\nscrub: {pace: 1}\n", r"^scrub\.pace: unknown"),
        ("- a\n- b\n", r"mapping"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(write(tmp_path, text), {})


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.yml", {})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(write(tmp_path, "a: [\n"), {})


def test_upstreams_list_and_dockerhub_detection() -> None:
    c = parse({"upstreams": [
        {"name": "hub", "url": "https://registry-1.docker.io"},
        {"name": "quay", "url": "https://quay.io/", "hosts": ["quay.io"], "prefixes": ["quay.io"],
         "tag_ttl": "1m30s", "username": "u", "password": "p"},
    ]})
    hub, quay = c.upstreams
    assert hub.dockerhub and not quay.dockerhub
    assert quay.url == "https://quay.io" and quay.tag_ttl == 90


@pytest.mark.parametrize(("value", "seconds"), [("168h", 604800), ("1h30m", 5400), ("500ms", 0.5), (10, 10),
                                                ("1.5s", 1.5)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "k") == seconds


@pytest.mark.parametrize("value", ["", "10", "h", "10x", "1h 2m", True])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^k:"):
        parse_duration(value, "k")


def test_sizes_and_addrs() -> None:
    assert parse_size("64MiB", "k") == 64 << 20
    assert parse_size("1g", "k") == 10**9
    assert parse_size(123, "k") == 123
    assert parse_addr(":5000", "k") == ("", 5000)
    assert parse_addr("[::1]:5000", "k") == ("::1", 5000)
    for bad in ("5000", "host:", "host:70000"):
        with pytest.raises(ConfigError):
            parse_addr(bad, "k")


def test_metrics_keys_and_registry_debug_mapping() -> None:
    assert parse({}).metrics.addr is None and parse({}).metrics.path == "/metrics"
    m = parse({"metrics": {"addr": "127.0.0.1:9100", "path": "/stats"}}).metrics
    assert (m.addr, m.path, m.enabled) == (("127.0.0.1", 9100), "/stats", True)
    debug = parse({"http": {"debug": {"addr": ":5001", "prometheus": {"enabled": True, "path": "/m"}}}}).metrics
    assert (debug.addr, debug.path) == (("", 5001), "/m")
    assert parse({"http": {"debug": {"addr": ":5001"}}}).metrics.addr is None  # debug without prometheus
    assert parse({"metrics": {"enabled": False}}).metrics.enabled is False
    for bad, key in (({"metrics": {"path": "/v2/x"}}, r"metrics\.path"), ({"metrics": {"addr": "x"}}, r"metrics\.addr"),
                     ({"metrics": {"port": 1}}, r"metrics\.port")):
        with pytest.raises(ConfigError, match=key):
            parse(bad)


def test_oss_keys_and_env_as_registry_2() -> None:
    """The seeds' REGISTRY_STORAGE=oss plus REGISTRY_STORAGE_OSS_* select and configure the bucket."""
    env = {"REGISTRY_STORAGE": "oss", "REGISTRY_STORAGE_OSS_ACCESSKEYID": "id",
           "REGISTRY_STORAGE_OSS_ACCESSKEYSECRET": "secret", "REGISTRY_STORAGE_OSS_REGION": "oss-cn-hangzhou",
           "REGISTRY_STORAGE_OSS_BUCKET": "images", "REGISTRY_STORAGE_OSS_INTERNAL": "true",
           "REGISTRY_STORAGE_OSS_ENCRYPT": "true", "REGISTRY_STORAGE_OSS_CHUNKSIZE": "16MiB",
           "REGISTRY_STORAGE_OSS_ROOTDIRECTORY": "/mirror/", "REGISTRY_CACHE_HOT_SIZE": "2GiB"}
    config = load(None, env)
    oss = config.storage.oss
    assert oss is not None and config.storage.redirect is False
    assert (oss.accesskeyid, oss.accesskeysecret, oss.bucket) == ("id", "secret", "images")
    assert oss.url == "https://oss-cn-hangzhou-internal.aliyuncs.com"
    assert oss.encrypt and oss.chunksize == 16 << 20 and oss.rootdirectory == "mirror"
    assert "secret" not in repr(config)
    assert config.cache.hot_size == 2 << 30
    assert str(config.cache.local_dir(config.storage)) == "/var/lib/mirror"


def test_oss_endpoint_and_redirect() -> None:
    config = parse({"version": 0.1, "storage": {
        "oss": {"accesskeyid": "a", "accesskeysecret": "s", "region": "r", "bucket": "b", "endpoint": "127.0.0.1:9000",
                "secure": False},
        "redirect": {"disable": False}}, "cache": {"directory": "/srv/mirror"}})
    assert config.storage.oss is not None and config.storage.oss.url == "http://127.0.0.1:9000"
    assert config.storage.redirect
    assert config.cache.index_dir(config.storage) == "/srv/mirror/_index"


def test_tls_auth_access_and_limits() -> None:
    c = parse({"http": {"addr": ":5443", "tls": {"certificate": "/c.pem", "key": "/k.pem", "clientcas": ["/ca.pem"]}},
               "auth": {"htpasswd": {"realm": "basic", "path": "/etc/mirror/htpasswd"}},
               "access": {"anonymous_pull": True, "rules": [
                   {"repositories": ["team/**"], "push": ["alice", "ci"], "delete": ["alice"]},
                   {"repositories": ["public/*"], "pull": ["*", "anonymous"]}]},
               "limits": {"manifest_size": "1MiB", "uploads_per_client": 4, "body_timeout": "30s",
                          "body_min_bytes": "1KiB", "header_size": "16KiB", "headers": 64}})
    assert c.http.tls is not None and c.http.tls.clientcas == ("/ca.pem",) and c.http.tls.minimumtls == "tls1.2"
    assert c.auth is not None and c.auth.htpasswd is not None and c.auth.token is None
    assert (c.auth.htpasswd.realm, c.auth.htpasswd.path) == ("basic", "/etc/mirror/htpasswd")
    assert c.access.anonymous_pull is True
    team, public = c.access.rules
    assert (team.repositories, team.pull, team.push, team.delete) == (("team/**",), None, ("alice", "ci"), ("alice",))
    assert public.users("pull") == ("*", "anonymous")
    assert (c.limits.manifest_size, c.limits.uploads_per_client, c.limits.body_timeout) == (1 << 20, 4, 30)
    assert (c.limits.header_size, c.limits.headers, c.limits.body_min_bytes) == (16 << 10, 64, 1 << 10)
    default = parse({})
    assert default.auth is None and default.http.tls is None and default.limits.manifest_size == 4 << 20
    assert default.limits.body_min_bytes == 16 << 10


def test_token_auth_keys_and_registry_env(tmp_path: Path) -> None:
    env = {"REGISTRY_HTTP_TLS_CERTIFICATE": "/certs/domain.crt", "REGISTRY_HTTP_TLS_KEY": "/certs/domain.key",
           "REGISTRY_AUTH_TOKEN_REALM": "https://auth.example/token", "REGISTRY_AUTH_TOKEN_SERVICE": "registry",
           "REGISTRY_AUTH_TOKEN_ISSUER": "issuer", "REGISTRY_AUTH_TOKEN_ROOTCERTBUNDLE": "/certs/bundle.pem",
           "REGISTRY_AUTH_TOKEN_AUTOREDIRECT": "true"}
    c = load(write(tmp_path, "version: 0.1\n"), env)
    assert c.http.tls is not None and (c.http.tls.certificate, c.http.tls.key) == ("/certs/domain.crt",
                                                                                  "/certs/domain.key")
    assert c.auth is not None and c.auth.token is not None
    t = c.auth.token
    assert (t.realm, t.service, t.issuer, t.rootcertbundle) == ("https://auth.example/token", "registry", "issuer",
                                                                "/certs/bundle.pem")
    assert t.autoredirect and t.autoredirectpath == "/auth/token" and "ES256" in t.signingalgorithms
    c = load(write(tmp_path, "version: 0.1\n"), {"REGISTRY_AUTH_HTPASSWD_REALM": "r",
                                                   "REGISTRY_AUTH_HTPASSWD_PATH": "/h"})
    assert c.auth is not None and c.auth.htpasswd is not None and c.auth.htpasswd.path == "/h"


def test_registry_auth_selects_the_driver_as_registry_2(tmp_path: Path) -> None:
    """REGISTRY_AUTH=htpasswd|token, as the tutorials run registry:2: that driver replaces the file's,
    its REGISTRY_AUTH_<DRIVER>_* fill it in; what mirror has no driver for is a one-line error."""
    token_file = write(tmp_path, "version: 0.1\nauth: {token: {realm: r, service: s, issuer: i, rootcertbundle: /b}}\n")
    env = {"REGISTRY_AUTH": "htpasswd", "REGISTRY_AUTH_HTPASSWD_REALM": "Registry Realm",
           "REGISTRY_AUTH_HTPASSWD_PATH": "/auth/htpasswd"}
    c = load(token_file, env)
    assert c.auth is not None and c.auth.token is None and c.auth.htpasswd is not None
    assert (c.auth.htpasswd.realm, c.auth.htpasswd.path) == ("Registry Realm", "/auth/htpasswd")
    assert not any("REGISTRY_AUTH" in w for w in c.warnings)
    c = load(token_file, {"REGISTRY_AUTH": "token", "REGISTRY_AUTH_TOKEN_REALM": "https://auth.example/token"})
    assert c.auth is not None and c.auth.token is not None and c.auth.token.realm == "https://auth.example/token"
    assert c.auth.token.service == "s"  # the file's other token keys stay
    with pytest.raises(ConfigError, match=r"auth\.htpasswd\.path: required"):
        load(token_file, {"REGISTRY_AUTH": "htpasswd"})
    with pytest.raises(ConfigError, match="silly"):
        load(token_file, {"REGISTRY_AUTH": "silly"})
    with pytest.raises(ConfigError, match=r"auth\.ldap"):
        load(token_file, {"REGISTRY_AUTH": "ldap"})
    assert load(token_file, {"REGISTRY_AUTH": ""}).auth is None


def test_ui_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    assert load(write(tmp_path, "version: 0.1\n"), {}).ui.enabled
    assert not load(write(tmp_path, "version: 0.1\nui: {enabled: false}\n"), {}).ui.enabled
    assert not load(write(tmp_path, "version: 0.1\n"), {"REGISTRY_UI_ENABLED": "false"}).ui.enabled


def test_scrub_keys_and_env(tmp_path: Path) -> None:
    default = load(write(tmp_path, "version: 0.1\n"), {}).scrub
    assert default.enabled and default.rate == 20 << 20 and default.interval == 7 * 24 * 3600
    c = load(write(tmp_path, "version: 0.1\nscrub: {enabled: false, rate: 5MiB, interval: 24h}\n"), {}).scrub
    assert (c.enabled, c.rate, c.interval) == (False, 5 << 20, 24 * 3600)
    c = load(write(tmp_path, "version: 0.1\n"), {"REGISTRY_SCRUB_ENABLED": "false", "REGISTRY_SCRUB_RATE": "1MiB",
                                                   "REGISTRY_SCRUB_INTERVAL": "1h"}).scrub
    assert (c.enabled, c.rate, c.interval) == (False, 1 << 20, 3600)
    limits = load(write(tmp_path, "version: 0.1\n"), {"REGISTRY_LIMITS_BODY_MIN_BYTES": "1KiB"}).limits
    assert limits.body_min_bytes == 1 << 10
