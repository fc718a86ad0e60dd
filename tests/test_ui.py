"""The web UI over HTTP (in-process): the list's pagination and filter, the repository and manifest
pages, escaping of hostile names and labels, 404s, who sees delete buttons and who may delete,
the CSRF defences of the delete form, and the overview's numbers against /metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mirror.server.state import CONFIG
from mirror.storage import layout
from tests.auth_keys import ISSUER, SERVICE, make_pki, mint, repo
from tests.conftest import MirrorFactory
from tests.scripted_upstream import ScriptedUpstream
from tests.support.catalog_seed import seed_repositories
from tests.test_cache import image
from tests.test_metrics import labels, scrape
from tests.test_push import OCI_MANIFEST, image_manifest, push_image, sha, upload

Factory = Any
HOSTILE = '<script>alert("x")</script>'


def deletes(tmp_path: Path) -> dict[str, Any]:
    """The storage section with deletes on (a `storage` key replaces the fixture's root)."""
    return {"filesystem": {"rootdirectory": str(tmp_path / "data")}, "delete": {"enabled": True}}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def ready(client: TestClient, predicate: Any = None, seconds: float = 10.0) -> dict[str, Any]:
    """The catalog API once it is built (and `predicate(data)` holds: a push has been seen)."""
    deadline = time.monotonic() + seconds
    while True:
        r = await client.get("/ui/api/repositories?n=500")
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
        if data["ready"] and (predicate is None or predicate(data)):
            return data
        assert time.monotonic() < deadline, data
        await asyncio.sleep(0.05)


def listed(data: dict[str, Any]) -> list[str]:
    return [r["name"] for r in data["repositories"]]


def rows(html: str, table: str) -> list[str]:
    body = html.split(f'<table id="{table}">', 1)[1].split("</table>", 1)[0].split("<tbody>", 1)[1]
    return re.findall(r"<tr>(.*?)</tr>", body, re.S)


def delete_form(html: str) -> dict[str, str]:
    form = html.split('id="confirm-form"', 1)[1].split("</form>", 1)[0]
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form))


# --- the list -------------------------------------------------------------------------------------

async def test_list_paginates_filters_and_sorts(registry: Factory, tmp_path: Path) -> None:
    root = tmp_path / "data"
    names = seed_repositories(root, 120)
    client = await registry(root=root, upstreams=[{"name": "hub", "url": "http://127.0.0.1:9", "dockerhub": True}],
                            private={"patterns": ["team/**"]})
    data = await ready(client)
    assert listed(data) == names and data["total"] == 120
    first = next(r for r in data["repositories"] if r["name"] == "team/app-00000")
    assert (first["kind"], first["upstream"], first["tags"], first["manifests"]) == ("private", None, 2, 1)
    cached = next(r for r in data["repositories"] if r["name"] == "library/img-00001")
    assert (cached["kind"], cached["upstream"]) == ("cached", "hub") and cached["size"] > 0

    r = await client.get("/ui/")
    html = await r.text()
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    assert '<meta name="viewport"' in html and "120 of 120 repositories" in html
    shown = re.findall(r'class="repo" href="/ui/repo/([^"]+)"', html)
    assert shown == names[:50] and "page 1 of 3" in html and 'rel="next"' in html
    html = await (await client.get("/ui/?page=3")).text()
    assert re.findall(r'class="repo" href="/ui/repo/([^"]+)"', html) == names[100:]
    assert 'rel="next"' not in html and 'rel="prev"' in html
    html = await (await client.get("/ui/?page=99&n=7")).text()  # past the end: the last page
    assert "page 18 of 18" in html

    html = await (await client.get("/ui/?q=APP-0001")).text()  # case-insensitive substring
    assert re.findall(r'class="repo" href="/ui/repo/([^"]+)"', html) == [n for n in names if "app-0001" in n]
    data = await (await client.get("/ui/api/repositories?kind=cached&n=500")).json()
    assert listed(data) == [n for n in names if n.startswith("library/")]
    data = await (await client.get("/ui/api/repositories?sort=size&n=3")).json()
    sizes = [r["size"] for r in data["repositories"]]
    assert sizes == sorted(sizes, reverse=True) and data["pages"] == 40
    assert (await client.get("/ui/?page=x")).status == 400


