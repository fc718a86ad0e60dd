"""registry/namespace.py: every spelling of a name resolves to one storage name, and what that name is
(private or proxied) is decided there, on the storage name, with what storage says of it."""

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from mirror.config import parse
from mirror.errors import RegistryError
from mirror.names import parse_digest
from mirror.registry import namespace
from mirror.registry.namespace import NameNowPrivate, Namespace, Upstream, local_prefix
from mirror.registry.upstream import UpstreamClient
from mirror.storage import layout
from mirror.storage.filesystem import FilesystemStorage

Make = Callable[..., Namespace]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    async with aiohttp.ClientSession() as session:
        def build(raw: dict[str, object] | None = None, root: Path | None = None) -> Namespace:
            config = parse(raw or {"upstreams": [
                {"name": "hub", "url": "https://registry-1.docker.io", "hosts": ["docker.io"],
                 "prefixes": ["docker.io"]},
                {"name": "quay", "url": "https://quay.io", "hosts": ["quay.io"], "prefixes": ["quay.io"]},
                {"name": "ghcr", "url": "https://ghcr.io", "hosts": ["ghcr.io"]},
            ], "private": {"patterns": ["team/**"]}})
            ups = [Upstream(u, UpstreamClient(u, session), local_prefix(u, i == 0))
                   for i, u in enumerate(config.upstreams)]
            return Namespace(ups, config.private, FilesystemStorage(root or tmp_path))

        yield build


async def test_default_upstream_and_library_normalisation(make: Make) -> None:
    ns = make()
    r = await ns.resolve("alpine", None)
    assert (r.proxy.config.name, r.remote, r.local) == ("hub", "library/alpine", "library/alpine")
    r = await ns.resolve("user/app", None)
    assert (r.remote, r.local) == ("user/app", "user/app")


async def test_ns_and_prefixes_route_to_one_storage_name(make: Make) -> None:
    ns = make()
    for name, q in (("library/alpine", "docker.io"), ("alpine", "docker.io"), ("docker.io/alpine", None),
                    ("docker.io/library/alpine", None), ("library/alpine", None)):
        r = await ns.resolve(name, q)
        assert (r.proxy.config.name, r.remote, r.local) == ("hub", "library/alpine", "library/alpine"), (name, q)
    by_ns, by_prefix = await ns.resolve("org/app", "quay.io"), await ns.resolve("quay.io/org/app", None)
    assert by_ns == by_prefix and by_prefix.local == "quay.io/org/app" and by_prefix.remote == "org/app"
    r = await ns.resolve("owner/app", "ghcr.io")
    assert (r.proxy.config.name, r.local) == ("ghcr", "ghcr/owner/app")  # no prefix: the upstream's name


async def test_every_spelling_of_a_private_name_is_that_private_repository(make: Make) -> None:
    ns = make()
    for name, q in (("team/app", None), ("docker.io/team/app", None), ("team/app", "docker.io")):
        r = await ns.resolve(name, q)
        assert r.private and r.local == "team/app", (name, q)
    r = await ns.resolve("team/app", "quay.io")  # another upstream's team/app is another repository
    assert not r.private and r.local == "quay.io/team/app"


async def test_unknown_ns_is_a_clear_error(make: Make) -> None:
    with pytest.raises(RegistryError) as e:
        await make().resolve("x/y", "registry.example.com")
    assert e.value.code == "NAME_UNKNOWN" and "ns=registry.example.com" in e.value.message


async def test_proxy_section_takes_any_ns(make: Make) -> None:
    ns = make({"proxy": {"remoteurl": "http://127.0.0.1:1"}})
    assert (await ns.resolve("a/b", "whatever.io")).local == "a/b"
    assert (await ns.resolve("alpine", None)).remote == "alpine"  # not Docker Hub: no library/


async def test_markers_decide_and_content_without_one_is_private(make: Make, tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path)
    await storage.put_bytes(layout.marker("a/claimed", layout.PRIVATE_MARK), b"")
    await storage.put_bytes(layout.marker("a/cache", layout.CACHED_MARK), b"")
    await storage.put_bytes(f"{layout.layers('a/adopted')}/sha256/{'a' * 64}", b"")  # e.g. registry:2's
    ns = make()
    assert (await ns.resolve("a/claimed", None)).private
    assert not (await ns.resolve("a/cache", None)).private
    assert (await ns.resolve("a/adopted", None)).private
    assert await storage.stat(layout.marker("a/adopted", layout.PRIVATE_MARK)) is not None  # said so, once
    assert not (await ns.resolve("a/unknown", None)).private


