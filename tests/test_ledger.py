"""The ledger a server keeps on its writes is what storage holds: after every write path (pushes, tag
moves, deletes, mounts, pull-through fills, claims, uploads, eviction, gc, imports) a ledger rebuilt
from a walk of storage equals it fact by fact, and so after a random run of them (a property). And
what reads it: `_catalog` and `tags/list` pages (n, last, Link, registry:2's order, who may see what),
the UI's list, the gauges."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

import bcrypt
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.cache.eviction import Evictor
from mirror.commands import gc
from mirror.commands.archive import export, import_archive
from mirror.config import parse
from mirror.ledger import queries, rebuild
from mirror.registry.stores import ManifestStore
from mirror.server.app import create_app
from mirror.server.metrics import Metrics
from mirror.server.state import LEDGER, STORAGE
from mirror.service import REGISTRY
from tests.scripted_upstream import ScriptedUpstream
from tests.support.clock import ManualClock
from tests.test_push import OCI_MANIFEST, image_manifest, push_image, sha, upload

MiB = 1 << 20


async def differences(client: TestClient, tmp: Path) -> dict[str, list[str]]:
    """The server's ledger against one rebuilt from storage now (empty: they agree)."""
    app = client.app
    await app[REGISTRY].settle()  # cache fills commit in the background
    ledger = app[LEDGER]
    assert ledger.db is not None
    fresh = tmp / f"fresh-{uuid.uuid4().hex[:8]}.sqlite"
    await rebuild.build(app[STORAGE], fresh, ledger.kinds, 0)
    return await asyncio.to_thread(rebuild.compare, ledger.db.path, fresh, ledger.kinds)


class Mirror:
    """A mirror in process on `root`, private `team/**`, in front of a scripted upstream."""

    def __init__(self, root: Path, upstream: TestServer, clock: ManualClock, **extra: Any) -> None:
        self.config = parse({"storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
                             "upstreams": [{"name": "hub", "url": str(upstream.make_url("")), "dockerhub": True,
                                            "tag_ttl": "1h", "retries": 1}],
                             "private": {"patterns": ["team/**"]}, **extra})
        self.client = TestClient(TestServer(create_app(self.config, clock)))

    async def __aenter__(self) -> TestClient:
        await self.client.start_server()
        assert await self.client.app[LEDGER].wait_ready(10)
        return self.client

    async def __aexit__(self, *_: object) -> None:
        await self.client.close()


