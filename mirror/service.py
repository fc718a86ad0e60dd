"""The service the handlers call: private repositories from storage, proxied ones through the
caches, and the push side (uploads, manifests, deletes, referrers)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from mirror.background import Jobs, every
from mirror.cache.blob_cache import BlobCache
from mirror.cache.eviction import Evictor
from mirror.cache.flight import Flight
from mirror.cache.manifest_cache import ManifestCache, Served
from mirror.cache.peers import Peers, advertised, signed
from mirror.cache.scrub import Scrubber
from mirror.clock import SYSTEM, Clock
from mirror.cluster import Cluster
from mirror.config import Config
from mirror.errors import RegistryError
from mirror.ledger import ops, queries
from mirror.ledger.ledger import Ledger
from mirror.names import Digest, parse_digest
from mirror.registry import manifest_schema, mediatypes, namespace
from mirror.registry.namespace import Namespace, Route, Upstream, local_prefix
from mirror.registry.stores import BlobStore, Manifest, ManifestStore, StoredBlob
from mirror.registry.upload_sessions import Uploads
from mirror.registry.upstream import UpstreamAnswer, UpstreamClient, translate
from mirror.server.metrics import Metrics
from mirror.storage import NotFound, Stat, Storage, StorageUnavailable, inventory, layout

log = logging.getLogger("mirror")
GAUGE_SECONDS = 10.0  # the storage gauges, from the ledger's totals (a read, not a walk)
READY_WAIT = 10.0  # a catalog request right after start waits this long for the ledger


@dataclass(frozen=True, slots=True)
class Pushed:
    digest: str
    subject: str | None


class Registry:
    """What the API handlers and the UI call: private repositories from storage, proxied ones through
    the caches, and the push side. It owns the stores, the caches, eviction and upload sessions, and
    runs their background jobs while `running()`."""

    def __init__(self, config: Config, storage: Storage, ledger: Ledger, session: aiohttp.ClientSession,
                 metrics: Metrics, clock: Clock = SYSTEM, cluster: Cluster | None = None) -> None:
        self._config = config
        self._storage = storage
        self.ledger = ledger
        self._metrics = metrics
        self._clock = clock
        upstreams = [
            Upstream(up, UpstreamClient(up, session, metrics, config.limits.manifest_size, clock),
                     local_prefix(up, i == 0))
            for i, up in enumerate(config.upstreams)
        ]
        self._namespace = Namespace(upstreams, config.private, storage, clock)
        self._namespace.recorded = self._marked
        self._cluster = cluster
        if cluster is not None:
            self._namespace.share(cluster)
            ledger.share(cluster)
            for up in upstreams:
                up.client.share(cluster)
        self._blobs = BlobStore(storage, ledger, metrics)
        self._manifests = ManifestStore(storage, ledger, config.cache.memory, self._blobs.added)
        self._manifest_cache = ManifestCache(self._manifests, ledger, clock, self._namespace.filling, cluster)
        self._secret = (config.http.secret or "").encode()
        peers = Peers(cluster, session, advertised(config), self._secret) if cluster is not None else None
        self._blob_cache = BlobCache(self._blobs, storage.staging_dir(), metrics, self._namespace.filling, peers)
        self._uploads = Uploads(storage, self._blobs, ledger)
        cache = config.cache
        self.evictor = Evictor(ledger, self._manifests, metrics, in_use=lambda: self._blob_cache.flights.keys(),
                                max_size=cache.max_size, ttl=cache.content_ttl, min_idle=cache.min_idle,
                                high=cache.high_watermark, low=cache.low_watermark, clock=clock, cluster=cluster)
        self._blobs.on_growth = self.evictor.grew
        ledger.on_change(self._manifests.heard)  # another replica removed links or blobs: memory forgets them
        ledger.on_change(self._blobs.heard)
        self._scrubber = Scrubber(storage, ledger, reads=storage.bulk(), manifests=self._manifests, metrics=metrics)
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
            loop.call_soon_threadsafe(self.evictor.pressure)

        if self._storage.name == "filesystem":
            self._storage.space.on_full.append(pressure)
        jobs.start(self.ledger.run(), self._blob_cache.clear_staging_forever(), self._gauges())
        purging = self._config.storage.uploadpurging
        jobs.start(self.evictor.run_forever())  # passes without a cap or TTL only when the disk fills
        scrub = self._config.scrub
        if scrub.enabled:
            jobs.start(self._scrubber.run_forever(scrub.interval, scrub.rate))
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

    async def settle(self) -> None:
        """Wait until no upstream fetch is in progress (a caller bounds it)."""
        await self._blob_cache.settle()

    async def _gauges(self) -> None:
        await self.ledger.ready.wait()
        await every(GAUGE_SECONDS, self._count_storage)

    async def _count_storage(self) -> None:
        """The storage gauges, from the ledger's totals (other replicas' writes included)."""
        since = self._metrics.storage_changes
        totals = await self.ledger.totals()
        self._metrics.storage_counted(totals.blobs, totals.bytes, since)
        self._metrics.uploads_in_progress.set(totals.uploads)

    async def _marked(self, name: str, mark: str, written: bool) -> None:
        await self.ledger.record([ops.mark(name, mark) if written else ops.unmark(name, mark)], durable=False)

    # --- names ---------------------------------------------------------------------------------

    async def resolve(self, name: str, ns: str | None) -> Route:
        """The repository a pull or a delete names (registry/namespace.py decides)."""
        return await self._namespace.resolve(name, ns)

    async def resolve_for_push(self, name: str, ns: str | None) -> Route:
        """The private repository a push writes to, claimed if the name is claimable; DENIED otherwise."""
        return await self._namespace.resolve_for_push(name, ns)

    async def is_private(self, name: str) -> bool:
        return await self._namespace.is_private(name)

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
            self.ledger.touch(served.manifest.digest)  # its pull is under way: eviction keeps what it references
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

    async def tags(self, route: Route, last: str | None, n: int | None) -> tuple[list[str], bool]:
        """Tags after `last` (sorted), at most `n` (None: all), and whether more follow. A private
        repository's are one range of the ledger; a proxied one's, those here merged with the upstream's
        (which lists them all)."""
        if route.private:
            row = await self.ledger.read(queries.repository, route.local) if self.ledger.ready.is_set() else None
            if row is not None and row.manifests + row.layers + row.tags:
                return await self.ledger.read(queries.tags_page, route.local, last, n)
            # Not in the ledger (yet: pushed a moment ago on another replica, or still rebuilding): storage.
            names = await inventory.tag_names(self._storage, route.local)
            if not names and not await inventory.has_content(self._storage, route.local):
                raise RegistryError("NAME_UNKNOWN", f"repository name not known to registry: {route.local}")
            return _page(sorted(names), last, n)
        if self.ledger.ready.is_set():
            local = set((await self.ledger.read(queries.tags_page, route.local, None, None))[0])
        else:
            local = set(await inventory.tag_names(self._storage, route.local))
        if local:
            await self._namespace.vouch(route)
        try:
            remote = set(await route.proxy.client.tags(route.remote))
        except UpstreamAnswer as e:  # what is cached here still lists
            if not local:
                raise translate(e, "NAME_UNKNOWN", route.local) from None
            remote = set()
        return _page(sorted(local | remote), last, n)

    async def catalog(self, last: str | None, n: int | None,
                      visible: queries.Visible | None) -> tuple[list[str], bool]:
        """Repositories with content here, private and cached, that `visible` lets the caller see: the
        page after `last` (registry:2's order), at most `n`, and whether more follow."""
        if not await self.ledger.wait_ready(READY_WAIT):
            raise RegistryError("UNAVAILABLE", "the catalog is still being read from storage (the ledger is "
                                               "rebuilding); try again shortly", headers={"Retry-After": "10"})
        return await self.ledger.read(queries.catalog_page, last, n, visible)

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
        await self._manifests.put(route.local, Manifest(str(digest), parsed.media_type, body), durable=True)
        if parsed.subject is not None:
            descriptor = manifest_schema.Descriptor(parsed.media_type, digest, len(body), parsed.artifact_type,
                                               parsed.annotations)
            await self._storage.put_bytes(layout.referrer(route.local, parsed.subject.digest, digest),
                                         json.dumps(descriptor.to_json()).encode())
        if isinstance(reference, str):
            await self._manifests.set_tag(route.local, reference, str(digest))
        return Pushed(str(digest), str(parsed.subject.digest) if parsed.subject else None)

    async def delete_manifest(self, route: Route, reference: str | Digest) -> None:
        self._check_delete(route)
        if isinstance(reference, str):
            if not await self._manifests.delete_tag(route.local, reference):
                raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.local}:{reference}")
            return
        manifest = await self._manifests.get(route.local, str(reference))
        if manifest is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.local}@{reference}")
        # tags pointing at it go with it, as distribution
        for tag in await self.ledger.read(queries.tags_pointing, route.local, manifest.digest):
            await self._manifests.delete_tag(route.local, tag)
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
        found = await self._blobs.find(source.local, digest)
        if found is None:
            return False
        try:
            await self._namespace.vouch(source)
        except namespace.NameNowPrivate:
            return False  # claimed meanwhile: the caller's pull right was judged on a cache
        if not await self._blobs.intact(digest):
            log.error("blob %s does not match its digest: not mounted into %s (the upload that follows "
                      "replaces it)", digest, route.local)
            return False
        try:
            await self._blobs.link(route.local, digest, Stat(found.size, self._clock.time()), durable=True)
        except RegistryError as e:
            if e.code != "BLOB_UNKNOWN":
                raise
            return False  # a deletion pass took it meanwhile: not mounted, the client uploads it instead
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

def _page(items: list[str], last: str | None, n: int | None) -> tuple[list[str], bool]:
    """The page after `last` of sorted `items`, at most `n`, and whether more follow."""
    start = bisect.bisect_right(items, last) if last else 0
    if n is None:
        return items[start:], False
    return items[start:start + n], start + n < len(items)


REGISTRY = web.AppKey("registry", Registry)  # the app's one Registry (server/app.py sets it at startup)
