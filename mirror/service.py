"""The service the handlers call: private repositories from storage, proxied ones through the
caches, and the push side (uploads, manifests, deletes, referrers)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web

from mirror.cache.blob_cache import BlobCache, Flight
from mirror.cache.index import Index
from mirror.cache.manifest_cache import ManifestCache, Served
from mirror.errors import RegistryError
from mirror.names import Digest, parse_digest
from mirror.registry import manifest_schema, mediatypes
from mirror.registry.namespace import Route, Router
from mirror.registry.stores import BlobStore, Manifest, ManifestStore, StoredBlob, walk_repositories
from mirror.registry.upload_sessions import Uploads
from mirror.registry.upstream import UpstreamDenied, UpstreamError, UpstreamNotFound
from mirror.storage import NotFound, Storage, layout


@dataclass(frozen=True, slots=True)
class Pushed:
    digest: str
    subject: str | None


class Registry:
    def __init__(self, storage: Storage, router: Router, index: Index, manifests: ManifestStore,
                 blobs: BlobStore, manifest_cache: ManifestCache, blob_cache: BlobCache,
                 delete_enabled: bool, redirect: bool = False) -> None:
        self.storage = storage
        self.router = router
        self.index = index
        self.manifests = manifests
        self.blobs = blobs
        self.manifest_cache = manifest_cache
        self.blob_cache = blob_cache
        self.uploads = Uploads(storage, blobs)
        self.delete_enabled = delete_enabled
        self.redirect = redirect

    def redirect_url(self, blob: StoredBlob) -> str | None:
        """Where to send a client for a blob not on local disk, when storage.redirect is on."""
        return self.storage.redirect_url(blob.key) if self.redirect and blob.path is None else None

    async def load_private_names(self) -> None:
        """Repositories pushed to before are private whatever the patterns say now."""
        for name, marks in await walk_repositories(self.storage):
            if "_private" in marks:
                self.router.add_private(name)

    def route(self, name: str, ns: str | None) -> Route:
        return self.router.route(name, ns)

    async def became_private(self, name: str, ns: str | None) -> bool:
        """A name routed upstream that another replica (claim_on_push) or `mirror import` has made
        private since we started: its marker is in storage. Asked only after the upstream did not
        know the name, so the hot path pays nothing."""
        if ns or self.router.route(name, ns).private:
            return False
        if await self.storage.stat(layout.private_marker(name)) is None:
            return False
        self.router.add_private(name)
        return True

    async def route_for_push(self, name: str, ns: str | None) -> Route:
        """The route a push may write to: private, or claimed as private; DENIED for proxied names.
        `name` is the raw one from the URL: routing validates it before anything uses it."""
        route = self.router.route(name, ns)
        if route.upstream is not None:
            if not self.router.claim_on_push or ns:
                raise RegistryError("DENIED", f"{name} is a pull-through cache of upstream "
                                              f"{route.upstream.config.name}; push to a private repository "
                                              f"(config private.patterns)")
            route = Route(None, name, name)
        if name not in self.router.known_private:
            await self.storage.put_bytes(layout.private_marker(name), b"")
            self.router.add_private(name)
        return route

    # --- pull ----------------------------------------------------------------------------------

    async def manifest(self, route: Route, reference: str | Digest, accept: frozenset[str]) -> Served:
        served = await self._manifest(route, reference)
        m = served.manifest
        if mediatypes.acceptable(m.media_type, accept) or m.media_type not in mediatypes.INDEX_TYPES:
            return served
        # A client that cannot read an index gets the linux/amd64 image, as from distribution.
        child = mediatypes.default_platform_child(m.body)
        if child is None:
            raise RegistryError("MANIFEST_UNKNOWN",
                                f"{route.local} is an index with no linux/amd64 image, and the client "
                                f"accepts only {', '.join(sorted(accept))}")
        return await self._manifest(route, parse_digest(child))

    async def _manifest(self, route: Route, reference: str | Digest) -> Served:
        if not route.private:
            served = await self.manifest_cache.get(route, reference)
            self.index.touch_blob(served.manifest.digest)  # its pull is under way: eviction keeps what it references
            return served
        digest = str(reference) if isinstance(reference, Digest) else await self.manifests.tag(route.local, reference)
        found = await self.manifests.get(route.local, digest) if digest else None
        if found is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.local}:{reference}")
        return Served(found, "private")

    async def blob(self, route: Route, digest: Digest) -> tuple[StoredBlob | Flight, str]:
        """The blob's source and the cache result (hit, miss or private)."""
        if not route.private:
            return await self.blob_cache.open(route, digest)
        return await self._private_blob(route, digest), "private"

    async def blob_head(self, route: Route, digest: Digest) -> tuple[int | None, str]:
        if not route.private:
            return await self.blob_cache.head(route, digest)
        return (await self._private_blob(route, digest)).size, "private"

    async def _private_blob(self, route: Route, digest: Digest) -> StoredBlob:
        local = await self.blobs.find(route.local, digest)
        if local is None:
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {route.local}@{digest}")
        return local

    async def tags(self, route: Route) -> list[str]:
        """Tags here, merged for proxied repositories with the upstream's (all, sorted)."""
        local = set(await self.manifests.tags(route.local))
        if route.private:
            if not local and route.local not in self.router.known_private:
                raise RegistryError("NAME_UNKNOWN", f"repository name not known to registry: {route.local}")
            return sorted(local)
        try:
            remote = set(await route.proxy.client.tags(route.remote))
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
        """Every repository with manifests here, private and cached, sorted."""
        return [name for name, marks in await walk_repositories(self.storage) if "_manifests" in marks]

    async def referrers(self, route: Route, subject: Digest, artifact_type: str | None) -> list[dict[str, object]]:
        """Descriptors of the manifests whose subject is `subject` (pushed here)."""
        found = []
        prefix = layout.referrers(route.local, subject)
        for entry in await self.storage.list(prefix):
            try:
                descriptor = json.loads(await self.storage.get_bytes(f"{prefix}/{entry}"))
            except (NotFound, ValueError):
                continue
            if artifact_type is None or descriptor.get("artifactType") == artifact_type:
                found.append(descriptor)
        return found

    # --- push ----------------------------------------------------------------------------------

    async def put_manifest(self, route: Route, reference: str | Digest, body: bytes,
                           content_type: str | None) -> Pushed:
        parsed = manifest_schema.parse(body, content_type)
        algorithm = reference.algorithm if isinstance(reference, Digest) else "sha256"
        digest = Digest.of(body, algorithm)
        if isinstance(reference, Digest) and digest != reference:
            raise RegistryError("DIGEST_INVALID", f"manifest digest is {digest}, not {reference}")
        for blob in parsed.blobs:
            if await self.blobs.find(route.local, blob) is None:
                raise RegistryError("MANIFEST_BLOB_UNKNOWN", f"blob unknown to registry: {blob}", detail=str(blob))
        for child in parsed.manifests:
            if await self.manifests.get(route.local, str(child)) is None:
                raise RegistryError("MANIFEST_BLOB_UNKNOWN", f"manifest unknown to registry: {child}",
                                    detail=str(child))
        await self.manifests.put(route.local, Manifest(str(digest), parsed.media_type, body))
        if parsed.subject is not None:
            descriptor = manifest_schema.Descriptor(parsed.media_type, digest, len(body), parsed.artifact_type,
                                               parsed.annotations)
            await self.storage.put_bytes(layout.referrer(route.local, parsed.subject.digest, digest),
                                         json.dumps(descriptor.to_json()).encode())
        if isinstance(reference, str):
            await self.manifests.set_tag(route.local, reference, str(digest))
            self.index.drop_tag(route.local, reference)  # a proxied tag index entry must not shadow it
        return Pushed(str(digest), str(parsed.subject.digest) if parsed.subject else None)

    async def delete_manifest(self, route: Route, reference: str | Digest) -> None:
        self._check_delete()
        if isinstance(reference, str):
            if not await self.manifests.delete_tag(route.local, reference):
                raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.local}:{reference}")
            self.index.drop_tag(route.local, reference)
            return
        manifest = await self.manifests.get(route.local, str(reference))
        if manifest is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.local}@{reference}")
        for tag in await self.manifests.tags(route.local):  # tags pointing at it go with it, as distribution
            if await self.manifests.tag(route.local, tag) == manifest.digest:
                await self.manifests.delete_tag(route.local, tag)
                self.index.drop_tag(route.local, tag)
        try:
            subject = manifest_schema.parse(manifest.body, manifest.media_type).subject
        except RegistryError:
            subject = None
        if subject is not None:
            await self.storage.delete(layout.referrer(route.local, subject.digest, reference))
        await self.manifests.unlink(route.local, reference)

    async def delete_blob(self, route: Route, digest: Digest) -> None:
        self._check_delete()
        if not await self.blobs.unlink(route.local, digest):
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {route.local}@{digest}")

    def _check_delete(self) -> None:
        if not self.delete_enabled:
            raise RegistryError("UNSUPPORTED", "deletes are disabled (storage.delete.enabled)")

    async def mount(self, route: Route, digest: Digest, source: str) -> bool:
        """Cross-repository mount: link the blob if `source` has it here."""
        if await self.blobs.find(source, digest) is None:
            return False
        await self.blobs.link(route.local, digest)
        return True


REGISTRY = web.AppKey("registry", Registry)  # the app's one Registry (mirror/app.py sets it at startup)
