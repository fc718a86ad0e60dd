"""No spelling of a name crosses between private and proxied: the adversarial matrix, as data.

The world: a Docker Hub-shaped default upstream `hub` (?ns=docker.io, prefix docker.io) that serves
library/busybox and, to shadow the private one, its own team/app; a second upstream `quay` (?ns=quay.io,
prefix quay.io) with its own team/app; a private team/app (private.patterns) pushed by alice; a
name, claimed/app, claimed by a push on replica A; and nobody/app, which nothing has. Replica B (a
second server on the same storage, which has never seen these names) answers the reads. htpasswd
users alice (may pull, push and delete team/** and claimed/**) and bob (may not), anonymous callers
may pull cached content (access.anonymous_pull).

Each cell: a state, a spelling of its name, a caller, an operation, and what must come back (the
status, and for a 200 the very digest or bytes of the repository the spelling must reach). After
the reads and the refused writes, storage is checked for anything written where it must not be.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
from aiohttp.test_utils import TestClient, TestServer

from mirror.storage import layout
from tests.scripted_upstream import ScriptedUpstream

OCI = "application/vnd.oci.image.manifest.v1+json"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
CALLERS = {"anonymous": {}, **{u: {"Authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}
                               for u, p in USERS.items()}}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    """One image's manifest digest, its layer, and the tag it carries."""

    tag: str
    config: bytes
    layer: bytes
    body: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(self.config),
                       "size": len(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(self.layer),
                        "size": len(self.layer)}]}).encode()

    @property
    def digest(self) -> str:
        return sha(self.body)


def image(tag: str, seed: str) -> Image:
    return Image(tag, json.dumps({"os": "linux", "seed": seed}).encode(), f"layer of {seed} ".encode() * 300)


# What each name holds, wherever it holds it.
P = image("v1", "private team/app, pushed by alice")
C = image("v1", "claimed/app, pushed on replica A")
U = image("latest", "hub's library/busybox")
SHADOW = image("v1", "hub's own team/app: must never reach a client asking for the private one")
Q = image("v1", "quay's team/app")
NOWHERE = image("v1", "what no repository holds, here or upstream")
GONE = image("gone", "a tag of team/app alice deletes later")
TAGS = {id(P): ["gone", "v1"]}  # what tags/list answers where it is not just the image's tag

# state -> [(spelling, name in the URL, ?ns=, what it must reach: an image, or None for nothing)]
SPELLINGS: dict[str, list[tuple[str, str, str | None, Image | None]]] = {
    "private": [
        ("plain", "team/app", None, P),
        ("docker.io/ prefix", "docker.io/team/app", None, P),
        ("?ns=docker.io", "team/app", "docker.io", P),
        ("?ns=quay.io (another upstream)", "team/app", "quay.io", Q),
        ("quay.io/ prefix (another upstream)", "quay.io/team/app", None, Q),
    ],
    "proxied": [
        ("plain library/x", "library/busybox", None, U),
        ("short x", "busybox", None, U),
        ("docker.io/ prefix, short", "docker.io/busybox", None, U),
        ("docker.io/ prefix", "docker.io/library/busybox", None, U),
        ("?ns=docker.io", "library/busybox", "docker.io", U),
        ("?ns=docker.io, short", "busybox", "docker.io", U),
        ("?ns=quay.io (another upstream)", "library/busybox", "quay.io", None),
        ("quay.io/ prefix (another upstream)", "quay.io/library/busybox", None, None),
    ],
    "claimed on another replica": [
        ("plain", "claimed/app", None, C),
        ("docker.io/ prefix", "docker.io/claimed/app", None, C),
        ("?ns=docker.io", "claimed/app", "docker.io", C),
        ("?ns=quay.io (another upstream)", "claimed/app", "quay.io", None),
        ("quay.io/ prefix (another upstream)", "quay.io/claimed/app", None, None),
    ],
    "unknown": [
        ("plain", "nobody/app", None, None),
        ("docker.io/ prefix", "docker.io/nobody/app", None, None),
        ("?ns=docker.io", "nobody/app", "docker.io", None),
        ("?ns=quay.io (another upstream)", "nobody/app", "quay.io", None),
        ("quay.io/ prefix (another upstream)", "quay.io/nobody/app", None, None),
    ],
}
PRIVATE_IMAGES = (P, C)

