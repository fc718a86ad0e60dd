"""An Aliyun OSS-protocol server for tests, run as a process: what `oss2` talks to instead of Aliyun.

    python -m tests.support.ossserver --port P --data DIR --bucket NAME [--bucket NAME2 ...]
        --key-id ID --key-secret SECRET [--max-copy-size BYTES]

It listens on 127.0.0.1 only and speaks OSS's object API the way the service does: signature V1 on
every request (the `Authorization: OSS id:sig` header, or a presigned URL's `OSSAccessKeyId`,
`Expires`, `Signature`), path-style `/<bucket>/<key>` addressing (virtual-host `Host: <bucket>.x`
too), XML bodies as oss2 parses them, and OSS's error codes, statuses and messages. Calls: Put, Get
(with OSS's two Range behaviours), Head, Delete, DeleteMultipleObjects, ListObjects v1 and v2,
CopyObject, the multipart calls (UploadPartCopy and ListParts included), AppendObject,
GetBucketInfo, GetBucketLocation and ListBuckets. Anything else gets an OSS error, not a crash.
Buckets are the --bucket names; they cannot be created or deleted through the API.

Everything lives under DIR, so a restarted server finds what the last one stored:

    <bucket>/objects/<sha256(key)>.json          sidecar: key, size, etag, crc64, type, headers, data name
    <bucket>/objects/<sha256(key)>.<uuid>.data   the content; a new file per write (appends extend it)
    .uploads/<upload id>/upload.json, <n>.<uuid>.part   multipart uploads in progress (never listed)
    .tmp/                                        request bodies being received

A body is streamed to .tmp and renamed into place only when complete and checked, so a reader never
sees half an object, and a reader's open file keeps its content whatever is written after it (an
append only adds bytes past the size the reader looked up).

Test controls, not part of OSS (bucket names cannot contain "_", so these never clash):

    POST /_control/faults    {"status503": N, "drop": N, "cut": N, "down": bool, "delay": seconds}
    GET  /_control/faults    the current fault settings
    GET  /_control/requests  [{method, path, query, op, status, fault, request_id}, ...] since start/clear
    POST /_control/requests/clear
    GET  /_control/health

`status503`: the next N OSS requests answer 503 ServiceUnavailable. `drop`: the next N have their
connection closed without an answer. `cut`: the next N GetObject answers with a body send their
headers and half the body, then close. `down`: every request answers 503 until set false. `delay`:
every request waits this long first, until set to 0. Each OSS request is also a JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import email.utils
import hashlib
import hmac
import ipaddress
import json
import os
import re
import shutil
import sys
import time
import traceback
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from aiohttp import web

try:
    # The C extension oss2 installs with crcmod; without it there is no CRC header (oss2 then skips its check).
    from crcmod import _crcfunext, mkCrcFun  # noqa: F401

    _CRC64: Callable[[bytes, int], int] | None = mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True,
                                                          xorOut=0xFFFFFFFFFFFFFFFF)
except ImportError:  # pragma: no cover - the venv has the extension
    _CRC64 = None

CHUNK = 256 * 1024
GiB = 1024**3
MAX_PUT_SIZE = 5 * GiB  # PutObject, UploadPart and AppendObject's total
MIN_PART_SIZE = 100 * 1024  # every part but the last, checked at CompleteMultipartUpload
MAX_PART_NUMBER = 10000
MAX_DELETE_KEYS = 1000
MAX_LIST_KEYS = 1000
MAX_KEY_BYTES = 1023
CLOCK_SKEW = 15 * 60  # seconds a signed request's Date may be off
OWNER_ID = "1000000000000000"
LOCATION = "oss-cn-local"

# Query parameters that are part of the signed CanonicalizedResource (OSS signature V1): the list oss2
# and the other SDKs sign. Every other parameter (prefix, marker, max-keys, ...) is left out.
SIGNED_SUBRESOURCES = frozenset({
    "acl", "uploads", "location", "cors", "logging", "website", "referer", "lifecycle", "delete", "append",
    "tagging", "objectMeta", "uploadId", "partNumber", "security-token", "position", "img", "style",
    "styleName", "replication", "replicationProgress", "replicationLocation", "cname", "bucketInfo", "comp",
    "qos", "live", "status", "vod", "startTime", "endTime", "symlink", "x-oss-process", "response-content-type",
    "x-oss-traffic-limit", "response-content-language", "response-expires", "response-cache-control",
    "response-content-disposition", "response-content-encoding", "udf", "udfName", "udfImage", "udfId",
    "udfImageDesc", "udfApplication", "udfApplicationLog", "restore", "callback", "callback-var", "qosInfo",
    "policy", "stat", "encryption", "versions", "versioning", "versionId", "requestPayment",
    "x-oss-request-payer", "sequential", "inventory", "inventoryId", "continuation-token", "asyncFetch",
    "worm", "wormId", "wormExtend", "withHashContext", "x-oss-enable-md5", "x-oss-enable-sha1",
    "x-oss-enable-sha256", "x-oss-hash-ctx", "x-oss-md5-ctx", "transferAcceleration", "regionList",
    "cloudboxes", "x-oss-ac-source-ip", "x-oss-ac-subnet-mask", "x-oss-ac-vpc-id", "x-oss-ac-forward-allow",
    "metaQuery", "resourceGroup", "rtc", "accessMonitor", "objectInfo", "link", "group", "httpsConfig",
    "x-oss-async-process", "bucketArchiveDirectRead", "redundancyTransition", "x-oss-target-redundancy-type",
    "x-oss-redundancy-transition-taskid", "accessPoint", "accessPointPolicy", "publicAccessBlock",
    "x-oss-access-point-name", "requesterQosInfo", "qosRequester", "resourcePoolInfo", "resourcePool",
    "resourcePoolBuckets", "x-oss-write-get-object-response",
})
# Signed parameters that are arguments of an operation rather than the name of one.
_ARGUMENTS = frozenset({"position", "partNumber", "security-token", "continuation-token", "response-content-type",
                        "response-content-language", "response-expires", "response-cache-control",
                        "response-content-disposition", "response-content-encoding"})
SELECTORS = SIGNED_SUBRESOURCES - _ARGUMENTS

# GetObject's response-* parameters and the header each one overrides.
RESPONSE_OVERRIDES = {"response-content-type": "Content-Type", "response-content-language": "Content-Language",
                      "response-expires": "Expires", "response-cache-control": "Cache-Control",
                      "response-content-disposition": "Content-Disposition",
                      "response-content-encoding": "Content-Encoding"}
# Request headers an object keeps and answers with on GET and HEAD (plus every x-oss-meta-*).
STORED_HEADERS = ("Content-Type", "Cache-Control", "Content-Disposition", "Content-Encoding", "Content-Language",
                  "Expires", "x-oss-server-side-encryption", "x-oss-server-side-encryption-key-id",
                  "x-oss-server-side-data-encryption", "x-oss-storage-class")
SSE_ALGORITHMS = ("AES256", "KMS", "SM4")

# code -> (HTTP status, OSS's message). Handlers raise OssError(code); `error_response` writes the XML.
ERRORS: dict[str, tuple[int, str]] = {
    "AccessDenied": (403, "You have no right to access this object because of bucket acl."),
    "InvalidAccessKeyId": (403, "The OSS Access Key Id you provided does not exist in our records."),
    "SignatureDoesNotMatch": (403, "The request signature we calculated does not match the signature you "
                                   "provided. Check your key and signing method."),
    "RequestTimeTooSkewed": (403, "The difference between the request time and the current time is too large."),
    "NoSuchBucket": (404, "The specified bucket does not exist."),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NoSuchUpload": (404, "The specified upload does not exist. The upload ID may be invalid, or the upload "
                          "may have been aborted or completed."),
    "InvalidArgument": (400, "Invalid Argument."),
    "MissingArgument": (400, "Missing Some Required Arguments."),
    "InvalidDigest": (400, "The Content-MD5 you specified was invalid."),
    "InvalidObjectName": (400, "The specified object is not valid."),
    "InvalidPart": (400, "One or more of the specified parts could not be found or the specified entity tag "
                         "might not have matched the part's entity tag."),
    "InvalidPartOrder": (400, "The list of parts was not in ascending order. Parts list must be specified in "
                              "order by part number."),
    "EntityTooSmall": (400, "Your proposed upload smaller than the minimum allowed size."),
    "EntityTooLarge": (400, "Your proposed upload exceeds the maximum allowed size."),
    "InlineDataTooLarge": (400, "Inline data exceeds the maximum allowed size."),
    "IncompleteBody": (400, "You did not provide the number of bytes specified by the Content-Length HTTP "
                            "header."),
    "MalformedXML": (400, "The XML you provided was not well-formed or did not validate against our published "
                          "schema."),
    "InvalidEncryptionAlgorithmError": (400, "The encryption algorithm specified is not valid."),
    "NotImplemented": (400, "A header you provided implies functionality that is not implemented."),
    "MethodNotAllowed": (405, "The specified method is not allowed against this resource."),
    "ObjectNotAppendable": (409, "The object is not appendable"),
    "PositionNotEqualToLength": (409, "Position is not equal to file length"),
    "FileAlreadyExists": (409, "The object you specified already exists and can not be overwritten."),
    "PreconditionFailed": (412, "At least one of the pre-conditions you specified did not hold."),
    "InvalidRange": (416, "The requested range cannot be satisfied"),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "ServiceUnavailable": (503, "Service is temporarily unavailable, please try again later."),
}


class OssError(Exception):
    """One OSS error answer: a code from ERRORS, optional message, extra XML fields and headers."""

    def __init__(self, code: str, message: str | None = None, headers: Mapping[str, str] | None = None,
                 **details: str) -> None:
        self.status, default = ERRORS[code]
        self.code = code
        self.message = message or default
        self.headers = dict(headers or {})
        self.details = details
        super().__init__(f"{code}: {self.message}")


class ClientGone(Exception):
    """The client closed its connection while sending the body: nobody is left to answer."""


def http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def iso8601(t: float) -> str:
    # Always ".000Z": OSS keeps seconds only, and oss2's parser accepts nothing else.
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


def request_id() -> str:
    return uuid.uuid4().hex[:24].upper()


def crc64(data: bytes, crc: int | None) -> int | None:
    return _CRC64(data, crc) if _CRC64 is not None and crc is not None else None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def write_json(path: Path, value: Any) -> None:
    """Write-then-rename, so the file is either the old or the new value."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(value, sort_keys=True))
    os.replace(tmp, path)


