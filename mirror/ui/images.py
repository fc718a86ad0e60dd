"""What the UI shows of a manifest: its layers, config (env, entrypoint, labels, history), the
platforms of an index, size and created time. Manifests and configs come from untrusted images:
parsed defensively here (any shape), escaped by the templates. Summaries are kept by digest
(content-addressed, so never stale) to render a page of tags without reading every config again.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from mirror.errors import RegistryError
from mirror.names import parse_digest
from mirror.registry import jsondoc, mediatypes
from mirror.service import Registry

CONFIG_LIMIT = 4 << 20  # a config bigger than this is not read for display
SUMMARIES_KEPT = 20_000


@dataclass(frozen=True, slots=True)
class Layer:
    media_type: str
    size: int | None
    digest: str
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Child:
    """One entry of an index: a platform's image (or an attestation)."""

    digest: str
    media_type: str
    size: int | None
    platform: str


@dataclass(frozen=True, slots=True)
class Summary:
    """One row of a repository's tag list."""

    digest: str
    media_type: str
    size: int | None  # config + layers; an index: the sum over the children present here
    created: str | None
    platforms: tuple[str, ...]
    is_index: bool


@dataclass
class ManifestView:
    digest: str
    media_type: str
    body: bytes
    schema: Any  # the parsed JSON
    is_index: bool = False
    artifact_type: str | None = None
    config: Layer | None = None
    layers: list[Layer] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    subject: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    image_config: dict[str, Any] | None = None  # the config blob's JSON, when it is here
    config_missing: bool = False

    @property
    def size(self) -> int | None:
        if self.is_index:
            return None
        sizes = [x.size for x in ([self.config] if self.config else []) + self.layers]
        return sum(s for s in sizes if s is not None) if sizes and None not in sizes else None

    @property
    def pretty(self) -> str:
        try:
            return json.dumps(self.schema, indent=2, sort_keys=False)
        except (TypeError, ValueError):
            return self.body.decode(errors="replace")


def _str(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else json.dumps(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _strings(value: Any) -> dict[str, str]:
    return {str(k): _str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _descriptor(value: Any) -> Layer | None:
    if not isinstance(value, dict) or not isinstance(value.get("digest"), str):
        return None
    return Layer(_str(value.get("mediaType")), _int(value.get("size")), value["digest"],
                 _strings(value.get("annotations")))


def platform_name(value: Any) -> str:
    """`linux/arm64/v8` from an index entry's platform; `unknown/unknown` (attestations) as is."""
    if not isinstance(value, dict):
        return ""
    parts = [_str(value.get("os")), _str(value.get("architecture")), _str(value.get("variant"))]
    return "/".join(p for p in parts if p)


def parse_view(digest: str, media_type: str, body: bytes) -> ManifestView:
    try:
        schema = jsondoc.loads(body)
    except ValueError:
        schema = None
    view = ManifestView(digest, media_type, body, schema)
    if not isinstance(schema, dict):
        return view
    view.is_index = media_type in mediatypes.INDEX_TYPES or isinstance(schema.get("manifests"), list)
    view.artifact_type = _str(schema.get("artifactType")) or None
    view.annotations = _strings(schema.get("annotations"))
    subject = _descriptor(schema.get("subject"))
    view.subject = subject.digest if subject else None
    if view.is_index:
        for entry in schema.get("manifests") or []:
            d = _descriptor(entry)
            if d is not None:
                view.children.append(Child(d.digest, d.media_type, d.size, platform_name(entry.get("platform"))))
        return view
    view.config = _descriptor(schema.get("config"))
    layers = schema.get("layers") if isinstance(schema.get("layers"), list) else schema.get("blobs")
    for entry in layers if isinstance(layers, list) else []:
        d = _descriptor(entry)
        if d is not None:
            view.layers.append(d)
    return view


class Images:
    """Reads manifests and configs from storage for display."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._summaries: OrderedDict[tuple[str, str], Summary] = OrderedDict()

    async def view(self, repository: str, digest: str, with_config: bool = True) -> ManifestView:
        """The manifest `repository` links (MANIFEST_UNKNOWN otherwise), parsed, with its config."""
        manifest = await self.registry.stored_manifest(repository, digest)
        if manifest is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {repository}@{digest}")
        view = parse_view(manifest.digest, manifest.media_type, manifest.body)
        if with_config and view.config is not None:
            view.image_config = await self._config(view.config)
            view.config_missing = view.image_config is None
        return view

    async def _config(self, config: Layer) -> dict[str, Any] | None:
        if "json" not in config.media_type:  # an artifact's config (or the empty one) is no image config
            return None
        try:
            body = await self.registry.small_blob(parse_digest(config.digest), CONFIG_LIMIT)
        except RegistryError:
            return None
        if body is None:
            return None
        try:
            parsed = jsondoc.loads(body)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None

    async def summary(self, repository: str, digest: str) -> Summary | None:
        """Size, created time and platforms of a tag's manifest (None: not here any more)."""
        key = (repository, digest)
        found = self._summaries.get(key)
        if found is not None:
            return found
        try:
            view = await self.view(repository, digest)
        except RegistryError:
            return None
        if view.is_index:
            sizes: list[int] = []
            created: str | None = None
            for child in view.children:
                try:
                    sub = await self.view(repository, child.digest)
                except RegistryError:
                    continue  # a platform nobody pulled through the mirror yet
                if sub.size is not None:
                    sizes.append(sub.size)
                created = created or _created(sub.image_config)
            platforms = tuple(c.platform for c in view.children if c.platform and c.platform != "unknown/unknown")
            found = Summary(view.digest, view.media_type, sum(sizes) if sizes else None, created, platforms, True)
        else:
            found = Summary(view.digest, view.media_type, view.size, _created(view.image_config),
                            _platform_of(view.image_config), False)
        self._summaries[key] = found
        if len(self._summaries) > SUMMARIES_KEPT:
            self._summaries.popitem(last=False)
        return found


def _created(config: dict[str, Any] | None) -> str | None:
    value = config.get("created") if config else None
    return value if isinstance(value, str) else None


def _platform_of(config: dict[str, Any] | None) -> tuple[str, ...]:
    name = platform_name(config) if config else ""
    return (name,) if name else ()


def config_section(config: dict[str, Any] | None) -> dict[str, Any]:
    """The parts of an image config the manifest page shows, each of a known shape."""
    if not config:
        return {}
    inner: dict[str, Any] = config["config"] if isinstance(config.get("config"), dict) else {}
    history = []
    for entry in config.get("history") or []:
        if isinstance(entry, dict):
            history.append({"created": _str(entry.get("created")), "created_by": _str(entry.get("created_by")),
                            "comment": _str(entry.get("comment")), "empty_layer": entry.get("empty_layer") is True})

    def listed(value: Any) -> list[str]:
        return [_str(v) for v in value] if isinstance(value, list) else [_str(value)] if value else []

    return {
        "created": _created(config),
        "platform": platform_name(config),
        "env": listed(inner.get("Env")),
        "entrypoint": listed(inner.get("Entrypoint")),
        "cmd": listed(inner.get("Cmd")),
        "workdir": _str(inner.get("WorkingDir")),
        "user": _str(inner.get("User")),
        "exposed": sorted(str(p) for p in inner.get("ExposedPorts") or {}) if isinstance(
            inner.get("ExposedPorts"), dict) else [],
        "labels": _strings(inner.get("Labels")),
        "history": history,
    }