async def test_a_fill_elsewhere_between_two_looks_is_not_taken_for_unmarked_content(make: Make,
                                                                                      tmp_path: Path) -> None:
    """Replica A reads no mark, then another replica fills the name (its mark first, then content), then A
    finds content: that is a cache being filled, not content this mirror never marked. Seen on OSS with
    three replicas: A adopted the name as private and 404'd its manifests for good."""
    digest = parse_digest("sha256:" + "b" * 64)

    class FillBetween(FilesystemStorage):
        filled = False

        async def list(self, prefix: str) -> list[str]:
            found = await super().list(prefix)
            if prefix == layout.markers("race/app") and not self.filled:
                self.filled = True
                await self.put_bytes(layout.marker("race/app", layout.CACHED_MARK), b"")
                await self.put_bytes(layout.layer("race/app", digest), layout.link(digest))
            return found

    a = make(root=tmp_path)
    a.storage = FillBetween(tmp_path)
    route = await a.resolve("race/app", None)
    assert not route.private
    assert await a.storage.stat(layout.marker("race/app", layout.PRIVATE_MARK)) is None


def test_classify_is_the_rule_every_reader_shares() -> None:
    c = namespace.classify
    assert c(True, set(), False) == c(False, {"private"}, True) == c(False, {"private", "cached"}, True) == "private"
    assert c(False, {"cached"}, True) == "cached" and c(False, set(), True) == "private"
    assert c(False, set(), False) == "open"


async def test_a_claim_elsewhere_is_learned_before_serving(make: Make, tmp_path: Path) -> None:
    """Replica B took a name as unmarked; replica A claims it. B vouches for what it reads from storage
    (NameNowPrivate), and forgets the unmarked name within OPEN_SECONDS anyway."""
    b = make(root=tmp_path)
    route = await b.resolve("someone/app", None)
    assert not route.private and not route.marked
    storage = FilesystemStorage(tmp_path)
    await storage.put_bytes(layout.marker("someone/app", layout.PRIVATE_MARK), b"")
    with pytest.raises(NameNowPrivate):
        await b.vouch(route)
    assert (await b.resolve("someone/app", None)).private


async def test_fill_and_claim_racing_never_both_win(make: Make, tmp_path: Path) -> None:
    a, b = make(root=tmp_path), make(root=tmp_path)
    route = await b.resolve("race/app", None)
    storage = FilesystemStorage(tmp_path)
    await storage.put_bytes(layout.marker("race/app", layout.PRIVATE_MARK), b"")  # A's claim lands first
    with pytest.raises(RegistryError) as e:
        await b.filling(route)
    assert e.value.code == "UNAVAILABLE"
    assert await storage.stat(layout.marker("race/app", layout.CACHED_MARK)) is None
    assert (await a.resolve("race/app", None)).private

    route = await b.resolve("other/app", None)
    await b.filling(route)  # B fills first: the name is a cache for good
    with pytest.raises(RegistryError) as e:
        await a.resolve_for_push("other/app", None)
    assert e.value.code == "DENIED" and "pulled through" in e.value.message


async def test_pushes_never_write_under_a_proxied_spelling(make: Make) -> None:
    ns = make({"upstreams": [{"name": "hub", "url": "https://registry-1.docker.io", "hosts": ["docker.io"],
                              "prefixes": ["docker.io"]}], "private": {"claim_on_push": "true"}})
    for name, q in (("docker.io/x/app", None), ("x/app", "docker.io")):
        with pytest.raises(RegistryError) as e:
            await ns.resolve_for_push(name, q)
        assert e.value.code == "DENIED", (name, q)


async def test_claim_modes(make: Make, tmp_path: Path) -> None:
    upstreams = [{"name": "hub", "url": "https://registry-1.docker.io", "hosts": ["docker.io"],
                  "prefixes": ["docker.io"]}]
    never = make({"upstreams": upstreams, "private": {"claim_on_push": False}}, root=tmp_path / "never")
    with pytest.raises(RegistryError) as e:
        await never.resolve_for_push("nginx", None)
    assert e.value.code == "DENIED" and "private.patterns" in e.value.message
    # auto, Docker Hub: a one-component name is never asked for by registry-mirrors clients (they ask
    # for library/<name>), so it is claimable without asking the upstream
    auto = make({"upstreams": upstreams}, root=tmp_path / "auto")
    assert (await auto.resolve_for_push("nginx", None)).private
    assert (await auto.resolve("nginx", None)).private  # the short name is now this private repository
    r = await auto.resolve("library/nginx", None)  # and library/nginx is still the upstream's
    assert not r.private and r.remote == "library/nginx"