# --- storage ---------------------------------------------------------------------------------------

@dataclass
class ObjectMeta:
    """What the sidecar JSON holds for one object."""

    key: str
    data: str  # the data file's name in the bucket's objects/ directory
    size: int
    etag: str  # as OSS prints it, unquoted: upper-case MD5 hex, or "<hex>-<parts>" for Multipart
    crc64: int | None
    type: str  # Normal | Appendable | Multipart
    mtime: float
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> ObjectMeta:
        return cls(**{f.name: value[f.name] for f in fields(cls)})


class BucketStore:
    """One bucket's objects: sidecars and data files on disk, an index of them in memory.

    Writers call `commit` and `update` synchronously from the event loop, so a handler that looks up
    a key and opens its data file without awaiting in between always gets a matching pair.
    """

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.dir = root / name / "objects"
        self.dir.mkdir(parents=True, exist_ok=True)
        info = root / name / "bucket.json"
        if not info.exists():
            write_json(info, {"name": name, "created": time.time()})
        self.created = float(json.loads(info.read_text())["created"])
        self.objects: dict[str, ObjectMeta] = {}
        self.keys: list[str] = []  # sorted; Python's str order is OSS's UTF-8 byte order
        self._load()

    def _load(self) -> None:
        used = set()
        for sidecar in self.dir.glob("*.json"):
            meta = ObjectMeta.from_json(json.loads(sidecar.read_text()))
            if (self.dir / meta.data).exists():
                self.objects[meta.key] = meta
                used.add(meta.data)
        self.keys = sorted(self.objects)
        for leftover in self.dir.iterdir():  # data a crash left unreferenced, half-written sidecars
            if leftover.suffix != ".json" and leftover.name not in used:
                leftover.unlink(missing_ok=True)

    def get(self, key: str) -> ObjectMeta | None:
        return self.objects.get(key)

    def open(self, meta: ObjectMeta) -> IO[bytes]:
        return open(self.dir / meta.data, "rb")

    def path(self, meta: ObjectMeta) -> Path:
        return self.dir / meta.data

    def commit(self, key: str, src: Path, *, size: int, etag: str, crc: int | None, type: str,
               headers: Mapping[str, str], forbid_overwrite: bool = False) -> ObjectMeta:
        """Move a complete file into place as `key` (replacing what was there)."""
        if forbid_overwrite and key in self.objects:
            raise OssError("FileAlreadyExists")
        digest = key_digest(key)
        data = f"{digest}.{uuid.uuid4().hex}.data"
        os.replace(src, self.dir / data)
        meta = ObjectMeta(key=key, data=data, size=size, etag=etag, crc64=crc, type=type, mtime=time.time(),
                          headers=dict(headers))
        self.update(meta)
        return meta

    def update(self, meta: ObjectMeta) -> None:
        """Make `meta` the key's sidecar; a replaced data file goes once nothing points at it."""
        write_json(self.dir / f"{key_digest(meta.key)}.json", asdict(meta))
        old = self.objects.get(meta.key)
        self.objects[meta.key] = meta
        if old is None:
            bisect.insort(self.keys, meta.key)
        elif old.data != meta.data:
            # Readers that opened it keep reading it: POSIX keeps the inode until they close.
            (self.dir / old.data).unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        meta = self.objects.pop(key, None)
        if meta is None:
            return
        del self.keys[bisect.bisect_left(self.keys, key)]
        (self.dir / f"{key_digest(key)}.json").unlink(missing_ok=True)
        (self.dir / meta.data).unlink(missing_ok=True)


@dataclass
class PartMeta:
    number: int
    data: str
    size: int
    etag: str
    crc64: int | None
    mtime: float


@dataclass
class Upload:
    """A multipart upload in progress: `.uploads/<id>/upload.json` and its part files."""

    id: str
    bucket: str
    key: str
    initiated: float
    headers: dict[str, str]
    parts: dict[int, PartMeta] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        value = asdict(self)
        value["parts"] = [asdict(p) for p in self.parts.values()]
        return value

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Upload:
        parts = {p["number"]: PartMeta(**p) for p in value["parts"]}
        return cls(id=value["id"], bucket=value["bucket"], key=value["key"], initiated=value["initiated"],
                   headers=value["headers"], parts=parts)


