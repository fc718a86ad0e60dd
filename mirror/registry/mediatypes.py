"""Manifest media types: what a body is, and what to answer a client's Accept with."""

from __future__ import annotations

from collections.abc import Iterable

from mirror.registry import jsondoc

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = frozenset({OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})


def detect(body: bytes, declared: str | None = None) -> str:
    """The media type of a manifest body: its `mediaType` field, else the declared Content-Type,
    else OCI by shape (an OCI manifest may omit mediaType)."""
    try:
        doc = jsondoc.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        field = doc.get("mediaType")
        if isinstance(field, str) and field:
            return field
    if declared and declared in MANIFEST_TYPES:
        return declared
    if isinstance(doc, dict) and "manifests" in doc:
        return OCI_INDEX
    return declared or OCI_MANIFEST


def accepted(headers: Iterable[str]) -> frozenset[str]:
    """Every media type in every Accept header (dockerd sends several lines; containerd one list)."""
    types = set()
    for header in headers:
        for item in header.split(","):
            mt = item.split(";")[0].strip().lower()
            if mt:
                types.add(mt)
    return frozenset(types)


def acceptable(media_type: str, accept: frozenset[str]) -> bool:
    """No Accept, `*/*` or the type itself: the client takes it as stored."""
    return not accept or "*/*" in accept or media_type in accept or "application/*" in accept


def default_platform_child(body: bytes) -> str | None:
    """For a client that cannot take an index: the linux/amd64 entry, as distribution answers."""
    try:
        doc = jsondoc.loads(body)
        for entry in doc.get("manifests") or []:
            platform = entry.get("platform") or {}
            if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
                digest = entry.get("digest")
                return digest if isinstance(digest, str) else None
    except (ValueError, AttributeError):
        pass
    return None