# What a caller gets from the repository a spelling reaches, for a manifest (by tag and by digest), a
# blob and tags/list: private content only for alice (anonymous callers are asked to log in, bob is
# refused); cached content for everyone (anonymous_pull); nothing is 404 for everyone.
ANSWERS: dict[str, dict[str, int]] = {
    "private": {"anonymous": 401, "alice": 200, "bob": 403},
    "proxied": {"anonymous": 200, "alice": 200, "bob": 200},
    "nothing": {"anonymous": 404, "alice": 404, "bob": 404},
}

# The catalog each caller sees (it needs a user, as registry:2's), and the status of each storage
# name's UI page.
CATALOG: dict[str, tuple[int, list[str] | None]] = {
    "anonymous": (401, None),
    "alice": (200, ["claimed/app", "library/busybox", "quay.io/team/app", "team/app"]),
    "bob": (200, ["library/busybox", "quay.io/team/app"]),
}
UI_PAGES = {
    "team/app": {"anonymous": 401, "alice": 200, "bob": 403},
    "claimed/app": {"anonymous": 401, "alice": 200, "bob": 403},
    "library/busybox": {"anonymous": 200, "alice": 200, "bob": 200},
    "nobody/app": {"anonymous": 404, "alice": 404, "bob": 404},
}

# Writes, in this order (each may change what the next finds): (name, ?ns=, caller, status of a
# POST .../blobs/uploads/, what storage must hold for the name afterwards).
PUSHES: list[tuple[str, str | None, str, int, str]] = [
    ("team/app", None, "anonymous", 401, "private"),
    ("team/app", None, "bob", 403, "private"),
    ("team/app", None, "alice", 202, "private"),
    ("docker.io/team/app", None, "alice", 403, "-"),  # a proxied spelling: nothing is written anywhere
    ("team/app", "docker.io", "alice", 403, "private"),
    ("team/app", "quay.io", "alice", 403, "private"),  # team/app as it was; quay.io/team/app untouched
    ("quay.io/team/app", None, "alice", 403, "cached"),  # quay's, cached by the reads: stays a cache
    ("library/busybox", None, "anonymous", 401, "cached"),
    ("library/busybox", None, "alice", 403, "cached"),  # the upstream serves it, and it holds its content
    ("library/busybox", "docker.io", "alice", 403, "cached"),
    ("docker.io/busybox", None, "alice", 403, "-"),
    ("claimed/app", None, "bob", 403, "private"),
    ("claimed/app", None, "alice", 202, "private"),
    ("docker.io/claimed/app", None, "alice", 403, "-"),
    ("nobody/app", None, "anonymous", 401, "-"),
    ("nobody/app", "docker.io", "alice", 403, "-"),
    ("busybox", None, "bob", 202, "private"),  # `busybox` is not library/busybox: claimable, and now bob's
    ("nobody/app", None, "alice", 202, "private"),  # the upstream does not have it: claimable
]
# Mounts of each image's layer into alice's team/dest, from every spelling of its name: mounted (201)
# only from what alice may pull and the source holds; otherwise a plain upload session (202).
MOUNTS: list[tuple[str, str, int]] = [
    ("team/app", sha(P.layer), 201),
    ("docker.io/team/app", sha(P.layer), 201),
    ("team/app", sha(SHADOW.layer), 202),  # the shadow's layer is not in the private repository
    ("library/busybox", sha(U.layer), 201),
    ("busybox", sha(U.layer), 202),  # bob's claimed busybox now, which alice may not pull and which is empty
    ("claimed/app", sha(C.layer), 201),
    ("nobody/app", sha(C.layer), 202),
]
# Deletes of a tag (deletes are enabled): only alice, only in private repositories.
DELETES: list[tuple[str, str, str, int]] = [
    ("team/app", "gone", "anonymous", 401),
    ("team/app", "gone", "bob", 403),
    ("docker.io/team/app", "gone", "alice", 202),  # the private repository, by another spelling
    ("library/busybox", "latest", "alice", 403),  # a cache's content goes by eviction only
    ("library/busybox", "latest", "anonymous", 401),
]


