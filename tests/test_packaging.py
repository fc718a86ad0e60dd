"""What people run first: the README's two commands, the wheel, the Dockerfile and compose.yaml."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in lines[:12] if line and not line.startswith(("#", "`"))]
    assert commands[0].endswith("/opt/mirror/bin/pip install . && /opt/mirror/bin/mirror serve")
    assert commands[1] == "bash scripts/test.sh"
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_wheel_ships_the_embedded_config(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=120, capture_output=True)
    (wheel,) = tmp_path.glob("mirror-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("mirror/mirror.yml").decode()
        assert "mirror/py.typed" in z.namelist()
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

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    service = compose["services"]["mirror"]
    assert service["build"] == "."
    assert f"{port}:{port}" in service["ports"]
    volume, _, target = service["volumes"][0].partition(":")
    assert target == data_dir and volume in compose["volumes"]
