"""`mirror serve` and `mirror check-config` as real processes."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mirror import __version__
from tests.support.procs import HTPASSWD_LINE, HTPASSWD_PASSWORD, HTPASSWD_USER
from tests.test_config import SEED

pytestmark = pytest.mark.e2e  # every test here runs `python -m mirror` processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("version: 0.1\nstorage:\n  filesystem:\n    rootdir: /x\n")
    r = run("check-config", str(bad))
    assert r.returncode == 2
    assert "storage.filesystem.rootdir: unknown configuration key" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("serve", "--config", str(bad))
    assert r.returncode == 2 and "storage.filesystem.rootdir" in r.stderr and "Traceback" not in r.stderr


def test_check_config_and_serve_load_the_files_auth_and_tls_name(tmp_path: Path) -> None:
    cases = {
        "auth: {htpasswd: {realm: r, path: %s/absent}}": r"auth.htpasswd.path: cannot read",
        "auth: {token: {realm: r, service: s, issuer: i, rootcertbundle: %s/absent.pem}}":
            "auth.token.rootcertbundle: cannot read",
        "http: {tls: {certificate: %s/c.pem, key: %s/k.pem}}": "http.tls.certificate/key: cannot load",
    }
    for text, message in cases.items():
        config = tmp_path / "config.yml"
        config.write_text(f"version: 0.1\nstorage: {{filesystem: {{rootdirectory: {tmp_path}/data}}}}\n"
                          + text.replace("%s", str(tmp_path)) + "\n")
        for args in (("check-config", str(config)), ("serve", "--config", str(config))):
            r = run(*args)
            assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_check_config_accepts_the_default_and_a_seed_config(tmp_path: Path) -> None:
    assert run("check-config").returncode == 0
    seed = tmp_path / "config.yml"
    seed.write_text(SEED)
    r = run("check-config", str(seed))
    assert r.returncode == 0, r.stderr


def test_seed_registry_config_serves_with_env_overrides(tmp_path: Path) -> None:
    """registry:2's config.yml with a proxy: section starts unchanged; REGISTRY_* moves what a
    test must move (address, storage); SIGTERM stops it cleanly."""
    seed = tmp_path / "config.yml"
    seed.write_text(SEED)
    port = free_port()
    env = {**os.environ, "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}",
           "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--config", str(seed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
                    assert r.headers["X-Content-Type-Options"] == "nosniff"  # http.headers applied
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "mirror did not start"
                time.sleep(0.1)
        assert (tmp_path / "data" / "_index").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert '"service": "registry"' in out  # log.fields on every line


def test_registry_auth_env_picks_htpasswd_as_the_tutorials_do(tmp_path: Path) -> None:
    """`docker run -e REGISTRY_AUTH=htpasswd -e REGISTRY_AUTH_HTPASSWD_REALM=... -e REGISTRY_AUTH_HTPASSWD_PATH=...`,
    no config file: the challenge names the realm and the file's user gets in."""
    (tmp_path / "htpasswd").write_text(HTPASSWD_LINE + "\n")
    port = free_port()
    env = {**os.environ, "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}", "REGISTRY_AUTH": "htpasswd",
           "REGISTRY_AUTH_HTPASSWD_REALM": "Registry Realm", "REGISTRY_AUTH_HTPASSWD_PATH": str(tmp_path / "htpasswd"),
           "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2)
                raise AssertionError("answered without credentials")
            except urllib.error.HTTPError as e:
                assert e.code == 401 and e.headers["WWW-Authenticate"] == 'Basic realm="Registry Realm"'
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "mirror did not start"
                time.sleep(0.1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/", headers={
            "Authorization": "Basic " + base64.b64encode(f"{HTPASSWD_USER}:{HTPASSWD_PASSWORD}".encode()).decode()})
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "unknown environment variable" not in out, out
    assert "auth htpasswd" in out


def test_access_log_line_per_request(tmp_path: Path) -> None:
    """One JSON line per request with what an operator greps for; log.level respected."""
    port = free_port()
    config = tmp_path / "config.yml"
    config.write_text(f"version: 0.1\nlog: {{level: info}}\nhttp: {{addr: '127.0.0.1:{port}'}}\n"
                      f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'data'}}}}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v2/",
                                                              headers={"X-Request-Id": "abc123"}), timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "mirror did not start"
                time.sleep(0.1)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/team/app/manifests/v1", timeout=5)
        except urllib.error.HTTPError as e:
            assert e.code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in out.splitlines()]
    requests = [e for e in lines if e.get("logger") == "mirror.access"]
    ping = next(e for e in requests if e["path"] == "/v2/" and e["request_id"] == "abc123")
    assert ping["status"] == 200 and ping["bytes"] == 2 and ping["method"] == "GET" and ping["client"] == "127.0.0.1"
    missing = next(e for e in requests if e["path"].endswith("/manifests/v1"))
    assert missing["status"] == 404 and missing["repository"] == "team/app" and missing["duration_ms"] >= 0
    assert {"time", "level", "cache", "user_agent"} <= missing.keys()


def test_version_and_check_config_takes_config_like_every_command(tmp_path: Path) -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mirror {__version__}"
    seed = tmp_path / "config.yml"
    seed.write_text(SEED)
    r = run("check-config", "--config", str(seed))
    assert r.returncode == 0 and f"{seed}: ok" in r.stdout, r.stderr


def _serve_fails(config: Path, *, drop_root: bool = False) -> subprocess.CompletedProcess[str]:
    # Without CAP_DAC_OVERRIDE root is held to file permissions, as the image's non-root user is.
    prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"] \
        if drop_root else []
    return subprocess.run([*prefix, sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_start_up_failures_are_one_line_with_the_fix_and_never_say_listening(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "busy.yml"
        config.write_text(f"version: 0.1\nhttp: {{addr: '127.0.0.1:{port}'}}\n"
                          f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'data'}}}}}\n")
        r = _serve_fails(config)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "already in use" in r.stderr and "http.addr" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "listening" not in r.stdout

    # A volume (or index) owned by someone else: say whose, and what to run.
    for what, key in (("data", "storage.filesystem.rootdirectory"), ("index", "cache.index")):
        root, index = tmp_path / f"{what}-root", tmp_path / f"{what}-index"
        root.mkdir()
        index.mkdir()
        os.chown(root if what == "data" else index, 12345, 12345)
        config = tmp_path / f"{what}.yml"
        config.write_text(f"version: 0.1\nhttp: {{addr: '127.0.0.1:{free_port()}'}}\n"
                          f"storage: {{filesystem: {{rootdirectory: {root}}}}}\ncache: {{index: {index}}}\n")
        r = _serve_fails(config, drop_root=True)
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and key in line and "owned by uid 12345" in line and "`chown -R 0 " in line, line
        assert "Traceback" not in r.stderr + r.stdout and "listening" not in r.stdout
