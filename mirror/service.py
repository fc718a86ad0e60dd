"""The service the handlers call: private repositories from storage, proxied ones through the
caches, and the push side (uploads, manifests, deletes, referrers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from mirror.background import Jobs, every
from mirror.cache.blob_cache import BlobCache
from mirror.cache.eviction import Evictor
from mirror.cache.flight import Flight
from mirror.cache.index import Index
from mirror.cache.manifest_cache import ManifestCache, Served
from mirror.clock import SYSTEM, Clock
from mirror.config import Config
from mirror.errors import RegistryError
from mirror.names import Digest, parse_digest
from mirror.registry import manifest_schema, mediatypes
from mirror.registry.namespace import Route, Router, Upstream, local_prefix
from mirror.registry.stores import BlobStore, Manifest, ManifestStore, StoredBlob
from mirror.registry.upload_sessions import Uploads, live_uploads
from mirror.registry.upstream import UpstreamAnswer, UpstreamClient, translate
from mirror.server.metrics import Metrics
from mirror.storage import NotFound, Storage, inventory, layout

log = logging.getLogger("mirror")
EPOCH_CHECK_SECONDS = 2.0
STORAGE_SCAN_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Pushed:
    digest: str
    subject: str | None


class Registry:
    """What the API handlers and the UI call: private repositories from storage, proxied ones through
    the caches, and the push side. It owns the stores, the caches, eviction and upload sessions, and
    runs their background jobs while `running()`."""

    def __init__(self, config: Config, storage: Storage, index: Index, session: aiohttp.ClientSession,
                 metrics: Metrics, clock: Clock = SYSTEM) -> None:
        self._config = config
        self._storage = storage
        self._index = index
        self._metrics = metrics
        upstreams = [
            Upstream(up, UpstreamClient(up, session, metrics, config.limits.manifest_size, clock),
                     local_prefix(up, i == 0))
            for i, up in enumerate(config.upstreams)
        ]
        self._router = Router(upstreams, config.private)
        self._blobs = BlobStore(storage, index, metrics)
        self._manifests = ManifestStore(storage, config.cache.memory, self._blobs.added)
        self._manifest_cache = ManifestCache(self._manifests, index, clock)
        self._blob_cache = BlobCache(self._blobs, storage.staging_dir(), metrics)
        self._uploads = Uploads(storage, self._blobs)
        cache = config.cache
        self._evictor = Evictor(storage, index, self._manifests, self._blobs, self._router.is_private,
                                in_use=lambda: self._blob_cache.flights.keys(), max_size=cache.max_size,
                                ttl=cache.content_ttl, min_idle=cache.min_idle, high=cache.high_watermark,
                                low=cache.low_watermark)
        self._blobs.on_growth = self._evictor.grew
        self.deletes_enabled = config.storage.delete_enabled
        self._redirect = config.storage.redirect

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The background jobs of what this service owns, for as long as the server runs; on the way
        out, fetches under way finish and commit (their clients already have the bytes), within bounds."""
        jobs = Jobs()
        jobs.start(self._index.flush_forever(), self._blob_cache.clear_staging_forever(),
                   every(EPOCH_CHECK_SECONDS, self._notice_storage_changes, first=False),
                   every(STORAGE_SCAN_SECONDS * (1 if self._storage.name == "filesystem" else 10),
                         self._count_storage))
        cache, purging = self._config.cache, self._config.storage.uploadpurging
        if cache.max_size is not None or cache.content_ttl is not None:
            jobs.start(self._evictor.run_forever())
        if purging.enabled:
            jobs.start(self._uploads.purge_forever(purging.age, purging.interval, purging.dryrun))
        try:
            yield
        finally:
            await jobs.stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.http.draintimeout):
                    await self._blob_cache.settle()
            await self._blob_cache.close()

    def watch(self, changed: Callable[[str], None]) -> None:
        """Tell `changed` the repository whenever one gains or loses a manifest, tag or blob link here
        (pull-through, push, delete, eviction): the UI's list stays current between its walks."""
        self._manifests.changed = self._blobs.changed = changed

    async def settle(self) -> None:
        """Wait until no upstream fetch is in progress (a caller bounds it)."""
        await self._blob_cache.settle()

    async def _count_storage(self) -> None:
        """The storage gauges. Listing a whole bucket costs a request per 1,000 blobs: remote storage is
        counted less often."""
        blobs, size = await inventory.blob_usage(self._storage)
        self._metrics.storage_blobs.labels(self._storage.name).set(blobs)
        self._metrics.storage_bytes.labels(self._storage.name).set(size)
        self._metrics.uploads_in_progress.set(len(await live_uploads(self._storage)))

    async def _notice_storage_changes(self) -> None:
        """`mirror evict` or `index rebuild` ran beside us: what memory names may be gone."""
        if self._index.epoch_moved():
            log.info("storage changed behind the server (mirror evict or index rebuild): re-reading it")
            self._index.forget_memory()
            self._manifests.forget_memory()
            self._blobs.forget_memory()

    # --- names ---------------------------------------------------------------------------------

    def resolve(self, name: str, ns: str | None) -> Route:
        """The route for a request's raw name and `?ns=` (validated here)."""
        return self._router.route(name, ns)

    def is_private(self, name: str) -> bool:
        return self._router.is_private(name)

    def upstream_of(self, name: str) -> str | None:
        """The configured upstream a cached repository's storage name comes from."""
        return self._router.upstream_of(name)

    @property
    def default_upstream(self) -> Upstream | None:
        return self._router.default

    async def load_private_names(self) -> None:
        """Repositories pushed to before are private whatever the patterns say now."""
        for name, children in await inventory.repository_names(self._storage):
            if "_mirror" in children and layout.PRIVATE_MARK in await inventory.marks(self._storage, name):
                self._router.add_private(name)

    async def became_private(self, name: str, ns: str | None) -> bool:
        """A name routed upstream that another replica (claim_on_push) or `mirror import` has made
        private since we started: its marker is in storage. Asked only after the upstream did not
        know the name, so the hot path pays nothing."""
        if ns or self._router.route(name, ns).private:
            return False
        if await self._storage.stat(layout.marker(name, layout.PRIVATE_MARK)) is None:
            return False
        self._router.add_private(name)
        return True

    async def resolve_for_push(self, name: str, ns: str | None) -> Route:
        """The route a push may write to: private, or claimed as private; DENIED for proxied names.
        `name` is the raw one from the URL: routing validates it before anything uses it."""
        route = self._router.route(name, ns)
        if route.upstream is not None:
            if not self._router.claim_on_push or ns:
                raise RegistryError("DENIED", f"{name} is a pull-through cache of upstream "
                                              f"{route.upstream.config.name}; push to a private repository "
                                              f"(config private.patterns)")
            route = Route(None, name, name)
        if name not in self._router.known_private:
            await self._storage.put_bytes(layout.marker(name, layout.PRIVATE_MARK), b"")
            self._router.add_private(name)
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
            served = await self._manifest_cache.get(route, reference)
            self._index.touch_blob(served.manifest.digest)  # its pull is under way: eviction keeps what it references
            return served
        digest = str(reference) if isinstance(reference, Digest) else await self._manifests.tag(route.local, reference)
        found = await self._manifests.get(route.local, digest) if digest else None
        if found is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.local}:{reference}")
        return Served(found, "private")

    async def blob(self, route: Route, digest: Digest) -> tuple[StoredBlob | Flight, str]:
        """The blob's source and the cache result (hit, miss or private)."""
        if not route.private:
            return await self._blob_cache.open(route, digest)
        return await self._private_blob(route, digest), "private"

    async def blob_head(self, route: Route, digest: Digest) -> tuple[int | None, str]:
        if not route.private:
            return await self._blob_cache.head(route, digest)
        return (await self._private_blob(route, digest)).size, "private"

    async def _private_blob(self, route: Route, digest: Digest) -> StoredBlob:
        local = await self._blobs.find(route.local, digest)
        if local is None:
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {route.local}@{digest}")
        return local

    def redirect_url(self, blob: StoredBlob) -> str | None:
        """Where to send a client for a blob not on local disk, when storage.redirect is on."""
        return self._storage.redirect_url(blob.key) if self._redirect and blob.path is None else None

    def read_blob(self, blob: StoredBlob, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of a stored blob not on local disk. Reading to the end is a whole read
        from 0: the one a hot tier keeps a copy of."""
        return self._storage.reader(blob.key, start, None if end in (None, blob.size) else end - start)

    async def tags(self, route: Route) -> list[str]:
        """Tags here, merged for proxied repositories with the upstream's (all, sorted)."""
        local = set(await self._manifests.tags(route.local))
        if route.private:
            if not local and route.local not in self._router.known_private \
                    and not await inventory.listed(self._storage, route.local):  # emptied by deletes: [] as registry:2
                raise RegistryError("NAME_UNKNOWN", f"repository name not known to registry: {route.local}")
            return sorted(local)
        try:
            remote = set(await route.proxy.client.tags(route.remote))
        except UpstreamAnswer as e:  # what is cached here still lists
            if not local:
                raise translate(e, "NAME_UNKNOWN", route.local) from None
            remote = set()
        return sorted(local | remote)

    async def repositories(self) -> list[str]:
        """Every repository here, private and cached, sorted: what registry:2's catalog lists (blob links),
        and repositories with a manifest pulled through before any of its blobs."""
        return [name for name, children in await inventory.repository_names(self._storage)
                if inventory.cataloged(children)]

    async def referrers(self, route: Route, subject: Digest, artifact_type: str | None) -> list[dict[str, object]]:
        """Descriptors of the manifests whose subject is `subject` (pushed here), of those still here:
        registry:2 run on the same storage deletes manifests without knowing of their records."""
        found = []
        for manifest, key in await inventory.referrers_of(self._storage, route.local, subject):
            if await self._storage.stat(layout.revision(route.local, manifest)) is None:
                continue
            try:
                descriptor = json.loads(await self._storage.get_bytes(key))
            except (NotFound, ValueError):
                continue
            if artifact_type is None or descriptor.get("artifactType") == artifact_type:
                found.append(descriptor)
        return found

    # --- what the UI shows -----------------------------------------------------------------------

    async def tag(self, name: str, tag: str) -> str | None:
        """The digest `tag` of repository `name` points to, as stored."""
        return await self._manifests.tag(name, tag)

    async def tag_names(self, name: str) -> list[str]:
        return await self._manifests.tags(name)

    async def manifest_digests(self, name: str) -> list[str]:
        """Every manifest repository `name` links (sha256 ones: what pushes and pulls make)."""
        return [str(d) for d in await inventory.manifests(self._storage, name)]

    async def stored_manifest(self, name: str, digest: str) -> Manifest | None:
        """The manifest if repository `name` has it here (never asks an upstream)."""
        return await self._manifests.get(name, digest)

    async def small_blob(self, digest: Digest, limit: int) -> bytes | None:
        """A blob of at most `limit` bytes (an image config), or None."""
        key = layout.blob(digest)
        st = await self._storage.stat(key)
        if st is None or st.size > limit:
            return None
        try:
            return await self._storage.get_bytes(key)
        except NotFound:
            return None

    # --- push ----------------------------------------------------------------------------------

    async def put_manifest(self, route: Route, reference: str | Digest, body: bytes,
                           content_type: str | None) -> Pushed:
        parsed = manifest_schema.parse(body, content_type)
        algorithm = reference.algorithm if isinstance(reference, Digest) else "sha256"
        digest = Digest.of(body, algorithm)
        if isinstance(reference, Digest) and digest != reference:
            raise RegistryError("DIGEST_INVALID", f"manifest digest is {digest}, not {reference}")
        for blob in parsed.blobs:
            if await self._blobs.find(route.local, blob) is None:
                raise RegistryError("MANIFEST_BLOB_UNKNOWN", f"blob unknown to registry: {blob}", detail=str(blob))
        for child in parsed.manifests:
            if await self._manifests.get(route.local, str(child)) is None:
                raise RegistryError("MANIFEST_BLOB_UNKNOWN", f"manifest unknown to registry: {child}",
                                    detail=str(child))
        await self._manifests.put(route.local, Manifest(str(digest), parsed.media_type, body))
        if parsed.subject is not None:
            descriptor = manifest_schema.Descriptor(parsed.media_type, digest, len(body), parsed.artifact_type,
                                               parsed.annotations)
            await self._storage.put_bytes(layout.referrer(route.local, parsed.subject.digest, digest),
                                         json.dumps(descriptor.to_json()).encode())
        if isinstance(reference, str):
            await self._manifests.set_tag(route.local, reference, str(digest))
            self._index.drop_tag(route.local, reference)  # a proxied tag index entry must not shadow it
        return Pushed(str(digest), str(parsed.subject.digest) if parsed.subject else None)

    async def delete_manifest(self, route: Route, reference: str | Digest) -> None:
        self._check_delete()
        if isinstance(reference, str):
            if not await self._manifests.delete_tag(route.local, reference):
                raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.local}:{reference}")
            self._index.drop_tag(route.local, reference)
            return
        manifest = await self._manifests.get(route.local, str(reference))
        if manifest is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.local}@{reference}")
        for tag in await self._manifests.tags(route.local):  # tags pointing at it go with it, as distribution
            if await self._manifests.tag(route.local, tag) == manifest.digest:
                await self._manifests.delete_tag(route.local, tag)
                self._index.drop_tag(route.local, tag)
        try:
            subject = manifest_schema.parse(manifest.body, manifest.media_type).subject
        except RegistryError:
            subject = None
        if subject is not None:
            await self._storage.delete(layout.referrer(route.local, subject.digest, reference))
        await self._manifests.unlink(route.local, reference)

    async def delete_blob(self, route: Route, digest: Digest) -> None:
        self._check_delete()
        if not await self._blobs.unlink(route.local, digest):
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {route.local}@{digest}")

    def _check_delete(self) -> None:
        if not self.deletes_enabled:
            raise RegistryError("UNSUPPORTED", "deletes are disabled (storage.delete.enabled)")

    async def mount(self, route: Route, digest: Digest, source: str) -> bool:
        """Cross-repository mount: link the blob if `source` has it here."""
        if await self._blobs.find(source, digest) is None:
            return False
        await self._blobs.link(route.local, digest)
        return True


    # --- uploads -------------------------------------------------------------------------------

    async def start_upload(self, route: Route) -> str:
        return await self._uploads.start(route.local)

    async def upload_size(self, route: Route, upload_id: str) -> int:
        return await self._uploads.size(route.local, upload_id)

    async def append_upload(self, route: Route, upload_id: str, chunks: AsyncIterator[bytes],
                            start: int | None) -> int:
        return await self._uploads.append(route.local, upload_id, chunks, start)

    async def finish_upload(self, route: Route, upload_id: str, digest: Digest,
                            chunks: AsyncIterator[bytes] | None) -> int:
        return await self._uploads.finish(route.local, upload_id, digest, chunks)

    async def monolithic_upload(self, route: Route, digest: Digest, chunks: AsyncIterator[bytes]) -> int:
        return await self._uploads.monolithic(route.local, digest, chunks)

    async def cancel_upload(self, route: Route, upload_id: str) -> None:
        await self._uploads.cancel(route.local, upload_id)

REGISTRY = web.AppKey("registry", Registry)  # the app's one Registry (server/app.py sets it at startup)
