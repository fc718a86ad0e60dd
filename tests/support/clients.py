"""Real registry clients, each fully private to the test session: dockerd (+ the matching
/usr/bin/docker CLI), containerd (+ ctr), podman and skopeo.

Nothing here touches the machine's own daemons or configuration: every root, state dir, socket,
pid file and config file lives under a tmp dir, and clients get a dead proxy for anything that
is not loopback (see procs.client_env).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path
from typing import Any

from tests.support.procs import Proc, client_env, run, tail

DOCKER_CLI = "/usr/bin/docker"  # dockerd 20.10's own CLI; /usr/local/bin/docker is a newer one
DOCKERD = "/usr/sbin/dockerd"
DOCKER_COMPOSE = "/usr/bin/docker-compose"  # Debian's 1.29 (python, docker-py)
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
PODMAN = "/usr/bin/podman"
SKOPEO = "/usr/bin/skopeo"


def missing(*paths: str) -> list[str]:
    return [p for p in paths if not (os.path.isfile(p) and os.access(p, os.X_OK)) and shutil.which(p) is None]


# --- dockerd -----------------------------------------------------------------------------------------

class Bridge:
    """A Linux bridge of our own (not docker0) on a free 10.213.N.0/24, for a private dockerd that
    runs containers: they reach this machine at `gateway`, and `-p` works through docker-proxy."""

    def __init__(self) -> None:
        self.name = f"mre2e{os.getpid()}"  # 15 characters at most (IFNAMSIZ)
        taken = [ipaddress.ip_network(line.split()[0], strict=False)
                 for line in run(["ip", "-4", "route", "show", "table", "all"], timeout=10).stdout.splitlines()
                 if line.split() and line.split()[0][0].isdigit()]
        candidates = (ipaddress.ip_network(f"10.213.{n}.0/24") for n in range(1, 255))
        self.network = next(net for net in candidates if not any(net.overlaps(t) for t in taken))
        self.gateway = str(self.network.network_address + 1)

    def create(self) -> Bridge:
        run(["ip", "link", "add", self.name, "type", "bridge"], timeout=10)
        run(["ip", "addr", "add", f"{self.gateway}/{self.network.prefixlen}", "dev", self.name], timeout=10)
        run(["ip", "link", "set", self.name, "up"], timeout=10)
        return self

    def delete(self) -> None:
        run(["ip", "link", "delete", self.name], timeout=10, check=False)


class Dockerd:
    """A private dockerd whose `registry-mirrors` is fixed at start (so it is paired with a port).

    It runs its own managed containerd under exec-root; storage-driver vfs, no iptables, no bridge.
    With `bridge` it runs containers: their default network is that bridge, and storage is overlay2
    (vfs copies a whole image for every build step and container). Still no iptables, NAT or IP
    forwarding set up by dockerd: containers are meant to reach this machine only.
    """

    def __init__(self, tmp: Path, mirrors: list[str], insecure: list[str] | None = None,
                 bridge: Bridge | None = None) -> None:
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        # unix socket paths are limited to 108 bytes: keep the exec-root short-ish
        self.sock = self.dir / "docker.sock"
        self.exec_root = self.dir / "exec"
        self.data_root = self.dir / "data"
        self.config = {
            "registry-mirrors": mirrors,
            "insecure-registries": insecure or [],
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "ip-masq": False,
            "bridge": "none",
            "data-root": str(self.data_root),
            "exec-root": str(self.exec_root),
            "pidfile": str(self.dir / "docker.pid"),
            "hosts": [f"unix://{self.sock}"],
            "log-level": "info",
            "max-concurrent-downloads": 3,
        }
        self.bridge = bridge
        if bridge is not None:
            self.config.update({"bridge": bridge.name, "storage-driver": "overlay2", "ip-forward": False})
        (self.dir / "daemon.json").write_text(json.dumps(self.config, indent=1))
        (self.dir / "cli").mkdir(exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.proc = Proc("dockerd", [DOCKERD, "--config-file", self.dir / "daemon.json"], self.dir,
                         env=client_env({"DOCKER_CONFIG": str(self.dir / "cli"), "TMPDIR": str(self.dir / "tmp")}))

    def start(self, timeout: float = 60.0) -> Dockerd:
        self.proc.start()
        self.proc.wait_ready(lambda: self.sock.exists() and self.cli("version", timeout=10, check=False)
                             .returncode == 0, timeout)
        return self

    def cli(self, *args: str, timeout: float = 120.0, check: bool = True) -> Any:
        env = client_env({"DOCKER_CONFIG": str(self.dir / "cli")})
        env.pop("DOCKER_HOST", None)
        return run([DOCKER_CLI, "-H", f"unix://{self.sock}", *args], timeout=timeout, env=env, check=check)

    def pull(self, ref: str, timeout: float = 120.0, check: bool = True) -> Any:
        return self.cli("pull", ref, timeout=timeout, check=check)

    def compose(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                timeout: float = 120.0, check: bool = True) -> Any:
        """docker-compose against this daemon."""
        return run([DOCKER_COMPOSE, *args], timeout=timeout, cwd=cwd, check=check,
                   env=client_env({"DOCKER_HOST": f"unix://{self.sock}", **(env or {})}))

    def image_ids(self) -> list[str]:
        out = self.cli("images", "-a", "-q", "--no-trunc", timeout=30).stdout.split()
        return sorted(set(out))

    def repo_digests(self, ref: str) -> list[str]:
        r = self.cli("image", "inspect", "--format", "{{json .RepoDigests}}", ref, timeout=30)
        return list(json.loads(r.stdout.strip() or "[]"))

    def image_id(self, ref: str) -> str:
        return str(self.cli("image", "inspect", "--format", "{{.Id}}", ref, timeout=30).stdout.strip())

    def clean(self) -> None:
        """Remove every image, so the next pull downloads again."""
        ids = self.image_ids()
        if ids:
            self.cli("rmi", "-f", *ids, timeout=60, check=False)

    def stop(self) -> None:
        self.proc.stop(timeout=20)
        # dockerd stops its managed containerd; should one be left behind, it is ours to end.
        pidfile = self.exec_root / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if _cmdline(pid).startswith("containerd") and str(self.exec_root) in _cmdline_full(pid):
                os.kill(pid, signal.SIGKILL)
        unmount_under(self.dir)

    def logs(self, lines: int = 60) -> str:
        return self.proc.logs(lines)


def unmount_under(base: Path) -> None:
    """Unmount whatever a daemon of ours left mounted under `base` (dockerd makes its data-root a
    private bind mount), deepest first, so the tmp dir can be removed."""
    prefix = str(base.resolve()) + "/"
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if (point + "/").startswith(prefix):
                mounts.append(point)
    for point in sorted(set(mounts), key=len, reverse=True):
        run(["umount", "-l", point], timeout=30, check=False)


def _cmdline_full(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    return os.path.basename(_cmdline_full(pid).split(" ", 1)[0])


# --- containerd + ctr ----------------------------------------------------------------------------------

class Containerd:
    """A private containerd (own root, state, sockets), content isolated per namespace, so a
    fresh namespace per test means a cold pull."""

    def __init__(self, tmp: Path) -> None:
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = self.dir / "containerd.sock"
        config = f"""version = 2
