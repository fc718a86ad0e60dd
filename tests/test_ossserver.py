"""The OSS test server (tests/support/ossserver.py) driven by the real oss2 SDK, as the storage backend
will drive it: every call the backend needs, the error each misuse gets, and every fault mode.

One server process serves the module; each test works under its own key prefix, and faults are
cleared after every test.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from http.client import HTTPException, IncompleteRead
from pathlib import Path
from typing import Any

import oss2
import pytest
import requests

from tests.support.ossserver import OssServer
from tests.support.procs import http

OTHER_BUCKET = "mirror-other"
MAX_COPY = 256 * 1024  # the server's --max-copy-size here, so the refusal needs no 1 GiB object
PART = 100 * 1024  # OSS's smallest part but the last


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OssServer]:
    oss = OssServer(tmp_path_factory.mktemp("oss"), buckets=("mirror-test", OTHER_BUCKET), max_copy_size=MAX_COPY)
    oss.start()
    try:
        yield oss
    finally:
        oss.stop()


@pytest.fixture(autouse=True)
def no_faults_after(server: OssServer) -> Iterator[None]:
    yield
    server.faults(status503=0, drop=0, cut=0, down=False, delay=0)


_SESSION: list[Any] = []


@pytest.fixture(scope="module", autouse=True)
def shared_session() -> Iterator[None]:
    """One connection pool for every Bucket here, closed at the end (a dropped pool leaks sockets)."""
    session = oss2.Session()
    session.session.trust_env = False  # requests would honour HTTP(S)_PROXY; this traffic stays on 127.0.0.1
    _SESSION.append(session)
    try:
        yield
    finally:
        _SESSION.remove(session)
        session.session.close()


def make_bucket(server: OssServer, name: str | None = None, key_id: str | None = None, secret: str | None = None,
                **kwargs: Any) -> Any:
    auth = oss2.Auth(key_id or server.key_id, secret or server.key_secret)
    return oss2.Bucket(auth, server.url, name or server.bucket, session=_SESSION[0], **kwargs)


@pytest.fixture
def bucket(server: OssServer) -> Any:
    return make_bucket(server)


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name}/"


def drained(result: Any) -> Any:
    """Read the XML body oss2 leaves unread after CopyObject, UploadPartCopy and CompleteMultipartUpload.

    Those return a PutObjectResult built from the headers only; until the body is read the pooled
    connection stays checked out, and is leaked (a ResourceWarning) when the result is dropped.
    """
    result.resp.read()
    return result


def etag_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest().upper()


def error_xml(body: bytes) -> dict[str, str]:
    root = ET.fromstring(body)
    assert root.tag == "Error"
    return {child.tag: child.text or "" for child in root}


# --- authentication ---------------------------------------------------------------------------------

def test_wrong_secret_is_signature_does_not_match(server: OssServer, bucket: Any, prefix: str) -> None:
    bucket.put_object(f"{prefix}k", b"x")
    bad = make_bucket(server, secret="not-the-secret")
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch) as e:
        bad.get_object(f"{prefix}k")
    assert e.value.status == 403 and e.value.request_id
    # OSS shows the string it signed, so a client can see where it differs.
    assert e.value.details["StringToSign"].startswith("GET\n\n\n")
    assert e.value.details["StringToSign"].endswith(f"/{server.bucket}/{prefix}k")
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch):  # HEAD: no body, the error is in x-oss-err
        bad.head_object(f"{prefix}k")
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch):
        bad.put_object(f"{prefix}k", b"y" * 100_000)
    assert bucket.get_object(f"{prefix}k").read() == b"x"


def test_unknown_key_id_is_invalid_access_key_id(server: OssServer) -> None:
    with pytest.raises(oss2.exceptions.ServerError) as e:
        make_bucket(server, key_id="nobody").list_objects()
    assert (e.value.status, e.value.code) == (403, "InvalidAccessKeyId")
    assert e.value.details["OSSAccessKeyId"] == "nobody"


def test_stale_date_is_request_time_too_skewed(server: OssServer, bucket: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oss2.auth.utils, "http_date", lambda: "Mon, 01 Jan 2001 00:00:00 GMT")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.list_objects()
    assert (e.value.status, e.value.code) == (403, "RequestTimeTooSkewed")


def test_unsigned_request_is_access_denied_xml(server: OssServer) -> None:
    r = http("GET", f"{server.url}/{server.bucket}/anything")
    assert r.status == 403
    assert r.headers["Content-Type"] == "application/xml"
    details = error_xml(r.body)
    assert details["Code"] == "AccessDenied"
    assert details["RequestId"] == r.headers["x-oss-request-id"]
    assert details["HostId"] and details["Message"]


def test_presigned_urls(server: OssServer, bucket: Any, prefix: str) -> None:
    key = f"{prefix}dir/a file+plus.bin"
    bucket.put_object(key, b"signed content")
    r = http("GET", bucket.sign_url("GET", key, 60))
    assert (r.status, r.body) == (200, b"signed content")

    expired = http("GET", bucket.sign_url("GET", key, -10))
    assert expired.status == 403
    assert error_xml(expired.body)["Code"] == "AccessDenied"
    assert "expired" in error_xml(expired.body)["Message"]

    tampered = http("GET", bucket.sign_url("GET", key, 60).replace("Signature=", "Signature=AA"))
    assert (tampered.status, error_xml(tampered.body)["Code"]) == (403, "SignatureDoesNotMatch")

    # A URL signed for GET does not allow DELETE.
    assert http("DELETE", bucket.sign_url("GET", key, 60)).status == 403
    # A presigned PUT, with the Content-Type it was signed with.
    url = bucket.sign_url("PUT", f"{prefix}uploaded", 60, headers={"Content-Type": "text/plain"})
    bucket.put_object_with_url(url, b"via url", headers={"Content-Type": "text/plain"})
    assert bucket.get_object(f"{prefix}uploaded").read() == b"via url"


def test_virtual_host_style_addressing(server: OssServer, bucket: Any, prefix: str) -> None:
    bucket.put_object(f"{prefix}vh", b"virtual host")
    signed = bucket.sign_url("GET", f"{prefix}vh", 60)
    path_and_query = signed.split(server.bucket, 1)[1]  # /key?OSSAccessKeyId=...: the key is the whole path
    r = http("GET", f"{server.url}{path_and_query}", headers={"Host": f"{server.bucket}.oss-test.localdomain"})
    assert (r.status, r.body) == (200, b"virtual host")


# --- objects ----------------------------------------------------------------------------------------

def test_put_get_head_round_trip(server: OssServer, bucket: Any, prefix: str, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    put = bucket.put_object(f"{prefix}blob", data, headers={"Content-Type": "application/x-test",
                                                            "x-oss-meta-origin": "unit"})
    assert put.etag == etag_of(data)  # the MD5, upper-case, as OSS prints it
    assert put.crc is not None  # x-oss-hash-crc64ecma; oss2 compared it with its own and found it equal
    assert put.request_id

    got = bucket.get_object(f"{prefix}blob")
    assert got.read() == data
    assert got.headers["Content-Type"] == "application/x-test"
    assert got.headers["x-oss-meta-origin"] == "unit"
    assert got.server_crc == put.crc

    head = bucket.head_object(f"{prefix}blob")
    assert head.content_length == len(data)
    assert head.etag == put.etag
    assert head.object_type == "Normal"
    assert head.content_type == "application/x-test"
    assert abs(head.last_modified - time.time()) < 60
    assert head.headers["x-oss-request-id"]

    # get_object_to_file checks the whole object's CRC64 against the server's.
    bucket.get_object_to_file(f"{prefix}blob", str(tmp_path / "copy"))
    assert (tmp_path / "copy").read_bytes() == data

    bucket.put_object(f"{prefix}blob", b"replaced")
    assert bucket.get_object(f"{prefix}blob").read() == b"replaced"
    bucket.put_object(f"{prefix}empty", b"")
    assert bucket.get_object(f"{prefix}empty").read() == b""
    assert bucket.head_object(f"{prefix}empty").content_length == 0


def test_server_side_encryption_is_echoed(bucket: Any, prefix: str) -> None:
    sse = {"x-oss-server-side-encryption": "AES256"}
    put = bucket.put_object(f"{prefix}secret", b"s", headers=sse)
    assert put.headers["x-oss-server-side-encryption"] == "AES256"
    assert bucket.get_object(f"{prefix}secret").headers["x-oss-server-side-encryption"] == "AES256"
    assert bucket.head_object(f"{prefix}secret").headers["x-oss-server-side-encryption"] == "AES256"
    bucket.put_object(f"{prefix}plain", b"p")
    assert "x-oss-server-side-encryption" not in bucket.head_object(f"{prefix}plain").headers
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.put_object(f"{prefix}bad", b"b", headers={"x-oss-server-side-encryption": "ROT13"})
    assert (e.value.status, e.value.code) == (400, "InvalidEncryptionAlgorithmError")


def test_content_md5_is_checked(bucket: Any, prefix: str) -> None:
    bucket.put_object(f"{prefix}ok", b"abc", headers={"Content-MD5": oss2.utils.content_md5(b"abc")})
    with pytest.raises(oss2.exceptions.InvalidDigest):
        bucket.put_object(f"{prefix}bad", b"abc", headers={"Content-MD5": oss2.utils.content_md5(b"abd")})
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.head_object(f"{prefix}bad")


def test_missing_key_and_bucket(server: OssServer, bucket: Any, prefix: str) -> None:
    with pytest.raises(oss2.exceptions.NoSuchKey) as e:
        bucket.get_object(f"{prefix}absent")
    assert e.value.status == 404 and e.value.details["Key"] == f"{prefix}absent"
    with pytest.raises(oss2.exceptions.NoSuchKey):  # HEAD too, from x-oss-err
        bucket.head_object(f"{prefix}absent")
    assert not bucket.object_exists(f"{prefix}absent")
    assert bucket.delete_object(f"{prefix}absent").status == 204  # deleting nothing is fine

    nowhere = make_bucket(server, "no-such-bucket")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        nowhere.get_object("k")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        nowhere.list_objects()
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        nowhere.put_object("k", b"x")


def test_key_names(bucket: Any, prefix: str) -> None:
    odd = [f"{prefix}space and+plus", f"{prefix}percent%2F", f"{prefix}ünïcødé/日本", f"{prefix}a//b", f"{prefix}q?x=1"]
    for i, key in enumerate(odd):
        bucket.put_object(key, str(i).encode())
    for i, key in enumerate(odd):
        assert bucket.get_object(key).read() == str(i).encode()
    assert sorted(o.key for o in oss2.ObjectIterator(bucket, prefix=prefix)) == sorted(odd)
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.put_object(f"{prefix}{'x' * 1024}", b"")
    assert e.value.code == "InvalidObjectName"


def test_ranged_reads(bucket: Any, prefix: str) -> None:
    data = bytes(range(256)) * 4  # 1024 bytes
    key = f"{prefix}ranged"
    bucket.put_object(key, data)

    def get(first: int | None, last: int | None, standard: bool = False) -> tuple[int, bytes, str | None]:
        headers = {"x-oss-range-behavior": "standard"} if standard else None
        r = bucket.get_object(key, byte_range=(first, last), headers=headers)
        return r.status, r.read(), r.headers.get("Content-Range")

    assert get(0, 99) == (206, data[:100], "bytes 0-99/1024")
    assert get(1000, None) == (206, data[1000:], "bytes 1000-1023/1024")
    assert get(None, 24) == (206, data[-24:], "bytes 1000-1023/1024")
    # OSS's default: a range it cannot satisfy is ignored, the whole object comes back with 200.
    assert get(0, 1024) == (200, data, None)
    assert get(1024, 2000) == (200, data, None)
    assert get(2000, None) == (200, data, None)
    # With x-oss-range-behavior: standard, the end is cut to the object, a start past it is 416.
    assert get(1000, 5000, standard=True) == (206, data[1000:], "bytes 1000-1023/1024")
    assert get(None, 5000, standard=True) == (206, data, "bytes 0-1023/1024")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        get(1024, None, standard=True)
    assert (e.value.status, e.value.code) == (416, "InvalidRange")


def test_batch_delete(bucket: Any, prefix: str) -> None:
    keys = [f"{prefix}{i}" for i in range(5)]
    for key in keys:
        bucket.put_object(key, b"x")
    result = bucket.batch_delete_objects([*keys[:3], f"{prefix}never-there"])
    assert result.deleted_keys == [*keys[:3], f"{prefix}never-there"]
    assert [o.key for o in oss2.ObjectIterator(bucket, prefix=prefix)] == keys[3:]
    with pytest.raises(oss2.exceptions.MalformedXml):
        bucket.batch_delete_objects([f"{prefix}k{i}" for i in range(1001)])


def test_quiet_batch_delete_has_no_body(server: OssServer, bucket: Any, prefix: str) -> None:
    bucket.put_object(f"{prefix}q", b"x")
    # oss2's batch_delete_objects always asks for the verbose answer: send Quiet through its request path.
    body = oss2.xml_utils.to_batch_delete_objects_request([f"{prefix}q"], True)
    resp = bucket._Bucket__do_bucket("POST", data=body, params={"delete": ""},
                                     headers={"Content-MD5": oss2.utils.content_md5(body)})
    assert resp.status == 200 and resp.read() == b""
    assert not bucket.object_exists(f"{prefix}q")


# --- listing ----------------------------------------------------------------------------------------

def test_list_pagination_with_markers_and_delimiter(server: OssServer, bucket: Any, prefix: str) -> None:
    keys = sorted([f"{prefix}top{i}" for i in range(3)] + [f"{prefix}d{d}/k{i}" for d in range(3) for i in range(4)])
    for key in keys:
        bucket.put_object(key, b"x" * len(key))

    server.clear_requests()
    listed = list(oss2.ObjectIterator(bucket, prefix=prefix, max_keys=2))
    assert [o.key for o in listed] == keys
    assert all(o.size == len(o.key) and o.etag == etag_of(b"x" * len(o.key)) for o in listed)
    pages = [r for r in server.requests() if r["op"] == "ListObjects"]
    assert len(pages) == (len(keys) + 1) // 2
    assert pages[1]["query"]["marker"] == keys[1]  # each page starts after the last key of the one before

    # One level: three common prefixes and three keys, two per page; no prefix comes twice.
    server.clear_requests()
    level = [o.key for o in oss2.ObjectIterator(bucket, prefix=prefix, delimiter="/", max_keys=2)]
    assert level == sorted([f"{prefix}d0/", f"{prefix}d1/", f"{prefix}d2/"] + [f"{prefix}top{i}" for i in range(3)])
    assert len([r for r in server.requests() if r["op"] == "ListObjects"]) == 3

    first = bucket.list_objects(prefix=prefix, delimiter="/", max_keys=2)
    assert first.is_truncated and first.next_marker == f"{prefix}d1/"
    assert first.prefix_list == [f"{prefix}d0/", f"{prefix}d1/"]
    second = bucket.list_objects(prefix=prefix, delimiter="/", marker=first.next_marker, max_keys=2)
    assert second.prefix_list == [f"{prefix}d2/"] and [o.key for o in second.object_list] == [f"{prefix}top0"]

    assert [o.key for o in oss2.ObjectIteratorV2(bucket, prefix=prefix, max_keys=3)] == keys
    assert [o.key for o in oss2.ObjectIteratorV2(bucket, prefix=prefix, start_after=keys[5])] == keys[6:]
    last = bucket.list_objects(prefix=prefix, max_keys=1000)
    assert not last.is_truncated and len(last.object_list) == len(keys)
    with pytest.raises(oss2.exceptions.InvalidArgument):
        bucket.list_objects(prefix=prefix, max_keys=1001)


# --- copy -------------------------------------------------------------------------------------------

def test_copy_object(server: OssServer, bucket: Any, prefix: str) -> None:
    data = os.urandom(50_000)
    bucket.put_object(f"{prefix}src", data, headers={"Content-Type": "image/png"})
    copied = drained(bucket.copy_object(server.bucket, f"{prefix}src", f"{prefix}dst"))
    assert copied.etag == etag_of(data)
    got = bucket.get_object(f"{prefix}dst")
    assert got.read() == data and got.headers["Content-Type"] == "image/png"

    other = make_bucket(server, OTHER_BUCKET)
    drained(other.copy_object(server.bucket, f"{prefix}src", f"{prefix}across"))
    assert other.get_object(f"{prefix}across").read() == data

    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.copy_object(server.bucket, f"{prefix}missing", f"{prefix}dst2")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        bucket.copy_object("no-such-bucket", f"{prefix}src", f"{prefix}dst2")


def test_copy_refuses_a_source_over_the_limit(server: OssServer, bucket: Any, prefix: str) -> None:
    bucket.put_object(f"{prefix}big", os.urandom(MAX_COPY + 1))
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.copy_object(server.bucket, f"{prefix}big", f"{prefix}big-copy")
    assert (e.value.status, e.value.code) == (400, "EntityTooLarge")
    assert "Source object" in e.value.message
    assert not bucket.object_exists(f"{prefix}big-copy")


# --- multipart --------------------------------------------------------------------------------------

def test_multipart_upload_with_part_copy(server: OssServer, bucket: Any, prefix: str) -> None:
    source = os.urandom(PART + 5000)
    bucket.put_object(f"{prefix}source", source)
    key = f"{prefix}assembled"
    upload_id = bucket.init_multipart_upload(key, headers={"Content-Type": "application/x-tar"}).upload_id
    one, three = os.urandom(PART), os.urandom(777)
    p1 = bucket.upload_part(key, upload_id, 1, one)
    assert p1.etag == etag_of(one) and p1.crc is not None
    p2 = drained(bucket.upload_part_copy(server.bucket, f"{prefix}source", (10, 10 + PART - 1), key, upload_id,
                                         2))
    assert p2.etag == etag_of(source[10:10 + PART])
    p3 = bucket.upload_part(key, upload_id, 3, three)

    assert [p.part_number for p in bucket.list_parts(key, upload_id).parts] == [1, 2, 3]
    assert upload_id in [u.upload_id for u in bucket.list_multipart_uploads(prefix=prefix).upload_list]
    with pytest.raises(oss2.exceptions.NoSuchKey):  # nothing to see before Complete
        bucket.head_object(key)
    assert [o.key for o in oss2.ObjectIterator(bucket, prefix=prefix)] == [f"{prefix}source"]

    done = drained(bucket.complete_multipart_upload(key, upload_id, [oss2.models.PartInfo(n, p.etag)
                                                                     for n, p in ((1, p1), (2, p2), (3, p3))]))
    assert done.etag.endswith("-3")
    got = bucket.get_object(key)
    assert got.read() == one + source[10:10 + PART] + three
    assert got.headers["x-oss-object-type"] == "Multipart"
    assert got.headers["Content-Type"] == "application/x-tar"
    assert got.server_crc == done.crc
    assert bucket.list_multipart_uploads(prefix=prefix).upload_list == []


def test_multipart_errors(bucket: Any, prefix: str) -> None:
    key = f"{prefix}mp"
    upload_id = bucket.init_multipart_upload(key).upload_id
    small = bucket.upload_part(key, upload_id, 1, b"too small")
    last = bucket.upload_part(key, upload_id, 2, b"last")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.complete_multipart_upload(key, upload_id, [oss2.models.PartInfo(1, small.etag),
                                                          oss2.models.PartInfo(2, last.etag)])
    assert (e.value.status, e.value.code) == (400, "EntityTooSmall")
    # A single small part is also the last one: that is fine... once the ETag is right.
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.complete_multipart_upload(key, upload_id, [oss2.models.PartInfo(1, etag_of(b"other"))])
    assert e.value.code == "InvalidPart"
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.complete_multipart_upload(key, upload_id, [oss2.models.PartInfo(3, small.etag)])
    assert e.value.code == "InvalidPart"
    with pytest.raises(oss2.exceptions.ServerError) as e:  # oss2 sorts the list; a repeated number is out of order
        bucket.complete_multipart_upload(key, upload_id, [oss2.models.PartInfo(1, small.etag)] * 2)
    assert e.value.code == "InvalidPartOrder"
    with pytest.raises(oss2.exceptions.InvalidArgument):
        bucket.upload_part(key, upload_id, 10001, b"x")

    assert bucket.abort_multipart_upload(key, upload_id).status == 204
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.upload_part(key, upload_id, 3, b"x")
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.complete_multipart_upload(key, upload_id, [oss2.models.PartInfo(2, last.etag)])
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.abort_multipart_upload(key, upload_id)
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.list_parts(key, "0" * 32)
    assert not bucket.object_exists(key)

    # The single small part completes.
    upload_id = bucket.init_multipart_upload(key).upload_id
    only = bucket.upload_part(key, upload_id, 1, b"tiny")
    drained(bucket.complete_multipart_upload(key, upload_id, [oss2.models.PartInfo(1, only.etag)]))
    assert bucket.get_object(key).read() == b"tiny"


# --- append -----------------------------------------------------------------------------------------

def test_append_object(server: OssServer, bucket: Any, prefix: str) -> None:
    key = f"{prefix}log"
    first = bucket.append_object(key, 0, b"abc")
    assert first.next_position == 3
    second = bucket.append_object(key, first.next_position, b"defg", init_crc=first.crc)  # oss2 checks the CRC
    assert second.next_position == 7
    head = bucket.head_object(key)
    assert head.object_type == "Appendable" and head.content_length == 7
    assert head.headers["x-oss-next-append-position"] == "7"
    assert bucket.get_object(key).read() == b"abcdefg"

    with pytest.raises(oss2.exceptions.PositionNotEqualToLength) as e:
        bucket.append_object(key, 3, b"again")
    assert e.value.next_position == 7
    with pytest.raises(oss2.exceptions.PositionNotEqualToLength) as e:
        bucket.append_object(f"{prefix}new", 5, b"x")
    assert e.value.next_position == 0

    bucket.put_object(f"{prefix}normal", b"n")
    with pytest.raises(oss2.exceptions.ObjectNotAppendable):
        bucket.append_object(f"{prefix}normal", 1, b"x")

    # An Appendable object can be copied (outside versioned buckets), and the copy is Normal.
    drained(bucket.copy_object(server.bucket, key, f"{prefix}log-copy"))
    assert bucket.head_object(f"{prefix}log-copy").object_type == "Normal"
    assert bucket.get_object(f"{prefix}log-copy").read() == b"abcdefg"


# --- the rest of the API ----------------------------------------------------------------------------

def test_bucket_info_and_unsupported_calls(server: OssServer, bucket: Any, prefix: str) -> None:
    info = bucket.get_bucket_info()
    assert info.name == server.bucket and info.storage_class == "Standard"
    bucket.put_object(f"{prefix}k", b"x")
    with pytest.raises(oss2.exceptions.NotImplemented):  # not an OSS call this server answers
        bucket.get_object_acl(f"{prefix}k")


def test_data_survives_a_restart(server: OssServer, bucket: Any, prefix: str) -> None:
    bucket.put_object(f"{prefix}kept", b"persisted")
    upload_id = bucket.init_multipart_upload(f"{prefix}pending").upload_id
    server.stop()
    server.start()
    assert make_bucket(server).get_object(f"{prefix}kept").read() == b"persisted"
    assert upload_id in [u.upload_id for u in bucket.list_multipart_uploads(prefix=prefix).upload_list]


# --- faults -----------------------------------------------------------------------------------------

def test_status503_fault(server: OssServer, bucket: Any, prefix: str) -> None:
    bucket.put_object(f"{prefix}k", b"x")
    server.faults(status503=2)
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.get_object(f"{prefix}k")
    assert (e.value.status, e.value.code) == (503, "ServiceUnavailable")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.head_object(f"{prefix}k")
    assert e.value.status == 503
    assert bucket.get_object(f"{prefix}k").read() == b"x"

    # oss2's ObjectIterator (and only it) retries a 5xx, up to three times.
    server.faults(status503=2)
    server.clear_requests()
    assert [o.key for o in oss2.ObjectIterator(bucket, prefix=prefix)] == [f"{prefix}k"]
    assert [(r["status"], r["fault"]) for r in server.requests()] == [(503, "status503")] * 2 + [(200, None)]


def test_drop_fault(server: OssServer, bucket: Any, prefix: str) -> None:
    bucket.put_object(f"{prefix}k", b"x")
    server.faults(drop=1)
    with pytest.raises(oss2.exceptions.RequestError):
        bucket.get_object(f"{prefix}k")
    server.faults(drop=1)
    with pytest.raises(oss2.exceptions.RequestError):  # before the body is read
        bucket.put_object(f"{prefix}k", os.urandom(1_000_000))
    server.faults(drop=1)
    with pytest.raises((HTTPException, urllib.error.URLError, ConnectionError)):
        http("GET", bucket.sign_url("GET", f"{prefix}k", 60))
    assert bucket.get_object(f"{prefix}k").read() == b"x"
    assert [r["status"] for r in server.requests()[-4:]] == [0, 0, 0, 200]


def test_cut_fault(server: OssServer, bucket: Any, prefix: str) -> None:
    data = os.urandom(200_000)
    bucket.put_object(f"{prefix}k", data)
    server.faults(cut=1)
    result = bucket.get_object(f"{prefix}k")  # the headers come; the body stops half way
    assert result.content_length == len(data)
    # oss2 does not wrap errors while reading a body: the requests exception comes through.
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        result.read()
    server.faults(cut=1)
    with urllib.request.urlopen(bucket.sign_url("GET", f"{prefix}k", 60), timeout=10) as r:
        with pytest.raises(IncompleteRead) as e:
            r.read()
    assert len(e.value.partial) == len(data) // 2
    assert bucket.get_object(f"{prefix}k").read() == data
    assert server.requests()[-2]["fault"] == "cut"


def test_down_fault(server: OssServer, bucket: Any, prefix: str) -> None:
    bucket.put_object(f"{prefix}k", b"x")
    server.faults(down=True)
    for _ in range(3):
        with pytest.raises(oss2.exceptions.ServerError) as e:
            bucket.get_object(f"{prefix}k")
        assert e.value.status == 503
    with pytest.raises(oss2.exceptions.ServerError):
        bucket.put_object(f"{prefix}other", b"y")
    server.faults(down=False)
    assert bucket.get_object(f"{prefix}k").read() == b"x"
    assert not bucket.object_exists(f"{prefix}other")


def test_delay_fault(server: OssServer, prefix: str) -> None:
    impatient = make_bucket(server, connect_timeout=0.3)
    impatient.put_object(f"{prefix}k", b"x")
    server.faults(delay=1.0)
    t0 = time.monotonic()
    with pytest.raises(oss2.exceptions.RequestError):
        impatient.get_object(f"{prefix}k")
    assert time.monotonic() - t0 < 0.9
    patient = make_bucket(server, connect_timeout=5)
    t0 = time.monotonic()
    assert patient.get_object(f"{prefix}k").read() == b"x"
    assert time.monotonic() - t0 >= 1.0


def test_request_log(server: OssServer, bucket: Any, prefix: str) -> None:
    server.clear_requests()
    bucket.put_object(f"{prefix}k", b"x")
    bucket.get_object(f"{prefix}k").read()
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.head_object(f"{prefix}nope")
    log = server.requests()
    assert [(r["method"], r["op"], r["status"]) for r in log] == [
        ("PUT", "PutObject", 200), ("GET", "GetObject", 200), ("HEAD", "HeadObject", 404)]
    assert log[0]["path"] == f"/{server.bucket}/{prefix}k"
    assert all(r["request_id"] for r in log)
    with pytest.raises(RuntimeError):
        server.faults(explode=1)