class Store:
    """The buckets, the multipart uploads in progress, and the temp area for incoming bodies."""

    def __init__(self, root: Path, buckets: Iterable[str]) -> None:
        self.root = root
        self.tmp = root / ".tmp"
        self.uploads_dir = root / ".uploads"
        shutil.rmtree(self.tmp, ignore_errors=True)  # bodies a killed server was receiving
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.buckets = {name: BucketStore(root, name) for name in buckets}
        self.uploads: dict[str, Upload] = {}
        for info in self.uploads_dir.glob("*/upload.json"):
            upload = Upload.from_json(json.loads(info.read_text()))
            self.uploads[upload.id] = upload

    def tmp_path(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def create_tmp(self) -> tuple[Path, IO[bytes]]:
        """A new temp file for a body. Its writes block the loop briefly: a local disk, a test server."""
        path = self.tmp_path()
        return path, open(path, "wb")

    def create_upload(self, bucket: str, key: str, headers: Mapping[str, str]) -> Upload:
        upload = Upload(id=uuid.uuid4().hex.upper(), bucket=bucket, key=key, initiated=time.time(),
                        headers=dict(headers))
        (self.uploads_dir / upload.id).mkdir()
        self._save(upload)
        self.uploads[upload.id] = upload
        return upload

    def part_path(self, upload: Upload, part: PartMeta) -> Path:
        return self.uploads_dir / upload.id / part.data

    def open_part(self, upload: Upload, part: PartMeta) -> IO[bytes]:
        return open(self.part_path(upload, part), "rb")

    def put_part(self, upload: Upload, number: int, src: Path, size: int, etag: str, crc: int | None) -> PartMeta:
        """Move a received part into the upload (replacing an earlier part with the same number)."""
        part = PartMeta(number=number, data=f"{number}.{uuid.uuid4().hex}.part", size=size, etag=etag, crc64=crc,
                        mtime=time.time())
        os.replace(src, self.uploads_dir / upload.id / part.data)
        old = upload.parts.get(number)
        upload.parts[number] = part
        self._save(upload)
        if old is not None:
            self.part_path(upload, old).unlink(missing_ok=True)
        return part

    def remove_upload(self, upload: Upload) -> None:
        self.uploads.pop(upload.id, None)
        shutil.rmtree(self.uploads_dir / upload.id, ignore_errors=True)

    def _save(self, upload: Upload) -> None:
        write_json(self.uploads_dir / upload.id / "upload.json", upload.to_json())


@dataclass
class Received:
    """A request body streamed to a temp file, with what OSS computes over it."""

    path: Path
    size: int
    md5: bytes
    crc64: int | None

    @property
    def etag(self) -> str:
        return self.md5.hex().upper()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def copy_range(src: IO[bytes], start: int, length: int, dst: Path, crc: int | None = 0) -> Received:
    """`length` bytes of an open file from `start` into a new file (run in a thread for big copies)."""
    md5 = hashlib.md5()
    src.seek(start)
    remaining = length
    try:
        with open(dst, "wb") as out:
            while remaining:
                chunk = src.read(min(CHUNK, remaining))
                if not chunk:
                    raise OSError(f"source ended {remaining} bytes early")
                out.write(chunk)
                md5.update(chunk)
                crc = crc64(chunk, crc)
                remaining -= len(chunk)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return Received(dst, length, md5.digest(), crc)


def concatenate(sources: Sequence[tuple[IO[bytes], int]], dst: Path) -> Received:
    """Parts (open files and sizes) one after the other into a new file; returns size and CRC."""
    crc: int | None = 0
    total = 0
    try:
        with open(dst, "wb") as out:
            for src, size in sources:
                src.seek(0)
                remaining = size
                while remaining:
                    chunk = src.read(min(CHUNK, remaining))
                    if not chunk:
                        raise OSError("part ended early")
                    out.write(chunk)
                    crc = crc64(chunk, crc)
                    remaining -= len(chunk)
                total += size
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return Received(dst, total, b"", crc)


# --- faults and the request log (test controls) -----------------------------------------------------

@dataclass
class Faults:
    """What the next requests suffer; set with POST /_control/faults."""

    status503: int = 0
    drop: int = 0
    cut: int = 0
    down: bool = False
    delay: float = 0.0

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply all of `changes`, or none of them if one is not a known fault with a valid value."""
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name in ("status503", "drop", "cut"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{name} must be a count, not {value!r}")
            elif name == "down":
                if not isinstance(value, bool):
                    raise ValueError(f"down must be true or false, not {value!r}")
            elif name == "delay":
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"delay must be seconds, not {value!r}")
                value = float(value)
            else:
                raise ValueError(f"unknown fault {name!r}")
            checked[name] = value
        for name, value in checked.items():
            setattr(self, name, value)

    def take(self, name: str) -> bool:
        """Use up one of a counted fault, if any is left."""
        left = getattr(self, name)
        if left > 0:
            setattr(self, name, left - 1)
            return True
        return False


# --- requests ---------------------------------------------------------------------------------------

SERVICE, BUCKET, OBJECT = "service", "bucket", "object"


@dataclass
class Call:
    """One OSS request, addressed: the bucket and key it names and its decoded query."""

    request: web.Request
    request_id: str
    bucket_name: str  # "" for service calls
    key: str  # "" for bucket and service calls
    query: dict[str, str]
    op: Operation | None = None
    fault: str | None = None

    @property
    def scope(self) -> str:
        return OBJECT if self.key else BUCKET if self.bucket_name else SERVICE

    @property
    def headers(self) -> Any:  # CIMultiDictProxy: case-insensitive, values as sent
        return self.request.headers


Handler = Callable[["OssApi", Call], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Operation:
    """One OSS API call: which method, scope, sub-resource (and header) select it, and its handler."""

    name: str
    method: str
    scope: str
    subresource: str | None
    handler: Handler
    header: str | None = None  # a request header that must be present (x-oss-copy-source)

    def matches(self, call: Call) -> bool:
        if self.scope != call.scope:
            return False
        if self.subresource is None:
            if any(k in SELECTORS for k in call.query):
                return False
        elif self.subresource not in call.query:
            return False
        return self.header is None or self.header in call.headers


def parse_address(request: web.Request) -> tuple[str, str, dict[str, str]]:
    """-> (bucket, key, query) from a path-style or virtual-host-style request."""
    raw_path, _, raw_query = request.raw_path.partition("?")
    query = dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True))
    path = raw_path.lstrip("/")
    host = request.host.rsplit(":", 1)[0].strip("[]")
    bucket = ""
    if "." in host and not _is_ip(host):
        bucket = host.split(".", 1)[0]  # virtual-hosted: the whole path is the key
    else:
        bucket, _, path = path.partition("/")
    try:
        key = urllib.parse.unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise OssError("InvalidObjectName", "The object name must be UTF-8.") from None
    return bucket, key, query


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def url_encode(value: str, encode: bool) -> str:
    return urllib.parse.quote(value, safe="/") if encode else value


def sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    child = ET.SubElement(parent, tag)
    if text is not None:
        child.text = str(text)
    return child


def xml_body(root: ET.Element) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8", xml_declaration=False)


def xml_response(root: ET.Element, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=xml_body(root), headers={"Content-Type": "application/xml",
                                                                       **(headers or {})})


def parse_xml(body: bytes, tag: str) -> ET.Element:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise OssError("MalformedXML") from None
    if root.tag != tag:
        raise OssError("MalformedXML")
    return root


def int_param(call: Call, name: str, default: int, low: int, high: int) -> int:
    raw = call.query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise OssError("InvalidArgument", f"{name} must be an integer.", ArgumentName=name,
                       ArgumentValue=raw) from None
    if not low <= value <= high:
        raise OssError("InvalidArgument", f"{name} must be between {low} and {high}.", ArgumentName=name,
                       ArgumentValue=raw)
    return value


def byte_range(header: str | None, size: int, standard: bool) -> tuple[int, int] | None:
    """A GetObject Range header -> (first, last), or None for the whole object.

    OSS's legacy behaviour ignores a range it cannot satisfy and sends the whole object with 200;
    with `x-oss-range-behavior: standard` an end past the object is cut short and a start past it is
    416 InvalidRange. Only the first of several ranges counts, as on OSS.
    """
    if header is None:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header.split(",", 1)[0])
    if m is None or m[1] == m[2] == "":
        return None
    if m[1] == "":  # the last N bytes
        n = int(m[2])
        if n == 0:
            return None
        if n > size:
            if not standard:
                return None
            if size == 0:
                raise OssError("InvalidRange", headers={"Content-Range": f"bytes */{size}"})
            return 0, size - 1
        return size - n, size - 1
    first = int(m[1])
    last = int(m[2]) if m[2] else size - 1
    if m[2] and last < first:
        return None
    if first >= size:
        if standard:
            raise OssError("InvalidRange", headers={"Content-Range": f"bytes */{size}"})
        return None
    if last >= size:
        if not standard:
            return None
        last = size - 1
    return first, last


def copy_source_range(header: str | None, size: int) -> tuple[int, int]:
    """UploadPartCopy's x-oss-copy-source-range (bytes=a-b, both ends inside the source)."""
    if header is None:
        return 0, size - 1
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d+)\s*-\s*(\d+)\s*", header)
    if m is None or not int(m[1]) <= int(m[2]) < size:
        raise OssError("InvalidArgument", "The specified copy source range is not valid for the source object.",
                       ArgumentName="x-oss-copy-source-range", ArgumentValue=header)
    return int(m[1]), int(m[2])


