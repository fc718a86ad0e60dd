"""`mirror export` and `mirror import`: repositories, private and cached, as one portable tar file.

Everything is read and written through the Storage interface, so it works the same on the
filesystem and on OSS. The tar (format version 1) holds, in this order:

    mirror-export.json   the header: every repository (kind private or proxied, tags -> digest,
                         manifest links, blob links, referrer records, and the digests its manifests
                         reference that the archive does not hold), and every blob with its size,
                         in member order
    blobs/<alg>/<hex>    one member per blob (manifests are blobs too), its bytes as stored
    mirror-export.end    {"header": "<sha256 of mirror-export.json>", "blobs": N, "bytes": B}:
                         written last, so an archive without it is incomplete

Export is consistent while a server runs: tags are read first, then manifest links, then blob
links (a push writes them in the opposite order, so every tag read finds its manifest and every
manifest its blobs), then the blobs, which are immutable. A blob removed meanwhile (gc,
eviction) fails the export, clearly; the output only appears, renamed from `.partial`, once whole.

Import verifies everything before it writes anything: every member's size and digest, the header
against the end marker, every manifest's references. New blobs are staged on local disk (beside
the storage root, so committing them is a rename on the filesystem backend) during that pass;
only when the whole archive checked out are they committed, then the links, tags and private
markers. A damaged, truncated or inconsistent archive leaves storage as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from mirror.commands import runner
from mirror.commands.runner import USAGE, CommandError
from mirror.config import Config
from mirror.errors import RegistryError
from mirror.ledger import ops
from mirror.ledger.ledger import Ledger
from mirror.names import ALGORITHMS, MAX_NAME, NAME_RE, TAG_RE, Digest, parse_digest
from mirror.registry import manifest_schema, namespace
from mirror.registry.namespace import glob_to_regex
from mirror.storage import NotFound, Stat, Storage, StorageUnavailable, inventory, layout

FORMAT = "mirror-export"
VERSION = 1
HEADER = "mirror-export.json"
TRAILER = "mirror-export.end"
KINDS = ("private", "proxied")
MAX_HEADER = 256 << 20  # ~1M blobs; a header past this is not one of ours
MAX_TRAILER = 64 << 10
CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
PARALLEL = 8  # storage calls in flight (each a request on OSS)

T = TypeVar("T")
R = TypeVar("R")


class ArchiveError(Exception):
    """The export or import failed; the message names the member or object at fault."""


# --- the header ----------------------------------------------------------------------------------

@dataclass
class Repository:
    name: str
    kind: str  # private | proxied
    tags: dict[str, str] = field(default_factory=dict)  # tag -> manifest digest
    manifests: list[str] = field(default_factory=list)  # manifest links (revisions)
    layers: list[str] = field(default_factory=list)  # blob links: configs and layers
    referrers: list[dict[str, Any]] = field(default_factory=list)  # {"subject": digest, "descriptor": {...}}
    absent: list[str] = field(default_factory=list)  # referenced by its manifests, not in the archive

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "tags": self.tags, "manifests": self.manifests,
                "layers": self.layers, "referrers": self.referrers, "absent": self.absent}

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "tags": sorted(self.tags), "manifests": len(self.manifests),
                "layers": len(self.layers), "absent": len(self.absent)}


@dataclass
class Header:
    repositories: list[Repository]
    blobs: dict[str, int]  # digest -> size, in member order
    created: str = ""

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, "created": self.created,
               "repositories": [r.to_json() for r in self.repositories],
               "blobs": [{"digest": d, "size": s} for d, s in self.blobs.items()]}
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Header:
        """Parse and validate a header; ArchiveError says what is wrong with it."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ArchiveError(f"{HEADER} is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ArchiveError(f"{HEADER} is not a mirror export header")
        if doc.get("version") != VERSION:
            raise ArchiveError(f"{HEADER}: format version {doc.get('version')!r} is not {VERSION} "
                               f"(made by another version of mirror?)")
        blobs: dict[str, int] = {}
        for i, entry in enumerate(_list(doc, "blobs", HEADER)):
            where = f"{HEADER}: blobs[{i}]"
            digest = _digest(entry.get("digest") if isinstance(entry, dict) else None, where)
            size = entry.get("size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ArchiveError(f"{where}: size must be a non-negative integer")
            if digest in blobs:
                raise ArchiveError(f"{where}: {digest} is listed twice")
            blobs[digest] = size
        repositories = []
        names = set()
        for i, raw in enumerate(_list(doc, "repositories", HEADER)):
            repo = _repository(raw, f"{HEADER}: repositories[{i}]", blobs)
            if repo.name in names:
                raise ArchiveError(f"{HEADER}: repository {repo.name} is listed twice")
            names.add(repo.name)
            repositories.append(repo)
        created = doc.get("created")
        return cls(repositories, blobs, created if isinstance(created, str) else "")


def _list(doc: Any, key: str, where: str) -> list[Any]:
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, list):
        raise ArchiveError(f"{where}: {key} must be a list")
    return value


