"""The machinery of the OCI distribution-spec conformance suite (v1.1.1, the Go + ginkgo suite in
github.com/opencontainers/distribution-spec `conformance/`), ported to Python for
tests/e2e/test_conformance.py, which holds the specs themselves.

- `Settings`: the suite's OCI_* environment, read with Go's rules (strconv.ParseBool, LookupEnv).
- `Content`: what its init() generates: per-workflow image configs and manifests (Go's
  json.MarshalIndent shapes, base64 `data`, the `newUnspecifiedField` registries must keep), the
  gzip'ed layer, random blobs, the referrers artifacts and index.
- `Client`/`Response`: what the suite uses of its HTTP client (bloodorangeio/reggie over resty):
  `<name>`/`<reference>`/`<digest>` templates, relative and absolute `Location`, OCI error bodies.
- `Tree`: ginkgo's Context/Specify as a list of named specs run in order with shared state;
  g.Skip is pytest.skip.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import random
import string
import sys
import tarfile
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.images import OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, sha256_digest
from tests.support.procs import http
from tests.support.registry import oci_error

# Workflow bits, as the suite's `pull = 1 << iota` constants.
PULL, PUSH, CONTENT_DISCOVERY, CONTENT_MANAGEMENT = 1, 2, 4, 8
WORKFLOW_ENV = {"OCI_TEST_PULL": PULL, "OCI_TEST_PUSH": PUSH, "OCI_TEST_CONTENT_DISCOVERY": CONTENT_DISCOVERY,
                "OCI_TEST_CONTENT_MANAGEMENT": CONTENT_MANAGEMENT}

ERROR_CODES = ("BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID", "MANIFEST_BLOB_UNKNOWN",
               "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "MANIFEST_UNVERIFIED", "NAME_INVALID", "NAME_UNKNOWN",
               "SIZE_INVALID", "TAG_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED")

EMPTY_JSON = "application/vnd.oci.empty.v1+json"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
EMPTY_LAYER_TEST_TAG = "emptylayer"
TEST_TAG_NAME = "tagtest0"
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"  # not even a valid tag
ARTIFACT_TYPE_FILTER = "artifactType"
ANNOTATION_KEY = "org.opencontainers.conformance.test"
USER_AGENT = "distribution-spec-conformance-tests"


def parse_bool(value: str) -> bool:
    """Go's strconv.ParseBool, an unparseable value being false (the suite ignores the error)."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


@dataclass(frozen=True)
class Settings:
    namespace: str
    crossmount_namespace: str
    workflows: int
    delete_manifest_before_blobs: bool
    run_automatic_crossmount_test: bool  # OCI_AUTOMATIC_CROSSMOUNT set at all
    automatic_crossmount_enabled: bool
    env: Mapping[str, str]  # for the skip report

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        workflows = 0
        for var, bit in WORKFLOW_ENV.items():
            if parse_bool(env.get(var, "")):
                workflows |= bit
        automatic = env.get("OCI_AUTOMATIC_CROSSMOUNT")
        return cls(
            namespace=env.get("OCI_NAMESPACE", ""),
            crossmount_namespace=env.get("OCI_CROSSMOUNT_NAMESPACE") or f"conformance-{uuid.uuid4()}",
            workflows=workflows,
            delete_manifest_before_blobs=parse_bool(env["OCI_DELETE_MANIFEST_BEFORE_BLOBS"])
            if "OCI_DELETE_MANIFEST_BEFORE_BLOBS" in env else True,
            run_automatic_crossmount_test=automatic is not None,
            automatic_crossmount_enabled=parse_bool(automatic or ""),
            env=dict(env),
        )

    def skip_if_disabled(self, workflow: int) -> None:
        if not self.workflows & workflow:
            report = "".join(f"\t{k}={self.env.get(k, '')}\n" for k in WORKFLOW_ENV)
            pytest.skip("you have skipped this test; if this is an error, check your environment variable "
                        f"settings:\n{report}")


def run_only_if(condition: bool) -> None:
    if not condition:
        pytest.skip("not run in this configuration, as in the Go suite (RunOnlyIf)")


def run_only_if_not(condition: bool) -> None:
    run_only_if(not condition)


def warn(message: str) -> None:
    """The suite's Warn: a note on stderr, the spec still passes."""
    print(f"WARNING: {message}", file=sys.stderr)


# --- generated content -------------------------------------------------------------------------

@dataclass(frozen=True)
class Blob:
    content: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.content)

    @property
    def length(self) -> str:
        return str(len(self.content))


def go_json(obj: Any) -> bytes:
    """json.MarshalIndent(obj, "", "\\t") for the plain values used here."""
    return json.dumps(obj, indent="\t", ensure_ascii=False).encode()


