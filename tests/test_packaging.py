"""What people run first: the README's two commands, the wheel, the Dockerfile and compose.yaml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from mirror.config import load
from tests.support.compose import load_compose

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in lines[:12] if line and not line.startswith(("#", "`"))]
    assert commands[0].endswith("/opt/mirror/bin/pip install . && /opt/mirror/bin/mirror serve")
    assert commands[1] == "bash scripts/test.sh"
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def source_copy(tmp_path: Path) -> Path:
    """The checkout's files as git sees them (tracked, and new ones not ignored), copied: a build
    writes build/ and egg-info beside its sources, and must neither touch the checkout nor reuse
    what an earlier build left there."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    src = tmp_path / "src"
    for name in filter(None, files):
        path = ROOT / name
        if path.is_file():  # deleted but still tracked files are skipped
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name, follow_symlinks=False)
    return src


@pytest.mark.e2e  # runs `python -m mirror` processes
def test_wheel_ships_the_embedded_config(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(source_copy(tmp_path))], check=True, timeout=120, capture_output=True)
    (wheel,) = tmp_path.glob("mirror-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("mirror/config/mirror.yml").decode()
        names = z.namelist()
        assert "mirror/py.typed" in names
        # the web UI's templates and static files, every one of them, byte for byte
        ui = ROOT / "mirror" / "ui"
        for folder in ("templates", "static"):
            files = sorted(p for p in (ui / folder).iterdir() if p.is_file())
            assert files, folder
            for path in files:
                assert z.read(f"mirror/ui/{folder}/{path.name}") == path.read_bytes(), path.name
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [line for line in z.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
        assert any("aiohttp-jinja2" in r and "extra" not in r for r in requires), requires
        assert any(r.split()[1].lower().startswith("jinja2") and "extra" not in r for r in requires), requires
    assert shipped == (ROOT / "config" / "mirror.yml").read_text()


def test_dockerfile_and_compose_agree_with_the_default_config() -> None:
    default = yaml.safe_load((ROOT / "config" / "mirror.yml").read_text())
    data_dir = default["storage"]["filesystem"]["rootdirectory"]
    port = default["http"]["addr"].rsplit(":", 1)[1]
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    for line in dockerfile:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    assert f"VOLUME {data_dir}" in dockerfile and f"EXPOSE {port}" in dockerfile
    assert any(line.startswith("USER ") and line.split()[1] not in ("root", "0") for line in dockerfile)

    compose = load_compose(ROOT / "compose.yaml")
    service = compose["services"]["mirror"]
    assert service["build"] == "."
    assert f"{port}:{port}" in service["ports"]
    volume, _, target = service["volumes"][0].partition(":")
    assert target == data_dir and volume in compose["volumes"]


def test_replicas_compose_shares_one_bucket_and_loads_as_config() -> None:
    compose = yaml.safe_load((ROOT / "compose.replicas.yaml").read_text())
    replicas = compose["services"]
    assert len(replicas) == 2
    envs = [service["environment"] for service in replicas.values()]
    assert envs[0] == envs[1] and envs[0]["REGISTRY_STORAGE"] == "oss"
    volumes = [service["volumes"][0].partition(":") for service in replicas.values()]
    assert len({v[0] for v in volumes}) == 2 and all(v[2] == envs[0]["REGISTRY_CACHE_DIRECTORY"] for v in volumes)
    # what compose hands the process, with the .env values filled in, is a valid config
    env = {k: re.sub(r"\$\{[A-Z_]+:[?-]([^}]*)\}", lambda m: m.group(1).split()[0] or "x", v)
           for k, v in envs[0].items()}
    config = load(None, env)
    assert config.storage.oss is not None and config.cache.local_dir(config.storage).as_posix() == "/var/lib/mirror"