def _digest(value: Any, where: str) -> str:
    try:
        if not isinstance(value, str):
            raise RegistryError("DIGEST_INVALID")
        return str(parse_digest(value))
    except RegistryError:
        raise ArchiveError(f"{where}: invalid digest {str(value)[:150]!r}") from None


def _repository(raw: Any, where: str, blobs: dict[str, int]) -> Repository:
    if not isinstance(raw, dict):
        raise ArchiveError(f"{where}: expected an object")
    name = raw.get("name")
    if not isinstance(name, str) or len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise ArchiveError(f"{where}: invalid repository name {str(name)[:150]!r}")
    where = f"{HEADER}: repository {name}"
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ArchiveError(f"{where}: kind must be one of {', '.join(KINDS)}")
    repo = Repository(name, kind)
    for key in ("manifests", "layers"):
        listed = [_digest(d, f"{where}: {key}") for d in _list(raw, key, where)]
        for digest in listed:
            if digest not in blobs:
                raise ArchiveError(f"{where}: {key} names {digest}, which is not among the archive's blobs")
        setattr(repo, key, listed)
    repo.absent = [_digest(d, f"{where}: absent") for d in _list(raw, "absent", where)]
    tags = raw.get("tags")
    if not isinstance(tags, dict):
        raise ArchiveError(f"{where}: tags must be an object")
    manifests = set(repo.manifests)
    for tag, digest in tags.items():
        if not TAG_RE.fullmatch(tag):
            raise ArchiveError(f"{where}: invalid tag {tag[:150]!r}")
        if _digest(digest, f"{where}: tag {tag}") not in manifests:
            raise ArchiveError(f"{where}: tag {tag} points at {digest}, which is not one of its manifests")
        repo.tags[tag] = digest
    for i, record in enumerate(_list(raw, "referrers", where)):
        descriptor = record.get("descriptor") if isinstance(record, dict) else None
        if not isinstance(descriptor, dict):
            raise ArchiveError(f"{where}: referrers[{i}]: descriptor must be an object")
        subject = _digest(record.get("subject"), f"{where}: referrers[{i}].subject")
        digest = _digest(descriptor.get("digest"), f"{where}: referrers[{i}].descriptor")
        if digest not in manifests:
            raise ArchiveError(f"{where}: referrers[{i}] describes {digest}, which is not one of its manifests")
        repo.referrers.append({"subject": subject, "descriptor": descriptor})
    return repo


def member_name(digest: str) -> str:
    algorithm, hexpart = digest.split(":", 1)
    return f"blobs/{algorithm}/{hexpart}"


def _member_digest(name: str) -> str | None:
    m = re.fullmatch(r"blobs/([a-z0-9]+)/([a-f0-9]+)", name)
    if m is None or m.group(1) not in ALGORITHMS:
        return None
    try:
        return str(parse_digest(f"{m.group(1)}:{m.group(2)}"))
    except RegistryError:
        return None


