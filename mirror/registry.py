"""The service the handlers call: route a name to its upstream, and answer from the caches.

Private repositories (pushed here) join in issue 4; today every name is proxied.
"""

from __future__ import annotations

from mirror import mediatypes
from mirror.cache.blobs import BlobCache, Flight
from mirror.cache.manifests import ManifestCache, Served
from mirror.errors import RegistryError
from mirror.names import Digest, parse_digest
from mirror.routing import Route, Router
from mirror.storage import Storage, paths
from mirror.store import LocalBlob
from mirror.upstream import UpstreamDenied, UpstreamError, UpstreamNotFound


class Registry:
    def __init__(self, storage: Storage, router: Router, manifests: ManifestCache, blobs: BlobCache) -> None:
        self.storage = storage
        self.router = router
        self.manifests = manifests
        self.blobs = blobs

    def route(self, name: str, ns: str | None) -> Route:
        return self.router.route(name, ns)

    async def manifest(self, route: Route, reference: str | Digest, accept: frozenset[str]) -> Served:
        served = await self.manifests.get(route, reference)
        m = served.manifest
        if mediatypes.acceptable(m.media_type, accept) or m.media_type not in mediatypes.INDEX_TYPES:
            return served
        # A client that cannot read an index gets the linux/amd64 image, as from distribution.
        child = mediatypes.default_platform_child(m.body)
        if child is None:
            raise RegistryError("MANIFEST_UNKNOWN",
                                f"{route.local} is an index with no linux/amd64 image, and the client "
                                f"accepts only {', '.join(sorted(accept))}")
        return await self.manifests.by_digest(route, str(parse_digest(child)))

    async def blob(self, route: Route, digest: Digest) -> LocalBlob | Flight:
        return await self.blobs.open(route, digest)

    async def blob_head(self, route: Route, digest: Digest) -> tuple[int | None, str]:
        return await self.blobs.head(route, digest)

    async def tags(self, route: Route) -> list[str]:
        """Tags known upstream merged with the ones cached here (all of them, sorted)."""
        local = set(await self.storage.list(paths.tags(route.local)))
        try:
            remote = set(await route.upstream.client.tags(route.remote))
        except UpstreamNotFound:
            if not local:
                raise RegistryError("NAME_UNKNOWN", f"repository name not known to registry: {route.local}") \
                    from None
            remote = set()
        except UpstreamDenied as e:
            raise RegistryError("DENIED", str(e)) from None
        except UpstreamError as e:
            if not local:
                raise e.to_registry_error() from None
            remote = set()
        return sorted(local | remote)

    async def repositories(self) -> list[str]:
        """Every repository with content here, sorted (walks storage)."""
        found: list[str] = []

        async def walk(prefix: str, name: str) -> None:
            children = await self.storage.list(prefix)
            if "_manifests" in children:
                found.append(name)
            for child in children:
                if not child.startswith("_"):
                    await walk(f"{prefix}/{child}", f"{name}/{child}" if name else child)

        await walk(paths.REPOSITORIES, "")
        return sorted(found)
