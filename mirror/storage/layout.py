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


def revisions(name: str) -> str:
    """Every manifest link of `name`: `<algorithm>/<hex>` below."""
    return f"{REPOSITORIES}/{name}/_manifests/revisions"


def layers(name: str) -> str:
    """Every blob link of `name`: `<algorithm>/<hex>` below."""
    return f"{REPOSITORIES}/{name}/_layers"


def private_marker(name: str) -> str:
    """Present once something was pushed to `name`: it is hosted here, never proxied."""
    return f"{REPOSITORIES}/{name}/_private"


def referrers(name: str, subject: Digest) -> str:
    return f"{REPOSITORIES}/{name}/_referrers/{subject.algorithm}/{subject.hex}"


def all_referrers(name: str) -> str:
    """Every referrer record of `name`: `<algorithm>/<subject hex>/<referrer_entry>` below."""
    return f"{REPOSITORIES}/{name}/_referrers"


def referrer(name: str, subject: Digest, manifest: Digest) -> str:
    """The descriptor of `manifest`, which names `subject` as its subject."""
    return f"{referrers(name, subject)}/{manifest.algorithm}-{manifest.hex}"


def referrer_manifest(entry: str) -> str:
    """The manifest digest a referrer record's name (the last part of `referrer()`) stands for."""
    return entry.replace("-", ":", 1)


def uploads(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_uploads"


def upload(name: str, upload_id: str) -> str:
    return f"{REPOSITORIES}/{name}/_uploads/{upload_id}"


def upload_data(name: str, upload_id: str) -> str:
    return f"{upload(name, upload_id)}/data"


def upload_started(name: str, upload_id: str) -> str:
    return f"{upload(name, upload_id)}/startedat"


def upload_hashstate(name: str, upload_id: str) -> str:
    return f"{upload(name, upload_id)}/hashstate"