def descriptor(media_type: str, blob: Blob, *, data: bytes | None = None, unspecified: bytes | None = None,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A descriptor in the suite's field order. `newUnspecifiedField` is not in the image spec and
    always present (null when unset): registries must store and serve it as sent."""
    out: dict[str, Any] = {"mediaType": media_type, "digest": blob.digest, "size": len(blob.content)}
    if annotations:
        out["annotations"] = annotations
    if data is not None:
        out["data"] = base64.b64encode(data).decode()
    out["newUnspecifiedField"] = base64.b64encode(unspecified).decode() if unspecified is not None else None
    return out


def manifest(config: dict[str, Any], layers: list[dict[str, Any]], *, media_type: str | None = OCI_MANIFEST,
             artifact_type: str | None = None, subject: dict[str, Any] | None = None,
             annotations: dict[str, str] | None = None) -> Blob:
    out: dict[str, Any] = {"schemaVersion": 2}
    if media_type:
        out["mediaType"] = media_type
    if artifact_type:
        out["artifactType"] = artifact_type
    out |= {"config": config, "layers": layers}
    if subject:
        out["subject"] = subject
    if annotations:
        out["annotations"] = annotations
    return Blob(go_json(out))


def random_blob(size: int, seed: int) -> Blob:
    """Reproducible random bytes for one seed (the suite's randomBlob)."""
    return Blob(random.Random(seed).randbytes(size))


def gzip_tar(name: str, data: bytes) -> bytes:
    """A one-file tar.gz, deterministic (the suite's base64 test layer is such a tarball)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


@dataclass
class Chunked:
    """testBlobB and its two chunks (rebuilt bigger when a registry asks for a minimum chunk size)."""
    blob: Blob
    chunk1: bytes
    chunk2: bytes

    @classmethod
    def make(cls, size: int, seed: int) -> Chunked:
        blob = random_blob(size, seed)
        cut = size // 2 + 1
        return cls(blob, blob.content[:cut], blob.content[cut:])

    @property
    def chunk1_range(self) -> str:
        return f"0-{len(self.chunk1) - 1}"

    @property
    def chunk2_range(self) -> str:
        return f"{len(self.chunk1)}-{len(self.blob.content) - 1}"


@dataclass
class Content:
    """Everything the suite pushes; fresh random configs each run, so digests never collide with
    an earlier run's content."""
    seed: int = field(default_factory=lambda: random.randrange(1 << 31))

    def __post_init__(self) -> None:
        letters = string.digits + string.ascii_uppercase + string.ascii_lowercase + "-"
        rng = random.SystemRandom()
        # One config and manifest per workflow (the suite makes 16 of each: its count is the bit
        # flag after the four workflows; specs use the first five).
        self.configs = [Blob(go_json({"author": "".join(rng.choice(letters) for _ in range(16)),
                                      "architecture": "amd64", "os": "linux",
                                      "rootfs": {"type": "layers", "diff_ids": []}})) for _ in range(5)]
        self.layer = Blob(gzip_tar("test.txt", b"a layer of the conformance suite\n"))
        layers = [descriptor(OCI_LAYER_GZIP, self.layer)]
        self.manifests = [manifest(self.config_descriptor(c), layers) for c in self.configs]
        # No layers and no mediaType: the push workflow's "no layers" manifest.
        self.empty_layer_manifest = manifest(self.config_descriptor(self.configs[1]), [], media_type=None)
        self.invalid_manifest = b"blablabla"
        self.blob_a = random_blob(42, self.seed + 1)
        self.chunked = Chunked.make(42, self.seed + 2)
        self.dummy_digest = sha256_digest(b"hello world")

        # Referrers: artifacts whose subject is manifests[4], one whose subject (manifests[3]) is
        # not pushed yet, and an index of two of them.
        self.empty_json = Blob(b"{}")
        empty = descriptor(EMPTY_JSON, self.empty_json)
        self.ref_blob_a = Blob(b"artifact A of the conformance suite")
        self.ref_blob_b = Blob(b"artifact B of the conformance suite")
        self.artifact_type_a = "application/vnd.conformance.artifact-a"
        self.artifact_type_b = "application/vnd.conformance.artifact-b"
        self.artifact_type_index = "application/vnd.conformance.index"
        subject = descriptor(OCI_MANIFEST, self.manifests[4])
        self.annotation_values: dict[str, str] = {}
        self.refs_a_config = self._annotated(manifest(
            descriptor(self.artifact_type_a, self.ref_blob_a), [empty], subject=subject,
            annotations={ANNOTATION_KEY: "test config a"}), "test config a")
        self.refs_b_config = self._annotated(manifest(
            descriptor(self.artifact_type_b, self.ref_blob_b), [empty], subject=subject,
            annotations={ANNOTATION_KEY: "test config b"}), "test config b")
        self.refs_a_layer = self._annotated(manifest(
            empty, [descriptor(self.artifact_type_a, self.ref_blob_a)], artifact_type=self.artifact_type_a,
            subject=subject, annotations={ANNOTATION_KEY: "test layer a"}), "test layer a")
        self.refs_b_layer = self._annotated(manifest(
            empty, [descriptor(self.artifact_type_b, self.ref_blob_b)], artifact_type=self.artifact_type_b,
            subject=subject, annotations={ANNOTATION_KEY: "test layer b"}), "test layer b")
        self.refs_c_layer = manifest(empty, [descriptor(self.artifact_type_b, self.ref_blob_b)],
                                     artifact_type=self.artifact_type_b,
                                     subject=descriptor(OCI_MANIFEST, self.manifests[3]))
        self.refs_index = self._annotated(Blob(go_json({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": self.artifact_type_index,
            "manifests": [descriptor(OCI_MANIFEST, self.refs_a_config), descriptor(OCI_MANIFEST, self.refs_a_layer)],
            "subject": subject, "annotations": {ANNOTATION_KEY: "test index"}})), "test index")

    @staticmethod
    def config_descriptor(config: Blob) -> dict[str, Any]:
        # The config's bytes ride along as `data`, and an unknown field with them.
        return descriptor(OCI_CONFIG, config, data=config.content, unspecified=b"hello world")

    def _annotated(self, blob: Blob, value: str) -> Blob:
        self.annotation_values[blob.digest] = value
        return blob

    def rebuild_chunked(self, size: int) -> None:
        self.chunked = Chunked.make(size, self.seed + 2)


# --- the HTTP client ---------------------------------------------------------------------------

@dataclass(repr=False)
class Response:
    method: str
    url: str
    status: int
    headers: Any  # email.message.Message: case-insensitive get
    body: bytes

    def header(self, name: str) -> str:
        return str(self.headers.get(name) or "")

    def relative_location(self) -> str:
        """reggie's GetRelativeLocation: the Location's path and query."""
        loc = urllib.parse.urlsplit(self.header("Location"))
        return loc.path + (f"?{loc.query}" if loc.query else "")

    def absolute_location(self) -> str:
        loc = self.header("Location")
        return urllib.parse.urljoin(self.url, loc) if loc else ""

    def errors(self) -> list[dict[str, Any]]:
        return oci_error(self.body)

    def tags(self) -> list[str]:
        """The suite's getTagList: the `tags` of a tag list, [] for anything else."""
        try:
            tags = json.loads(self.body).get("tags")
        except (ValueError, AttributeError):
            return []
        return tags if isinstance(tags, list) else []

    def __repr__(self) -> str:  # what a failed assertion shows
        return f"{self.method} {self.url} -> {self.status} {self.body[:400]!r}"


@dataclass
class Client:
    """A reggie client with a default name: `path` is a template (`<name>`, `<reference>`,
    `<digest>`) or a location a registry answered."""
    root_url: str
    namespace: str

    def do(self, method: str, path: str, *, name: str | None = None, reference: str = "", digest: str = "",
           headers: Mapping[str, str] | None = None, query: Mapping[str, str] | None = None,
           body: bytes | None = None) -> Response:
        path = (path.replace("<name>", name or self.namespace).replace("<reference>", reference)
                .replace("<digest>", digest))
        url = self.root_url + path
        if query:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(sorted(query.items()))
        # Go sends Content-Length from the body it has, whatever header was set (the suite sets
        # one for a PUT without a body); urllib sends 0 for a bodiless POST/PUT/PATCH, as Go.
        sent = {k: v for k, v in (headers or {}).items() if k.lower() != "content-length"}
        r = http(method, url, {"User-Agent": USER_AGENT, **sent}, data=body)
        return Response(method, url, r.status, r.headers, r.body)


# --- the spec tree -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    path: tuple[str, ...]
    text: str
    body: Callable[[], None]

    @property
    def name(self) -> str:
        return " / ".join((*self.path, self.text))


class Tree:
    """ginkgo's Context and Specify: specs in the order declared, under their contexts."""

    def __init__(self) -> None:
        self.specs: list[Spec] = []
        self._path: list[str] = []

    @contextlib.contextmanager
    def context(self, title: str) -> Iterator[None]:
        self._path.append(title)
        try:
            yield
        finally:
            self._path.pop()

    def specify(self, text: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
        def add(body: Callable[[], None]) -> Callable[[], None]:
            self.specs.append(Spec(tuple(self._path), text, body))
            return body
        return add


# --- gomega's matchers as the suite uses them ---------------------------------------------------

def expect_status(resp: Response, *statuses: int) -> None:
    assert resp.status in statuses, f"want {' or '.join(map(str, statuses))}: {resp}"


def expect_2xx(resp: Response, *others: int) -> None:
    """SatisfyAll(>=200, <300), or one of `others`."""
    assert 200 <= resp.status < 300 or resp.status in others, \
        f"want 2xx{''.join(f' or {s}' for s in others)}: {resp}"
