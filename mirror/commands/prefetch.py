"""`mirror prefetch`: warm the cache by pulling images through a mirror, as a client would.

Each image is pulled over the registry API (manifest, the platform's child manifests of an index,
the config and every layer, bodies streamed and discarded), so the server caches exactly what a
client pull would have cached, with its own verification. Without a server to talk to, the mirror
app is started in this process on an ephemeral loopback port and the pull goes through that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import platform as platform_
import re
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from tqdm import tqdm

from mirror import __version__
from mirror.commands import runner
from mirror.config import Config, MetricsConfig
from mirror.errors import RegistryError
from mirror.names import DIGEST_RE, NAME_RE, TAG_RE, parse_digest
from mirror.registry import manifest_schema, mediatypes
from mirror.server import logs
from mirror.storage import StorageUnavailable, without_hot_tier

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
ACCEPT = ", ".join(sorted(mediatypes.MANIFEST_TYPES))
PARALLEL_BLOBS = 4  # docker's max-concurrent-downloads is 3; the server single-flights each blob anyway
MAX_INDEX_DEPTH = 4  # an index of indexes of ... is refused past this
CHUNK = 1 << 20
SETTLE_SECONDS = 300.0  # for the in-process server's last commits (fsync + rename, or an upload to OSS)
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)


class BadReference(ValueError):
    """A malformed image reference or platform (bad usage: exit 2)."""


class PrefetchError(Exception):
    """One image could not be prefetched; the message says which part and why."""


# --- references -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ImageRef:
    """A Docker-style image reference: `alpine`, `user/app:1`, `ghcr.io/org/app@sha256:...`."""

    original: str
    registry: str  # docker.io for Docker Hub
    repository: str  # library/alpine, org/app
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What to ask the manifest endpoint for: the digest when given (as docker does), else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def mirror_name(self) -> str:
        """The repository name on the mirror: Docker Hub names as they are; another registry through
        its path prefix (`ghcr.io/org/app`), which is how the mirror routes it (README: Several upstreams)."""
        if self.registry == DOCKER_HUB or ":" in self.registry:
            return self.repository
        return f"{self.registry}/{self.repository}"

    @property
    def ns(self) -> str | None:
        """A registry with a port cannot be a path component: it goes as containerd's `?ns=`."""
        return self.registry if ":" in self.registry else None

    def __str__(self) -> str:
        name = self.repository if self.registry == DOCKER_HUB else f"{self.registry}/{self.repository}"
        return f"{name}@{self.digest}" if self.digest else f"{name}:{self.tag or 'latest'}"


_HOST_RE = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                      r"(?::[0-9]+)?")


def parse_reference(text: str) -> ImageRef:
    """Parse as docker does: a first component with a `.` or `:` (or `localhost`) is a registry,
    Docker Hub otherwise (`alpine` -> `library/alpine`); `@digest` wins over `:tag`."""
    rest, at, digest = text.partition("@")
    if at:
        if not DIGEST_RE.fullmatch(digest):
            raise BadReference(f"invalid digest {digest!r}")
        try:
            parse_digest(digest)
        except RegistryError as e:
            raise BadReference(e.message) from None
    registry = DOCKER_HUB
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _HOST_RE.fullmatch(first):
            raise BadReference(f"invalid registry host {first!r}")
        registry, rest = first.lower(), remainder  # host names are case-insensitive; mirror names are not
        if registry in DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
    name, colon, tag = rest.rpartition(":") if ":" in rest.rpartition("/")[2] else (rest, "", "")
    if colon and not TAG_RE.fullmatch(tag):
        raise BadReference(f"invalid tag {tag!r}")
    if not name or not NAME_RE.fullmatch(name) or len(name) > 255:
        raise BadReference(f"invalid repository name {name!r} (lowercase letters, digits and . _ - /)")
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    return ImageRef(text, registry, name, tag or None, digest or None)


# --- platforms ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, entry: Any) -> bool:
        """An index entry's `platform`: os and architecture equal, variant too when we ask for one."""
        if not isinstance(entry, dict):
            return False
        return (entry.get("os") == self.os and entry.get("architecture") == self.architecture
                and (self.variant is None or entry.get("variant") == self.variant))


