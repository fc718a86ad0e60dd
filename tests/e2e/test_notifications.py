"""registry:2-style notifications from a real mirror process to a real HTTP receiver: the right
events in order for a push and a pull (and `fetch` for a cache fill), and events that wait on disk
while the receiver is down, through a mirror restart, until every one has arrived."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.push_helpers import PRIVATE
from tests.support.clients import skopeo_copy
from tests.support.images import Layout
from tests.support.procs import Distribution, Mirror, http, mirror_config, wait_for
from tests.support.receiver import ENVELOPE, Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def notify_config(upstream: Distribution, receiver: Receiver, **endpoint: Any) -> dict[str, Any]:
    config = mirror_config(upstream.url)
    config["private"] = {"patterns": list(PRIVATE)}
    config["notifications"] = {"endpoints": [{
        "name": "listener", "url": receiver.url, "headers": {"Authorization": ["Bearer s3cret"]},
        "timeout": "2s", "threshold": 3, "backoff": "200ms", **endpoint}]}
    return config


def metric(mirror: Mirror, name: str) -> float:
    text = http("GET", f"{mirror.url}/metrics").body.decode()
    m = re.search(rf'^{name}{{endpoint="listener"}} (\S+)$', text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_push_and_pull_events_in_order(mirror_factory: Callable[..., Mirror], upstream: Distribution,
                                       receiver: Receiver, layouts: dict[str, Layout], tmp_path: Path) -> None:
    small = layouts["small"]
    image = small.image()
    mirror = mirror_factory(notify_config(upstream, receiver))
    skopeo_copy(small.oci_ref(), f"docker://{mirror.host}/team/app:v1", "--dest-tls-verify=false")
    pushed = receiver.wait(len(image.blobs) + 1)
    assert [e["action"] for e in pushed] == ["push"] * (len(image.blobs) + 1)
    assert {e["target"]["digest"] for e in pushed[:-1]} == {b.digest for b in image.blobs}
    for event, blob in ((e, next(b for b in image.blobs if b.digest == e["target"]["digest"])) for e in pushed[:-1]):
        assert event["target"]["size"] == blob.size and event["target"]["repository"] == "team/app"
    manifest = pushed[-1]["target"]  # the manifest comes after the blobs it references
    assert manifest["digest"] == image.manifest.digest and manifest["tag"] == "v1"
    assert manifest["mediaType"] == image.manifest.media_type and manifest["size"] == image.manifest.size
    assert manifest["url"].endswith(f"/v2/team/app/manifests/{image.manifest.digest}")
    first = pushed[0]
    assert first["request"]["method"] in ("PUT", "POST") and first["request"]["useragent"]
    assert first["source"]["instanceID"] and first["id"] and first["timestamp"].endswith("Z")
    assert receiver.content_types[0] == ENVELOPE and receiver.headers[0]["Authorization"] == "Bearer s3cret"

    skopeo_copy(f"docker://{mirror.host}/team/app:v1", f"oci:{tmp_path / 'out'}:v1", "--src-tls-verify=false")
    pulled = receiver.wait(len(pushed) + len(image.blobs) + 1)[len(pushed):]
    assert pulled[0]["action"] == "pull" and pulled[0]["target"]["digest"] == image.manifest.digest
    assert pulled[0]["target"]["tag"] == "v1" and pulled[0]["request"]["method"] == "GET"
    assert {e["target"]["digest"] for e in pulled[1:]} == {b.digest for b in image.blobs}
    assert {e["action"] for e in pulled} == {"pull"}

    # A pull through from upstream: each cache fill is a `fetch` just before its `pull`. (The
    # blobs are already stored from the push above: they are linked, not fetched again.)
    start = len(receiver.snapshot())
    skopeo_copy(f"docker://{mirror.host}/library/small:latest", f"oci:{tmp_path / 'proxied'}:latest")
    events = receiver.wait(start + len(image.blobs) + 2)[start:]
    assert [e["action"] for e in events[:2]] == ["fetch", "pull"]
    assert {e["target"]["digest"] for e in events[:2]} == {image.manifest.digest}
    assert {e["target"]["digest"] for e in events[2:]} == {b.digest for b in image.blobs}
    assert all(e["target"]["repository"] == "library/small" for e in events)
    assert len({e["id"] for e in receiver.snapshot()}) == len(receiver.snapshot())


def test_events_wait_on_disk_while_the_receiver_is_down_across_a_restart(
        mirror_factory: Callable[..., Mirror], upstream: Distribution, receiver: Receiver,
        layouts: dict[str, Layout]) -> None:
    small = layouts["small"]
    expected = {b.digest for b in small.image().blobs} | {small.image().manifest.digest}
    receiver.stop()
    mirror = mirror_factory(notify_config(upstream, receiver, ignore={"actions": ["pull"]}))
    skopeo_copy(small.oci_ref(), f"docker://{mirror.host}/team/down:v1", "--dest-tls-verify=false")
    wait_for(lambda: metric(mirror, "mirror_notifications_queued") == len(expected)
             and metric(mirror, "mirror_notifications_failed_total") >= 1, 20, "every event queued, a delivery failed")
    skopeo_copy(f"docker://{mirror.host}/team/down:v1", "oci:/dev/null:x", check=False)  # pulls: ignored

    mirror.restart()  # the queue is on disk: nothing is lost
    receiver.start()
    events = receiver.wait(len(expected))
    wait_for(lambda: metric(mirror, "mirror_notifications_queued") == 0, 20, "the queue to drain")
    got = receiver.snapshot()
    assert {e["target"]["digest"] for e in got} == expected and {e["action"] for e in got} == {"push"}
    assert len({e["id"] for e in got}) == len(expected)  # at least once; here exactly once
    assert events[-1]["target"]["digest"] == small.image().manifest.digest  # still in order
    assert metric(mirror, "mirror_notifications_sent_total") == len(expected)