async def _bounded(items: Iterable[T], call: Callable[[T], Awaitable[R]], limit: int = PARALLEL) -> list[R]:
    """`call` on every item, at most `limit` at a time (storage round trips on OSS), in order."""
    gate = asyncio.Semaphore(limit)

    async def one(item: T) -> R:
        async with gate:
            return await call(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


# --- export --------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    output: Path
    header: Header
    notes: list[str]
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "output": str(self.output), "repositories": [r.summary() for r in self.header.repositories],
                "blobs": len(self.header.blobs), "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "notes": self.notes}


async def _is_private(storage: Storage, name: str, children: list[str]) -> bool:
    """As registry/namespace.py classifies it (without the config: a pattern's repositories carry a marker)."""
    marks = await inventory.marks(storage, name) if "_mirror" in children else set()
    has_content = not {"_manifests", "_layers"}.isdisjoint(children)
    return namespace.classify(False, marks, has_content) == namespace.PRIVATE


async def _read_repository(storage: Storage, name: str, marks: list[str], notes: list[str]) -> Repository:
    """Tags first, then manifest links, then blob links: a concurrent push writes them the other way round."""
    repo = Repository(name, "private" if await _is_private(storage, name, marks) else "proxied")
    for tag in await inventory.tag_names(storage, name):
        target = await inventory.tag_target(storage, name, tag)
        if target is None:
            continue  # deleted meanwhile
        try:
            repo.tags[tag] = str(parse_digest(target))
        except RegistryError:
            notes.append(f"{name}: tag {tag} holds no digest; left out")
    repo.manifests = [str(d) for d in await inventory.manifests(storage, name)]
    repo.layers = [str(d) for d in await inventory.layers(storage, name)]
    for subject, manifest, key in await inventory.referrer_records(storage, name):
        try:
            descriptor = json.loads(await storage.get_bytes(key))
        except (NotFound, ValueError):
            continue
        if isinstance(descriptor, dict) and descriptor.get("digest") == str(manifest):
            repo.referrers.append({"subject": str(subject), "descriptor": descriptor})
    return repo


async def plan_export(storage: Storage, patterns: list[str], kind: str | None) -> tuple[Header, list[str]]:
    """What an export of the repositories matching `patterns` (all when empty) and `kind` holds."""
    notes: list[str] = []
    wanted = [(p, re.compile(glob_to_regex(p))) for p in patterns]
    matched: set[str] = set()
    selected = []
    for name, marks in await inventory.repository_names(storage):
        if not {"_manifests", "_layers", "_mirror"} & set(marks):
            continue  # only uploads in progress
        hits = [p for p, regex in wanted if regex.fullmatch(name)]
        matched.update(hits)
        if wanted and not hits:
            continue
        if kind is not None and ("private" if await _is_private(storage, name, marks) else "proxied") != kind:
            continue
        selected.append((name, marks))
    unmatched = [p for p, _ in wanted if p not in matched]
    if unmatched:
        raise ArchiveError(f"no repository matches {', '.join(unmatched)}")
    repositories = [await _read_repository(storage, name, marks, notes) for name, marks in selected]

    # Sizes of everything linked; a link whose blob is gone (a dangling link gc has not dropped yet)
    # serves nothing today and is left out.
    digests = list(dict.fromkeys(d for r in repositories for d in [*r.manifests, *r.layers]))
    stats = await _bounded(digests, lambda d: storage.stat(layout.blob(parse_digest(d))))
    sizes = {d: st.size for d, st in zip(digests, stats, strict=True) if st is not None}
    bodies: dict[str, bytes] = {}

    async def body(digest: str) -> None:
        with contextlib.suppress(NotFound):
            bodies[digest] = await storage.get_bytes(layout.blob(parse_digest(digest)))

    await _bounded([d for d in dict.fromkeys(d for r in repositories for d in r.manifests) if d in sizes], body)
    blobs: dict[str, int] = {}
    for repo in repositories:
        gone = [d for d in repo.manifests if d not in bodies] + [d for d in repo.layers if d not in sizes]
        if gone:
            notes.append(f"{repo.name}: {len(gone)} links to blobs no longer in storage left out")
        repo.manifests = [d for d in repo.manifests if d in bodies]
        repo.layers = [d for d in repo.layers if d in sizes]
        kept = set(repo.manifests)
        for tag, digest in list(repo.tags.items()):
            if digest not in kept:
                notes.append(f"{repo.name}: tag {tag} points at {digest}, which the repository does not have; "
                             f"left out")
                del repo.tags[tag]
        repo.referrers = [r for r in repo.referrers if r["descriptor"].get("digest") in kept]
        included = kept | set(repo.layers)
        absent: dict[str, None] = {}
        for digest in repo.manifests:
            for ref in _refs(bodies[digest]):
                if ref not in included:
                    absent[ref] = None
        repo.absent = list(absent)
        if repo.absent and repo.kind == "private":
            notes.append(f"{repo.name}: its manifests reference {len(repo.absent)} blobs it does not have "
                         f"(deleted?); they stay missing after import")
        for digest in [*repo.manifests, *repo.layers]:
            blobs.setdefault(digest, sizes[digest])
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Header(repositories, blobs, created), notes


def _refs(body: bytes) -> list[str]:
    return [str(d) for d in manifest_schema.references(body)]


def _tar_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, mtime, 0o644, tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


async def write_archive(storage: Storage, header: Header, output: Path, progress: bool = False) -> int:
    """Write the tar; bytes of blobs written. The file appears (renamed from `.partial`) only when whole."""
    partial = output.with_name(output.name + ".partial")
    header_bytes = header.to_bytes()
    now = int(time.time())
    total = 0
    try:
        f = await asyncio.to_thread(open, partial, "wb")
        with f, runner.byte_bar(progress, "export", sum(header.blobs.values())) as bar:
            f.write(_tar_header(HEADER, len(header_bytes), now) + header_bytes + _padding(len(header_bytes)))
            for digest, size in header.blobs.items():
                f.write(_tar_header(member_name(digest), size, now))
                await _copy_blob(storage, f, parse_digest(digest), size, bar.update)
                f.write(_padding(size))
                total += size
            trailer = json.dumps({"header": "sha256:" + hashlib.sha256(header_bytes).hexdigest(),
                                  "blobs": len(header.blobs), "bytes": total}).encode()
            f.write(_tar_header(TRAILER, len(trailer), now) + trailer + _padding(len(trailer)))
            end = f.tell() + 2 * BLOCK  # the end-of-archive blocks, then padding to a whole record, as tar
            f.write(b"\0" * (2 * BLOCK + (-end % RECORD)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return total


async def _copy_blob(storage: Storage, f: IO[bytes], digest: Digest, size: int,
                     advance: Callable[[int], object]) -> None:
    """Stream one blob into the tar, hashed on the way: a damaged blob never makes a backup that
    only fails at restore time. (Hashing and writing in a thread beside the next read measured no
    faster here: this command is the only thing on its loop.)"""
    hasher = digest.hasher()
    written = 0
    try:
        async for chunk in storage.reader(layout.blob(digest)):
            written += len(chunk)
            if written > size:
                raise ArchiveError(f"blob {digest} in storage is larger than the {size} bytes it had moments ago")
            hasher.update(chunk)
            f.write(chunk)
            advance(len(chunk))
    except NotFound:
        raise ArchiveError(f"blob {digest} was removed from storage during the export (mirror gc or eviction); "
                           f"run the export again") from None
    if written != size:
        raise ArchiveError(f"blob {digest} in storage has {written} bytes, not the {size} it had moments ago")
    if hasher.hexdigest() != digest.hex:
        raise ArchiveError(f"blob {digest} in storage does not match its digest: storage is damaged; "
                           f"delete it (it is fetched or pushed again) and run the export again")


async def export(storage: Storage, output: Path, patterns: list[str], kind: str | None,
                 progress: bool = False) -> ExportResult:
    t0 = time.monotonic()
    header, notes = await plan_export(storage, patterns, kind)
    written = await write_archive(storage, header, output, progress)
    return ExportResult(output, header, notes, written, time.monotonic() - t0)


# --- import --------------------------------------------------------------------------------------

@dataclass
class ImportResult:
    archive: Path
    header: Header
    new_blobs: int
    new_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "archive": str(self.archive),
                "repositories": [r.summary() for r in self.header.repositories], "blobs": len(self.header.blobs),
                "bytes": sum(self.header.blobs.values()), "new_blobs": self.new_blobs, "new_bytes": self.new_bytes,
                "seconds": round(self.seconds, 3)}


def _open(path: Path) -> tarfile.TarFile:
    try:
        # Seekable mode reads member data straight from the file: stream mode ("r|") copies every
        # block through its buffer and reads at a third of the speed. Members are still read in order.
        return tarfile.open(path, mode="r:")
    except tarfile.TarError as e:
        raise ArchiveError(f"{path} is not a tar file: {e}") from None


def read_header(path: Path) -> bytes:
    """The first member's bytes, which must be the header."""
    try:
        with _open(path) as tar:
            first = tar.next()
            if first is None or first.name != HEADER or not first.isreg():
                raise ArchiveError(f"{path}: the first member is {first.name if first else 'missing'}, not {HEADER}: "
                                   f"not a mirror export")
            if first.size > MAX_HEADER:
                raise ArchiveError(f"{path}: {HEADER} is larger than {MAX_HEADER} bytes")
            data = _read_member(tar, first)
    except (tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"{path}: {HEADER} is damaged or truncated: {e}") from None
    return data


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None
    data = f.read()
    if len(data) != member.size:
        raise ArchiveError(f"{member.name}: {len(data)} bytes of {member.size}: the file is truncated")
    return data


def verify(path: Path, header_bytes: bytes, header: Header, present: set[str], staging: Path,
           advance: Callable[[int], object] = lambda n: None) -> dict[str, bytes]:
    """Read the whole archive: every member where the header says, with its size and digest; the end
    marker matching the header. Blobs not in `present` are staged as `staging/<alg>-<hex>`. Returns
    the manifest bodies. Nothing here touches storage."""
    manifests = {d for r in header.repositories for d in r.manifests}
    bodies: dict[str, bytes] = {}
    seen: set[str] = set()
    last = HEADER
    reading: str | None = None  # the member being read, for the message when it is cut short
    trailer: bytes | None = None
    try:
        with _open(path) as tar:
            first = tar.next()
            if first is None or first.name != HEADER or _read_member(tar, first) != header_bytes:
                raise ArchiveError(f"{path}: {HEADER} changed while importing")
            while (member := tar.next()) is not None:
                # TarFile keeps every member it read (an undocumented list): each is read once, in order here.
                tar.members.clear()  # type: ignore[attr-defined]
                reading = member.name
                if trailer is not None:
                    raise ArchiveError(f"{path}: {member.name} follows {TRAILER}, which must be the last member")
                if member.name == TRAILER and member.isreg() and member.size <= MAX_TRAILER:
                    trailer = _read_member(tar, member)
                    last, reading = member.name, None
                    continue
                digest = _member_digest(member.name)
                if digest is None or not member.isreg():
                    raise ArchiveError(f"{path}: unexpected member {member.name[:200]!r} after {last}")
                if digest not in header.blobs:
                    raise ArchiveError(f"{path}: {member.name} is not listed in {HEADER}")
                if digest in seen:
                    raise ArchiveError(f"{path}: {member.name} appears twice")
                if member.size != header.blobs[digest]:
                    raise ArchiveError(f"{path}: {member.name} has {member.size} bytes, {HEADER} says "
                                       f"{header.blobs[digest]}")
                body = _verify_blob(tar, member, digest, None if digest in present else staging, advance,
                                    keep=digest in manifests)
                if body is not None:
                    bodies[digest] = body
                seen.add(digest)
                last, reading = member.name, None
    except (tarfile.TarError, EOFError) as e:
        where = f"in {reading[:200]}" if reading else f"after {last}"
        raise ArchiveError(f"{path}: damaged or truncated {where}: {e}") from None
    missing = [d for d in header.blobs if d not in seen]
    if missing:
        raise ArchiveError(f"{path}: the archive ends after {last} without {member_name(missing[0])}"
                           f"{f' and {len(missing) - 1} more blobs' if len(missing) > 1 else ''}: "
                           f"the file is truncated or damaged there")
    if trailer is None:
        raise ArchiveError(f"{path}: no {TRAILER} after {last}: the file is truncated")
    try:
        end = json.loads(trailer)
        expected = "sha256:" + hashlib.sha256(header_bytes).hexdigest()
        ok = (end.get("header") == expected and end.get("blobs") == len(header.blobs)
              and end.get("bytes") == sum(header.blobs.values()))
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ArchiveError(f"{path}: {TRAILER} does not match {HEADER}: the header is damaged")
    return bodies


def _verify_blob(tar: tarfile.TarFile, member: tarfile.TarInfo, digest: str, staging: Path | None,
                 advance: Callable[[int], object], keep: bool) -> bytes | None:
    if keep and member.size > manifest_schema.MAX_MANIFEST:
        raise ArchiveError(f"{member.name}: a manifest larger than {manifest_schema.MAX_MANIFEST} bytes")
    d = parse_digest(digest)
    hasher = d.hasher()
    source = tar.extractfile(member)
    assert source is not None
    kept = bytearray() if keep else None
    received = 0
    with open(staging / f"{d.algorithm}-{d.hex}", "wb") if staging is not None else contextlib.nullcontext() as out:
        while chunk := source.read(CHUNK):
            hasher.update(chunk)
            if out is not None:
                out.write(chunk)
            if kept is not None:
                kept += chunk
            received += len(chunk)
            advance(len(chunk))
    if received != member.size:
        raise ArchiveError(f"{member.name}: {received} bytes of {member.size}: the file is truncated")
    if hasher.hexdigest() != d.hex:
        raise ArchiveError(f"{member.name}: its bytes do not match the digest (sha: {hasher.hexdigest()[:16]}...): "
                           f"the archive is damaged")
    return bytes(kept) if kept is not None else None


def check_references(header: Header, bodies: dict[str, bytes]) -> None:
    """Every reference of every manifest is in its repository, or declared absent by the exporter."""
    for repo in header.repositories:
        included = {*repo.manifests, *repo.layers, *repo.absent}
        for digest in repo.manifests:
            for ref in _refs(bodies[digest]):
                if ref not in included:
                    raise ArchiveError(f"{HEADER}: manifest {digest} of {repo.name} references {ref}, which the "
                                       f"archive neither holds ({member_name(ref)}) nor declares absent")


async def commit(storage: Storage, ledger: Ledger, header: Header, present: dict[str, Stat], bodies: dict[str, bytes],
                 staging: Path, progress: bool = False) -> tuple[int, int]:
    """Blobs first, then per repository blob links, manifest links, referrers, tags and the private
    marker: a server reading meanwhile never finds a link to a blob that is not there yet. Each
    repository is then told to the ledger, durably (a deletion pass on any replica keeps its blobs)."""
    new = [d for d in header.blobs if d not in present]
    now = time.time()

    async def put(digest: str) -> None:
        d = parse_digest(digest)
        staged = staging / f"{d.algorithm}-{d.hex}"
        os.utime(staged)  # mtime = now: gc's grace period counts from the commit, not from the staging
        await storage.put_file(layout.blob(d), staged)
        bar.update(header.blobs[digest])

    async def still_there(digest: str) -> None:
        if await storage.stat(layout.blob(parse_digest(digest))) is None:
            raise ArchiveError(f"blob {digest} was deleted from storage during the import (mirror gc?); "
                               f"run the import again")

    for repo in header.repositories:  # a name is private or a cache here for good: never both
        mark = layout.PRIVATE_MARK if repo.kind == "private" else layout.CACHED_MARK
        other = (set(layout.MARKS) - {mark}) & await inventory.marks(storage, repo.name)
        if other:
            raise ArchiveError(f"{repo.name} is {other.pop()} here but {repo.kind} in the archive; nothing was "
                               f"written to storage")
    with runner.byte_bar(progress, "commit", sum(header.blobs[d] for d in new)) as bar:
        await _bounded(new, put, 4)
    await _bounded([d for d in header.blobs if d in present], still_there)
    for repo in header.repositories:
        # What the name is comes before what it holds (registry/namespace.py reads it first).
        mark = layout.PRIVATE_MARK if repo.kind == "private" else layout.CACHED_MARK
        await storage.put_bytes(layout.marker(repo.name, mark), b"")
        writes: list[tuple[str, bytes]] = []
        writes += [(layout.layer(repo.name, parse_digest(d)), layout.link(d)) for d in repo.layers]
        writes += [(layout.revision(repo.name, parse_digest(d)), layout.link(d)) for d in repo.manifests]
        writes += [(layout.referrer(repo.name, parse_digest(r["subject"]), parse_digest(r["descriptor"]["digest"])),
                    json.dumps(r["descriptor"]).encode()) for r in repo.referrers]
        await _bounded(writes, lambda w: storage.put_bytes(*w))
        tags = [w for tag, digest in repo.tags.items() for w in layout.tag_links(repo.name, tag, parse_digest(digest))]
        await _bounded(tags, lambda w: storage.put_bytes(*w))  # after the manifests they point at
        mine = set(repo.layers) | set(repo.manifests)
        changes = [ops.mark(repo.name, mark)]
        changes += [ops.blob(d, header.blobs[d], present[d].mtime if d in present else now) for d in sorted(mine)
                    if d in header.blobs]
        changes += [ops.refs(d, _refs(bodies[d])) for d in repo.manifests if d in bodies]
        changes += [ops.link(repo.name, d, ops.LAYER, now) for d in repo.layers]
        changes += [ops.link(repo.name, d, ops.REVISION, now) for d in repo.manifests]
        changes += [ops.tag(repo.name, tag, digest) for tag, digest in repo.tags.items()]
        if await ledger.record(changes, durable=True):
            raise ArchiveError(f"blobs of {repo.name} were deleted from storage during the import (mirror gc?); "
                               f"run the import again")
    return len(new), sum(header.blobs[d] for d in new)


async def import_archive(storage: Storage, ledger: Ledger, path: Path, progress: bool = False) -> ImportResult:
    """Verify the whole archive (staging new blobs locally), then commit it to storage."""
    t0 = time.monotonic()
    try:
        header_bytes = await asyncio.to_thread(read_header, path)
        header = Header.from_bytes(header_bytes)
    except ArchiveError as e:
        raise ArchiveError(f"{e}; nothing was written to storage") from None
    stats = await _bounded(list(header.blobs), lambda d: storage.stat(layout.blob(parse_digest(d))))
    present = {d: st for d, st in zip(header.blobs, stats, strict=True) if st is not None}
    # Beside the storage root's own staging directory: same filesystem, so a commit is a rename;
    # not inside it, where the server clears files idle for an hour.
    staging = Path(tempfile.mkdtemp(prefix="_import-", dir=storage.staging_dir().parent))
    try:
        try:
            with runner.byte_bar(progress, "verify", sum(header.blobs.values())) as bar:
                bodies = await asyncio.to_thread(verify, path, header_bytes, header, set(present), staging,
                                                bar.update)
            check_references(header, bodies)
        except ArchiveError as e:
            raise ArchiveError(f"{e}; nothing was written to storage") from None
        try:
            new_blobs, new_bytes = await commit(storage, ledger, header, present, bodies, staging, progress)
        except (ArchiveError, StorageUnavailable, OSError) as e:
            raise ArchiveError(f"import failed while writing to storage: {e}; what was written is consistent "
                               f"(blobs before the links to them): run the import again") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)
    return ImportResult(path, header, new_blobs, new_bytes, time.monotonic() - t0)


# --- the commands --------------------------------------------------------------------------------

def _run(config: Config, job: Callable[[Storage], Awaitable[T]]) -> T:
    """`runner.run`, with a failed export or import a message and exit 1."""
    try:
        return runner.run(config, job)
    except ArchiveError as e:
        raise CommandError(str(e)) from None


def export_command(config: Config, output: Path, patterns: list[str], kind: str | None, as_json: bool) -> int:
    """`mirror export`: 0 written, 1 failed (nothing left at `output`), 2 bad usage or storage config."""
    if not output.parent.is_dir():
        raise CommandError(f"--output {output}: no directory {output.parent}", USAGE)
    for pattern in patterns:
        if not re.fullmatch(r"[a-z0-9._/*-]+", pattern):
            raise CommandError(f"{pattern!r} is not a repository name or pattern", USAGE)
    progress = runner.show_progress(as_json)
    result = _run(config, lambda s: export(s, output, patterns, kind, progress))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        repos = result.header.repositories
        private = sum(1 for r in repos if r.kind == "private")
        print(f"exported {len(repos)} repositories ({private} private, {len(repos) - private} proxied), "
              f"{len(result.header.blobs)} blobs, {result.bytes} bytes to {output} in {result.seconds:.1f}s "
              f"({runner.mb_per_s(result.bytes, result.seconds)})")
    return 0


def import_command(config: Config, archive: Path, as_json: bool) -> int:
    """`mirror import`: 0 imported, 1 failed (storage unchanged unless it failed while committing),
    2 bad usage or storage config."""
    if not archive.is_file():
        raise CommandError(f"{archive}: no such file", USAGE)
    progress = runner.show_progress(as_json)
    async def job(storage: Storage) -> ImportResult:
        async with runner.opened_ledger(config, storage, progress) as ledger:
            return await import_archive(storage, ledger, archive, progress)

    result = _run(config, job)
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        repos = result.header.repositories
        total = sum(result.header.blobs.values())
        print(f"imported {len(repos)} repositories, {len(result.header.blobs)} blobs ({result.new_blobs} new, "
              f"{result.new_bytes} bytes) from {archive} in {result.seconds:.1f}s "
              f"({runner.mb_per_s(total, result.seconds)})")
    return 0