_MACHINES = {"x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", None),
             "arm64": ("arm64", None), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i386": ("386", None),
             "i686": ("386", None)}


def host_platform() -> Platform:
    """The platform docker on this machine would pull (images are Linux ones whatever the OS here)."""
    machine = platform_.machine().lower()
    arch, variant = _MACHINES.get(machine, (machine, None))
    return Platform("linux", arch, variant)


def parse_platform(text: str | None) -> Platform | None:
    """`os/arch[/variant]`; `all` -> None (every child of an index); no value -> the host's."""
    if text is None:
        return host_platform()
    if text == "all":
        return None
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
        raise BadReference(f"invalid platform {text!r}: expected os/arch[/variant] (linux/amd64) or all")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


# --- the pull --------------------------------------------------------------------------------------

@dataclass
class ImageResult:
    image: ImageRef
    digest: str | None = None  # what the reference resolved to
    manifests: list[str] = field(default_factory=list)  # every manifest fetched (the top one first)
    blobs: list[str] = field(default_factory=list)  # configs and layers
    bytes: int = 0  # blob bytes received
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image.original, "repository": self.image.mirror_name,
                "reference": self.image.reference, "digest": self.digest, "manifests": self.manifests,
                "blobs": self.blobs, "bytes": self.bytes, "seconds": round(self.seconds, 3), "error": self.error}


@dataclass
class Report:
    server: str
    platform: Platform | None
    images: list[ImageResult]

    @property
    def failures(self) -> list[ImageResult]:
        return [r for r in self.images if r.error is not None]

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.failures, "server": self.server,
                "platform": str(self.platform) if self.platform else "all",
                "images": [r.to_json() for r in self.images], "bytes": sum(r.bytes for r in self.images),
                "failures": [{"image": r.image.original, "error": r.error} for r in self.failures]}


@dataclass(frozen=True, slots=True)
class _Blob:
    digest: str
    size: int


