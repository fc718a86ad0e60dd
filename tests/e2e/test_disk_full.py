"""A full disk is an operating state, end to end: a real mirror whose storage is a small tmpfs,
real clients (skopeo) pulling a 200 MiB image through it cold and pushing one to it, both past
full; the operator commands and a DELETE on the full disk; then the tmpfs grown with
`mount -o remount,size=...` and the same pull and push succeed, with no restart."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.push_helpers import push_config, sha
from tests.e2e.test_operator_cli import json_out, mirror_cli
from tests.support.clients import skopeo_copy
from tests.support.images import Layout
from tests.support.procs import Distribution, Mirror, http, wait_for
from tests.support.prometheus import Samples
from tests.support.registry import MANIFEST_ACCEPT, check_oci_copy, oci_error
from tests.support.tmpfs import Tmpfs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]
MiB = 1 << 20


def metrics(mirror: Mirror) -> Samples:
    return Samples.scrape(f"{mirror.url}/metrics")


def test_cold_pulls_and_pushes_past_full_then_the_same_after_a_remount_without_restart(
        skopeo_required: None, mirror_factory: Callable[..., Mirror], upstream: Distribution,
        layouts: dict[str, Layout], tmpfs: Callable[[int], Tmpfs], tmp_path: Path) -> None:
    big, small = layouts["big"], layouts["small"]
    fs = tmpfs(96 * MiB)  # the big image is ~200 MiB in four layers
    config = push_config(upstream.url)
    config["storage"]["filesystem"] = {"rootdirectory": str(fs.path / "data")}
    mirror = mirror_factory(config)
    staging = fs.path / "data" / "_staging"
    skopeo_copy(f"oci:{small.path}:latest", f"docker://{mirror.host}/team/small:v1", "--dest-tls-verify=false")
    small_digest = http("GET", f"{mirror.url}/v2/team/small/manifests/v1", {"Accept": MANIFEST_ACCEPT}).headers[
        "Docker-Content-Digest"]

    # Past full: a cold pull and a push fail, promptly and cleanly.
    t0 = time.monotonic()
    pulled = skopeo_copy(f"docker://{mirror.host}/library/big:latest", f"oci:{tmp_path / 'cold'}:latest",
                         check=False, timeout=120)
    assert pulled.returncode != 0, "a 200 MiB image was pulled through a 96 MiB disk"
    pushed = skopeo_copy(f"oci:{big.path}:latest", f"docker://{mirror.host}/team/big:v1", "--dest-tls-verify=false",
                         check=False, timeout=120)
    assert pushed.returncode != 0
    blob = os.urandom(100 * MiB)
    r = http("POST", f"{mirror.url}/v2/team/raw/blobs/uploads/?digest={sha(blob)}", data=blob, timeout=60)
    assert r.status == 507 and r.headers["Retry-After"], (r.status, r.body[:300])
    (error,) = oci_error(r.body)
    assert error["code"] == "STORAGE_FULL" and "storage full" in error["message"]
    assert time.monotonic() - t0 < 150
    wait_for(lambda: metrics(mirror).value("mirror_blob_flights_in_progress") == 0, 30, "the flights to end")
    wait_for(lambda: not [p for p in staging.iterdir() if p.name.startswith("f-")], 10, "the spools to go")
    assert metrics(mirror).value("mirror_storage_full_errors_total") >= 2
    lines = mirror.log_lines()
    full = [e for e in lines if "storage full" in str(e.get("msg")) and e["level"] in ("warning", "error")]
    assert len(full) == 1, full
    assert not [e for e in lines if "error" in e], "a traceback in the log"

    # Completely full: the operator's commands and a DELETE still work.
    filler = fs.fill()
    for command in (["du"], ["evict", "--older-than", "1s"], ["gc"], ["scrub"]):
        ran = mirror_cli(*command, "--json", "--config", mirror.config_path)
        assert ran.returncode == 0, (command, ran.stdout, ran.stderr)
        # scrub: whatever was stored while the disk filled and drained is whole (a spool write cut
        # short at the brim once left a hole of zeros in a blob whose digest had checked)
        assert json_out(ran).get("damaged", []) == [], ran.stdout
    r = http("DELETE", f"{mirror.url}/v2/team/small/manifests/{small_digest}")
    assert r.status == 202, (r.status, r.body[:300])
    for ref in ("v1", small_digest):
        assert http("GET", f"{mirror.url}/v2/team/small/manifests/{ref}", {"Accept": MANIFEST_ACCEPT}).status == 404
    filler.unlink()

    # Grown, no restart: the same pull and the same push succeed.
    fs.resize(1 << 30)
    out = tmp_path / "warm"
    skopeo_copy(f"docker://{mirror.host}/library/big:latest", f"oci:{out}:latest", timeout=180)
    check_oci_copy(out, big)
    skopeo_copy(f"oci:{big.path}:latest", f"docker://{mirror.host}/team/big:v1", "--dest-tls-verify=false",
                timeout=180)
    out = tmp_path / "pushed"
    skopeo_copy(f"docker://{mirror.host}/team/big:v1", f"oci:{out}:latest", timeout=180)
    check_oci_copy(out, big)
    assert mirror.running and mirror.proc.starts == 1
    assert metrics(mirror).value("mirror_storage_full") == 0
