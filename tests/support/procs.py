"""Real processes for the end-to-end tests: the mirror, distribution (the upstream), and helpers.

Every process is started in its own session with stdout/stderr going to files in a tmp dir, is
waited for with a bounded timeout (the log tail is in the error when it does not come up) and is
stopped with SIGTERM, then SIGKILL after a bound. Only processes started here are ever signalled:
each `Proc` remembers its own pid, and an atexit hook stops whatever a crashed test left running.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Self

import yaml

from mirror.storage.layout import BLOBS

REPO_ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTION = "/usr/bin/docker-registry"

# A proxy nobody listens on: whatever a client tries outside loopback (dockerd falling back to
# registry-1.docker.io after a mirror error, say) fails at once instead of reaching the internet.
# Loopback is never proxied (NO_PROXY, and Go never proxies loopback anyway).
DEAD_PROXY = "http://127.0.0.1:9"
NO_PROXY = "127.0.0.1,localhost,::1"

_RUNNING: set[Proc] = set()


def is_local_address(host: str) -> bool:
    """An address of this machine (loopback, or one of its interfaces, e.g. a test bridge's
    gateway): binding to it works. Tests send requests to nothing else."""
    if host == "localhost":
        return True
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def free_port() -> int:
    """A port nothing listens on right now (bind to :0 and let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for processes that may talk to registries: loopback only, dead proxy for the rest."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy",
                                                                      "all_proxy")}
    env.update({"HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "http_proxy": DEAD_PROXY,
                "https_proxy": DEAD_PROXY, "NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY})
    env.update(extra or {})
    return env


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class HttpResult:
    status: int
    headers: Any  # email.message.Message (case-insensitive get)
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, headers: Mapping[str, str] | None = None, data: bytes | None = None,
         timeout: float = 10.0, context: ssl.SSLContext | None = None) -> HttpResult:
    """One request to a URL on this machine (https with `context`); HTTP errors are results, not exceptions."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme in ("http", "https") and is_local_address(parts.hostname or ""), url
    req = urllib.request.Request(url, method=method, headers=dict(headers or {}), data=data)
    opener = _OPENER if context is None else urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(req, timeout=timeout) as r:
            return HttpResult(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        with e:
            return HttpResult(e.code, e.headers, e.read())


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, HTTPException):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class Proc:
    """One process with its output in `<log_dir>/<name>.stdout|stderr`."""

    def __init__(self, name: str, argv: Sequence[str | Path], log_dir: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_dir = Path(log_dir)
        self.env = dict(env) if env is not None else client_env()
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.killed = False  # the last stop() needed SIGKILL
        self.stdout_path = self.log_dir / f"{name}.stdout"
        self.stderr_path = self.log_dir / f"{name}.stderr"

    def __hash__(self) -> int:
        return id(self)

    def start(self) -> Proc:
        assert not self.running, f"{self.name} is already running"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        # Append: a restarted process keeps one log, so counts over the whole test stay right.
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          env=self.env, cwd=self.cwd, start_new_session=True)
        _RUNNING.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def logs(self, lines: int = 40) -> str:
        return (f"--- {self.name} {' '.join(self.argv)}\n--- stdout ({self.stdout_path}):\n"
                f"{tail(self.stdout_path, lines)}\n--- stderr ({self.stderr_path}):\n{tail(self.stderr_path, lines)}")

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll `check` until true; fail with the log tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                rc = self.popen.returncode if self.popen else None
                raise RuntimeError(f"{self.name} exited with {rc} before it was ready\n{self.logs()}")
            with contextlib.suppress(OSError, ValueError, HTTPException):
                if check():
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL (to the process's own session group) after `timeout` seconds."""
        p = self.popen
        if p is None:
            return None
        self.killed = False
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)  # the group is this process's own session
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(10)
        _RUNNING.discard(self)
        return p.returncode

    def kill(self) -> None:
        """SIGKILL now (a crash, for tests that need one)."""
        if self.running and self.popen:
            self.popen.kill()
            self.popen.wait(10)
        _RUNNING.discard(self)


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_RUNNING):
        with contextlib.suppress(Exception):
            proc.stop(timeout=5)


