"""The storage layout, both ways: the only place that turns registry objects into storage keys
(the builders) and keys back into objects (`parse`). Readers that walk storage use these through
inventory.py.

    blobs/<algorithm>/<2 hex>/<hex>                              blob (and manifest) bytes
    repositories/<name>/_manifests/tags/<tag>                    -> digest
    repositories/<name>/_manifests/revisions/<algorithm>/<hex>   this repository has this manifest
    repositories/<name>/_layers/<algorithm>/<hex>                this repository may serve this blob
    repositories/<name>/_mirror/{private,cached}                 what this name is here (registry/namespace.py)
    repositories/<name>/_referrers/<alg>/<subject hex>/<alg>-<hex>   a manifest naming that subject
    repositories/<name>/_uploads/<id>/{data,startedat,hashstate} an upload in progress
    _quarantine/<algorithm>/<hex>                                a damaged private blob, kept, never served

Beside registry:2's tree, mirror's own shared state (registry:2 never looks there), the part of the
layout every replica on this storage reads and writes (mirror/ledger/):

    _mirror/journal/<hour>/<minute>/<ms>-<replica>-<seq>     what one write changed (ledger records)
    _mirror/passes/<id>                                      a gc or eviction pass under way: what it may delete
"""

from __future__ import annotations

from dataclasses import dataclass

from mirror.errors import RegistryError
from mirror.names import Digest, parse_digest

BLOBS = "blobs"
REPOSITORIES = "repositories"
QUARANTINE = "_quarantine"


def blob(digest: Digest) -> str:
    return f"{BLOBS}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def quarantined(digest: Digest) -> str:
    """Where `mirror scrub` moves a private blob whose bytes no longer match its digest: out of what
    is served (a push of the right bytes repairs it), kept for whoever wants to look."""
    return f"{QUARANTINE}/{digest.algorithm}/{digest.hex}"


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


PRIVATE_MARK = "private"  # hosted here: pushed to, never proxied
CACHED_MARK = "cached"  # holds content pulled through from an upstream
MARKS = (PRIVATE_MARK, CACHED_MARK)


def marker(name: str, mark: str) -> str:
    """What this mirror has decided `name` is (`private` or `cached`). Under `_mirror/`, a directory
    registry:2's catalog walk skips, so the same storage still serves registry:2."""
    return f"{REPOSITORIES}/{name}/_mirror/{mark}"


def markers(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_mirror"


def referrers(name: str, subject: Digest) -> str:
    return f"{REPOSITORIES}/{name}/_referrers/{subject.algorithm}/{subject.hex}"


def all_referrers(name: str) -> str:
    """Every referrer record of `name`: `<algorithm>/<subject hex>/<referrer_entry>` below."""
    return f"{REPOSITORIES}/{name}/_referrers"


def referrer(name: str, subject: Digest, manifest: Digest) -> str:
    """The descriptor of `manifest`, which names `subject` as its subject."""
    return f"{referrers(name, subject)}/{manifest.algorithm}-{manifest.hex}"


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


MIRROR = "_mirror"
JOURNAL = f"{MIRROR}/journal"
PASSES = f"{MIRROR}/passes"


def journal_hour(hour: int) -> str:
    """The records of one hour (hours since the epoch): the unit the journal is pruned by."""
    return f"{JOURNAL}/{hour:08d}"


def journal_minute(minute: int) -> str:
    """The records of one minute (minutes since the epoch): the unit the journal is tailed by."""
    return f"{journal_hour(minute // 60)}/{minute:010d}"


def journal_record(ms: int, replica: str, seq: int) -> str:
    """One record: written at `ms` (epoch milliseconds) by `replica`; names sort by time."""
    return f"{journal_minute(ms // 60_000)}/{ms:013d}-{replica}-{seq:08d}"


def journal_time(name: str) -> int | None:
    """The milliseconds a record's name (the last part of its key) was written at; None for a stray."""
    head = name.split("-", 1)[0]
    return int(head) if len(head) == 13 and head.isdigit() else None


def deletion_pass(pass_id: str) -> str:
    return f"{PASSES}/{pass_id}"


# --- keys back into objects ---------------------------------------------------------------------

BLOB, LAYER, REVISION, TAG, MARKER, REFERRER, UPLOAD, QUARANTINED = "blob", "layer", "revision", "tag", \
    "marker", "referrer", "upload", "quarantined"


@dataclass(frozen=True, slots=True)
class Parsed:
    """What a key stands for: `kind` (one of the constants above) and the parts it names."""

    kind: str
    repository: str = ""
    digest: Digest | None = None  # the blob, the linked blob or manifest, the referring manifest
    tag: str = ""
    subject: Digest | None = None  # a referrer record's subject
    upload_id: str = ""
    mark: str = ""  # a marker's: private or cached


def digest_of(algorithm: str, hexpart: str) -> Digest | None:
    """The digest a pair of key parts names, or None if they name none (a stray file)."""
    try:
        return parse_digest(f"{algorithm}:{hexpart}")
    except RegistryError:
        return None


def parse(key: str) -> Parsed | None:
    """The object a storage key stands for; None for anything else (staging files, strays)."""
    parts = key.split("/")
    if parts[0] == BLOBS:
        if len(parts) == 4 and parts[2] == parts[3][:2]:
            d = digest_of(parts[1], parts[3])
            return Parsed(BLOB, digest=d) if d else None
        return None
    if parts[0] == QUARANTINE:
        d = digest_of(parts[1], parts[2]) if len(parts) == 3 else None
        return Parsed(QUARANTINED, digest=d) if d else None
    if parts[0] != REPOSITORIES:
        return None
    mark = next((i for i, p in enumerate(parts) if p.startswith("_")), None)
    if mark is None or mark < 2:
        return None
    name, kind, rest = "/".join(parts[1:mark]), parts[mark], parts[mark + 1:]
    if kind == "_layers" and len(rest) == 2:
        d = digest_of(*rest)
        return Parsed(LAYER, name, d) if d else None
    if kind == "_manifests" and len(rest) == 3 and rest[0] == "revisions":
        d = digest_of(rest[1], rest[2])
        return Parsed(REVISION, name, d) if d else None
    if kind == "_manifests" and len(rest) == 2 and rest[0] == "tags":
        return Parsed(TAG, name, tag=rest[1])
    if kind == "_mirror" and len(rest) == 1 and rest[0] in MARKS:
        return Parsed(MARKER, name, mark=rest[0])
    if kind == "_referrers" and len(rest) == 3:
        subject = digest_of(rest[0], rest[1])
        d = digest_of(*rest[2].split("-", 1)) if "-" in rest[2] else None
        return Parsed(REFERRER, name, d, subject=subject) if subject and d else None
    if kind == "_uploads" and len(rest) >= 1:
        return Parsed(UPLOAD, name, upload_id=rest[0])
    return None
