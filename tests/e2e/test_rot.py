"""Bit rot, end to end: bytes flipped in stored blob and manifest files of a real mirror (private
content pushed by skopeo, cached content pulled through from distribution); a re-push of the right
bytes repairs them; `mirror scrub` reports and repairs the rest (cached: removed and fetched again;
private: quarantined, named, repaired by a push); pulls are correct afterwards."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from mirror.names import parse_digest
from mirror.storage import layout
from tests.e2e.push_helpers import push_config, sha
from tests.e2e.test_operator_cli import json_out, mirror_cli
from tests.support.clients import skopeo_copy
from tests.support.images import Layout
from tests.support.procs import Distribution, Mirror, http, wait_for
from tests.support.registry import check_oci_copy
from tests.test_eviction import run_on_a_terminal

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def stored(mirror: Mirror, digest: str) -> Path:
    return mirror.root / layout.blob(parse_digest(digest))


def flip(path: Path) -> None:
    """One byte changed in place, as a failing disk does it."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x20]))


def chunked_push(mirror: Mirror, repo: str, data: bytes, digest: str) -> int:
    r = http("POST", f"{mirror.url}/v2/{repo}/blobs/uploads/")
    assert r.status == 202
    half = len(data) // 2
    r = http("PATCH", mirror.url + r.headers["Location"], data=data[:half], headers={"Content-Range": f"0-{half - 1}"})
    assert r.status == 202
    r = http("PUT", f"{mirror.url}{r.headers['Location']}?digest={digest}", data=data[half:])
    return r.status


def test_rot_is_repaired_by_a_push_and_by_scrub(skopeo_required: None, mirror_factory: Callable[..., Mirror],
                                                upstream: Distribution, layouts: dict[str, Layout],
                                                tmp_path: Path) -> None:
    small, multi = layouts["small"], layouts["multi"]
    mirror = mirror_factory(push_config(upstream.url))
    skopeo_copy(f"oci:{small.path}:latest", f"docker://{mirror.host}/team/app:v1", "--dest-tls-verify=false")
    skopeo_copy(f"docker://{mirror.host}/library/multi:latest", f"oci:{tmp_path / 'first'}:latest", "--all")
    private_layer, private_manifest = small.image().layers[1], small.image().manifest
    cached_layer, cached_manifest = multi.image("amd64").layers[1], multi.image("amd64").manifest
    assert private_layer.digest != cached_layer.digest
    for path in (stored(mirror, cached_layer.digest), stored(mirror, cached_manifest.digest)):
        wait_for(path.exists, 10, f"{path.name} cached")
    for blob in (private_layer, private_manifest, cached_layer, cached_manifest):
        flip(stored(mirror, blob.digest))

    # A push of the right bytes repairs: a chunked upload of the layer, skopeo's push of the manifest.
    assert chunked_push(mirror, "team/app", small.read(private_layer.digest), private_layer.digest) == 201
    assert stored(mirror, private_layer.digest).read_bytes() == small.read(private_layer.digest)
    skopeo_copy(f"oci:{small.path}:latest", f"docker://{mirror.host}/team/app:v1", "--dest-tls-verify=false")
    assert stored(mirror, private_manifest.digest).read_bytes() == small.read(private_manifest.digest)

    # Scrub finds the rest (and the private layer, damaged again), repairs it, and says so.
    flip(stored(mirror, private_layer.digest))
    r = mirror_cli("scrub", "--json", "--config", mirror.config_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    report = json_out(r)
    assert not report["ok"] and report["objects"] >= 8 and report["bytes"] > 0
    damaged = {d["digest"]: d for d in report["damaged"]}
    assert set(damaged) == {private_layer.digest, cached_layer.digest, cached_manifest.digest}
    assert damaged[private_layer.digest]["private"] and damaged[private_layer.digest]["action"] == "quarantined"
    assert damaged[private_layer.digest]["repositories"] == ["team/app"]
    for blob in (cached_layer, cached_manifest):
        assert damaged[blob.digest]["action"] == "removed" and damaged[blob.digest]["repositories"] == ["library/multi"]
    quarantined = mirror.root / layout.quarantined(parse_digest(private_layer.digest))
    assert quarantined.exists() and not stored(mirror, private_layer.digest).exists()
    r = mirror_cli("scrub", "--dry-run", "--config", mirror.config_path)
    assert r.returncode == 0 and "0 damaged" in r.stdout, r.stdout + r.stderr

    # Pulls are right afterwards: cached content is fetched again, private content once pushed again.
    mark = upstream.mark()
    out = tmp_path / "cached"
    skopeo_copy(f"docker://{mirror.host}/library/multi:latest", f"oci:{out}:latest", "--all")
    check_oci_copy(out, multi)
    assert upstream.blob_gets(cached_layer.digest, since=mark), "the damaged cached layer was not fetched again"
    failed = skopeo_copy(f"docker://{mirror.host}/team/app:v1", f"oci:{tmp_path / 'gone'}:v1", check=False)
    assert failed.returncode != 0, "a quarantined blob was served"
    data = small.read(private_layer.digest)
    pushed = http("POST", f"{mirror.url}/v2/team/app/blobs/uploads/?digest={private_layer.digest}", data=data)
    assert pushed.status == 201
    out = tmp_path / "private"
    skopeo_copy(f"docker://{mirror.host}/team/app:v1", f"oci:{out}:v1")
    check_oci_copy(out, small)
    r = mirror_cli("scrub", "--json", "--config", mirror.config_path)
    assert r.returncode == 0 and json.loads(r.stdout)["damaged"] == [], r.stdout


def test_scrub_shows_progress_on_a_terminal_and_keeps_to_its_rate(tmp_path: Path) -> None:
    root = tmp_path / "data"
    data = os.urandom(3 << 20)
    path = root / layout.blob(parse_digest(sha(data)))
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"version": 0.1, "storage": {"filesystem": {"rootdirectory": str(root)}}}))
    code, out, terminal = run_on_a_terminal("scrub", "--config", str(config))
    assert code == 0 and b"scrubbing" in terminal and "scrubbing" not in out and "0 damaged" in out
    start = time.monotonic()
    code, out, terminal = run_on_a_terminal("scrub", "--config", str(config), "--json", "--rate", "1MiB")
    assert code == 0 and b"scrubbing" not in terminal and json.loads(out)["bytes"] == len(data)
    assert time.monotonic() - start >= 2.5, "3 MiB at 1 MiB a second took less than 3 s"
    flip(path)
    code, out, _ = run_on_a_terminal("scrub", "--config", str(config))
    assert code == 1 and "damaged sha256:" in out and "1 damaged" in out, out
