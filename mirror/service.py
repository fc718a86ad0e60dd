"""The service the handlers call: private repositories from storage, proxied ones through the
caches, and the push side (uploads, manifests, deletes, referrers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
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
from mirror.cache.peers import Peers, advertised, signed
from mirror.cache.scrub import Scrubber
from mirror.clock import SYSTEM, Clock
from mirror.cluster import Cluster
from mirror.config import Config
from mirror.errors import RegistryError
from mirror.names import Digest, parse_digest
from mirror.registry import manifest_schema, mediatypes, namespace
from mirror.registry.namespace import Namespace, Route, Upstream, local_prefix
from mirror.registry.stores import BlobStore, Manifest, ManifestStore, StoredBlob
from mirror.registry.upload_sessions import Uploads, live_uploads
from mirror.registry.upstream import UpstreamAnswer, UpstreamClient, translate
from mirror.server.metrics import Metrics
from mirror.storage import NotFound, Storage, StorageUnavailable, inventory, layout

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
                 metrics: Metrics, clock: Clock = SYSTEM, cluster: Cluster | None = None) -> None:
        self._config = config
        self._storage = storage
        self._index = index
        self._metrics = metrics
        upstreams = [
            Upstream(up, UpstreamClient(up, session, metrics, config.limits.manifest_size, clock),
                     local_prefix(up, i == 0))
            for i, up in enumerate(config.upstreams)
        ]
        self._namespace = Namespace(upstreams, config.private, storage, clock)
        self._cluster = cluster
        if cluster is not None:
            self._namespace.share(cluster)
            for up in upstreams:
                up.client.share(cluster)
        self._blobs = BlobStore(storage, index, metrics)
        self._manifests = ManifestStore(storage, config.cache.memory, self._blobs.added)
        self._manifest_cache = ManifestCache(self._manifests, index, clock, self._namespace.filling, cluster)
        self._secret = (config.http.secret or "").encode()
        peers = Peers(cluster, session, advertised(config), self._secret) if cluster is not None else None
        self._blob_cache = BlobCache(self._blobs, storage.staging_dir(), metrics, self._namespace.filling, peers)
        self._uploads = Uploads(storage, self._blobs)
        cache = config.cache
        self._evictor = Evictor(storage, index, self._manifests, self._blobs, self._namespace.configured_private,
                                in_use=lambda: self._blob_cache.flights.keys(), max_size=cache.max_size,
                                ttl=cache.content_ttl, min_idle=cache.min_idle, high=cache.high_watermark,
                                low=cache.low_watermark, clock=clock)
        self._blobs.on_growth = self._evictor.grew
        self._scrubber = Scrubber(storage, self._namespace.configured_private, reads=storage.bulk(),
                                  manifests=self._manifests, metrics=metrics)
        self.deletes_enabled = config.storage.delete_enabled
        self._redirect = config.storage.redirect

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The background jobs of what this service owns, for as long as the server runs; on the way
        out, fetches under way finish and commit (their clients already have the bytes), within bounds."""
        jobs = Jobs()
        self._namespace.adopted = await namespace.adopted_kind(self._storage)
        if self._cluster is not None:
            jobs.start(self._cluster.run())
        # A write that finds the disk full (often in a worker thread) makes room at once; on OSS a full
        # local disk is the hot tier's, which evicts itself.
        loop = asyncio.get_running_loop()

        def pressure() -> None:
            loop.call_soon_threadsafe(self._evictor.pressure)

        if self._storage.name == "filesystem":
            self._storage.space.on_full.append(pressure)
        jobs.start(self._index.flush_forever(), self._blob_cache.clear_staging_forever(),
                   every(EPOCH_CHECK_SECONDS, self._notice_storage_changes, first=False),
                   every(STORAGE_SCAN_SECONDS * (1 if self._storage.name == "filesystem" else 10),
                         self._count_storage))
        purging = self._config.storage.uploadpurging
        jobs.start(self._evictor.run_forever())  # passes without a cap or TTL only when the disk fills
        scrub = self._config.scrub
        if scrub.enabled:
            jobs.start(self._scrubber.run_forever(scrub.interval, scrub.rate, self._index))
        if purging.enabled:
            jobs.start(self._uploads.purge_forever(purging.age, purging.interval, purging.dryrun))
        try:
            yield
        finally:
            if pressure in self._storage.space.on_full:
                self._storage.space.on_full.remove(pressure)
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

    async def resolve(self, name: str, ns: str | None) -> Route:
        """The repository a pull or a delete names (registry/namespace.py decides)."""
        return await self._namespace.resolve(name, ns)

    async def resolve_for_push(self, name: str, ns: str | None) -> Route:
        """The private repository a push writes to, claimed if the name is claimable; DENIED otherwise."""
        return await self._namespace.resolve_for_push(name, ns)

    async def is_private(self, name: str) -> bool:
        return await self._namespace.is_private(name)

    def classify(self, contents: inventory.Contents) -> bool:
        """Whether a repository read from storage is private (for lists built from one walk)."""
        return namespace.classify(self._namespace.configured_private(contents.name), contents.marks,
                                  bool(contents.linked), self._namespace.adopted or namespace.PRIVATE) \
            == namespace.PRIVATE

    def upstream_of(self, name: str) -> str | None:
        """The configured upstream a cached repository's storage name comes from."""
        return self._namespace.upstream_of(name)

    @property
    def default_upstream(self) -> Upstream | None:
        return self._namespace.default

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
            if served.cache != "miss":  # read from storage: still this proxied name's to serve?
                await self._namespace.vouch(route)
            self._index.touch_blob(served.manifest.digest)  # its pull is under way: eviction keeps what it references
            return served
        stale = False
        if isinstance(reference, Digest):
            digest: str | None = str(reference)
        else:
            try:
                digest = await self._manifests.tag(route.local, reference)
            except StorageUnavailable as e:
                # A replica keeps serving what its memory holds: the tag as last read here (its
                # manifest too, if still in memory; else the 503 stands).
                digest = self._manifests.remembered_tag(route.local, reference)
                if digest is None:
                    raise
                stale = True
                log.warning("serving stale private tag %s:%s from memory: %s", route.local, reference, e)
        found = await self._manifests.get(route.local, digest) if digest else None
        if found is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.local}:{reference}")
        if stale:
            return Served(found, "stale", '110 - "Response is Stale"')
        return Served(found, "private")

    async def blob(self, route: Route, digest: Digest) -> tuple[StoredBlob | Flight, str]:
        """The blob's source and the cache result (hit, miss or private)."""
        if not route.private:
            source, result = await self._blob_cache.open(route, digest)
            if result == "hit":
                await self._namespace.vouch(route)
            return source, result
        return await self._private_blob(route, digest), "private"

    async def blob_head(self, route: Route, digest: Digest) -> tuple[int | None, str]:
        if not route.private:
            size, result = await self._blob_cache.head(route, digest)
            if result == "hit":
                await self._namespace.vouch(route)
            return size, result
        return (await self._private_blob(route, digest)).size, "private"

    async def _private_blob(self, route: Route, digest: Digest) -> StoredBlob:
        local = await self._blobs.find(route.local, digest)
        if local is None:
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {route.local}@{digest}")
        return local

    def peer_signed(self, digest: str, signature: str) -> bool:
        """Whether a replica of this registry (one that knows http.secret) asks for `digest`."""
        return bool(self._secret) and signed(self._secret, digest, signature, time.time())

    async def peer_source(self, digest: Digest) -> Flight | StoredBlob | None:
        """What a following replica streams `digest` from: our fetch of it, or the blob once stored."""
        flight = self._blob_cache.flights.get(str(digest))
        if flight is not None:
            return flight
        st = await self._blobs.stat(digest)
        return None if st is None else StoredBlob(layout.blob(digest), st.size, self._storage.local_path(
            layout.blob(digest)))

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
            if not local and not await inventory.has_content(self._storage, route.local):
                raise RegistryError("NAME_UNKNOWN", f"repository name not known to registry: {route.local}")
            return sorted(local)
        if local:
            await self._namespace.vouch(route)
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
        self._check_delete(route)
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
        self._check_delete(route)
        if not await self._blobs.unlink(route.local, digest):
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {route.local}@{digest}")

    def _check_delete(self, route: Route) -> None:
        if not self.deletes_enabled:
            raise RegistryError("UNSUPPORTED", "deletes are disabled (storage.delete.enabled)")
        if not route.private:  # a cache's content goes by eviction (`mirror evict`), never by a client
            raise RegistryError("DENIED", f"{route.local} is a pull-through cache of upstream "
                                          f"{route.proxy.config.name}: deletes are for private repositories")

    async def mount(self, route: Route, digest: Digest, source: Route) -> bool:
        """Cross-repository mount: link the blob if `source` (resolved, and the caller may pull it) has
        it here and it verifies (a damaged one is not linked: the client uploads the bytes instead,
        which replaces it)."""
        if await self._blobs.find(source.local, digest) is None:
            return False
        try:
            await self._namespace.vouch(source)
        except namespace.NameNowPrivate:
            return False  # claimed meanwhile: the caller's pull right was judged on a cache
        if not await self._blobs.intact(digest):
            log.error("blob %s does not match its digest: not mounted into %s (the upload that follows "
                      "replaces it)", digest, route.local)
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