def serve(script: ScriptedUpstream, repo: str, seed: int) -> tuple[str, str]:
    layer = script.add_blob(bytes([seed]) * (1000 + seed))
    config = script.add_blob(json.dumps({"os": "linux", "seed": seed}).encode())
    body = image_manifest(b"", [])  # only for its shape
    manifest = script.add_manifest(repo, "latest", {**json.loads(body), "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 30},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 1000 + seed}]})
    return manifest, layer


async def pull(client: TestClient, repo: str, ref: str = "latest") -> None:
    r = await client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
    assert r.status == 200, await r.text()
    doc = json.loads(await r.read())
    for d in [doc["config"]["digest"], *(x["digest"] for x in doc["layers"])]:
        r = await client.get(f"/v2/{repo}/blobs/{d}")
        assert r.status == 200
        await r.read()


# --- every write path ------------------------------------------------------------------------------


async def test_every_write_path_keeps_the_ledger_what_storage_holds(
        upstream: tuple[ScriptedUpstream, TestServer], clock: ManualClock, tmp_path: Path) -> None:
    script, server = upstream
    serve(script, "library/cached", 1)
    serve(script, "library/other", 2)
    async with Mirror(tmp_path / "data", server, clock) as client:
        async def step(what: str) -> None:
            found = await differences(client, tmp_path)
            assert found == {}, f"after {what}: {found}"

        m1, _ = await push_image(client, "team/app", "v1", seed=b"a")
        await step("a push")
        m2, _ = await push_image(client, "team/app", "v1", seed=b"b")  # the tag moves
        await step("a tag move")
        r = await client.put("/v2/team/app/manifests/v2", data=image_manifest(b'{"os":"linux","seed":"a"}',
                             [b"layer-" + b"a" * 1000]), headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 201
        await step("a second tag")
        r = await client.post(f"/v2/team/copy/blobs/uploads/?mount={sha(b'layer-' + b'a' * 1000)}&from=team/app")
        assert r.status == 201
        await step("a mount")
        location = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
        assert (await client.patch(location, data=b"half")).status == 202
        await step("an upload in progress")
        assert (await client.delete(location)).status == 204
        await step("a cancelled upload")
        await pull(client, "library/cached")
        await step("a pull-through fill")
        r = await client.put("/v2/claimed/app/manifests/v1", data=b"{}", headers={"Content-Type": OCI_MANIFEST})
        await upload(client, "claimed/app", b"claimed")
        await step("a claim by a push")
        assert (await client.delete("/v2/team/app/manifests/v2")).status == 202
        await step("a tag deleted")
        assert (await client.delete(f"/v2/team/app/manifests/{m1}")).status == 202
        await step("a manifest deleted")
        assert (await client.delete(f"/v2/team/copy/blobs/{sha(b'layer-' + b'a' * 1000)}")).status == 202
        await step("a blob link deleted")
        ledger = client.app[LEDGER]
        evictor = Evictor(ledger, ManifestStore(ledger.storage, ledger, 0, lambda n: None), Metrics(), min_idle=0.0)
        evicted = await evictor.run(ttl=0.0)
        assert evicted.evicted and evicted.manifests == 1  # library/cached went whole
        await step("an eviction pass")
        swept = await gc.collect(ledger, grace=0.0)
        assert sha(b"layer-" + b"a" * 1000) in swept.swept  # m1's layer: no manifest reaches it any more
        await step("gc")
        archive = tmp_path / "team.tar"
        await export(ledger.storage, archive, ["team/**"], None)
        async with Mirror(tmp_path / "other", server, clock) as other:
            result = await import_archive(other.app[STORAGE], other.app[LEDGER], archive)
            assert result.new_blobs > 0
            assert await differences(other, tmp_path) == {}
        await pull(client, "library/other")
        await step("another fill, after everything")
        assert (await client.get("/v2/team/app/manifests/v1")).headers["Docker-Content-Digest"] == m2


# --- a random run ----------------------------------------------------------------------------------

ACTIONS = st.lists(st.tuples(
    st.sampled_from(["push", "move", "mount", "delete_tag", "delete_manifest", "fill", "evict", "gc", "upload"]),
    st.sampled_from(["team/a", "team/b", "team/c/d"]), st.integers(0, 3)), min_size=3, max_size=12)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ACTIONS)
def test_a_rebuild_from_storage_equals_the_ledger_after_any_run(tmp_path_factory: Any,
                                                                actions: list[tuple[str, str, int]]) -> None:
    asyncio.run(_run(tmp_path_factory.mktemp("run"), actions))


async def _run(tmp: Path, actions: list[tuple[str, str, int]]) -> None:
    script = ScriptedUpstream()
    for i in range(4):
        serve(script, f"library/img{i}", i + 10)
    server = TestServer(script.app())
    await server.start_server()
    try:
        async with Mirror(tmp / "data", server, ManualClock()) as client:
            ledger = client.app[LEDGER]
            pushed: dict[str, list[str]] = {}
            for action, repo, n in actions:
                if action in ("push", "move"):
                    digest, _ = await push_image(client, repo, f"v{n % 2}", seed=bytes([97 + n]))
                    pushed.setdefault(repo, []).append(digest)
                elif action == "mount" and pushed:
                    source = sorted(pushed)[n % len(pushed)]
                    r = await client.post(f"/v2/{repo}/blobs/uploads/?mount={sha(b'layer-' + bytes([97 + n]) * 1000)}"
                                          f"&from={source}")
                    assert r.status in (201, 202)
                elif action == "delete_tag":
                    assert (await client.delete(f"/v2/{repo}/manifests/v{n % 2}")).status in (202, 404)
                elif action == "delete_manifest" and pushed.get(repo):
                    r = await client.delete(f"/v2/{repo}/manifests/{pushed[repo][n % len(pushed[repo])]}")
                    assert r.status in (202, 404)
                elif action == "fill":
                    await pull(client, f"library/img{n}")
                elif action == "evict":
                    await client.app[REGISTRY].settle()
                    evictor = Evictor(ledger, ManifestStore(ledger.storage, ledger, 0, lambda s: None), Metrics())
                    await evictor.run(ttl=0.0 if n % 2 else None, max_size=n * 4000)
                elif action == "gc":
                    await gc.collect(ledger, grace=0.0)
                elif action == "upload":
                    assert (await client.post(f"/v2/{repo}/blobs/uploads/")).status == 202
            assert await differences(client, tmp) == {}
    finally:
        await server.close()


# --- the readers -----------------------------------------------------------------------------------


async def test_catalog_and_tags_pages_come_from_the_ledger(registry: Any, tmp_path: Path) -> None:
    client = await registry(private={"patterns": ["**"]})
    names = ["a", "a-b", "a/b", "a/b/c", "a.b", "b", "z"]
    for name in names:
        await push_image(client, name, "v1")
    for tag in ("t3", "t1", "t2", "t10"):
        await push_image(client, "a", tag)
    # registry:2's order: by path components (`a/b` before `a-b`), not by string
    everything = (await (await client.get("/v2/_catalog")).json())["repositories"]
    assert everything == ["a", "a/b", "a/b/c", "a-b", "a.b", "b", "z"]
    pages, url = [], "/v2/_catalog?n=3"
    while url:
        r = await client.get(url)
        pages.append((await r.json())["repositories"])
        link = r.headers.get("Link")
        url = link.split(";")[0].strip("<>") if link else ""
    assert pages == [["a", "a/b", "a/b/c"], ["a-b", "a.b", "b"], ["z"]]
    r = await client.get("/v2/_catalog?n=2&last=a-b")
    assert (await r.json())["repositories"] == ["a.b", "b"] and "last=b" in r.headers["Link"]
    assert (await (await client.get("/v2/_catalog?n=0")).json())["repositories"] == []
    r = await client.get("/v2/a/tags/list?n=2")
    assert (await r.json())["tags"] == ["t1", "t10"] and 'last=t10' in r.headers["Link"]
    r = await client.get("/v2/a/tags/list?n=2&last=t10")
    assert (await r.json())["tags"] == ["t2", "t3"] and "Link" in r.headers
    r = await client.get("/v2/a/tags/list?n=2&last=t3")
    assert (await r.json())["tags"] == ["v1"] and "Link" not in r.headers
    assert (await client.get("/v2/nothing/tags/list")).status == 404


async def test_the_catalog_shows_each_caller_what_it_may_pull(registry: Any, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("".join(f"{u}:{bcrypt.hashpw(u.encode(), bcrypt.gensalt(4)).decode()}\n"
                                for u in ("alice", "bob")))
    client = await registry(auth={"htpasswd": {"realm": "r", "path": str(htpasswd)}},
                            access={"rules": [{"repositories": ["team/alice/**"], "pull": ["alice"],
                                               "push": ["alice"]}]},
                            private={"patterns": ["team/**"]})

    def user(name: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{name}:{name}".encode()).decode()}

    # alice pushes 30 repositories only she may pull; bob one of his own
    for i in range(30):
        for data in (b'{"os":"linux"}', b"layer-x"):
            r = await client.post(f"/v2/team/alice/r{i:02d}/blobs/uploads/?digest={sha(data)}", data=data,
                                  headers=user("alice"))
            assert r.status == 201
        body = image_manifest(b'{"os":"linux"}', [b"layer-x"])
        r = await client.put(f"/v2/team/alice/r{i:02d}/manifests/v1", data=body,
                             headers={"Content-Type": OCI_MANIFEST, **user("alice")})
        assert r.status == 201
    for data in (b'{"os":"linux"}', b"layer-x"):
        await client.post(f"/v2/team/bob/app/blobs/uploads/?digest={sha(data)}", data=data, headers=user("bob"))
    r = await client.put("/v2/team/bob/app/manifests/v1", data=image_manifest(b'{"os":"linux"}', [b"layer-x"]),
                         headers={"Content-Type": OCI_MANIFEST, **user("bob")})
    assert r.status == 201
    r = await client.get("/v2/_catalog?n=5", headers=user("bob"))
    assert (await r.json())["repositories"] == ["team/bob/app"] and "Link" not in r.headers
    r = await client.get("/v2/_catalog?n=5", headers=user("alice"))
    assert (await r.json())["repositories"] == [f"team/alice/r{i:02d}" for i in range(5)]
    assert "team/bob" not in r.headers["Link"] and "last=team/alice/r04" in r.headers["Link"]


async def test_the_gauges_and_the_ui_list_read_the_ledger(registry: Any) -> None:
    client = await registry(private={"patterns": ["team/**"]})
    for i in range(3):
        await push_image(client, f"team/app{i}", "v1", seed=bytes([97 + i]))
    ledger = client.app[LEDGER]
    totals = await ledger.totals()
    assert totals.private_blobs == 9 and totals.cached_bytes == 0 and totals.loose_bytes == 0
    r = await client.get("/ui/api/repositories?n=2&sort=size")
    data = await r.json()
    assert data["total"] == 3 and [x["name"] for x in data["repositories"]] == ["team/app0", "team/app1"]
    row = await ledger.read(queries.repository, "team/app2")
    assert row is not None and (row.kind, row.tags, row.manifests, row.layers) == ("private", 1, 1, 2)


# --- two replicas, one storage: the fence ------------------------------------------------------------


async def _replicas(root: Path) -> tuple[Any, Any, str]:
    """Two ledgers (two replicas' local directories) on one storage holding one cached blob."""
    from mirror.ledger.ledger import Ledger
    from mirror.names import parse_digest
    from mirror.storage import layout
    from mirror.storage.filesystem import FilesystemStorage

    storage = FilesystemStorage(root / "data")
    blob = b"cached bytes"
    digest = sha(blob)
    await storage.put_bytes(layout.blob(parse_digest(digest)), blob)
    await storage.put_bytes(layout.marker("library/c", "cached"), b"")
    await storage.put_bytes(layout.layer("library/c", parse_digest(digest)), digest.encode())
    ledgers = []
    for name in ("one", "two"):
        ledger = await Ledger(root / name, storage, lambda n: n.startswith("team/"), poll=0.05).open()
        await ledger.prepare()
        ledgers.append(ledger)
    return ledgers[0], ledgers[1], digest


async def test_a_write_inside_a_pass_on_another_replica_is_refused_never_lost(tmp_path: Path) -> None:
    """Replica two links the blob (a push or mount) after replica one's pass has caught up for the last
    time and before it deletes: the write finds the pass's marker, waits for it, and is told the blob
    went (its client pushes again): it is never acknowledged over a deleted blob."""
    from mirror.ledger import ops
    from mirror.storage import layout

    one, two, digest = await _replicas(tmp_path)
    try:
        settle = one._settle
        writes: list[asyncio.Task[set[str]]] = []

        async def settle_then_a_write_lands(condemned: Any) -> None:
            await settle(condemned)  # the pass has applied every record written before its marker
            writes.append(asyncio.create_task(two.record([ops.link("team/app", digest, ops.LAYER, 1.0)],
                                                         durable=True)))
            for _ in range(100):  # until the write's record is in storage and it looks for passes
                await asyncio.sleep(0.02)
                if two.writer._task is None or two.writer._task.done():
                    break

        one._settle = settle_then_a_write_lands
        removed = await one.remove([digest], lambda state: state.pinned)
        gone = await asyncio.wait_for(writes[0], 10)
        present = (tmp_path / "data" / layout.blob(ops_digest(digest))).exists()
        assert removed == [digest] and not present
        assert gone == {digest}, "a write was acknowledged over a blob a pass deleted"
    finally:
        await one.close()
        await two.close()


async def test_a_write_before_a_pass_on_another_replica_keeps_its_blob(tmp_path: Path) -> None:
    from mirror.ledger import ops

    one, two, digest = await _replicas(tmp_path)
    try:
        assert await two.record([ops.link("team/app", digest, ops.LAYER, 1.0)], durable=True) == set()
        # one has not caught up yet: the pass condemns the blob, waits for the journal, and spares it
        assert await one.remove([digest], lambda state: state.pinned) == []
        assert (await one.read(queries.blob_state, digest))[2]  # pinned, as two's push made it
    finally:
        await one.close()
        await two.close()


async def test_the_ledger_loop_stops_when_cancelled_just_as_it_hears_of_a_change(tmp_path: Path) -> None:
    """Replicas wake the loop all the time (redis): a shutdown that comes with a wake-up must still end
    it (Python 3.11's wait_for swallowed that cancellation, and the app's cleanup waited forever)."""
    from mirror.ledger.ledger import Ledger
    from mirror.storage.filesystem import FilesystemStorage

    ledger = await Ledger(tmp_path / "index", FilesystemStorage(tmp_path / "data"), lambda n: False).open()
    task = asyncio.create_task(ledger.run())
    try:
        await asyncio.wait_for(ledger.ready.wait(), 5)
        for _ in range(3):
            await asyncio.sleep(0)  # the loop now waits to be woken
        ledger._wake.set()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        assert done, "the ledger's loop went on after it was cancelled"
    finally:
        task.cancel()
        await ledger.close()


def ops_digest(digest: str) -> Any:
    from mirror.names import parse_digest

    return parse_digest(digest)