async def test_a_push_appears_and_a_pull_is_recorded(registry: Factory, tmp_path: Path) -> None:
    client = await registry()
    await ready(client)
    digest, _ = await push_image(client, "team/app", "v1")
    data = await ready(client, lambda d: "team/app" in listed(d))
    (repo,) = data["repositories"]
    assert repo["last_pulled"] is None and repo["tags"] == 1
    r = await client.get("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert r.status == 200
    data = await ready(client)
    assert data["repositories"][0]["last_pulled"] == pytest.approx(time.time(), abs=10)
    pulled = data["repositories"][0]["last_pulled"]
    html = await (await client.get("/ui/repo/team/app")).text()
    (row,) = rows(html, "tags")
    assert digest in row and "just now" in row
    # last pulled is written to the index with the batched access times: a restart keeps it
    await client.close()
    client = await registry(root=tmp_path / "data")
    data = await ready(client)
    assert data["repositories"][0]["last_pulled"] == pulled
    # a delete through the API: the row goes within a second
    client = await registry(root=tmp_path / "data", storage=deletes(tmp_path))
    assert (await client.delete(f"/v2/team/app/manifests/{digest}")).status == 202
    await ready(client, lambda d: d["repositories"] == [])


async def test_a_pull_through_shows_at_once_and_its_row_follows_its_blobs(mirror: MirrorFactory,
                                                                        upstream: Any) -> None:
    """A cached repository is on the list about half a second after its first manifest GET, its size
    follows each blob as it is committed (a slow 3 MiB layer here), and a second tag pulled into it
    counts at once too: the stores tell the list, no 45 s rebuild is waited for."""
    script, _ = upstream
    script.slow = 0.05  # per 64 KiB: the layer takes over two seconds to arrive
    _, layer = image(script)
    client = await mirror()
    await ready(client)
    r = await client.get("/v2/app/manifests/latest")
    assert r.status == 200
    size = len(await r.read())
    start = time.monotonic()
    data = await ready(client, lambda d: "library/app" in listed(d), seconds=2)
    assert time.monotonic() - start < 2 and data["repositories"][0]["size"] == size
    for d in (json.loads(script.manifests[("library/app", "latest")][0])["config"]["digest"], layer):
        r = await client.get(f"/v2/app/blobs/{d}")
        size += len(await r.read())
    await ready(client, lambda d: d["repositories"][0]["size"] == size, seconds=2)
    v2 = script.add_manifest("library/app", "v2", {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                                   "config": {"digest": layer, "size": 1}, "layers": []},
                             media_type=OCI_MANIFEST)
    assert (await client.get("/v2/app/manifests/v2")).status == 200
    data = await ready(client, lambda d: d["repositories"][0]["tags"] == 2, seconds=2)
    assert data["repositories"][0]["manifests"] == 2 and v2


async def test_a_stray_file_in_a_repository_does_not_stop_its_row(registry: Factory, tmp_path: Path) -> None:
    """A file under _layers that names no digest (a copy gone wrong, an editor's backup) is skipped when
    a push makes the list read the repository again: the row still appears, with the right size."""
    client = await registry()
    await ready(client)
    stray = tmp_path / "data" / layout.layers("team/app") / "sha256" / "not-a-digest~" / "link"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"")
    await push_image(client, "team/app", "v1")
    data = await ready(client, lambda d: "team/app" in listed(d))
    (repo,) = data["repositories"]
    assert repo["tags"] == 1 and repo["size"] > 0


