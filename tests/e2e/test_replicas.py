"""Two `mirror serve` replicas on one OSS bucket (our OSS-protocol server, tests/support/ossserver.py):
what one pushes or caches the other serves, an upload moves between them, the local hot tier keeps
serving while the bucket is down, and a bad bucket configuration fails at start, clearly."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from tests.e2e.push_helpers import PRIVATE, sha, start_upload
from tests.support.clients import Dockerd, skopeo_copy
from tests.support.images import Layout
from tests.support.ossserver import OssServer
from tests.support.procs import REPO_ROOT, Distribution, Mirror, client_env, free_port, mirror_config, run, wait_for
from tests.support.procs import http as request
from tests.support.registry import MANIFEST_ACCEPT, check_oci_copy, oci_error

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

MiB = 1 << 20


def replica_config(upstream: Distribution, oss: OssServer, **storage: Any) -> dict[str, Any]:
    """A replica: the session upstream, `team/**` private, everything in the bucket."""
    config = mirror_config(upstream.url)
    config["private"] = {"patterns": list(PRIVATE), "claim_on_push": True}
    config["storage"] = {"oss": {"accesskeyid": oss.key_id, "accesskeysecret": oss.key_secret,
                                 "region": "oss-test", "bucket": oss.bucket, "endpoint": oss.endpoint,
                                 "secure": False, "rootdirectory": "registry"},
                         "delete": {"enabled": True}, **storage}
    return config


def blob_get(mirror: Mirror, repo: str, digest: str, follow: bool = True) -> tuple[int, bytes, dict[str, str]]:
    """GET a blob without urllib's automatic redirects, so a 307 is seen (and followed if asked)."""
    conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=60)
    try:
        conn.request("GET", f"/v2/{repo}/blobs/{digest}")
        resp = conn.getresponse()
        status, body, headers = resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()
    if follow and status == 307:
        with urllib.request.urlopen(headers["Location"], timeout=60) as signed:  # the signed bucket URL
            return signed.status, signed.read(), headers
    return status, body, headers