def run(argv: Sequence[str | Path], timeout: float, env: Mapping[str, str] | None = None, check: bool = True,
        input: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client command to completion within `timeout` seconds; output captured as text."""
    args = [str(a) for a in argv]
    t0 = time.monotonic()
    try:
        r = subprocess.run(args, capture_output=True, timeout=timeout, env=dict(env) if env is not None
                           else client_env(), input=input, cwd=cwd, start_new_session=True)
        if os.environ.get("E2E_TRACE"):
            print(f"[e2e {time.monotonic() - t0:6.2f}s exit {r.returncode}] {' '.join(args)}", file=sys.stderr)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")[-3000:]
        err = (e.stderr or b"").decode(errors="replace")[-3000:]
        raise AssertionError(f"timed out after {timeout}s: {' '.join(args)}\nstdout:\n{out}\nstderr:\n{err}") from None
    result = subprocess.CompletedProcess(args, r.returncode, r.stdout.decode(errors="replace"),
                                         r.stderr.decode(errors="replace"))
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {' '.join(args)}\nstdout:\n{result.stdout[-3000:]}\n"
                             f"stderr:\n{result.stderr[-3000:]}")
    return result


def registry_ready(url: str, statuses: Iterable[int] = (200,),
                   context: ssl.SSLContext | None = None) -> Callable[[], bool]:
    allowed = set(statuses)

    def check() -> bool:
        r = http("GET", f"{url}/v2/", timeout=2, context=context)
        return r.status in allowed and r.headers.get("Docker-Distribution-API-Version") == "registry/2.0"

    return check


class RegistryProc:
    """A registry server process on a loopback port: the mirror, or distribution."""

    port: int
    proc: Proc
    ready_statuses: tuple[int, ...] = (200,)
    listen = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.listen}:{self.port}"

    @property
    def host(self) -> str:
        return f"{self.listen}:{self.port}"

    context: ssl.SSLContext | None = None  # https: how a test client trusts the server (and who it is)

    def start(self, timeout: float = 30.0) -> Self:
        self.proc.start()
        self.proc.wait_ready(registry_ready(self.url, self.ready_statuses, self.context), timeout)
        return self

    def stop(self) -> int | None:
        return self.proc.stop()

    @property
    def running(self) -> bool:
        return self.proc.running


# --- the mirror ------------------------------------------------------------------------------------

class Mirror(RegistryProc):
    """`python -m mirror serve` on a fixed port and storage; stop() and start() again keep both.

    With `http.tls` in the config the mirror serves https and `context` (the test's client side)
    must trust it; with `auth` it answers /v2/ with 401 until a client authenticates."""

    def __init__(self, tmp: Path, config: dict[str, Any], port: int | None = None, name: str = "mirror",
                 context: ssl.SSLContext | None = None, environ: Mapping[str, str] | None = None) -> None:
        """With `environ`, no config file at all: the embedded default and these REGISTRY_* variables (the
        address and storage root added), as `docker run -e REGISTRY_... ` starts a registry."""
        self.context = context
        self.scheme = "https" if (config.get("http") or {}).get("tls") else "http"
        self.ready_statuses = (200, 401) if config.get("auth") else (200,)
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        config = json.loads(json.dumps(config))  # a copy we may fill in
        config.setdefault("version", 0.1)
        config.setdefault("log", {"level": "info"})
        config.setdefault("http", {})["addr"] = f"127.0.0.1:{self.port}"
        storage = config.setdefault("storage", {})
        if "oss" in storage:  # the bucket holds everything; local disk has the index and hot tier
            self.root = Path(config.setdefault("cache", {}).setdefault("directory", str(self.dir / "local")))
        else:
            fs = storage.setdefault("filesystem", {})
            fs.setdefault("rootdirectory", str(self.dir / "data"))
            self.root = Path(fs["rootdirectory"])
        self.config = config
        self.config_path = self.dir / "config.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = client_env({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)})
        # REGISTRY_* from the environment would override the test's config.
        env = {k: v for k, v in env.items() if not k.startswith("REGISTRY_")}
        argv: list[str | Path] = [sys.executable, "-m", "mirror", "serve", "--config", self.config_path]
        if environ is not None:
            argv = argv[:-2]
            env.update(environ)
            env.update({"REGISTRY_HTTP_ADDR": config["http"]["addr"],
                        "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(self.root)})
        self.proc = Proc(name, argv, self.dir, env=env, cwd=REPO_ROOT)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def restart(self) -> Mirror:
        self.stop()
        return self.start()

    @property
    def log(self) -> list[dict[str, Any]]:
        return self.log_lines()

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON line the mirror wrote to stdout (access log and others)."""
        out = []
        with contextlib.suppress(OSError):
            for line in self.proc.stdout_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict):
                        out.append(entry)
        return out

    def requests(self) -> list[dict[str, Any]]:
        return [e for e in self.log_lines() if "method" in e and "path" in e]

    def non_json_lines(self) -> list[str]:
        """stdout lines that are not one JSON object each (there should be none)."""
        bad = []
        with contextlib.suppress(OSError):
            for line in self.proc.stdout_path.read_text(errors="replace").splitlines():
                try:
                    ok = isinstance(json.loads(line), dict)
                except ValueError:
                    ok = False
                if not ok:
                    bad.append(line)
        return bad

    def logs(self, lines: int = 60) -> str:
        return self.proc.logs(lines)

    def blob_files(self) -> list[Path]:
        """The data files of the mirror's blob store (what it cached), staging excluded."""
        base = self.root / BLOBS
        return sorted(p for p in base.rglob("data") if p.is_file()) if base.exists() else []

    def has_blob(self, digest: str) -> bool:
        hexpart = digest.split(":", 1)[1]
        return any(hexpart in p.as_posix() for p in self.blob_files())


def start_mirror(tmp_path: Path, config: dict[str, Any], port: int | None = None, name: str = "mirror",
                 timeout: float = 30.0) -> Mirror:
    return Mirror(tmp_path, config, port, name).start(timeout)


def mirror_config(default_url: str, quay_url: str | None = None, *, username: str | None = None,
                  password: str | None = None, tag_ttl: str = "30s", **upstream_extra: Any) -> dict[str, Any]:
    """The standard test config: a Docker Hub-like default upstream, optionally a second (quay)."""
    hub: dict[str, Any] = {"name": "hub", "url": default_url, "hosts": ["docker.io"], "prefixes": ["docker.io"],
                           "dockerhub": True, "tag_ttl": tag_ttl, **upstream_extra}
    if username is not None:
        hub["username"] = username
    if password is not None:
        hub["password"] = password
    upstreams = [hub]
    if quay_url:
        upstreams.append({"name": "quay", "url": quay_url, "hosts": ["quay.io"], "prefixes": ["quay.io"]})
    return {"version": 0.1, "log": {"level": "info"}, "upstreams": upstreams}


# --- distribution (the upstream) -------------------------------------------------------------------

_ACCESS = re.compile(r'^\S+ \S+ (?P<user>\S+) \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" '
                     r'(?P<status>\d{3}) (?P<size>\d+|-)')


@dataclass(frozen=True)
class AccessEntry:
    method: str
    path: str  # with the query string
    status: int
    size: int

    @property
    def route(self) -> str:
        return self.path.split("?", 1)[0]


class Distribution(RegistryProc):
    """CNCF distribution (`docker-registry serve`) on plain HTTP, loopback.

    Its access log (gorilla combined format, one line per finished request) goes to stdout and
    is what tests count upstream requests with; logrus logs go to stderr.
    """

    ready_statuses = (200, 401)  # 401: with auth configured

    def __init__(self, tmp: Path, extra_config: dict[str, Any] | None = None, root: Path | None = None,
                 port: int | None = None, name: str = "distribution", listen: str = "127.0.0.1") -> None:
        self.listen = listen  # another address of this machine for clients in containers (a bridge's gateway)
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.root = Path(root) if root else self.dir / "storage"
        self.root.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.root)}, "delete": {"enabled": True},
                        "cache": {"blobdescriptor": "inmemory"}},
            "http": {"addr": f"{listen}:{self.port}", "secret": "e2e-not-secret"},
        }
        for key, value in (extra_config or {}).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        self.config = config
        self.auth = "token" if "token" in config.get("auth", {}) else \
            "htpasswd" if "htpasswd" in config.get("auth", {}) else None
        self.config_path = self.dir / "config.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {k: v for k, v in client_env().items() if not k.startswith("REGISTRY_")}
        self.proc = Proc(name, [DISTRIBUTION, "serve", self.config_path], self.dir, env=env)


    @property
    def access_lines(self) -> list[str]:
        """The raw access-log lines (combined log format)."""
        with contextlib.suppress(OSError):
            return [line for line in self.proc.stdout_path.read_text(errors="replace").splitlines()
                    if _ACCESS.match(line)]
        return []

    def access(self) -> list[AccessEntry]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.proc.stdout_path.read_text(errors="replace").splitlines():
                m = _ACCESS.match(line)
                if m:
                    size = m.group("size")
                    out.append(AccessEntry(m.group("method"), m.group("path"), int(m.group("status")),
                                           0 if size == "-" else int(size)))
        return out

    def mark(self) -> int:
        """How many access lines so far: pass to `since=` to count only what came after."""
        return len(self.access())

    def requests(self, method: str | None = None, contains: str = "", since: int = 0) -> list[AccessEntry]:
        return [e for e in self.access()[since:]
                if (method is None or e.method == method) and contains in e.path]

    def blob_gets(self, digest: str | None = None, since: int = 0) -> list[AccessEntry]:
        """GETs of blobs (optionally one digest), whatever the repository name."""
        return [e for e in self.access()[since:]
                if e.method == "GET" and "/blobs/sha256:" in e.route
                and (digest is None or e.route.endswith(f"/blobs/{digest}"))]

    def blob_path(self, digest: str) -> Path:
        algo, hexpart = digest.split(":", 1)
        return self.root / "docker/registry/v2/blobs" / algo / hexpart[:2] / hexpart / "data"

    def logs(self, lines: int = 60) -> str:
        return self.proc.logs(lines)


