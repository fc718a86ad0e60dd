from collections.abc import AsyncIterator

import aiohttp
import pytest

from mirror.config import parse
from mirror.errors import RegistryError
from mirror.registry.namespace import Router, Upstream, local_prefix
from mirror.registry.upstream import UpstreamClient


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    config = parse({"upstreams": [
        {"name": "hub", "url": "https://registry-1.docker.io", "hosts": ["docker.io"], "prefixes": ["docker.io"]},
        {"name": "quay", "url": "https://quay.io", "hosts": ["quay.io"], "prefixes": ["quay.io"]},
        {"name": "ghcr", "url": "https://ghcr.io", "hosts": ["ghcr.io"]},
    ]})
    async with aiohttp.ClientSession() as session:
        yield Router([Upstream(u, UpstreamClient(u, session), local_prefix(u, i == 0))
                      for i, u in enumerate(config.upstreams)])


def test_default_upstream_and_library_normalisation(router: Router) -> None:
    r = router.route("alpine", None)
    assert (r.proxy.config.name, r.remote, r.local) == ("hub", "library/alpine", "library/alpine")
    r = router.route("user/app", None)
    assert (r.remote, r.local) == ("user/app", "user/app")


def test_ns_routes_by_host(router: Router) -> None:
    r = router.route("library/alpine", "docker.io")
    assert (r.proxy.config.name, r.local) == ("hub", "library/alpine")
    r = router.route("org/app", "quay.io")
    assert (r.proxy.config.name, r.remote, r.local) == ("quay", "org/app", "quay.io/org/app")
    r = router.route("owner/app", "ghcr.io")
    assert (r.proxy.config.name, r.local) == ("ghcr", "ghcr/owner/app")  # no prefix: the name


def test_path_prefix_routes_to_the_same_storage_name(router: Router) -> None:
    by_ns = router.route("org/app", "quay.io")
    by_prefix = router.route("quay.io/org/app", None)
    assert by_prefix.upstream is by_ns.upstream and by_prefix.local == by_ns.local and by_prefix.remote == "org/app"
    hub = router.route("docker.io/alpine", None)
    assert (hub.remote, hub.local) == ("library/alpine", "library/alpine")


def test_unknown_ns_is_a_clear_error(router: Router) -> None:
    with pytest.raises(RegistryError) as e:
        router.route("x/y", "registry.example.com")
    assert e.value.code == "NAME_UNKNOWN" and "ns=registry.example.com" in e.value.message


async def test_proxy_section_takes_any_ns() -> None:
    config = parse({"proxy": {"remoteurl": "http://127.0.0.1:1"}})
    async with aiohttp.ClientSession() as session:
        router = Router([Upstream(u, UpstreamClient(u, session), None) for u in config.upstreams])
        assert router.route("a/b", "whatever.io").local == "a/b"
        assert router.route("alpine", None).remote == "alpine"  # not Docker Hub: no library/