def htpasswd(tmp_path: Path) -> str:
    path = tmp_path / "htpasswd"
    path.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
                            for u, p in USERS.items()))
    return str(path)


async def push(client: TestClient, name: str, img: Image, caller: str = "alice") -> None:
    auth = CALLERS[caller]
    for data in (img.config, img.layer):
        r = await client.post(f"/v2/{name}/blobs/uploads/?digest={sha(data)}", data=data, headers=auth)
        assert r.status == 201, (name, r.status, await r.text())
    r = await client.put(f"/v2/{name}/manifests/{img.tag}", data=img.body, headers={**auth, "Content-Type": OCI})
    assert r.status == 201, (name, r.status, await r.text())


def serve(script: ScriptedUpstream, repo: str, img: Image) -> None:
    script.add_blob(img.config)
    script.add_blob(img.layer)
    script.add_manifest(repo, img.tag, img.body, media_type=OCI)


def storage_keys(root: Path) -> set[str]:
    """The registry's objects (not local state, nor the replicas' journal and heartbeats)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "_index" not in p.parts
            and "_staging" not in p.parts and p.relative_to(root).parts[0] != layout.MIRROR}


async def test_no_spelling_crosses_between_private_and_proxied(
        registry: Callable[..., Any], upstream: tuple[ScriptedUpstream, TestServer], tmp_path: Path) -> None:
    hub, hub_server = upstream
    quay = ScriptedUpstream()
    quay_server = TestServer(quay.app())
    await quay_server.start_server()
    serve(hub, "library/busybox", U)
    serve(hub, "team/app", SHADOW)
    serve(quay, "team/app", Q)
    root = tmp_path / "data"
    settings = {
        "upstreams": [
            {"name": "hub", "url": str(hub_server.make_url("")), "hosts": ["docker.io"], "prefixes": ["docker.io"],
             "dockerhub": True},
            {"name": "quay", "url": str(quay_server.make_url("")), "hosts": ["quay.io"], "prefixes": ["quay.io"]},
        ],
        "private": {"patterns": ["team/**"]},
        "storage": {"delete": {"enabled": True}},
        "auth": {"htpasswd": {"realm": "r", "path": htpasswd(tmp_path)}},
        "access": {"anonymous_pull": True, "rules": [
            {"repositories": ["team/**", "claimed/**"], "pull": ["alice"], "push": ["alice"], "delete": ["alice"]},
        ]},
    }
    try:
        a = await registry(root=root, **settings)
        await push(a, "team/app", P)
        await push(a, "team/app", GONE)
        await push(a, "claimed/app", C)  # claim_on_push auto: the upstream does not have claimed/app
        b = await registry(root=root, **settings)  # replica B: has never seen any of these names

        failures: list[str] = []
        cells = 0
        for state, spellings in SPELLINGS.items():
            for spelling, name, ns, target in spellings:
                kind = "nothing" if target is None else "private" if target in PRIVATE_IMAGES else "proxied"
                query = f"?ns={ns}" if ns else ""
                for caller, auth in CALLERS.items():
                    want = ANSWERS[kind][caller]
                    img = target or NOWHERE
                    for op, path in (("manifest by tag", f"manifests/{img.tag}"),
                                     ("manifest by digest", f"manifests/{img.digest}"),
                                     ("blob", f"blobs/{sha(img.layer)}"), ("tags/list", "tags/list")):
                        cells += 1
                        r = await b.get(f"/v2/{name}/{path}{query}", headers={**auth, "Accept": OCI})
                        body = await r.read()
                        where = f"{state} / {spelling} / {caller} / {op}"
                        if r.status != want:
                            failures.append(f"{where}: {r.status}, want {want}: {body[:120]!r}")
                        elif want == 200 and op.startswith("manifest") and body != img.body:
                            failures.append(f"{where}: another repository's manifest {sha(body)}")
                        elif want == 200 and op == "blob" and body != img.layer:
                            failures.append(f"{where}: another repository's blob")
                        elif want == 200 and op == "tags/list" and \
                                json.loads(body)["tags"] != TAGS.get(id(img), [img.tag]):
                            failures.append(f"{where}: tags {json.loads(body)['tags']}")
                    if target in PRIVATE_IMAGES and caller == "alice":
                        # the shadow's digest through a private spelling: never the upstream's content
                        cells += 1
                        r = await b.get(f"/v2/{name}/manifests/{SHADOW.digest}{query}", headers=auth)
                        if r.status != 404:
                            failures.append(f"{state} / {spelling} / shadow digest: {r.status}")
        for caller, auth in CALLERS.items():
            cells += 1
            r = await b.get("/v2/_catalog", headers=auth)
            listed = (await r.json()).get("repositories")
            if (r.status, listed) != CATALOG[caller]:
                failures.append(f"catalog / {caller}: {r.status} {listed}")
            for page, wants in UI_PAGES.items():
                cells += 1
                r = await b.get(f"/ui/repo/{page}", headers=auth)
                if r.status != wants[caller]:
                    failures.append(f"ui /ui/repo/{page} / {caller}: {r.status}, want {wants[caller]}")
        assert not failures, f"{len(failures)} of {cells} read cells:\n" + "\n".join(failures)
        # The shadowing upstream was never asked for the private names; for claimed/app only once, by the
        # claim on A (does the upstream serve it?), before anything was pushed to it.
        asked = {k: n for k, n in hub.calls.items() if "/team/app/" in k or "/claimed/app/" in k}
        assert asked == {"GET /v2/claimed/app/tags/list": 1}, asked

        before = storage_keys(root)
        for name, ns, caller, want, holds in PUSHES:
            query = f"?ns={ns}" if ns else ""
            r = await b.post(f"/v2/{name}/blobs/uploads/{query}", headers=CALLERS[caller])
            cells += 1
            if r.status != want:
                failures.append(f"push {name}{query} / {caller}: {r.status}, want {want}: {await r.text()}")
            if r.status == 202:
                assert (await b.delete(r.headers["Location"], headers=CALLERS[caller])).status == 204
            marks = {m.name for m in (root / layout.markers(name)).glob("*")}
            if holds == "-" and (root / layout.repository(name)).exists():
                failures.append(f"push {name}{query} / {caller}: wrote under {name}")
            elif holds != "-" and marks != {holds}:
                failures.append(f"push {name}{query} / {caller}: markers {marks}, want {holds}")
        await push(b, "team/dest", image("v1", "alice's destination"))
        for source, digest, want in MOUNTS:
            cells += 1
            r = await b.post(f"/v2/team/dest/blobs/uploads/?mount={digest}&from={source}", headers=CALLERS["alice"])
            if r.status != want:
                failures.append(f"mount from {source}: {r.status}, want {want}")
        for name, tag, caller, want in DELETES:
            cells += 1
            r = await b.delete(f"/v2/{name}/manifests/{tag}", headers=CALLERS[caller])
            if r.status != want:
                failures.append(f"delete {name}:{tag} / {caller}: {r.status}, want {want}")
        assert not failures, f"{len(failures)} of {cells} cells:\n" + "\n".join(failures)

        # Nothing written where it must not be: the refused writes left no file; what changed is the
        # claims, the mounts into team/dest and its push, and the one tag deleted.
        changed = storage_keys(root) ^ before
        allowed = ("team/dest", "busybox/_mirror", "nobody/app/_mirror", "team/app/_manifests/tags/gone")
        stray = [k for k in changed if not any(f"{layout.REPOSITORIES}/{a}" in k for a in allowed)
                 and not k.startswith(layout.BLOBS)]
        assert not stray, stray
        assert (root / layout.tag("team/app", "v1")).read_text() == P.digest
        assert not (root / layout.repository("docker.io")).exists()
        assert not (root / layout.marker("library/busybox", layout.PRIVATE_MARK)).exists()
        assert not (root / layout.marker("team/app", layout.CACHED_MARK)).exists()
        assert cells > 300, cells
    finally:
        await quay_server.close()