root = "{self.dir / 'root'}"
state = "{self.dir / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{self.sock}"

[ttrpc]
  address = "{self.sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"""
        (self.dir / "config.toml").write_text(config)
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.proc = Proc("containerd", [CONTAINERD, "--config", self.dir / "config.toml"], self.dir,
                         env=client_env({"TMPDIR": str(self.dir / "tmp")}))

    def start(self, timeout: float = 30.0) -> Containerd:
        self.proc.start()
        self.proc.wait_ready(lambda: self.sock.exists() and self.ctr("version", timeout=10, check=False)
                             .returncode == 0, timeout)
        return self

    def ctr(self, *args: str, namespace: str = "default", timeout: float = 120.0, check: bool = True) -> Any:
        return run([CTR, "-a", str(self.sock), "-n", namespace, *args], timeout=timeout, check=check)

    def new_namespace(self) -> str:
        return "e2e-" + uuid.uuid4().hex[:12]

    def pull(self, ref: str, hosts_dir: Path, namespace: str, timeout: float = 120.0, check: bool = True,
             *extra: str) -> Any:
        return self.ctr("image", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native", *extra, ref,
                        namespace=namespace, timeout=timeout, check=check)

    def image_digest(self, ref: str, namespace: str) -> str:
        out = self.ctr("image", "ls", namespace=namespace, timeout=30).stdout
        for line in out.splitlines()[1:]:
            cols = line.split()
            if cols and cols[0] == ref:
                return next(c for c in cols if c.startswith("sha256:"))
        raise AssertionError(f"{ref} not in ctr image ls:\n{out}")

    def stop(self) -> None:
        self.proc.stop(timeout=15)
        unmount_under(self.dir)

    def logs(self, lines: int = 60) -> str:
        return self.proc.logs(lines)


