"""The storage layout, both ways: the only place that turns registry objects into storage keys
(the builders) and keys back into objects (`parse`). Readers that walk storage use these through
inventory.py.

It is registry:2's (CNCF distribution's) layout, so a registry:2 root is served as it is and
registry:2 pointed back at mirror's storage reads what mirror wrote. Under `docker/registry/v2/`:

    blobs/<alg>/<2 hex>/<hex>/data                                  blob (and manifest) bytes
    repositories/<name>/_layers/<alg>/<hex>/link                    this repository may serve this blob
    repositories/<name>/_manifests/revisions/<alg>/<hex>/link       this repository has this manifest
    repositories/<name>/_manifests/tags/<tag>/current/link          what the tag points to
    repositories/<name>/_manifests/tags/<tag>/index/<alg>/<hex>/link  every manifest the tag pointed to
    repositories/<name>/_uploads/<id>/data, startedat               an upload in progress (RFC 3339 start)
    repositories/<name>/_uploads/<id>/hashstates/<alg>/<offset>     the hash after <offset> bytes (Go's
                                                                    encoding.BinaryMarshaler format)
    repositories/<name>/_mirror/{private,cached}                    what this name is here (mirror's own)
    repositories/<name>/_mirror/referrers/<alg>/<subject hex>/<alg>-<hex>  a manifest naming that subject

and beside it, mirror's own: `_quarantine/<alg>/<hex>`, a damaged private blob, kept, never served.

A link file holds the digest string. registry:2 skips every `_`-directory of a repository but
`_layers` (its catalog) and the ones it reads by path, so `_mirror/` is invisible to it. Its
pull-through cache keeps `scheduler-state.json` at the storage root. Mirror's local state
(`_index`, `_staging`, `_tier`, `_events`) lives beside `docker/`, outside what registry:2 reads.

Beside registry:2's tree too, the state every replica on this storage shares (mirror/ledger/):

    _mirror/journal/<hour>/<minute>/<ms>-<replica>-<seq>     what one write changed (ledger records)
    _mirror/passes/<id>                                      a gc or eviction pass under way: what it may delete

Mirror's own layout before it adopted registry:2's (`blobs/<alg>/<2 hex>/<hex>`,
`repositories/<name>/...` with plain files for links and tags) is parsed by `parse_legacy`, for
migrate.py to move it over.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from mirror.errors import RegistryError
from mirror.names import Digest, parse_digest

ROOT = "docker/registry/v2"
BLOBS = f"{ROOT}/blobs"
REPOSITORIES = f"{ROOT}/repositories"
SCHEDULER_STATE = "scheduler-state.json"  # registry:2's pull-through cache state: this root was a cache
QUARANTINE = "_quarantine"  # mirror's own, beside registry:2's tree: never read by it


def blob(digest: Digest) -> str:
    return f"{blob_entry(digest)}/data"


def blob_entry(digest: Digest) -> str:
    """Everything of one blob: what deleting it removes (as registry:2's garbage collector does)."""
    return f"{BLOBS}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def quarantined(digest: Digest) -> str:
    """Where `mirror scrub` moves a private blob whose bytes no longer match its digest: out of what
    is served (a push of the right bytes repairs it), kept for whoever wants to look."""
    return f"{QUARANTINE}/{digest.algorithm}/{digest.hex}"


def is_blob(key: str) -> bool:
    """A key in the blob store (immutable content: a local copy is never stale)."""
    return key.startswith(BLOBS + "/")


def link(digest: Digest | str) -> bytes:
    """What a link file holds: the digest string, as registry:2 writes it."""
    return str(digest).encode()


def repository(name: str) -> str:
    return f"{REPOSITORIES}/{name}"


# What puts a repository in the catalog: registry:2 lists those with blob links; a manifest pulled
# through before any of its blobs lists it too. Emptied by deletes, it stays listed, as in registry:2.
CATALOGED = ("_layers", "_manifests")


def tags(name: str) -> str:
    """The tags of `name`: one directory each."""
    return f"{REPOSITORIES}/{name}/_manifests/tags"


def tag(name: str, tag: str) -> str:
    """The link to what tag `tag` points to now."""
    return f"{tag_entry(name, tag)}/current/link"


def tag_entry(name: str, tag: str) -> str:
    """Everything of one tag: what deleting it removes."""
    return f"{tags(name)}/{tag}"


def tag_index(name: str, tag: str, digest: Digest) -> str:
    """Link: tag `tag` of `name` has pointed to `digest` (registry:2 keeps one per manifest tagged)."""
    return f"{tag_entry(name, tag)}/index/{digest.algorithm}/{digest.hex}/link"


def tag_links(name: str, tag_name: str, digest: Digest) -> list[tuple[str, bytes]]:
    """The writes that point a tag at `digest`, in registry:2's order: the index entry, then current."""
    return [(tag_index(name, tag_name, digest), link(digest)), (tag(name, tag_name), link(digest))]


def revision(name: str, digest: Digest) -> str:
    """Link: repository `name` has manifest `digest`."""
    return f"{REPOSITORIES}/{name}/_manifests/revisions/{digest.algorithm}/{digest.hex}/link"


def layer(name: str, digest: Digest) -> str:
    """Link: repository `name` may serve blob `digest`."""
    return f"{REPOSITORIES}/{name}/_layers/{digest.algorithm}/{digest.hex}/link"


def revisions(name: str) -> str:
    """Every manifest link of `name`: `<algorithm>/<hex>/link` below."""
    return f"{REPOSITORIES}/{name}/_manifests/revisions"


def layers(name: str) -> str:
    """Every blob link of `name`: `<algorithm>/<hex>/link` below."""
    return f"{REPOSITORIES}/{name}/_layers"


PRIVATE_MARK = "private"  # hosted here: pushed to, never proxied
CACHED_MARK = "cached"  # holds content pulled through from an upstream
MARKS = (PRIVATE_MARK, CACHED_MARK)


def marker(name: str, mark: str) -> str:
    """What this mirror has decided `name` is (`private` or `cached`). Under `_mirror/`, a directory
    registry:2's catalog walk skips, so the same storage still serves registry:2."""
    return f"{markers(name)}/{mark}"


def markers(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_mirror"


def referrers(name: str, subject: Digest) -> str:
    return f"{all_referrers(name)}/{subject.algorithm}/{subject.hex}"


def all_referrers(name: str) -> str:
    """Every referrer record of `name`: `<algorithm>/<subject hex>/<referrer_entry>` below."""
    return f"{REPOSITORIES}/{name}/_mirror/referrers"


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


def hashstates(name: str, upload_id: str, algorithm: str) -> str:
    """The saved hash states of an upload: one per offset below."""
    return f"{upload(name, upload_id)}/hashstates/{algorithm}"


def hashstate(name: str, upload_id: str, algorithm: str, offset: int) -> str:
    return f"{hashstates(name, upload_id, algorithm)}/{offset}"


def started_at(epoch: float) -> bytes:
    """An upload's `startedat`, as registry:2 writes it (RFC 3339, UTC, to the second)."""
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode()


def parse_started(data: bytes) -> float | None:
    """When an upload started, from registry:2's RFC 3339 `startedat` or mirror's older epoch seconds."""
    text = data.decode(errors="replace").strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo else when.replace(tzinfo=datetime.UTC).timestamp()


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

BLOB, LAYER, REVISION, TAG, TAG_INDEX, MARKER, REFERRER, UPLOAD, QUARANTINED = (
    "blob", "layer", "revision", "tag", "tag_index", "marker", "referrer", "upload", "quarantined")
LEGACY_PRIVATE, HASHSTATE = "legacy_private", "hashstate"  # parse_legacy only


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


def _split_repository(parts: list[str]) -> tuple[str, str, list[str]] | None:
    """(name, `_`-directory, what follows) of a key's parts below `repositories/`. Name components
    never start with `_` (the name grammar), so the first one that does ends the name."""
    mark = next((i for i, p in enumerate(parts) if p.startswith("_")), None)
    if mark is None or mark < 1:
        return None
    return "/".join(parts[:mark]), parts[mark], parts[mark + 1:]


def _referrer(name: str, rest: list[str]) -> Parsed | None:
    subject = digest_of(rest[0], rest[1])
    d = digest_of(*rest[2].split("-", 1)) if "-" in rest[2] else None
    return Parsed(REFERRER, name, d, subject=subject) if subject and d else None


def parse(key: str) -> Parsed | None:
    """The object a storage key stands for; None for anything else (local state, strays, registry:2's
    schema 1 signatures, mirror's old layout)."""
    if key.startswith(QUARANTINE + "/"):
        parts = key.split("/")
        d = digest_of(parts[1], parts[2]) if len(parts) == 3 else None
        return Parsed(QUARANTINED, digest=d) if d else None
    if not key.startswith(ROOT + "/"):
        return None
    top, *parts = key[len(ROOT) + 1:].split("/")
    if top == "blobs":
        if len(parts) == 4 and parts[3] == "data" and parts[1] == parts[2][:2]:
            d = digest_of(parts[0], parts[2])
            return Parsed(BLOB, digest=d) if d else None
        return None
    split = _split_repository(parts) if top == "repositories" else None
    if split is None:
        return None
    name, kind, rest = split
    if kind == "_layers" and len(rest) == 3 and rest[2] == "link":
        d = digest_of(rest[0], rest[1])
        return Parsed(LAYER, name, d) if d else None
    if kind == "_manifests" and len(rest) == 4 and rest[0] == "revisions" and rest[3] == "link":
        d = digest_of(rest[1], rest[2])
        return Parsed(REVISION, name, d) if d else None
    if kind == "_manifests" and len(rest) == 4 and rest[0] == "tags" and rest[2:] == ["current", "link"]:
        return Parsed(TAG, name, tag=rest[1])
    if kind == "_manifests" and len(rest) == 6 and rest[0] == "tags" and rest[2] == "index" and rest[5] == "link":
        d = digest_of(rest[3], rest[4])
        return Parsed(TAG_INDEX, name, d, tag=rest[1]) if d else None
    if kind == "_mirror" and len(rest) == 1 and rest[0] in MARKS:
        return Parsed(MARKER, name, mark=rest[0])
    if kind == "_mirror" and len(rest) == 4 and rest[0] == "referrers":
        return _referrer(name, rest[1:])
    if kind == "_uploads" and len(rest) >= 1:
        return Parsed(UPLOAD, name, upload_id=rest[0])
    return None


# --- mirror's layout before registry:2's (read by migrate.py only) -------------------------------

LEGACY_BLOBS = "blobs"
LEGACY_REPOSITORIES = "repositories"


def parse_legacy(key: str) -> Parsed | None:
    """A key of mirror's old layout: `blobs/<alg>/<2 hex>/<hex>`; under `repositories/<name>/`:
    `_layers/<alg>/<hex>`, `_manifests/revisions/<alg>/<hex>`, `_manifests/tags/<tag>` (each a file
    holding a digest), `_mirror/{private,cached}` or the older `_private` file, `_referrers/<alg>/<subject
    hex>/<alg>-<hex>`, `_uploads/<id>/{data,startedat,hashstate}`. An upload's `data` and `startedat`
    parse as UPLOAD (`tag` names which), its `hashstate` (mirror's own format) as HASHSTATE."""
    top, *parts = key.split("/")
    if top == LEGACY_BLOBS:
        if len(parts) == 3 and parts[1] == parts[2][:2]:
            d = digest_of(parts[0], parts[2])
            return Parsed(BLOB, digest=d) if d else None
        return None
    split = _split_repository(parts) if top == LEGACY_REPOSITORIES else None
    if split is None:
        return None
    name, kind, rest = split
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
    if kind == "_private" and not rest:
        return Parsed(LEGACY_PRIVATE, name, mark=PRIVATE_MARK)
    if kind == "_referrers" and len(rest) == 3:
        return _referrer(name, rest)
    if kind == "_uploads" and len(rest) == 2 and rest[1] in ("data", "startedat"):
        return Parsed(UPLOAD, name, upload_id=rest[0], tag=rest[1])
    if kind == "_uploads" and len(rest) == 2 and rest[1] == "hashstate":
        return Parsed(HASHSTATE, name, upload_id=rest[0])
    return None