def push_blob(mirror: Mirror, repo: str, data: bytes) -> str:
    digest = sha(data)
    r = request("POST", f"{mirror.url}/v2/{repo}/blobs/uploads/?digest={digest}", data=data,
             headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert r.status == 201, (r.status, r.body[:300])
    return digest


def test_replicas_share_pushes_uploads_and_cached_blobs(
        docker: Dockerd, docker_mirror: Callable[..., Mirror], mirror_factory: Callable[..., Mirror],
        upstream: Distribution, oss: OssServer, layouts: dict[str, Layout], tmp_path: Path) -> None:
    small = layouts["small"]
    a = mirror_factory(replica_config(upstream, oss), name="replica-a")
    b = docker_mirror(replica_config(upstream, oss))  # dockerd mirrors Docker Hub names to this one

    # An image pushed to A is pulled from B, by docker itself.
    skopeo_copy(f"oci:{small.path}:latest", f"docker://{a.host}/team/app:v1", "--dest-tls-verify=false")
    docker.pull(f"{b.host}/team/app:v1")
    assert docker.image_id(f"{b.host}/team/app:v1") == small.image().config.digest

    # A name A made private by pushing to it (claim_on_push) is served by B, which started before.
    skopeo_copy(f"oci:{small.path}:latest", f"docker://{a.host}/claimed/app:v1", "--dest-tls-verify=false")
    out = tmp_path / "claimed"
    skopeo_copy(f"docker://{b.host}/claimed/app:v1", f"oci:{out}:v1", "--src-tls-verify=false")
    check_oci_copy(out, small)

    # An upload started on A is finished on B, and both serve the blob.
    data = os.urandom(3 * MiB + 7)
    location = start_upload(a, "team/data")
    r = request("PATCH", a.url + location, data=data[:2 * MiB], headers={"Content-Type": "application/octet-stream"})
    assert r.status == 202, (r.status, r.body[:300])
    r = request("PATCH", b.url + location, data=data[2 * MiB:], headers={"Content-Type": "application/octet-stream",
                                                                       "Content-Range": f"{2 * MiB}-{len(data) - 1}"})
    assert r.status == 202, (r.status, r.body[:300])
    r = request("PUT", f"{b.url}{location}{'&' if '?' in location else '?'}digest={sha(data)}")
    assert r.status == 201, (r.status, r.body[:300])
    for replica in (a, b):
        status, body, _ = blob_get(replica, "team/data", sha(data))
        assert status == 200 and body == data

    # A blob cached from upstream via A is served by B without going upstream.
    skopeo_copy(f"docker://{a.host}/library/small:latest", f"oci:{tmp_path / 'via-a'}:latest")
    mark = upstream.mark()
    out = tmp_path / "via-b"
    skopeo_copy(f"docker://{b.host}/library/small:latest", f"oci:{out}:latest")
    check_oci_copy(out, small)
    docker.pull("small")
    assert docker.image_id("small") == small.image().config.digest
    assert upstream.blob_gets(since=mark) == [], "B fetched a blob upstream that A had cached in the bucket"
    assert not any(p.name.startswith("f-") for p in (b.root / "_tier" / "_staging").iterdir())


def test_hot_tier_serves_through_an_outage_and_nothing_half_written_appears(
        mirror_factory: Callable[..., Mirror], upstream: Distribution, oss: OssServer) -> None:
    a = mirror_factory(replica_config(upstream, oss), name="replica-a")
    b = mirror_factory(replica_config(upstream, oss), name="replica-b")
    def metric(pattern: str) -> float:
        text = request("GET", f"{a.url}/metrics").body.decode()
        return sum(float(v) for v in re.findall(pattern + r" (\S+)$", text, re.M))

    warm = push_blob(a, "team/outage", os.urandom(2 * MiB))
    assert blob_get(a, "team/outage", warm)[0] == 200
    # the client has its bytes a moment before the server files the hot tier's copy
    wait_for(lambda: metric(r"^mirror_hot_tier_bytes") >= 2 * MiB, 10, "the blob in A's hot tier")
    cold = push_blob(b, "team/outage", os.urandom(MiB))  # in the bucket, not in A's tier

    oss.faults(down=True)
    try:
        status, _, _ = blob_get(a, "team/outage", warm)
        assert status == 200, "A stopped serving what its hot tier holds"
        status, body, _ = blob_get(a, "team/outage", cold)
        assert status == 503 and oci_error(body)[0]["code"] == "UNAVAILABLE"
        lost = os.urandom(MiB)
        r = request("POST", f"{a.url}/v2/team/outage/blobs/uploads/?digest={sha(lost)}", data=lost, timeout=60)
        assert 500 <= r.status < 600 and oci_error(r.body)[0]["code"] == "UNAVAILABLE", (r.status, r.body[:300])
    finally:
        oss.faults(down=False)
    assert request("HEAD", f"{b.url}/v2/team/outage/blobs/{sha(lost)}").status == 404
    assert blob_get(a, "team/outage", cold)[0] == 200
    assert a.running and b.running
    assert metric(r'^mirror_storage_errors_total\{backend="oss",operation="\w+"\}') >= 2  # the cold read, the push
    wait_for(lambda: metric(r"^mirror_hot_tier_bytes") >= 3 * MiB, 10, "both blobs in A's hot tier")


def test_private_tags_just_served_are_served_from_memory_while_the_bucket_is_down(
        mirror_factory: Callable[..., Mirror], upstream: Distribution, oss: OssServer, layouts: dict[str, Layout],
        tmp_path: Path) -> None:
    small = layouts["small"]
    a = mirror_factory(replica_config(upstream, oss), name="replica-a")
    b = mirror_factory(replica_config(upstream, oss), name="replica-b")
    skopeo_copy(f"oci:{small.path}:latest", f"docker://{a.host}/team/app:v1", "--dest-tls-verify=false")
    skopeo_copy(f"oci:{small.path}:latest", f"docker://{b.host}/team/other:v1", "--dest-tls-verify=false")
    skopeo_copy(f"docker://{a.host}/team/app:v1", f"oci:{tmp_path / 'warm'}:v1", "--src-tls-verify=false")
    accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
    before = request("GET", f"{a.url}/v2/team/app/manifests/v1", accept)
    assert before.status == 200

    oss.faults(down=True)
    try:
        r = request("GET", f"{a.url}/v2/team/app/manifests/v1", accept)
        assert r.status == 200 and r.body == before.body, (r.status, r.body[:300])
        assert r.headers["Warning"] == '110 - "Response is Stale"'
        out = tmp_path / "stale"
        skopeo_copy(f"docker://{a.host}/team/app:v1", f"oci:{out}:v1", "--src-tls-verify=false")
        check_oci_copy(out, small)  # the tag from memory, the blobs from the hot tier
        r = request("GET", f"{a.url}/v2/team/other/manifests/v1", accept)  # never read by A
        assert r.status == 503 and oci_error(r.body)[0]["code"] == "UNAVAILABLE"
    finally:
        oss.faults(down=False)
    stale = [e for e in a.log_lines() if "serving stale private tag team/app:v1" in str(e.get("msg"))]
    assert stale and all(e["level"] == "warning" for e in stale)
    assert any(e.get("path") == "/v2/team/app/manifests/v1" and e.get("cache") == "stale" for e in a.requests())
    r = request("GET", f"{a.url}/v2/team/app/manifests/v1", accept)
    assert r.status == 200 and "Warning" not in r.headers


def test_redirect_to_a_signed_bucket_url(mirror_factory: Callable[..., Mirror], upstream: Distribution,
                                         oss: OssServer, layouts: dict[str, Layout], tmp_path: Path) -> None:
    config = replica_config(upstream, oss, redirect={"disable": False})
    config["cache"] = {"hot_size": 0}  # no local tier: every blob GET is a redirect
    m = mirror_factory(config, name="redirecting")
    data = os.urandom(MiB)
    digest = push_blob(m, "team/redirect", data)
    status, _, headers = blob_get(m, "team/redirect", digest, follow=False)
    assert status == 307 and "Signature=" in headers["Location"] and oss.endpoint in headers["Location"]
    assert blob_get(m, "team/redirect", digest)[:2] == (200, data)
    # a real client follows it
    skopeo_copy(f"oci:{layouts['small'].path}:latest", f"docker://{m.host}/team/small:v1", "--dest-tls-verify=false")
    out = tmp_path / "redirected"
    skopeo_copy(f"docker://{m.host}/team/small:v1", f"oci:{out}:v1", "--src-tls-verify=false")
    assert (out / "index.json").exists()


@pytest.mark.parametrize(("change", "expect"), [
    ({"accesskeysecret": "wrong"}, "SignatureDoesNotMatch"),
    ({"accesskeyid": "nobody"}, "InvalidAccessKeyId"),
    ({"bucket": "no-such-bucket"}, "NoSuchBucket"),
])
def test_bad_bucket_settings_fail_at_start_clearly(upstream: Distribution, oss: OssServer, tmp_path: Path,
                                                   change: dict[str, str], expect: str) -> None:
    config = replica_config(upstream, oss)
    config["storage"]["oss"].update(change)
    config["http"] = {"addr": f"127.0.0.1:{free_port()}"}
    config["cache"] = {"directory": str(tmp_path / "local")}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in client_env().items() if not k.startswith("REGISTRY_")}
    result = run([sys.executable, "-m", "mirror", "serve", "--config", str(path)], timeout=60, env=env,
                 check=False, cwd=REPO_ROOT)
    bucket = config["storage"]["oss"]["bucket"]
    assert result.returncode == 2, result.stderr
    assert expect in result.stderr and repr(bucket) in result.stderr and "'oss-test'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_name_claimed_on_a_is_never_served_anonymously_by_b(
        mirror_factory: Callable[..., Mirror], upstream: Distribution, oss: OssServer, layouts: dict[str, Layout],
        tmp_path: Path) -> None:
    """While alice pushes claimed/app to A, an anonymous client asks B for it without pause (B has seen
    the name before, unclaimed): at no moment does B answer with its content; afterwards B serves it
    to alice, and to nobody else."""
    small = layouts["small"]
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b'alice-pw', bcrypt.gensalt(4)).decode()}\n")
    config = replica_config(upstream, oss)
    config["private"] = {"claim_on_push": "auto"}
    config["auth"] = {"htpasswd": {"realm": "r", "path": str(htpasswd)}}
    # No rule names claimed/**: only what the namespace decides keeps anonymous callers out (they may
    # pull what is cached, never what is private).
    config["access"] = {"anonymous_pull": True}
    a = mirror_factory(config, name="replica-a")
    b = mirror_factory(config, name="replica-b")
    layer = small.image().layers[0].digest
    paths = ["manifests/v1", f"manifests/{small.digest}", f"blobs/{layer}", "tags/list"]
    assert {request("GET", f"{b.url}/v2/claimed/app/{p}").status for p in paths} == {404}  # seen, unclaimed

    seen: list[tuple[str, int, bytes]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            for p in paths:
                r = request("GET", f"{b.url}/v2/claimed/app/{p}", {"Accept": MANIFEST_ACCEPT})
                seen.append((p, r.status, r.body[:200]))

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        skopeo_copy(f"oci:{small.path}:latest", f"docker://{a.host}/claimed/app:v1", "--dest-tls-verify=false",
                    "--dest-creds", "alice:alice-pw")
        time.sleep(2.0)  # B keeps being asked well after the push
    finally:
        stop.set()
        prober.join(30)
    served = [(p, s, body) for p, s, body in seen if s not in (401, 404)]
    assert not served, served[:10]
    assert len(seen) > 40 and any(s == 401 for _, s, _ in seen), len(seen)
    mark = upstream.mark()
    alice = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-pw").decode(), "Accept": MANIFEST_ACCEPT}
    r = request("GET", f"{b.url}/v2/claimed/app/manifests/v1", alice)
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == small.digest
    assert request("GET", f"{b.url}/v2/claimed/app/manifests/v1").status == 401
    assert not upstream.requests(contains="claimed/app", since=mark)  # private now: never asked upstream


def cli(mirror: Mirror, *args: str) -> subprocess.Popen[str]:
    """`mirror ARGS --config` of `mirror` (its local directory: its ledger), as its own process."""
    env = {k: v for k, v in client_env({"PYTHONPATH": str(REPO_ROOT)}).items() if not k.startswith("REGISTRY_")}
    return subprocess.Popen([sys.executable, "-m", "mirror", *args, "--config", str(mirror.config_path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
                            start_new_session=True)


def finished(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    found: dict[str, Any] = json.loads(out)
    return found


def while_running(proc: subprocess.Popen[str], step: Callable[[int], None], every: float = 0.15) -> int:
    """`step(i)` over and over until `proc` ends (bounded): writes racing the pass it runs."""
    i, deadline = 0, time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        step(i)
        i += 1
        time.sleep(every)
    return i


def test_replicas_share_the_ledger_and_a_pass_on_one_never_takes_what_the_other_pushed(
        mirror_factory: Callable[..., Mirror], upstream: Distribution, oss: OssServer, layouts: dict[str, Layout],
        tmp_path: Path) -> None:
    """Each replica keeps its own ledger; the journal in the bucket tells each what the other wrote:
    B's catalog lists what A pushed within seconds. An eviction pass run beside B (its local directory,
    its ledger) while A mounts cached blobs into private repositories, and gc run beside B while A
    pushes manifests naming blobs gc would otherwise sweep: whatever A acknowledged is there after, on
    both replicas; what nothing needs is gone."""
    config = replica_config(upstream, oss)
    config["cache"] = {"min_idle": "0s"}
    a = mirror_factory(config, name="replica-a")
    b = mirror_factory(config, name="replica-b")
    small = layouts["small"]

    # B sees A's push in its catalog and tag list within seconds (the journal), not at a rebuild.
    skopeo_copy(f"oci:{small.path}:latest", f"docker://{a.host}/team/seen:v1", "--dest-tls-verify=false")
    wait_for(lambda: "team/seen" in request("GET", f"{b.url}/v2/_catalog").body.decode(), 10, "B lists A's push")
    assert json.loads(request("GET", f"{b.url}/v2/team/seen/tags/list").body)["tags"] == ["v1"]

    # Cached content through B: what the eviction pass will find unpinned.
    for name in ("small", "multi", "big"):
        skopeo_copy(f"docker://{b.host}/library/{name}:latest", f"oci:{tmp_path / name}:latest")
    # a client has a cold blob's bytes before B has committed it to the bucket: wait for the commits
    wait_for(lambda: re.search(r"^mirror_blob_flights_in_progress 0", request("GET", f"{b.url}/metrics").body.decode(),
                               re.M) is not None, 60, "B's fills committed")
    sources = {d: f"library/{name}" for name in ("small", "multi")
               for d in [layouts[name].image().config.digest, *(x.digest for x in layouts[name].image().layers)]}
    cached = sorted(sources)
    mounted: dict[str, str] = {}  # private repository -> the blob its mount put there (201)

    def mount(i: int) -> None:
        digest, repo = cached[i % len(cached)], f"team/race{i}"
        r = request("POST", f"{a.url}/v2/{repo}/blobs/uploads/?mount={digest}&from={sources[digest]}",
                    timeout=60)  # a mount that meets the pass waits it out
        assert r.status in (201, 202), (r.status, r.body[:300])  # 202: gone already, the client uploads it
        if r.status == 201:
            mounted[repo] = digest

    evict = cli(b, "evict", "--older-than", "0s")
    mounts = while_running(evict, mount)
    result = finished(evict)
    assert mounts >= 5 and mounted, (mounts, mounted)
    big_layer = layouts["big"].image().layers[0].digest
    assert big_layer in result["evicted"], "what nothing private needs goes"
    for replica in (a, b):
        for repo, digest in mounted.items():
            status, body, _ = blob_get(replica, repo, digest)
            assert status == 200 and sha(body) == digest, (replica.url, repo, digest, status)

    # gc beside B while A pushes manifests naming blobs uploaded long before any manifest.
    blobs = [push_blob(a, f"team/gc{i}", os.urandom(4096 + i)) for i in range(12)]
    config_blob = push_blob(a, "team/gc0", b'{"os":"linux"}')
    pushed: dict[str, str] = {}

    def push_manifest(i: int) -> None:
        if i >= len(blobs):
            return
        repo = f"team/gc{i}"
        if i:
            r = request("POST", f"{a.url}/v2/{repo}/blobs/uploads/?mount={config_blob}&from=team/gc0", timeout=60)
            if r.status != 201:
                return
        body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config_blob, "size": 14},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blobs[i],
                                       "size": 4096 + i}]}).encode()
        r = request("PUT", f"{a.url}/v2/{repo}/manifests/v1", data=body,
                    headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, timeout=60)
        assert r.status in (201, 400, 404), (r.status, r.body[:300])  # refused: a blob was swept first
        if r.status == 201:
            pushed[repo] = blobs[i]

    collect = cli(b, "gc", "--grace", "0s", "--upload-idle", "0s")
    while_running(collect, push_manifest, every=0.8)
    swept = set(finished(collect)["swept"])
    for replica in (a, b):
        for repo, digest in pushed.items():
            r = request("GET", f"{replica.url}/v2/{repo}/manifests/v1", {"Accept": MANIFEST_ACCEPT})
            assert r.status == 200, (replica.url, repo, r.status)
            status, body, _ = blob_get(replica, repo, digest)
            assert status == 200 and sha(body) == digest, (replica.url, repo, status)
            assert digest not in swept
    assert set(blobs) - set(pushed.values()) <= swept, "what no manifest named was swept"