async def test_nested_repositories_are_counted_apart(registry: Factory) -> None:
    client = await registry()
    await ready(client)
    await push_image(client, "team/app", "v1", seed=b"a")
    await push_image(client, "team/app/sub", "v1", seed=b"b")
    await push_image(client, "team/app/sub", "v2", seed=b"c")
    data = await ready(client, lambda d: {r["name"]: r["tags"] for r in d["repositories"]}
                       == {"team/app": 1, "team/app/sub": 2})
    by_name = {r["name"]: r for r in data["repositories"]}
    assert by_name["team/app"]["manifests"] == 1 and by_name["team/app/sub"]["manifests"] == 2
    assert by_name["team/app/sub"]["size"] > by_name["team/app"]["size"]


# --- a repository and a manifest ------------------------------------------------------------------

async def test_repository_and_manifest_pages(registry: Factory, tmp_path: Path) -> None:
    client = await registry(storage=deletes(tmp_path))
    config = json.dumps({"architecture": "arm64", "os": "linux", "created": "2024-05-01T12:30:00Z",
                         "config": {"Env": ["PATH=/usr/bin", "MODE=prod"], "Entrypoint": ["/app"], "Cmd": ["--serve"],
                                    "Labels": {"org.opencontainers.image.source": "https://example.invalid/app"}},
                         "history": [{"created_by": "COPY app /app"}]}).encode()
    layers = [b"a" * 3000, b"b" * 5000]
    for blob in (config, *layers):
        await upload(client, "team/app", blob)
    body = image_manifest(config, layers)
    assert (await client.put("/v2/team/app/manifests/v1", data=body, headers={"Content-Type": OCI_MANIFEST})).status \
        == 201
    digest = sha(body)
    # an SBOM-like artifact referring to it
    empty = b"{}"
    await upload(client, "team/app", empty)
    sbom = b'{"spdxVersion":"SPDX-2.3"}'
    await upload(client, "team/app", sbom)
    artifact = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(empty),
                                      "size": 2},
                           "layers": [{"mediaType": "application/spdx+json", "digest": sha(sbom), "size": len(sbom)}],
                           "subject": {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body)}}).encode()
    r = await client.put(f"/v2/team/app/manifests/{sha(artifact)}", data=artifact,
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201

    r = await client.get("/ui/repo/team/app", headers={"Host": "mirror.example:5000"})
    html = await r.text()
    assert r.status == 200
    (row,) = rows(html, "tags")
    assert f'href="/ui/repo/team/app/-/manifest/{digest}"' in row
    size = len(config) + sum(len(x) for x in layers)
    assert f"{size / 1024:.1f} KiB" in row and "2024-05-01 12:30:00 UTC" in row and "linux/arm64" in row
    assert "docker pull mirror.example:5000/team/app:v1" in row and 'class="delete button"' in row
    assert "Manifests without a tag" in html and sha(artifact) in html  # the artifact has no tag

    html = await (await client.get(f"/ui/repo/team/app/-/manifest/{digest}")).text()
    layer_rows = rows(html, "layers")
    assert [sha(x) in r for r, x in zip(layer_rows, layers, strict=True)] == [True, True]
    assert sha(config) in html and "MODE=prod" in html and "--serve" in html and "COPY app /app" in html
    assert "https://example.invalid/app" in html
    (ref,) = rows(html, "referrers")
    assert "application/spdx+json" in ref and sha(artifact) in ref
    html = await (await client.get(f"/ui/repo/team/app/-/manifest/{sha(artifact)}")).text()
    assert f'href="/ui/repo/team/app/-/manifest/{digest}"' in html  # its subject


async def test_multi_arch_index_lists_platforms(registry: Factory) -> None:
    client = await registry()
    children = []
    for arch in ("amd64", "arm64"):
        config = json.dumps({"architecture": arch, "os": "linux", "created": "2024-01-01T00:00:00Z"}).encode()
        layer = arch.encode() * 100
        await upload(client, "team/multi", config)
        await upload(client, "team/multi", layer)
        body = image_manifest(config, [layer])
        assert (await client.put(f"/v2/team/multi/manifests/{sha(body)}", data=body,
                                 headers={"Content-Type": OCI_MANIFEST})).status == 201
        children.append({"mediaType": OCI_MANIFEST, "digest": sha(body), "size": len(body),
                         "platform": {"os": "linux", "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": children}).encode()
    r = await client.put("/v2/team/multi/manifests/latest", data=index,
                         headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
    assert r.status == 201
    html = await (await client.get("/ui/repo/team/multi")).text()
    (row,) = rows(html, "tags")
    assert "linux/amd64, linux/arm64" in row and "2024-01-01 00:00:00 UTC" in row
    html = await (await client.get(f"/ui/repo/team/multi/-/manifest/{sha(index)}")).text()
    assert [str(c["digest"]) in r for r, c in zip(rows(html, "children"), children, strict=True)] == [True, True]


async def test_hostile_labels_annotations_and_host_are_escaped(registry: Factory) -> None:
    client = await registry()
    config = json.dumps({"os": "linux", "architecture": "amd64", "created": HOSTILE,
                         "config": {"Labels": {HOSTILE: HOSTILE}, "Env": [HOSTILE], "Cmd": [HOSTILE]},
                         "history": [{"created_by": HOSTILE}]}).encode()
    layer = b"x" * 100
    await upload(client, "team/evil", config)
    await upload(client, "team/evil", layer)
    body = image_manifest(config, [layer], annotations={"org.example": HOSTILE})
    assert (await client.put("/v2/team/evil/manifests/v1", data=body,
                             headers={"Content-Type": OCI_MANIFEST})).status == 201
    await ready(client, lambda d: "team/evil" in listed(d))
    pages = ["/ui/repo/team/evil", f"/ui/repo/team/evil/-/manifest/{sha(body)}", f"/ui/?q={HOSTILE}"]
    for path in pages:
        r = await client.get(path, headers={"Host": '"><script>alert(1)</script>'})
        html = await r.text()
        assert "<script>alert" not in html, path
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html or "&lt;script&gt;" in html


async def test_not_found_and_invalid(registry: Factory) -> None:
    client = await registry()
    await push_image(client, "team/app", "v1")
    missing = "sha256:" + "0" * 64
    for path, status in [("/ui/repo/team/nothing", 404), (f"/ui/repo/team/app/-/manifest/{missing}", 404),
                         ("/ui/repo/team/app/-/manifest/sha256:zz", 400), ("/ui/repo/Team/App", 400),
                         ("/ui/static/../../app.py", 404), ("/ui/static/nothing.css", 404), ("/ui/nothing", 404)]:
        r = await client.get(path)
        assert r.status == status, (path, r.status, await r.text())
    for query in ("tag=%3Cb%3Ex", f"tag={missing}", "tag=v1&digest=" + missing, ""):
        r = await client.get(f"/ui/repo/team/app/-/delete?{query}")
        assert r.status in (400, 405) and "<b>" not in await r.text(), query  # deletes are off here, too
    r = await client.get("/ui/repo/team/nothing")
    assert r.headers["Content-Type"].startswith("text/html") and "404" in await r.text()
    r = await client.get("/ui/static/ui.css")
    assert r.status == 200 and "max-width" in await r.text()
    r = await client.get("/ui", allow_redirects=False)
    assert r.status == 301 and r.headers["Location"] == "/ui/"


async def test_ui_can_be_turned_off(registry: Factory) -> None:
    client = await registry(ui={"enabled": False})
    r = await client.get("/ui/")
    assert r.status == 404 and (await r.json())["errors"][0]["code"] == "NOT_FOUND"


# --- delete ---------------------------------------------------------------------------------------

async def test_delete_needs_deletes_enabled(registry: Factory) -> None:
    client = await registry()
    await push_image(client, "team/app", "v1")
    html = await (await client.get("/ui/repo/team/app")).text()
    assert "delete" not in html.split("<main>", 1)[1].lower().replace("deleted", "")
    r = await client.get("/ui/repo/team/app/-/delete?tag=v1")
    assert r.status == 405 and "storage.delete.enabled" in await r.text()


async def test_delete_a_tag_and_a_manifest_with_csrf_checks(registry: Factory, tmp_path: Path) -> None:
    client = await registry(storage=deletes(tmp_path))
    digest, _ = await push_image(client, "team/app", "v1")
    assert (await client.put("/v2/team/app/manifests/v2", data=_, headers={"Content-Type": OCI_MANIFEST})).status == 201
    other, _ = await push_image(client, "team/app", "other", seed=b"o")
    html = await (await client.get("/ui/repo/team/app/-/delete?tag=v1")).text()
    form = delete_form(html)
    assert form["tag"] == "v1" and digest in html
    url = "/ui/repo/team/app/-/delete"
    origin = {"Origin": str(client.make_url("")).rstrip("/")}

    async def post(data: dict[str, str], headers: dict[str, str]) -> Any:
        return await client.post(url, data=data, headers=headers, allow_redirects=False)

    # another site's form: its Origin, or none at all, or a Referer elsewhere
    for headers in ({"Origin": "http://evil.example"}, {}, {"Referer": "http://evil.example/x"}, {"Origin": "null"}):
        r = await post({**form, "confirm": "yes"}, headers)
        assert r.status == 403 and "Origin" in await r.text(), headers
    r = await post({**form, "confirm": "yes", "token": "0" * 64}, origin)  # no token from the confirm page
    assert r.status == 403 and "token" in await r.text()
    r = await post({**form, "tag": "v2", "confirm": "yes"}, origin)  # v1's token does not delete v2
    assert r.status == 403
    r = await post(form, origin)  # the box not ticked
    assert r.status == 405
    for bad in ({"tag": "<b>x"}, {"tag": digest}, {"tag": "v1", "digest": digest}, {}):
        r = await post({"token": form["token"], "confirm": "yes", **bad}, origin)
        assert r.status in (400, 405) and "<b>" not in await r.text(), bad
    assert (await client.get("/v2/team/app/tags/list")).status == 200
    r = await post({**form, "confirm": "yes"}, {"Referer": f"{origin['Origin']}/ui/repo/team/app/-/delete?tag=v1"})
    assert r.status == 303 and r.headers["Location"] == "/ui/repo/team/app?deleted=team/app:v1"
    assert (await (await client.get("/v2/team/app/tags/list")).json())["tags"] == ["other", "v2"]
    # the manifest by digest: v2 points to it and goes with it
    html = await (await client.get(f"/ui/repo/team/app/-/delete?digest={digest}")).text()
    assert "v2" in html
    r = await post({**delete_form(html), "confirm": "yes"}, origin)
    assert r.status == 303
    assert (await (await client.get("/v2/team/app/tags/list")).json())["tags"] == ["other"]
    assert (await client.get(f"/v2/team/app/manifests/{digest}", headers={"Accept": OCI_MANIFEST})).status == 404
    assert other in await (await client.get("/ui/repo/team/app")).text()


async def test_replicas_with_one_http_secret_accept_each_others_delete_forms(registry: Factory,
                                                                            tmp_path: Path) -> None:
    one = await registry(storage=deletes(tmp_path), http={"secret": "shared-secret"})
    other = await registry(storage=deletes(tmp_path), http={"secret": "shared-secret"})
    third = await registry(storage=deletes(tmp_path))  # no secret: a key of its own
    await push_image(one, "team/app", "v1")
    await push_image(one, "team/app", "v2", seed=b"2")
    assert "shared-secret" not in repr(one.app[CONFIG])
    form = delete_form(await (await one.get("/ui/repo/team/app/-/delete?tag=v1")).text())
    for client, status in ((third, 403), (other, 303)):
        r = await client.post("/ui/repo/team/app/-/delete", data={**form, "confirm": "yes"}, allow_redirects=False,
                              headers={"Origin": str(client.make_url("")).rstrip("/")})
        assert r.status == status
    # `one` hears of the delete `other` made through the ledger's journal, within a poll
    deadline = time.monotonic() + 5
    while (await (await one.get("/v2/team/app/tags/list")).json())["tags"] != ["v2"]:
        assert time.monotonic() < deadline, "one never heard of other's delete"
        await asyncio.sleep(0.1)


# --- auth -----------------------------------------------------------------------------------------

USERS = {"alice": "alice-pw", "bob": "bob-pw"}


@pytest.fixture
async def auth_mirror(registry: Factory, upstream: tuple[ScriptedUpstream, TestServer], tmp_path: Path) -> TestClient:
    script, server = upstream
    image(script, "library/app")
    path = tmp_path / "htpasswd"
    path.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n" for u, p in USERS.items()))
    client: TestClient = await registry(
        upstreams=[{"name": "hub", "url": str(server.make_url("")), "dockerhub": True}],
        private={"patterns": ["team/**"]}, storage=deletes(tmp_path),
        auth={"htpasswd": {"realm": "ui-realm", "path": str(path)}},
        access={"anonymous_pull": True, "rules": [{"repositories": ["team/**"], "delete": ["alice"]},
                                                  {"repositories": ["library/**"], "delete": ["alice"]}]})
    alice = basic("alice", "alice-pw")
    for blob in (b'{"os":"linux"}', b"layer" * 100):
        r = await client.post(f"/v2/team/app/blobs/uploads/?digest={sha(blob)}", data=blob, headers=alice)
        assert r.status == 201
    body = image_manifest(b'{"os":"linux"}', [b"layer" * 100])
    r = await client.put("/v2/team/app/manifests/v1", data=body, headers={**alice, "Content-Type": OCI_MANIFEST})
    assert r.status == 201
    assert (await client.get("/v2/app/manifests/latest")).status == 200  # anonymous pull-through
    await ready(client)
    return client


async def test_anonymous_sees_cached_only_and_no_delete_buttons(auth_mirror: TestClient) -> None:
    client = auth_mirror
    alice = basic("alice", "alice-pw")
    # The push and the pull are read into the list one after the other: wait for both rows.
    for _ in range(200):
        data = await (await client.get("/ui/api/repositories", headers=alice)).json()
        if listed(data) == ["library/app", "team/app"]:
            break
        await asyncio.sleep(0.05)
    assert listed(data) == ["library/app", "team/app"]
    data = await ready(client, lambda d: "library/app" in listed(d))
    assert listed(data) == ["library/app"]  # anonymous: cached content only (anonymous_pull)
    html = await (await client.get("/ui/repo/library/app")).text()
    assert "Log in" in html and 'class="delete' not in html and "docker pull" in html
    r = await client.get("/ui/repo/team/app")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="ui-realm"'
    assert (await client.get("/ui/repo/library/app/-/delete?tag=latest")).status == 401
    r = await client.get("/ui/login", allow_redirects=False)
    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="ui-realm"'
    r = await client.get("/ui/login", headers=alice, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/"
    r = await client.get("/ui/", headers=basic("alice", "wrong"))
    assert r.status == 401


async def test_only_users_the_rules_allow_may_delete(auth_mirror: TestClient) -> None:
    client = auth_mirror
    alice, bob = basic("alice", "alice-pw"), basic("bob", "bob-pw")
    html = await (await client.get("/ui/repo/team/app", headers=bob)).text()
    assert "signed in as <strong>bob</strong>" in html and 'class="delete' not in html
    assert (await client.get("/ui/repo/team/app/-/delete?tag=v1", headers=bob)).status == 403
    html = await (await client.get("/ui/repo/team/app", headers=alice)).text()
    assert 'class="delete button"' in html
    form = delete_form(await (await client.get("/ui/repo/team/app/-/delete?tag=v1", headers=alice)).text())
    origin = {"Origin": str(client.make_url("")).rstrip("/")}
    # alice's token in bob's hands: bob may not delete, and the token is alice's
    r = await client.post("/ui/repo/team/app/-/delete", data={**form, "confirm": "yes"}, headers={**bob, **origin},
                          allow_redirects=False)
    assert r.status == 403
    r = await client.post("/ui/repo/team/app/-/delete", data={**form, "confirm": "yes"},
                          headers={**alice, **origin}, allow_redirects=False)
    assert r.status == 303
    r = await client.get("/v2/team/app/tags/list", headers=alice)
    assert (await r.json())["tags"] == []


async def test_token_auth_login_asks_the_realm_as_docker_login_does(registry: Factory, tmp_path: Path) -> None:
    """With token auth the browser logs in with a username and password (Basic, as with htpasswd); the
    mirror asks the realm for a token with them, as `docker login` does, and shows what it grants:
    alice may list and delete, bob may only pull team/app-00000; wrong passwords and a realm that
    hands out tokens for someone else log nobody in."""
    pki = make_pki()
    asked: list[tuple[str | None, list[str]]] = []
    users = {"alice": "alice-pw", "bob": "bob-pw", "mallory": "mallory-pw"}

    async def realm(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        user, _, password = base64.b64decode(header[6:]).decode().partition(":") if header[:6] == "Basic " else \
            ("", "", "")
        asked.append((request.query.get("account"), request.query.getall("scope", [])))
        if users.get(user) != password or request.query.get("service") != SERVICE:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        access = []
        for scope in request.query.getall("scope", []):
            kind, name, actions = scope.split(":")
            if kind == "registry" and user == "alice":
                access.append({"type": "registry", "name": "catalog", "actions": ["*"]})
            elif kind == "repository":
                access.append(repo(name, *(actions.split(",") if user == "alice" else ["pull"])))
        return web.json_response({"token": mint(pki.root, access, sub="alice" if user == "mallory" else user)})

    app = web.Application()
    app.router.add_get("/token", realm)
    server = TestServer(app)
    await server.start_server()
    try:
        seed_repositories(tmp_path / "data", 2)  # team/app-00000 (private), library/img-00001
        client = await registry(storage=deletes(tmp_path), auth={"token": {
            "realm": str(server.make_url("/token")), "service": SERVICE, "issuer": ISSUER,
            "rootcertbundle": str(pki.bundle(tmp_path / "b.pem"))}})
        assert 'id="login"' in await (await client.get("/ui/")).text()
        r = await client.get("/ui/login", allow_redirects=False)
        assert r.status == 401 and r.headers["WWW-Authenticate"] == f'Basic realm="{SERVICE}"'
        for who in (basic("alice", "wrong"), basic("mallory", "mallory-pw")):
            r = await client.get("/ui/", headers=who)
            assert r.status == 401 and r.headers["WWW-Authenticate"] == f'Basic realm="{SERVICE}"'
        alice, bob = basic("alice", "alice-pw"), basic("bob", "bob-pw")
        r = await client.get("/ui/login", headers=alice, allow_redirects=False)
        assert r.status == 303
        asked.clear()
        data = await ready(client)
        assert listed(data) == []  # anonymous: the private repository is not listed
        data = await (await client.get("/ui/api/repositories", headers=alice)).json()
        assert listed(data) == ["library/img-00001", "team/app-00000"]  # the token lists the catalog
        html = await (await client.get("/ui/repo/team/app-00000", headers=alice)).text()
        assert "signed in as <strong>alice</strong>" in html and 'class="delete' in html
        assert (await client.get("/ui/repo/team/app-00000", headers=alice)).status == 200
        assert asked == [("alice", ["repository:team/app-00000:pull,delete"])]  # the login's token was remembered
        html = await (await client.get("/ui/repo/team/app-00000", headers=bob)).text()
        assert "signed in as <strong>bob</strong>" in html and 'class="delete' not in html  # pull only
        assert (await client.get("/ui/repo/team/app-00000/-/delete?tag=v0", headers=bob)).status == 403
        assert listed(await (await client.get("/ui/api/repositories", headers=bob)).json()) == []  # no catalog
        assert (await client.get("/v2/_catalog", headers=alice)).status == 401  # the API still wants a Bearer token
    finally:
        await server.close()


# --- overview -------------------------------------------------------------------------------------

async def test_overview_shows_the_numbers_of_metrics(upstream: tuple[ScriptedUpstream, TestServer],
                                                     mirror: MirrorFactory) -> None:
    script, _ = upstream
    _, blob = image(script)
    client = await mirror()
    for _ in range(3):
        for path in ("/v2/app/manifests/latest", f"/v2/app/blobs/{blob}"):
            r = await client.get(path)
            assert r.status == 200
            await r.read()  # the request is counted when its handler is done
    data = await (await client.get("/ui/api/overview")).json()
    s = await scrape(client)
    for kind in ("manifest", "blob"):
        for result in ("hit", "miss", "revalidated", "stale", "private"):
            assert data["cache"][kind][result] == s["mirror_cache_requests_total" + labels(kind=kind, result=result)]
        for source in ("cache", "upstream"):
            assert data["served_bytes"][kind][source] == \
                s["mirror_served_bytes_total" + labels(kind=kind, source=source)]
    assert data["cache"]["blob"]["hit_ratio"] == pytest.approx(2 / 3)
    assert data["storage"]["bytes"] == s["mirror_storage_bytes" + labels(backend="filesystem")]
    hub = data["upstreams"]["hub"]
    assert hub["requests"]["2xx"] == sum(v for k, v in s.items()
                                         if k.startswith("mirror_upstream_requests_total") and 'status="2xx"' in k)
    assert hub["ratelimit_remaining"] is None and hub["backoff_seconds"] == 0 and hub["healthy"]
    html = await (await client.get("/ui/overview")).text()
    assert "66.7 %" in html and "unknown (no rate-limit headers seen)" in html


async def test_overview_shows_rate_limit_headroom_and_back_off(upstream: tuple[ScriptedUpstream, TestServer],
                                                               mirror: MirrorFactory) -> None:
    script, _ = upstream
    image(script)
    script.headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"}
    client = await mirror()
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    data = await (await client.get("/ui/api/overview")).json()
    hub = data["upstreams"]["hub"]
    assert (hub["ratelimit_limit"], hub["ratelimit_remaining"], hub["ratelimit_share"]) == (100, 76, 0.76)
    html = await (await client.get("/ui/overview")).text()
    assert "76 of 100 (76.0 %)" in html and '<span class="badge ok">ok</span>' in html
    # a 429 with Retry-After: the upstream is backed off, the same seconds as the gauge says
    script.status, script.retry_after = 429, "120"
    assert (await client.get("/v2/app/manifests/other")).status == 429
    data = await (await client.get("/ui/api/overview")).json()
    s = await scrape(client)
    hub = data["upstreams"]["hub"]
    assert not hub["healthy"] and 100 < hub["backoff_seconds"] <= 120
    assert s["mirror_upstream_backoff_seconds" + labels(upstream="hub")] == pytest.approx(hub["backoff_seconds"], abs=2)
    assert hub["errors"]["429"] == s["mirror_upstream_errors_total" + labels(reason="429", upstream="hub")] >= 1
    html = await (await client.get("/ui/overview")).text()
    assert re.search(r'class="badge bad">backing off 1[01]\d s<', html)