def _json_object(body: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise PrefetchError(f"{where} is not a JSON object")
    return doc


def _descriptor(value: Any, where: str) -> _Blob:
    digest = value.get("digest") if isinstance(value, dict) else None
    size = value.get("size") if isinstance(value, dict) else None
    try:
        parse_digest(digest if isinstance(digest, str) else "")
    except RegistryError:
        raise PrefetchError(f"{where}: a descriptor without a valid digest: {str(value)[:200]}") from None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise PrefetchError(f"{where}: descriptor {digest} has no valid size")
    return _Blob(str(digest), size)


def _oci_error(status: int, body: bytes) -> str:
    try:
        errors = json.loads(body)["errors"]
        return "; ".join(f"{e.get('code')}: {e.get('message') or ''}".rstrip(": ") for e in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"HTTP {status}"


class Prefetcher:
    """Pulls images through the registry at `base` (http://host:port)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, platform: Platform | None,
                 progress: bool = False, parallel: int = PARALLEL_BLOBS) -> None:
        self.session = session
        self.base = base.rstrip("/")
        self.platform = platform
        self.progress = progress
        self.parallel = parallel

    def _url(self, image: ImageRef, kind: str, reference: str) -> str:
        query = f"?ns={image.ns}" if image.ns else ""
        return f"{self.base}/v2/{image.mirror_name}/{kind}/{reference}{query}"

    async def ping(self) -> None:
        try:
            async with self.session.get(f"{self.base}/v2/") as r:
                if r.headers.get("Docker-Distribution-API-Version") != "registry/2.0" and r.status != 200:
                    raise PrefetchError(f"{self.base} is not a registry (GET /v2/ answered {r.status})")
        except aiohttp.ClientError as e:
            raise PrefetchError(f"cannot reach {self.base}: {e}") from None

    async def image(self, image: ImageRef) -> ImageResult:
        result = ImageResult(image)
        t0 = time.monotonic()
        try:
            blobs = await self._manifests(image, image.reference, result, 0)
            unique = list({b.digest: b for b in blobs}.values())
            result.blobs = [b.digest for b in unique]
            await self._blobs(image, unique, result)
        except PrefetchError as e:
            result.error = str(e)
        except aiohttp.ClientError as e:
            result.error = f"{image}: connection to {self.base} failed: {e}"
        except TimeoutError:
            result.error = f"{image}: {self.base} stopped answering"
        result.seconds = time.monotonic() - t0
        return result

    async def _manifests(self, image: ImageRef, reference: str, result: ImageResult, depth: int) -> list[_Blob]:
        """GET the manifest; for an index recurse into the chosen children. The blobs to fetch."""
        body, media_type = await self._get_manifest(image, reference)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if result.digest is None:
            result.digest = digest
        result.manifests.append(digest)
        if media_type in mediatypes.INDEX_TYPES:
            if depth >= MAX_INDEX_DEPTH:
                raise PrefetchError(f"{image}: indexes nested deeper than {MAX_INDEX_DEPTH}")
            blobs = []
            for child in self._children(image, body):
                blobs.extend(await self._manifests(image, child, result, depth + 1))
            return blobs
        doc = _json_object(body, f"{image}: manifest {digest}")
        layers = doc.get("layers") or []
        if not isinstance(layers, list):
            raise PrefetchError(f"{image}: manifest {digest}: layers is not a list")
        # Read as a client reads it, not with the push validation: upstreams send manifests a push
        # would refuse (descriptors without a mediaType, say), and docker pulls them all the same.
        return [_descriptor(d, f"{image}: manifest {digest}") for d in [doc.get("config"), *layers]]

    async def _get_manifest(self, image: ImageRef, reference: str) -> tuple[bytes, str]:
        async with self.session.get(self._url(image, "manifests", reference), headers={"Accept": ACCEPT}) as r:
            body = await r.content.read(manifest_schema.MAX_MANIFEST + 1)
            if r.status != 200:
                raise PrefetchError(f"{image}: manifest {reference}: {_oci_error(r.status, body)}")
            declared = r.headers.get("Content-Type")
        if len(body) > manifest_schema.MAX_MANIFEST:
            raise PrefetchError(f"{image}: manifest {reference} is larger than {manifest_schema.MAX_MANIFEST} bytes")
        if reference.startswith(("sha256:", "sha512:")):
            algorithm = reference.split(":", 1)[0]
            if f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}" != reference:
                raise PrefetchError(f"{image}: manifest {reference}: the body does not match the digest")
        return body, mediatypes.detect(body, declared)

    def _children(self, image: ImageRef, body: bytes) -> list[str]:
        entries = _json_object(body, f"{image}: index").get("manifests") or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise PrefetchError(f"{image}: index: manifests is not a list of descriptors")
        if self.platform is None:
            chosen = entries
        else:
            wanted = self.platform
            chosen = [e for e in entries if wanted.matches(e.get("platform"))][:1]
        if not chosen:
            offered = ", ".join(sorted({str(Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant")))
                                        for e in entries if isinstance(p := e.get("platform"), dict)}))
            raise PrefetchError(f"{image}: no {self.platform} image in the index (it has {offered or 'none'}); "
                                f"--platform all fetches every one")
        return [_descriptor(e, f"{image}: index").digest for e in chosen]

    async def _blobs(self, image: ImageRef, blobs: list[_Blob], result: ImageResult) -> None:
        total = sum(b.size for b in blobs)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=str(image), leave=True,
                  disable=not self.progress) as bar:
            gate = asyncio.Semaphore(self.parallel)

            async def one(blob: _Blob) -> None:
                async with gate:
                    await self._blob(image, blob, result, bar.update)

            try:
                async with asyncio.TaskGroup() as group:  # the first failure cancels the other downloads
                    for blob in blobs:
                        group.create_task(one(blob))
            except ExceptionGroup as e:
                raise e.exceptions[0] from None

    async def _blob(self, image: ImageRef, blob: _Blob, result: ImageResult, advance: Callable[[int], object]) -> None:
        received = 0
        async with self.session.get(self._url(image, "blobs", blob.digest)) as r:
            if r.status != 200:
                raise PrefetchError(f"{image}: blob {blob.digest}: {_oci_error(r.status, await r.content.read(65536))}")
            try:
                async for chunk in r.content.iter_chunked(CHUNK):
                    received += len(chunk)
                    result.bytes += len(chunk)
                    advance(len(chunk))
            except aiohttp.ClientPayloadError as e:
                raise PrefetchError(f"{image}: blob {blob.digest} was cut after {received} bytes: {e}") from None
        if received != blob.size:
            raise PrefetchError(f"{image}: blob {blob.digest}: received {received} bytes, the manifest says "
                                f"{blob.size}")


def session() -> aiohttp.ClientSession:
    # auto_decompress off: layer bytes are counted as the server sends them.
    return aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False,
                                 headers={"User-Agent": f"mirror-prefetch/{__version__}"})


async def prefetch(base: str, images: list[ImageRef], platform: Platform | None, progress: bool = False) -> Report:
    """Pull every image through the registry at `base`, one after the other."""
    report = Report(base, platform, [])
    async with session() as s:
        fetcher = Prefetcher(s, base, platform, progress)
        try:
            await fetcher.ping()
        except PrefetchError as e:
            report.images = [ImageResult(image, error=str(e)) for image in images]
            return report
        for image in images:
            report.images.append(await fetcher.image(image))
    return report


async def prefetch_in_process(config: Config, images: list[ImageRef], platform: Platform | None,
                              progress: bool = False) -> Report:
    """Start the mirror app from `config` on an ephemeral loopback port, prefetch through it, stop it.
    Storage may be shared with a running server, as replicas share a bucket."""
    from mirror.api.request import REGISTRY  # the whole server: only needed on this path
    from mirror.server.app import create_app

    # Its own metrics listener would collide with the running server's, its own hot tier fight the server's.
    config = dataclasses.replace(without_hot_tier(config), metrics=MetricsConfig(enabled=False))
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        report = await prefetch(f"http://{host}:{port}", images, platform, progress)
        report.server = "in-process"
        # A client has a blob's last bytes once it verified; its commit to storage may still run.
        try:
            async with asyncio.timeout(SETTLE_SECONDS):
                await app[REGISTRY].settle()
        except TimeoutError:
            for result in report.images:
                result.error = result.error or f"{result.image}: blobs still being stored after {SETTLE_SECONDS:.0f}s"
        return report
    finally:
        await runner.cleanup()


# --- the command ---------------------------------------------------------------------------------

def _server_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
        raise BadReference(f"--server {text!r}: expected the mirror's URL, e.g. http://127.0.0.1:5000")
    return f"{parts.scheme}://{parts.netloc}"


def command(images: list[str], platform: str | None, server: str | None, config: Config | None,
            as_json: bool) -> int:
    """`mirror prefetch`: 0 when every image was fetched, 1 when one failed, 2 for bad usage."""
    try:
        refs = []
        for text in images:
            try:
                refs.append(parse_reference(text))
            except BadReference as e:
                raise BadReference(f"bad image reference {text!r}: {e}") from None
        wanted = parse_platform(platform)
        base = _server_url(server) if server else None
    except BadReference as e:
        print(f"mirror: {e}", file=sys.stderr)
        return 2
    progress = not as_json and sys.stderr.isatty()
    if base is not None:
        report = asyncio.run(prefetch(base, refs, wanted, progress))
    else:
        assert config is not None
        logs.setup(config.log, sys.stderr, "warning")
        try:
            report = asyncio.run(prefetch_in_process(config, refs, wanted, progress))
        except StorageUnavailable as e:
            print(f"mirror: storage error: {e}", file=sys.stderr)
            return 2
    if as_json:
        print(json.dumps(report.to_json()))
    for r in report.images:
        if r.error is not None:
            print(f"mirror: prefetch of {r.image.original} failed: {r.error}", file=sys.stderr)
        elif not as_json:
            print(f"{r.image} {r.digest} {len(r.manifests)} manifests, {len(r.blobs)} blobs, "
                  f"{runner.human_size(r.bytes)} in {r.seconds:.1f}s")
    return 1 if report.failures else 0
