"""`mirror serve` and `mirror check-config` as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.test_config import SEED


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
