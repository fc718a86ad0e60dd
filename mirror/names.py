"""Parse and validate what clients put in URLs and headers: names, references, digests, ranges."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mirror.errors import RegistryError

# The OCI distribution spec's grammar.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
MAX_NAME = 255

# Algorithm -> hex length. Anything else is refused rather than stored under a path we can't verify.
ALGORITHMS = {"sha256": 64, "sha512": 128}


def parse_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise RegistryError("NAME_INVALID", f"repository name is longer than {MAX_NAME} characters")
    if not NAME_RE.fullmatch(name):
        raise RegistryError("NAME_INVALID", f"invalid repository name: {name[:300]!r}")
    return name


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def parse_digest(value: str) -> Digest:
    m = DIGEST_RE.fullmatch(value)
    if not m:
        raise RegistryError("DIGEST_INVALID", f"invalid digest: {value[:200]!r}")
    algorithm, hexpart = m.groups()
    length = ALGORITHMS.get(algorithm)
    if length is None:
        raise RegistryError("DIGEST_INVALID", f"unsupported digest algorithm: {algorithm!r}")
    if len(hexpart) != length or not re.fullmatch(r"[a-f0-9]+", hexpart):
        raise RegistryError("DIGEST_INVALID", f"invalid {algorithm} digest: {value[:200]!r}")
    return Digest(algorithm, hexpart)


def is_digest(reference: str) -> bool:
    return ":" in reference


def parse_reference(reference: str) -> str | Digest:
    """A manifest reference: a tag, or a digest."""
    if is_digest(reference):
        return parse_digest(reference)
    if not TAG_RE.fullmatch(reference):
        raise RegistryError("TAG_INVALID", f"invalid tag: {reference[:200]!r}")
    return reference


def parse_range(header: str, size: int) -> tuple[int, int]:
    """A single `bytes=` range against a blob of `size` bytes -> (start, end) with end exclusive.

    Multi-range requests are refused: no registry client sends them, and multipart bodies
    cannot go out with sendfile.
    """
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or not spec or "," in spec:
        raise RegistryError("RANGE_INVALID", f"unsupported range: {header[:100]!r}")
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        raise RegistryError("RANGE_INVALID", f"malformed range: {header[:100]!r}")
    if first == "":
        if last == "" or int(last) == 0:
            raise RegistryError("RANGE_INVALID", f"malformed range: {header[:100]!r}")
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
        if last != "" and int(last) < start:
            raise RegistryError("RANGE_INVALID", f"malformed range: {header[:100]!r}")
    if start >= size:
        raise RegistryError(
            "RANGE_INVALID",
            f"range starts at {start}, blob has {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def parse_page_size(value: str | None, maximum: int) -> int | None:
    """The `n` query parameter of tags/list and _catalog."""
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise RegistryError("PAGINATION_NUMBER_INVALID", f"invalid n: {value[:50]!r}")
    n = int(value)
    if n > maximum:
        raise RegistryError("PAGINATION_NUMBER_INVALID", f"n must be at most {maximum}")
    return n


# Ours (uuid4 hex), or registry:2's (a uuid with hyphens): an upload it left in a root mirror now serves.
UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_upload_id(value: str) -> str:
    """An upload id mirror or registry:2 makes: anything else is unknown, never a path."""
    if not UPLOAD_ID_RE.fullmatch(value):
        raise RegistryError("BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry")
    return value


def parse_content_range(header: str) -> tuple[int, int]:
    """A PATCH's `Content-Range: <start>-<end>` (inclusive) -> (start, end exclusive)."""
    spec = header.strip().removeprefix("bytes").strip().lstrip("=").strip()
    first, dash, last = spec.partition("-")
    if not dash or not first.isdigit() or not last.isdigit() or int(last) < int(first):
        raise RegistryError("RANGE_INVALID", f"malformed Content-Range: {header[:100]!r}")
    return int(first), int(last) + 1