class OssApi:
    """The OSS object API over a Store: authentication, dispatch, the handlers and the test controls."""

    def __init__(self, store: Store, key_id: str, key_secret: str, max_copy_size: int = GiB) -> None:
        self.store = store
        self.key_id = key_id
        self.key_secret = key_secret
        self.max_copy_size = max_copy_size
        self.faults = Faults()
        self.log: list[dict[str, Any]] = []

    # --- entry point ---

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """Every OSS request: faults, addressing, dispatch, authentication, the handler, the error XML."""
        call = Call(request, request_id(), "", "", {})
        request["oss_request_id"] = call.request_id
        status = 0
        try:
            response = await self._serve(call)
            status = response.status
            return response
        except OssError as e:
            response = self.error_response(call, e)
            status = response.status
            return response
        except (ClientGone, ConnectionResetError):
            call.fault = call.fault or "client-gone"
            return web.Response(status=400)  # never sent: the connection is gone
        except Exception:
            traceback.print_exc()
            response = self.error_response(call, OssError("InternalError"))
            status = response.status
            return response
        finally:
            entry = {"method": request.method, "path": f"/{call.bucket_name}/{call.key}" if call.bucket_name
                     else "/", "query": call.query, "op": call.op.name if call.op else None,
                     "status": 0 if call.fault in ("drop", "client-gone") else status, "fault": call.fault,
                     "request_id": call.request_id}
            self.log.append(entry)
            print(json.dumps(entry), flush=True)

    async def _serve(self, call: Call) -> web.StreamResponse:
        request = call.request
        call.bucket_name, call.key, call.query = parse_address(request)
        if self.faults.delay:
            await asyncio.sleep(self.faults.delay)
        if self.faults.down:
            call.fault = "down"
            raise OssError("ServiceUnavailable")
        if self.faults.take("drop"):
            call.fault = "drop"
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)  # never sent
        if self.faults.take("status503"):
            call.fault = "status503"
            raise OssError("ServiceUnavailable")
        call.op = self.resolve(call)
        if call.scope != SERVICE and call.bucket_name not in self.store.buckets:
            raise OssError("NoSuchBucket", BucketName=call.bucket_name)
        self.authenticate(call)
        if call.scope == OBJECT:
            self.check_key(call.key)
        return await call.op.handler(self, call)

    def resolve(self, call: Call) -> Operation:
        for op in OPERATIONS:
            if op.method == call.request.method and op.matches(call):
                return op
        if any(op.matches(call) for op in OPERATIONS):
            raise OssError("MethodNotAllowed", Method=call.request.method)
        raise OssError("NotImplemented")

    @staticmethod
    def check_key(key: str) -> None:
        if len(key.encode()) > MAX_KEY_BYTES:
            raise OssError("InvalidObjectName", "The Length of Object name must be less than 1024.")
        if key.startswith(("/", "\\")):
            raise OssError("InvalidObjectName")

    # --- signature V1 ---

    def authenticate(self, call: Call) -> None:
        """OSS signature V1, from the Authorization header or a presigned URL's query."""
        headers, query = call.headers, call.query
        authorization = headers.get("Authorization")
        if authorization is None and "Signature" in query:
            key_id, signature = query.get("OSSAccessKeyId", ""), query["Signature"]
            expires = query.get("Expires", "")
            if not expires.isdigit():
                raise OssError("AccessDenied", "Invalid argument: Expires.")
            date = expires
            expired = int(expires) < time.time()
        elif authorization is not None:
            scheme, _, credential = authorization.strip().partition(" ")
            key_id, colon, signature = credential.strip().rpartition(":")
            if scheme != "OSS" or not colon or not key_id or not signature:
                raise OssError("InvalidArgument", "Authorization header is invalid.",
                               ArgumentName="Authorization", ArgumentValue=authorization)
            date = headers.get("x-oss-date") or headers.get("Date") or ""
            try:
                sent = email.utils.parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError):
                raise OssError("AccessDenied", "OSS authentication requires a valid Date.") from None
            if abs(sent - time.time()) > CLOCK_SKEW:
                raise OssError("RequestTimeTooSkewed", RequestTime=date, ServerTime=iso8601(time.time()),
                               MaxAllowedSkewMilliseconds=str(CLOCK_SKEW * 1000))
            expired = False
        else:
            raise OssError("AccessDenied")
        if key_id != self.key_id:
            raise OssError("InvalidAccessKeyId", OSSAccessKeyId=key_id)
        if expired:
            raise OssError("AccessDenied", "Request has expired.", Expires=iso8601(int(date)),
                           ServerTime=iso8601(time.time()))
        string_to_sign = self.string_to_sign(call, date)
        expected = base64.b64encode(hmac.new(self.key_secret.encode(), string_to_sign.encode(),
                                             hashlib.sha1).digest()).decode()
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise OssError("SignatureDoesNotMatch", OSSAccessKeyId=key_id, SignatureProvided=signature,
                           StringToSign=string_to_sign)

    def string_to_sign(self, call: Call, date: str) -> str:
        """VERB, Content-MD5, Content-Type, Date, CanonicalizedOSSHeaders + CanonicalizedResource."""
        headers = call.headers
        oss_headers: dict[str, str] = {}
        for name, value in headers.items():
            lower = name.lower()
            if lower.startswith("x-oss-"):
                oss_headers[lower] = f"{oss_headers[lower]},{value}" if lower in oss_headers else value
        canonical_headers = "".join(f"{k}:{oss_headers[k]}\n" for k in sorted(oss_headers))
        resource = f"/{call.bucket_name}/{call.key}" if call.bucket_name else "/"
        signed = sorted((k, v) for k, v in call.query.items() if k in SIGNED_SUBRESOURCES)
        if signed:
            resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in signed)
        return "\n".join([call.request.method, headers.get("Content-MD5", ""), headers.get("Content-Type", ""),
                          date, canonical_headers + resource])

    # --- answers ---

    def error_response(self, call: Call, error: OssError) -> web.Response:
        root = ET.Element("Error")
        sub(root, "Code", error.code)
        sub(root, "Message", error.message)
        sub(root, "RequestId", call.request_id)
        sub(root, "HostId", call.request.host)
        for name, value in error.details.items():
            sub(root, name, value)
        if call.key and error.code in ("NoSuchKey", "InvalidObjectName"):
            sub(root, "Key", call.key)
        headers = dict(error.headers)
        if call.request.method == "HEAD":
            # HEAD answers have no body; OSS puts the error XML, base64, in x-oss-err (oss2 reads it).
            headers["x-oss-err"] = base64.b64encode(xml_body(root)).decode()
            return web.Response(status=error.status, headers=headers)
        return xml_response(root, error.status, headers)

    def bucket(self, call: Call) -> BucketStore:
        return self.store.buckets[call.bucket_name]

    def object(self, call: Call) -> ObjectMeta:
        meta = self.bucket(call).get(call.key)
        if meta is None:
            raise OssError("NoSuchKey")
        return meta

    @staticmethod
    def object_headers(meta: ObjectMeta) -> dict[str, str]:
        headers = {"Content-Type": "application/octet-stream", **meta.headers, "ETag": f'"{meta.etag}"',
                   "Last-Modified": http_date(meta.mtime), "Accept-Ranges": "bytes", "x-oss-object-type": meta.type}
        headers.setdefault("x-oss-storage-class", "Standard")
        if meta.crc64 is not None:
            headers["x-oss-hash-crc64ecma"] = str(meta.crc64)
        if meta.type == "Appendable":
            headers["x-oss-next-append-position"] = str(meta.size)
        if meta.type == "Normal" and len(meta.etag) == 32:
            headers["Content-MD5"] = base64.b64encode(bytes.fromhex(meta.etag)).decode()
        return headers

    @staticmethod
    def stored_headers(call: Call) -> dict[str, str]:
        """The request headers an object keeps; an unknown encryption algorithm is refused."""
        headers = {name: call.headers[name] for name in STORED_HEADERS if name in call.headers}
        headers.update({k.lower(): v for k, v in call.headers.items() if k.lower().startswith("x-oss-meta-")})
        sse = headers.get("x-oss-server-side-encryption")
        if sse is not None and sse not in SSE_ALGORITHMS:
            raise OssError("InvalidEncryptionAlgorithmError")
        return headers

    @staticmethod
    def write_headers(meta: ObjectMeta) -> dict[str, str]:
        """What a successful write answers with."""
        headers = {"ETag": f'"{meta.etag}"'}
        if meta.crc64 is not None:
            headers["x-oss-hash-crc64ecma"] = str(meta.crc64)
        for name in ("x-oss-server-side-encryption", "x-oss-server-side-encryption-key-id"):
            if name in meta.headers:
                headers[name] = meta.headers[name]
        return headers

    async def receive(self, call: Call, limit: int, too_large: str = "InlineDataTooLarge") -> Received:
        """Stream the body to a temp file, checking length, size limit and Content-MD5."""
        request = call.request
        declared = request.content_length
        if declared is not None and declared > limit:
            raise OssError(too_large)
        md5 = hashlib.md5()
        crc: int | None = 0
        size = 0
        path, out = self.store.create_tmp()
        try:
            with out:
                async for chunk in request.content.iter_chunked(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise OssError(too_large)
                    out.write(chunk)
                    md5.update(chunk)
                    crc = crc64(chunk, crc)
            if declared is not None and size != declared:
                raise OssError("IncompleteBody")
            sent_md5 = call.headers.get("Content-MD5")
            if sent_md5 is not None:
                try:
                    ok = base64.b64decode(sent_md5, validate=True) == md5.digest()
                except (binascii.Error, ValueError):
                    ok = False
                if not ok:
                    raise OssError("InvalidDigest")
        except ConnectionResetError:
            path.unlink(missing_ok=True)
            raise ClientGone from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Received(path, size, md5.digest(), crc)

    async def read_small_body(self, call: Call) -> bytes:
        try:
            return await call.request.read()
        except web.HTTPRequestEntityTooLarge:
            raise OssError("MalformedXML") from None

    # --- objects ---

    async def put_object(self, call: Call) -> web.StreamResponse:
        headers = self.stored_headers(call)
        received = await self.receive(call, MAX_PUT_SIZE)
        try:
            meta = self.bucket(call).commit(call.key, received.path, size=received.size, etag=received.etag,
                                            crc=received.crc64, type="Normal", headers=headers,
                                            forbid_overwrite=self.forbid_overwrite(call))
        finally:
            received.discard()
        return web.Response(headers={**self.write_headers(meta), "Content-MD5": base64.b64encode(received.md5)
                                     .decode()})

    @staticmethod
    def forbid_overwrite(call: Call) -> bool:
        return call.headers.get("x-oss-forbid-overwrite", "").lower() == "true"

    async def get_object(self, call: Call) -> web.StreamResponse:
        bucket = self.bucket(call)
        meta = self.object(call)
        data = bucket.open(meta)  # before any await: the file that matches meta, whatever is written next
        try:
            etag = f'"{meta.etag}"'
            if "If-Match" in call.headers and call.headers["If-Match"] not in (etag, meta.etag, "*"):
                raise OssError("PreconditionFailed", Condition="If-Match")
            standard = call.headers.get("x-oss-range-behavior", "").lower() == "standard"
            span = byte_range(call.headers.get("Range"), meta.size, standard)
            headers = self.object_headers(meta)
            for param, header in RESPONSE_OVERRIDES.items():
                if param in call.query:
                    headers[header] = call.query[param]
            if span is None:
                status, first, length = 200, 0, meta.size
            else:
                status, first, length = 206, span[0], span[1] - span[0] + 1
                headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{meta.size}"
            headers["Content-Length"] = str(length)
            response = web.StreamResponse(status=status, headers=headers)
            await response.prepare(call.request)
            cut = length > 0 and self.faults.take("cut")
            send = length // 2 if cut else length
            data.seek(first)
            try:
                while send:
                    chunk = data.read(min(CHUNK, send))
                    if not chunk:
                        break
                    await response.write(chunk)
                    send -= len(chunk)
                if cut:
                    call.fault = "cut"
                    assert call.request.transport is not None
                    call.request.transport.abort()
                    return response
                await response.write_eof()
            except ConnectionResetError:
                call.fault = "client-gone"  # the reader went away mid-body; the prepared answer stands
            return response
        finally:
            data.close()

    async def head_object(self, call: Call) -> web.StreamResponse:
        meta = self.object(call)
        headers = self.object_headers(meta)
        headers["Content-Length"] = str(meta.size)
        response = web.StreamResponse(headers=headers)
        await response.prepare(call.request)
        await response.write_eof()
        return response

    async def get_object_meta(self, call: Call) -> web.StreamResponse:
        meta = self.object(call)
        headers = {"ETag": f'"{meta.etag}"', "Last-Modified": http_date(meta.mtime),
                   "Content-Length": str(meta.size)}
        response = web.StreamResponse(headers=headers)
        await response.prepare(call.request)
        await response.write_eof()
        return response

    async def delete_object(self, call: Call) -> web.StreamResponse:
        self.bucket(call).delete(call.key)
        return web.Response(status=204)

    async def delete_multiple_objects(self, call: Call) -> web.StreamResponse:
        body = await self.read_small_body(call)
        sent_md5 = call.headers.get("Content-MD5")
        if sent_md5 is None:
            raise OssError("MissingArgument", "Missing Some Required Arguments: Content-MD5.",
                           ArgumentName="Content-MD5")
        if sent_md5 != base64.b64encode(hashlib.md5(body).digest()).decode():
            raise OssError("InvalidDigest")
        encode = self.encoding_type(call)
        root = parse_xml(body, "Delete")
        quiet = (root.findtext("Quiet") or "false").strip().lower() == "true"
        keys = []
        for obj in root.findall("Object"):
            key = obj.findtext("Key")
            if not key:
                raise OssError("MalformedXML")
            keys.append(key)
        if not keys or len(keys) > MAX_DELETE_KEYS:
            raise OssError("MalformedXML")
        for key in keys:
            self.check_key(key)
        bucket = self.bucket(call)
        for key in keys:
            bucket.delete(key)
        if quiet:
            return web.Response(status=200)
        result = ET.Element("DeleteResult")
        if encode:
            sub(result, "EncodingType", "url")
        for key in keys:
            sub(sub(result, "Deleted"), "Key", url_encode(key, encode))
        return xml_response(result)

    def copy_source(self, call: Call) -> tuple[BucketStore, ObjectMeta]:
        raw = call.headers["x-oss-copy-source"]
        path, _, params = raw.partition("?")
        if params:
            raise OssError("NotImplemented", "This server keeps no versions: x-oss-copy-source has a versionId.")
        bucket_name, slash, quoted = path.removeprefix("/").partition("/")
        key = urllib.parse.unquote(quoted)
        if not path.startswith("/") or not slash or not bucket_name or not key:
            raise OssError("InvalidArgument", "Copy Source must mention the source bucket and key: "
                           "/sourcebucket/sourcekey.", ArgumentName="x-oss-copy-source", ArgumentValue=raw)
        bucket = self.store.buckets.get(bucket_name)
        if bucket is None:
            raise OssError("NoSuchBucket", BucketName=bucket_name)
        meta = bucket.get(key)
        if meta is None:
            raise OssError("NoSuchKey", Key=key)
        return bucket, meta

    async def copy_object(self, call: Call) -> web.StreamResponse:
        source_bucket, source = self.copy_source(call)
        if source.size > self.max_copy_size:
            raise OssError("EntityTooLarge", "Source object Length exceeds the maximum allowed size.")
        target = self.bucket(call)
        directive = call.headers.get("x-oss-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise OssError("InvalidArgument", "Invalid metadata directive.", ArgumentName="x-oss-metadata-directive",
                           ArgumentValue=directive)
        requested = self.stored_headers(call)
        if directive == "COPY":
            # The content's headers come along; encryption only when this request asks for it (as on OSS).
            headers = {k: v for k, v in source.headers.items() if not k.startswith("x-oss-server-side")}
            headers.update({k: v for k, v in requested.items() if k.startswith("x-oss-server-side")})
        else:
            headers = requested
        if source_bucket is target and source.key == call.key:
            # Same object: OSS changes the metadata and keeps the content.
            meta = ObjectMeta(**{**asdict(source), "headers": headers, "mtime": time.time()})
            target.update(meta)
        else:
            data = source_bucket.open(source)
            try:
                copied = await asyncio.to_thread(copy_range, data, 0, source.size, self.store.tmp_path())
            finally:
                data.close()
            try:
                meta = target.commit(call.key, copied.path, size=copied.size, etag=source.etag, crc=copied.crc64,
                                     type="Normal" if source.type == "Appendable" else source.type, headers=headers,
                                     forbid_overwrite=self.forbid_overwrite(call))
            finally:
                copied.discard()
        result = ET.Element("CopyObjectResult")
        sub(result, "ETag", f'"{meta.etag}"')
        sub(result, "LastModified", iso8601(meta.mtime))
        return xml_response(result, headers=self.write_headers(meta))

    async def append_object(self, call: Call) -> web.StreamResponse:
        position = int_param(call, "position", -1, 0, MAX_PUT_SIZE)
        if position < 0:
            raise OssError("InvalidArgument", "position is required.", ArgumentName="position", ArgumentValue="")
        bucket = self.bucket(call)
        self.check_append(bucket.get(call.key), position)  # refuse before reading the body, as OSS does
        headers = self.stored_headers(call)
        received = await self.receive(call, MAX_PUT_SIZE - position)
        try:
            meta = bucket.get(call.key)  # again: another append may have landed while this body came in
            self.check_append(meta, position)
            if meta is None:
                meta = bucket.commit(call.key, received.path, size=received.size, etag=received.etag,
                                     crc=received.crc64, type="Appendable", headers=headers)
            else:
                meta = self.append_to(bucket, meta, received)
        finally:
            received.discard()
        return web.Response(headers={**self.write_headers(meta), "x-oss-next-append-position": str(meta.size)})

    @staticmethod
    def check_append(meta: ObjectMeta | None, position: int) -> None:
        if meta is not None and meta.type != "Appendable":
            raise OssError("ObjectNotAppendable")
        length = meta.size if meta else 0
        if position != length:
            raise OssError("PositionNotEqualToLength", headers={"x-oss-next-append-position": str(length)})

    @staticmethod
    def append_to(bucket: BucketStore, meta: ObjectMeta, received: Received) -> ObjectMeta:
        """Add the received bytes after the object's end, in place.

        Readers read only up to the size they looked up, and the bytes before it never change; the
        truncate drops anything a crash left past the recorded end.
        """
        crc = meta.crc64
        with open(bucket.path(meta), "r+b") as out, open(received.path, "rb") as src:
            out.truncate(meta.size)
            out.seek(meta.size)
            while chunk := src.read(CHUNK):
                out.write(chunk)
                crc = crc64(chunk, crc)
        etag = hashlib.md5(f"{meta.etag}{received.etag}".encode()).hexdigest().upper()
        new = ObjectMeta(**{**asdict(meta), "size": meta.size + received.size, "etag": etag, "crc64": crc,
                            "mtime": time.time()})
        bucket.update(new)
        return new

    # --- listing ---

    @staticmethod
    def encoding_type(call: Call) -> bool:
        value = call.query.get("encoding-type", "")
        if value not in ("", "url"):
            raise OssError("InvalidArgument", "Invalid Encoding Method specified in Request.",
                           ArgumentName="encoding-type", ArgumentValue=value)
        return value == "url"

    @staticmethod
    def list_keys(bucket: BucketStore, prefix: str, delimiter: str, after: str,
                  limit: int) -> tuple[list[ObjectMeta], list[str], bool, str]:
        """Keys after `after` under `prefix`, rolled up at `delimiter`: (objects, prefixes, truncated, last).

        A common prefix counts as one entry and is never repeated: one that sorts at or before `after`
        (the marker from the previous page, which may be that prefix) was on an earlier page.
        """
        keys = bucket.keys
        i = max(bisect.bisect_right(keys, after) if after else 0, bisect.bisect_left(keys, prefix))
        objects: list[ObjectMeta] = []
        prefixes: list[str] = []
        last = ""
        while i < len(keys) and keys[i].startswith(prefix):
            key = keys[i]
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = key[:cut + len(delimiter)]
                if common > after:
                    if len(objects) + len(prefixes) == limit:
                        return objects, prefixes, True, last
                    prefixes.append(common)
                    last = common
                while i < len(keys) and keys[i].startswith(common):
                    i += 1
                continue
            if len(objects) + len(prefixes) == limit:
                return objects, prefixes, True, last
            objects.append(bucket.objects[key])
            last = key
            i += 1
        return objects, prefixes, False, last

    @staticmethod
    def add_contents(root: ET.Element, objects: list[ObjectMeta], prefixes: list[str], encode: bool,
                     owner: bool) -> None:
        for meta in objects:
            contents = sub(root, "Contents")
            sub(contents, "Key", url_encode(meta.key, encode))
            sub(contents, "LastModified", iso8601(meta.mtime))
            sub(contents, "ETag", f'"{meta.etag}"')
            sub(contents, "Type", meta.type)
            sub(contents, "Size", meta.size)
            sub(contents, "StorageClass", meta.headers.get("x-oss-storage-class", "Standard"))
            if owner:
                owner_node = sub(contents, "Owner")
                sub(owner_node, "ID", OWNER_ID)
                sub(owner_node, "DisplayName", OWNER_ID)
        for common in prefixes:
            sub(sub(root, "CommonPrefixes"), "Prefix", url_encode(common, encode))

    async def list_objects(self, call: Call) -> web.StreamResponse:
        if call.query.get("list-type") == "2":
            return await self.list_objects_v2(call)
        encode = self.encoding_type(call)
        prefix, delimiter, marker = (call.query.get(k, "") for k in ("prefix", "delimiter", "marker"))
        max_keys = int_param(call, "max-keys", 100, 1, MAX_LIST_KEYS)
        objects, prefixes, truncated, last = self.list_keys(self.bucket(call), prefix, delimiter, marker, max_keys)
        root = ET.Element("ListBucketResult")
        sub(root, "Name", call.bucket_name)
        sub(root, "Prefix", url_encode(prefix, encode))
        sub(root, "Marker", url_encode(marker, encode))
        sub(root, "MaxKeys", max_keys)
        sub(root, "Delimiter", url_encode(delimiter, encode))
        if encode:
            sub(root, "EncodingType", "url")
        sub(root, "IsTruncated", "true" if truncated else "false")
        if truncated:
            sub(root, "NextMarker", url_encode(last, encode))
        self.add_contents(root, objects, prefixes, encode, owner=True)
        return xml_response(root)

    async def list_objects_v2(self, call: Call) -> web.StreamResponse:
        encode = self.encoding_type(call)
        prefix, delimiter, start_after = (call.query.get(k, "") for k in ("prefix", "delimiter", "start-after"))
        token = call.query.get("continuation-token", "")
        after = start_after
        if token:
            try:
                after = base64.urlsafe_b64decode(token.encode()).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise OssError("InvalidArgument", "The continuation token provided is incorrect.",
                               ArgumentName="continuation-token", ArgumentValue=token) from None
        max_keys = int_param(call, "max-keys", 100, 1, MAX_LIST_KEYS)
        objects, prefixes, truncated, last = self.list_keys(self.bucket(call), prefix, delimiter, after, max_keys)
        root = ET.Element("ListBucketResult")
        sub(root, "Name", call.bucket_name)
        sub(root, "Prefix", url_encode(prefix, encode))
        if start_after:
            sub(root, "StartAfter", url_encode(start_after, encode))
        if token:
            sub(root, "ContinuationToken", token)
        sub(root, "MaxKeys", max_keys)
        sub(root, "Delimiter", url_encode(delimiter, encode))
        if encode:
            sub(root, "EncodingType", "url")
        sub(root, "IsTruncated", "true" if truncated else "false")
        if truncated:
            sub(root, "NextContinuationToken", base64.urlsafe_b64encode(last.encode()).decode())
        sub(root, "KeyCount", len(objects) + len(prefixes))
        self.add_contents(root, objects, prefixes, encode, owner=call.query.get("fetch-owner") == "true")
        return xml_response(root)

    # --- multipart ---

    def upload(self, call: Call) -> Upload:
        upload = self.store.uploads.get(call.query.get("uploadId", ""))
        if upload is None or upload.bucket != call.bucket_name or upload.key != call.key:
            raise OssError("NoSuchUpload", UploadId=call.query.get("uploadId", ""))
        return upload

    def part_number(self, call: Call) -> int:
        raw = call.query.get("partNumber", "")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_PART_NUMBER:
            raise OssError("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive.",
                           ArgumentName="partNumber", ArgumentValue=raw)
        return int(raw)

    async def initiate_multipart_upload(self, call: Call) -> web.StreamResponse:
        encode = self.encoding_type(call)
        upload = self.store.create_upload(call.bucket_name, call.key, self.stored_headers(call))
        root = ET.Element("InitiateMultipartUploadResult")
        if encode:
            sub(root, "EncodingType", "url")
        sub(root, "Bucket", call.bucket_name)
        sub(root, "Key", url_encode(call.key, encode))
        sub(root, "UploadId", upload.id)
        headers = {k: v for k, v in upload.headers.items() if k.startswith("x-oss-server-side-encryption")}
        return xml_response(root, headers=headers)

    async def upload_part(self, call: Call) -> web.StreamResponse:
        upload = self.upload(call)
        number = self.part_number(call)
        received = await self.receive(call, MAX_PUT_SIZE, too_large="EntityTooLarge")
        try:
            upload = self.upload(call)  # aborted or completed while the body came in?
            part = self.store.put_part(upload, number, received.path, received.size, received.etag,
                                       received.crc64)
        finally:
            received.discard()
        return web.Response(headers=self.part_headers(upload, part))

    @staticmethod
    def part_headers(upload: Upload, part: PartMeta) -> dict[str, str]:
        headers = {"ETag": f'"{part.etag}"'}
        if part.crc64 is not None:
            headers["x-oss-hash-crc64ecma"] = str(part.crc64)
        if "x-oss-server-side-encryption" in upload.headers:
            headers["x-oss-server-side-encryption"] = upload.headers["x-oss-server-side-encryption"]
        return headers

    async def upload_part_copy(self, call: Call) -> web.StreamResponse:
        upload = self.upload(call)
        number = self.part_number(call)
        source_bucket, source = self.copy_source(call)
        first, last = copy_source_range(call.headers.get("x-oss-copy-source-range"), source.size)
        if last - first + 1 > MAX_PUT_SIZE:
            raise OssError("EntityTooLarge")
        data = source_bucket.open(source)
        try:
            copied = await asyncio.to_thread(copy_range, data, first, last - first + 1, self.store.tmp_path())
        finally:
            data.close()
        try:
            upload = self.upload(call)
            part = self.store.put_part(upload, number, copied.path, copied.size, copied.etag, copied.crc64)
        finally:
            copied.discard()
        result = ET.Element("CopyPartResult")
        sub(result, "LastModified", iso8601(part.mtime))
        sub(result, "ETag", f'"{part.etag}"')
        return xml_response(result, headers=self.part_headers(upload, part))

    async def complete_multipart_upload(self, call: Call) -> web.StreamResponse:
        upload = self.upload(call)
        encode = self.encoding_type(call)
        body = await self.read_small_body(call)
        if not body.strip() and call.headers.get("x-oss-complete-all", "").lower() == "yes":
            chosen = [upload.parts[n] for n in sorted(upload.parts)]
            if not chosen:
                raise OssError("InvalidPart")
        else:
            chosen = self.chosen_parts(upload, parse_xml(body, "CompleteMultipartUpload"))
        for part in chosen[:-1]:
            if part.size < MIN_PART_SIZE:
                raise OssError("EntityTooSmall", MinSizeAllowed=str(MIN_PART_SIZE), ProposedSize=str(part.size),
                               PartNumber=str(part.number))
        sources = [(self.store.open_part(upload, p), p.size) for p in chosen]
        try:
            joined = await asyncio.to_thread(concatenate, sources, self.store.tmp_path())
        finally:
            for src, _ in sources:
                src.close()
        try:
            upload = self.upload(call)  # aborted meanwhile?
            joined_md5 = hashlib.md5(b"".join(bytes.fromhex(p.etag) for p in chosen)).hexdigest().upper()
            meta = self.bucket(call).commit(call.key, joined.path, size=joined.size,
                                            etag=f"{joined_md5}-{len(chosen)}", crc=joined.crc64, type="Multipart",
                                            headers=upload.headers, forbid_overwrite=self.forbid_overwrite(call))
        finally:
            joined.discard()
        self.store.remove_upload(upload)
        root = ET.Element("CompleteMultipartUploadResult")
        if encode:
            sub(root, "EncodingType", "url")
        sub(root, "Location", f"http://{call.request.host}/{call.bucket_name}/{urllib.parse.quote(call.key)}")
        sub(root, "Bucket", call.bucket_name)
        sub(root, "Key", url_encode(call.key, encode))
        sub(root, "ETag", f'"{meta.etag}"')
        return xml_response(root, headers=self.write_headers(meta))

    @staticmethod
    def chosen_parts(upload: Upload, root: ET.Element) -> list[PartMeta]:
        """The parts a CompleteMultipartUpload body lists, checked against what was uploaded."""
        chosen: list[PartMeta] = []
        for node in root.findall("Part"):
            number_text, etag_text = node.findtext("PartNumber"), node.findtext("ETag")
            if number_text is None or etag_text is None or not number_text.strip().isdigit():
                raise OssError("MalformedXML")
            number = int(number_text)
            if chosen and number <= chosen[-1].number:
                raise OssError("InvalidPartOrder")
            part = upload.parts.get(number)
            if part is None or part.etag != etag_text.strip().strip('"').upper():
                raise OssError("InvalidPart", PartNumber=str(number), ETag=etag_text)
            chosen.append(part)
        if not chosen:
            raise OssError("MalformedXML")
        return chosen

    async def abort_multipart_upload(self, call: Call) -> web.StreamResponse:
        self.store.remove_upload(self.upload(call))
        return web.Response(status=204)

    async def list_parts(self, call: Call) -> web.StreamResponse:
        upload = self.upload(call)
        encode = self.encoding_type(call)
        marker = int_param(call, "part-number-marker", 0, 0, MAX_PART_NUMBER)
        max_parts = int_param(call, "max-parts", 1000, 1, 1000)
        numbers = [n for n in sorted(upload.parts) if n > marker]
        page, truncated = numbers[:max_parts], len(numbers) > max_parts
        root = ET.Element("ListPartsResult")
        if encode:
            sub(root, "EncodingType", "url")
        sub(root, "Bucket", call.bucket_name)
        sub(root, "Key", url_encode(call.key, encode))
        sub(root, "UploadId", upload.id)
        sub(root, "PartNumberMarker", marker)
        sub(root, "NextPartNumberMarker", page[-1] if page else marker)
        sub(root, "MaxParts", max_parts)
        sub(root, "IsTruncated", "true" if truncated else "false")
        for n in page:
            part = upload.parts[n]
            node = sub(root, "Part")
            sub(node, "PartNumber", n)
            sub(node, "LastModified", iso8601(part.mtime))
            sub(node, "ETag", f'"{part.etag}"')
            if part.crc64 is not None:
                sub(node, "HashCrc64ecma", part.crc64)
            sub(node, "Size", part.size)
        return xml_response(root)

    async def list_multipart_uploads(self, call: Call) -> web.StreamResponse:
        encode = self.encoding_type(call)
        prefix, delimiter = call.query.get("prefix", ""), call.query.get("delimiter", "")
        key_marker, id_marker = call.query.get("key-marker", ""), call.query.get("upload-id-marker", "")
        max_uploads = int_param(call, "max-uploads", 1000, 1, 1000)
        uploads = sorted((u for u in self.store.uploads.values()
                          if u.bucket == call.bucket_name and u.key.startswith(prefix)),
                         key=lambda u: (u.key, u.id))
        if key_marker:
            uploads = [u for u in uploads if u.key > key_marker or (id_marker and u.key == key_marker
                                                                     and u.id > id_marker)]
        page: list[Upload] = []
        prefixes: list[str] = []
        truncated = False
        next_key = next_id = ""
        for u in uploads:
            cut = u.key.find(delimiter, len(prefix)) if delimiter else -1
            common = u.key[:cut + len(delimiter)] if cut >= 0 else None
            if common is not None and (common in prefixes or common <= key_marker):
                continue
            if len(page) + len(prefixes) == max_uploads:
                truncated = True
                break
            if common is not None:
                prefixes.append(common)
                next_key, next_id = common, ""
            else:
                page.append(u)
                next_key, next_id = u.key, u.id
        root = ET.Element("ListMultipartUploadsResult")
        if encode:
            sub(root, "EncodingType", "url")
        sub(root, "Bucket", call.bucket_name)
        sub(root, "KeyMarker", url_encode(key_marker, encode))
        sub(root, "UploadIdMarker", id_marker)
        sub(root, "NextKeyMarker", url_encode(next_key if truncated else "", encode))
        sub(root, "NextUploadIdMarker", next_id if truncated else "")
        sub(root, "Delimiter", url_encode(delimiter, encode))
        sub(root, "Prefix", url_encode(prefix, encode))
        sub(root, "MaxUploads", max_uploads)
        sub(root, "IsTruncated", "true" if truncated else "false")
        for u in page:
            node = sub(root, "Upload")
            sub(node, "Key", url_encode(u.key, encode))
            sub(node, "UploadId", u.id)
            sub(node, "Initiated", iso8601(u.initiated))
        for common in prefixes:
            sub(sub(root, "CommonPrefixes"), "Prefix", url_encode(common, encode))
        return xml_response(root)

    # --- buckets and service ---

    async def get_bucket_info(self, call: Call) -> web.StreamResponse:
        bucket = self.bucket(call)
        root = ET.Element("BucketInfo")
        node = sub(root, "Bucket")
        sub(node, "CreationDate", iso8601(bucket.created))
        sub(node, "ExtranetEndpoint", call.request.host)
        sub(node, "IntranetEndpoint", call.request.host)
        sub(node, "Location", LOCATION)
        sub(node, "Name", bucket.name)
        sub(node, "StorageClass", "Standard")
        sub(node, "DataRedundancyType", "LRS")
        owner = sub(node, "Owner")
        sub(owner, "DisplayName", OWNER_ID)
        sub(owner, "ID", OWNER_ID)
        sub(sub(node, "AccessControlList"), "Grant", "private")
        sub(sub(node, "ServerSideEncryptionRule"), "SSEAlgorithm", "None")
        return xml_response(root)

    async def get_bucket_location(self, call: Call) -> web.StreamResponse:
        root = ET.Element("LocationConstraint")
        root.text = LOCATION
        return xml_response(root)

    async def list_buckets(self, call: Call) -> web.StreamResponse:
        prefix = call.query.get("prefix", "")
        root = ET.Element("ListAllMyBucketsResult")
        owner = sub(root, "Owner")
        sub(owner, "ID", OWNER_ID)
        sub(owner, "DisplayName", OWNER_ID)
        buckets = sub(root, "Buckets")
        for name in sorted(self.store.buckets):
            if not name.startswith(prefix):
                continue
            node = sub(buckets, "Bucket")
            sub(node, "CreationDate", iso8601(self.store.buckets[name].created))
            sub(node, "ExtranetEndpoint", call.request.host)
            sub(node, "IntranetEndpoint", call.request.host)
            sub(node, "Location", LOCATION)
            sub(node, "Name", name)
            sub(node, "StorageClass", "Standard")
        return xml_response(root)

    # --- test controls ---

    async def control_faults(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                changes = await request.json()
                if not isinstance(changes, dict):
                    raise ValueError("a JSON object of faults")
                self.faults.update(changes)
            except ValueError as e:
                return web.json_response({"error": str(e)}, status=400)
        return web.json_response(asdict(self.faults))

    async def control_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.log)

    async def control_clear_requests(self, request: web.Request) -> web.Response:
        self.log.clear()
        return web.json_response([])

    async def control_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


# The API as data: the first entry whose method, scope, sub-resource (and header) match a request wins.
OPERATIONS: tuple[Operation, ...] = (
    Operation("ListBuckets", "GET", SERVICE, None, OssApi.list_buckets),
    Operation("GetBucketInfo", "GET", BUCKET, "bucketInfo", OssApi.get_bucket_info),
    Operation("GetBucketLocation", "GET", BUCKET, "location", OssApi.get_bucket_location),
    Operation("ListMultipartUploads", "GET", BUCKET, "uploads", OssApi.list_multipart_uploads),
    Operation("DeleteMultipleObjects", "POST", BUCKET, "delete", OssApi.delete_multiple_objects),
    Operation("ListObjects", "GET", BUCKET, None, OssApi.list_objects),
    Operation("UploadPartCopy", "PUT", OBJECT, "uploadId", OssApi.upload_part_copy, header="x-oss-copy-source"),
    Operation("UploadPart", "PUT", OBJECT, "uploadId", OssApi.upload_part),
    Operation("CopyObject", "PUT", OBJECT, None, OssApi.copy_object, header="x-oss-copy-source"),
    Operation("PutObject", "PUT", OBJECT, None, OssApi.put_object),
    Operation("ListParts", "GET", OBJECT, "uploadId", OssApi.list_parts),
    Operation("GetObject", "GET", OBJECT, None, OssApi.get_object),
    Operation("GetObjectMeta", "HEAD", OBJECT, "objectMeta", OssApi.get_object_meta),
    Operation("HeadObject", "HEAD", OBJECT, None, OssApi.head_object),
    Operation("InitiateMultipartUpload", "POST", OBJECT, "uploads", OssApi.initiate_multipart_upload),
    Operation("CompleteMultipartUpload", "POST", OBJECT, "uploadId", OssApi.complete_multipart_upload),
    Operation("AppendObject", "POST", OBJECT, "append", OssApi.append_object),
    Operation("AbortMultipartUpload", "DELETE", OBJECT, "uploadId", OssApi.abort_multipart_upload),
    Operation("DeleteObject", "DELETE", OBJECT, None, OssApi.delete_object),
)


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "AliyunOSS"
    if "oss_request_id" in request:
        response.headers["x-oss-request-id"] = request["oss_request_id"]


def create_app(api: OssApi) -> web.Application:
    # XML bodies (a 10000-part completion, a 1000-key delete) are read whole; objects are streamed.
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_routes([
        web.post("/_control/faults", api.control_faults),
        web.get("/_control/faults", api.control_faults),
        web.get("/_control/requests", api.control_requests),
        web.post("/_control/requests/clear", api.control_clear_requests),
        web.get("/_control/health", api.control_health),
        web.route("*", "/{path:.*}", api.serve),
    ])
    app.on_response_prepare.append(_common_headers)
    return app


# --- the process, for tests ------------------------------------------------------------------------

class OssServer:
    """The OSS test server as a process started by a test (stop() and start() again keep its data)."""

    def __init__(self, tmp: Path, buckets: Iterable[str] = ("mirror-test",), key_id: str = "test-access-key-id",
                 key_secret: str = "test-access-key-secret", max_copy_size: int | None = None,
                 name: str = "ossserver") -> None:
        from tests.support.procs import REPO_ROOT, Proc, client_env, free_port

        self.dir = Path(tmp)
        self.data = self.dir / "data"
        self.buckets = list(buckets)
        assert self.buckets, "at least one bucket"
        self.key_id = key_id
        self.key_secret = key_secret
        self.port = free_port()
        argv: list[str | Path] = [sys.executable, "-m", "tests.support.ossserver", "--port", str(self.port),
                                  "--data", self.data, "--key-id", key_id, "--key-secret", key_secret]
        argv += [a for bucket in self.buckets for a in ("--bucket", bucket)]
        if max_copy_size is not None:
            argv += ["--max-copy-size", str(max_copy_size)]
        env = client_env({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)})
        self.proc = Proc(name, argv, self.dir, env=env, cwd=REPO_ROOT)

    @property
    def endpoint(self) -> str:
        """`127.0.0.1:PORT`, what oss2 and the storage config take (oss2 then uses path-style URLs)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def bucket(self) -> str:
        """The first bucket."""
        return self.buckets[0]

    def start(self, timeout: float = 30.0) -> OssServer:
        from tests.support.procs import http

        self.proc.start()
        self.proc.wait_ready(lambda: http("GET", f"{self.url}/_control/health", timeout=2).status == 200, timeout)
        return self

    def stop(self) -> int | None:
        return self.proc.stop()

    @property
    def running(self) -> bool:
        return self.proc.running

    def __enter__(self) -> OssServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        from tests.support.procs import http

        data = None if body is None else json.dumps(body).encode()
        r = http(method, f"{self.url}/_control/{path}", {"Content-Type": "application/json"}, data, timeout=10)
        if r.status != 200:
            raise RuntimeError(f"{method} /_control/{path}: {r.status} {r.body!r}")
        return r.json()

    def faults(self, **changes: Any) -> dict[str, Any]:
        """Set faults (status503=N, drop=N, cut=N, down=bool, delay=seconds); -> all current settings."""
        result: dict[str, Any] = self._control("POST", "faults", changes)
        return result

    def requests(self) -> list[dict[str, Any]]:
        """The OSS requests answered since start or the last clear_requests(), oldest first."""
        result: list[dict[str, Any]] = self._control("GET", "requests")
        return result

    def clear_requests(self) -> None:
        self._control("POST", "requests/clear", {})

    def logs(self, lines: int = 60) -> str:
        return self.proc.logs(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ossserver", description="An OSS-protocol test server on 127.0.0.1.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data", type=Path, required=True, help="directory that holds the buckets' objects")
    p.add_argument("--bucket", action="append", required=True, help="a bucket name (repeatable)")
    p.add_argument("--key-id", required=True)
    p.add_argument("--key-secret", required=True)
    p.add_argument("--max-copy-size", type=int, default=GiB,
                   help="largest CopyObject source; bigger ones need UploadPartCopy (default 1 GiB)")
    args = p.parse_args(argv)
    for name in args.bucket:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", name):
            p.error(f"invalid bucket name {name!r}: 3-63 of a-z, 0-9 and -, not starting or ending with -")
    store = Store(args.data, args.bucket)
    api = OssApi(store, args.key_id, args.key_secret, args.max_copy_size)
    print(json.dumps({"msg": "listening", "port": args.port, "buckets": args.bucket}), flush=True)
    # Loopback only: nothing but the tests may reach it. A short shutdown: a delayed request may be waiting.
    web.run_app(create_app(api), host="127.0.0.1", port=args.port, print=None, access_log=None,
                shutdown_timeout=2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