def start_distribution(tmp_path: Path, extra_config: dict[str, Any] | None = None, root: Path | None = None,
                       port: int | None = None, name: str = "distribution") -> Distribution:
    return Distribution(tmp_path, extra_config, root, port, name).start()


def clone_storage(src: Path, dst: Path) -> Path:
    """A copy of a distribution storage tree made of hard links (instant, even for `big`).

    Files are never modified in place by distribution's reads; a test that wants to change one
    must write a new file and rename it over (see `replace_file`) so the original stays intact.
    """
    shutil.copytree(src, dst, copy_function=os.link, dirs_exist_ok=True)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    """Write a new inode and rename it over `path` (breaks a hard link instead of writing through)."""
    tmp = path.with_name(path.name + ".e2e-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# htpasswd for the upstream with Basic auth. A bcrypt hash computed once (cost 5, `$2b$`, which
# distribution's golang.org/x/crypto/bcrypt accepts), so the tests need neither the `bcrypt`
# package nor apache2-utils. Password: HTPASSWD_PASSWORD.
HTPASSWD_USER = "puller"
HTPASSWD_PASSWORD = "pull-secret"
HTPASSWD_LINE = f"{HTPASSWD_USER}:$2b$05$BxdRaMMIfR5de73aP7HlvOrYu44kyfCdG5nVkJXAGEE4UVYeeD9C2"


def htpasswd_entry(user: str, password: str) -> str:
    """`user:bcrypt-hash` for any credentials: the `bcrypt` package, else `htpasswd -B`
    (apache2-utils), else the C library's crypt (libxcrypt does `$2b$`)."""
    if (user, password) == (HTPASSWD_USER, HTPASSWD_PASSWORD):
        return HTPASSWD_LINE
    try:
        import bcrypt

        return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode()}"
    except ImportError:
        pass
    if shutil.which("htpasswd"):
        return run(["htpasswd", "-nbB", "-C", "5", user, password], timeout=30).stdout.strip()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # removed in Python 3.13; fine on bookworm's 3.11

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 5))
    assert hashed and hashed.startswith("$2"), "no bcrypt available: pip install bcrypt"
    return f"{user}:{hashed}"


def htpasswd_config(tmp: Path, users: Mapping[str, str] | None = None) -> dict[str, Any]:
    """distribution's `auth.htpasswd` section with an htpasswd file under `tmp`."""
    path = Path(tmp) / "htpasswd"
    path.parent.mkdir(parents=True, exist_ok=True)
    users = users or {HTPASSWD_USER: HTPASSWD_PASSWORD}
    path.write_text("".join(htpasswd_entry(u, p) + "\n" for u, p in users.items()))
    return {"auth": {"htpasswd": {"realm": "e2e-basic-realm", "path": str(path)}}}
