"""The only place that turns registry objects into storage keys (layout in design.md)."""

from __future__ import annotations

from mirror.names import Digest

REPOSITORIES = "repositories"


def blob(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def repository(name: str) -> str:
    return f"{REPOSITORIES}/{name}"


def tags(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/tags"


def tag(name: str, tag: str) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/tags/{tag}"


def revision(name: str, digest: Digest) -> str:
    """Link: repository `name` has manifest `digest`."""
    return f"{REPOSITORIES}/{name}/_manifests/revisions/{digest.algorithm}/{digest.hex}"


def layer(name: str, digest: Digest) -> str:
    """Link: repository `name` may serve blob `digest`."""
    return f"{REPOSITORIES}/{name}/_layers/{digest.algorithm}/{digest.hex}"