def write_hosts_toml(hosts_dir: Path, registry: str, server: str, mirror: str) -> Path:
    """containerd's certs.d layout: <dir>/<registry>/hosts.toml sending pulls to `mirror` (http)."""
    d = hosts_dir / registry
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(f'server = "{server}"\n\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n')
    return hosts_dir


# --- podman --------------------------------------------------------------------------------------------

class Podman:
    """podman with its own storage (vfs) and a registries.conf mirroring docker.io to `mirror`.

    The docker.io entry's own location is a dead loopback port: should the mirror fail, podman's
    fallback goes nowhere instead of to the internet."""

    def __init__(self, tmp: Path, mirror_host: str, dead_host: str = "127.0.0.1:9") -> None:
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        # podman refuses a runroot longer than 50 characters: that one lives in a short /tmp dir
        self.short = Path(tempfile.mkdtemp(prefix="e2e-pm-", dir="/tmp"))
        self.runroot = self.short / "run"
        self.registries_conf = self.dir / "registries.conf"
        self.registries_conf.write_text(f"""unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"

[[registry]]
prefix = "docker.io"
location = "{dead_host}"
insecure = true

[[registry.mirror]]
location = "{mirror_host}"
insecure = true
""")
        (self.dir / "containers.conf").write_text('[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n')
        (self.dir / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{self.runroot}"\ngraphroot = "{self.dir / "root"}"\n')
        (self.dir / "auth.json").write_text("{}")
        self.env = client_env({
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "CONTAINERS_CONF": str(self.dir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.dir / "storage.conf"),
            "REGISTRY_AUTH_FILE": str(self.dir / "auth.json"),
            "XDG_RUNTIME_DIR": str(self.short / "xdg"),
            "TMPDIR": str(self.dir / "tmp"),
        })
        (self.short / "xdg").mkdir(exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)

    def podman(self, *args: str, timeout: float = 120.0, check: bool = True) -> Any:
        return run([PODMAN, "--root", str(self.dir / "root"), "--runroot", str(self.runroot),
                    "--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs", *args],
                   timeout=timeout, env=self.env, check=check)

    def pull(self, ref: str, timeout: float = 120.0, check: bool = True) -> Any:
        return self.podman("pull", ref, timeout=timeout, check=check)

    def image_digest(self, ref: str) -> str:
        return str(self.podman("image", "inspect", "--format", "{{.Digest}}", ref, timeout=30).stdout.strip())

    def cleanup(self) -> None:
        """Undo podman's vfs mounts (none for pulls) and storage, best effort."""
        self.podman("rmi", "-a", "-f", timeout=60, check=False)
        shutil.rmtree(self.short, ignore_errors=True)


# --- skopeo --------------------------------------------------------------------------------------------

def skopeo(*args: str, timeout: float = 120.0, check: bool = True, env: dict[str, str] | None = None) -> Any:
    return run([SKOPEO, *args], timeout=timeout, env=env or client_env(), check=check)


def skopeo_copy(src: str, dest: str, *extra: str, timeout: float = 120.0, check: bool = True) -> Any:
    """Copy from the (plain HTTP) registry `src` to a local `dest` (oci:/dir:), anonymously."""
    return skopeo("copy", "--src-tls-verify=false", "--src-no-creds", "--retry-times", "0", *extra, src, dest,
                  timeout=timeout, check=check)


def oci_index_digest(layout_dir: Path) -> list[str]:
    """Digests named by an OCI layout's index.json (what skopeo wrote)."""
    index = json.loads((Path(layout_dir) / "index.json").read_text())
    return [m["digest"] for m in index.get("manifests", [])]


def log_tail(path: Path, lines: int = 40) -> str:
    return tail(path, lines)
