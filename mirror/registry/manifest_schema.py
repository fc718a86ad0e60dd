"""What a pushed manifest says: validated media type, the blobs and manifests it references,
its subject and artifact type (for the referrers API)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mirror.errors import RegistryError
from mirror.names import Digest, parse_digest
from mirror.registry import jsondoc, mediatypes

MAX_MANIFEST = 4 << 20
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
           "application/vnd.docker.distribution.manifest.v1+prettyjws")


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    media_type: str
    blobs: list[Digest] = field(default_factory=list)  # config and layers
    manifests: list[Digest] = field(default_factory=list)  # children of an index
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None


async def read_manifest(chunks: AsyncIterator[bytes], declared_length: int | None,
                        limit: int = MAX_MANIFEST) -> bytes | None:
    """A manifest body read whole (it is small by definition); None past `limit` bytes."""
    if (declared_length or 0) > limit:
        return None
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _invalid(message: str) -> RegistryError:
    return RegistryError("MANIFEST_INVALID", message)


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _invalid(f"{where}: expected a descriptor object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where}.mediaType: required")
    if not isinstance(digest, str):
        raise _invalid(f"{where}.digest: required")
    try:
        d = parse_digest(digest)
    except RegistryError:
        raise _invalid(f"{where}.digest: invalid digest {digest[:100]!r}") from None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _invalid(f"{where}.size: expected a non-negative integer")
    artifact_type = value.get("artifactType")
    annotations = value.get("annotations")
    return Descriptor(media_type, d, size,
                      artifact_type if isinstance(artifact_type, str) else None,
                      annotations if isinstance(annotations, dict) else None)


def parse(body: bytes, content_type: str | None) -> ParsedManifest:
    """Validate a pushed manifest; MANIFEST_INVALID says what is wrong with it."""
    try:
        doc = jsondoc.loads(body)
    except jsondoc.TooDeep:
        raise _invalid(f"manifest nests arrays and objects deeper than {jsondoc.MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise _invalid("manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise _invalid("manifest must be a JSON object")
    declared = (content_type or "").split(";")[0].strip()
    field_type = doc.get("mediaType")
    if declared in SCHEMA1 or field_type in SCHEMA1:
        raise _invalid("Docker schema 1 manifests are not supported; push schema 2 or OCI")
    if doc.get("schemaVersion") != 2:
        raise _invalid("schemaVersion must be 2")
    if field_type is not None and not isinstance(field_type, str):
        raise _invalid("mediaType must be a string")
    if field_type and declared and declared in mediatypes.MANIFEST_TYPES and field_type != declared:
        raise _invalid(f"mediaType {field_type} does not match Content-Type {declared}")
    media_type = mediatypes.detect(body, declared or None)
    if media_type not in mediatypes.MANIFEST_TYPES:
        raise _invalid(f"unsupported manifest media type {media_type[:100]!r}")
    subject = _descriptor(doc["subject"], "subject") if doc.get("subject") is not None else None
    annotations = doc.get("annotations") if isinstance(doc.get("annotations"), dict) else None
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType must be a string")

    if media_type in mediatypes.INDEX_TYPES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise _invalid("manifests: expected a list")
        refs = [_descriptor(c, f"manifests[{i}]") for i, c in enumerate(children)]
        return ParsedManifest(media_type, manifests=[r.digest for r in refs], subject=subject,
                              artifact_type=artifact_type, annotations=annotations)

    config = _descriptor(doc.get("config"), "config")
    layers = doc.get("layers")
    if layers is None and media_type == mediatypes.OCI_MANIFEST:
        layers = []
    if not isinstance(layers, list):
        raise _invalid("layers: expected a list")
    blobs = [config.digest, *(_descriptor(x, f"layers[{i}]").digest for i, x in enumerate(layers))]
    if artifact_type is None and config.media_type != IMAGE_CONFIG and media_type == mediatypes.OCI_MANIFEST:
        artifact_type = config.media_type  # OCI 1.1: an artifact without artifactType is typed by its config
    return ParsedManifest(media_type, blobs=blobs, subject=subject, artifact_type=artifact_type,
                          annotations=annotations)


def references(body: bytes, keys: tuple[str, ...] = ("layers", "manifests", "blobs")) -> list[Digest]:
    """What a stored manifest references: config, layers, an index's children. Read leniently, not
    with the push validation: upstreams send manifests a push would refuse (descriptors without a
    mediaType, say), and their references count all the same (gc, eviction, export)."""
    try:
        doc = jsondoc.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(doc, dict):
        return []
    descriptors = [doc.get("config")] if "layers" in keys else []
    for key in keys:
        if isinstance(doc.get(key), list):
            descriptors += doc[key]
    refs = []
    for descriptor in descriptors:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
            with contextlib.suppress(RegistryError):
                refs.append(parse_digest(descriptor["digest"]))
    return refs


def child_manifests(body: bytes) -> list[Digest]:
    """An index's children: the references that are manifests themselves (read them too to know all
    a manifest reaches)."""
    return references(body, ("manifests",))
