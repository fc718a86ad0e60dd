"""layout.py both ways: every key a builder makes parses back into what it was made from, and
nothing else parses (staging files, strays, keys with bad digests, registry:2's signatures, mirror's
old layout, which only parse_legacy reads)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.names import Digest
from mirror.storage import layout
from mirror.storage.layout import Parsed

COMPONENT = st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+)?", fullmatch=True)
NAMES = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)
TAGS = st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,40}", fullmatch=True)
DIGESTS = st.binary(max_size=16).map(lambda b: Digest("sha256", hashlib.sha256(b).hexdigest()))


@given(NAMES, DIGESTS, DIGESTS, TAGS, st.uuids())
def test_every_builder_parses_back(name: str, digest: Digest, subject: Digest, tag: str, upload: object) -> None:
    upload_id = str(upload).replace("-", "")
    assert layout.parse(layout.blob(digest)) == Parsed(layout.BLOB, digest=digest)
    assert layout.parse(layout.quarantined(digest)) == Parsed(layout.QUARANTINED, digest=digest)
    assert layout.blob(digest).startswith(layout.blob_entry(digest) + "/") and layout.is_blob(layout.blob(digest))
    assert layout.parse(layout.layer(name, digest)) == Parsed(layout.LAYER, name, digest)
    assert layout.parse(layout.revision(name, digest)) == Parsed(layout.REVISION, name, digest)
    assert layout.parse(layout.tag(name, tag)) == Parsed(layout.TAG, name, tag=tag)
    assert layout.parse(layout.tag_index(name, tag, digest)) == Parsed(layout.TAG_INDEX, name, digest, tag=tag)
    assert [layout.parse(k) for k, _ in layout.tag_links(name, tag, digest)] == [
        Parsed(layout.TAG_INDEX, name, digest, tag=tag), Parsed(layout.TAG, name, tag=tag)]
    assert all(k.startswith(layout.tag_entry(name, tag) + "/") for k, _ in layout.tag_links(name, tag, digest))
    for mark in layout.MARKS:
        assert layout.parse(layout.marker(name, mark)) == Parsed(layout.MARKER, name, mark=mark)
    assert layout.parse(layout.referrer(name, subject, digest)) == Parsed(layout.REFERRER, name, digest,
                                                                          subject=subject)
    for key in (layout.upload_data(name, upload_id), layout.upload_started(name, upload_id),
                layout.hashstate(name, upload_id, "sha256", 1 << 20)):
        assert layout.parse(key) == Parsed(layout.UPLOAD, name, upload_id=upload_id)


@given(NAMES, DIGESTS, TAGS)
def test_mirrors_old_layout_parses_only_as_legacy(name: str, digest: Digest, tag: str) -> None:
    a, h = digest.algorithm, digest.hex
    keys = {f"blobs/{a}/{h[:2]}/{h}": Parsed(layout.BLOB, digest=digest),
            f"repositories/{name}/_layers/{a}/{h}": Parsed(layout.LAYER, name, digest),
            f"repositories/{name}/_manifests/revisions/{a}/{h}": Parsed(layout.REVISION, name, digest),
            f"repositories/{name}/_manifests/tags/{tag}": Parsed(layout.TAG, name, tag=tag),
            f"repositories/{name}/_private": Parsed(layout.LEGACY_PRIVATE, name, mark=layout.PRIVATE_MARK),
            f"repositories/{name}/_mirror/cached": Parsed(layout.MARKER, name, mark=layout.CACHED_MARK),
            f"repositories/{name}/_referrers/{a}/{h}/{a}-{h}": Parsed(layout.REFERRER, name, digest, subject=digest),
            f"repositories/{name}/_uploads/{h[:32]}/data": Parsed(layout.UPLOAD, name, upload_id=h[:32], tag="data"),
            f"repositories/{name}/_uploads/{h[:32]}/hashstate": Parsed(layout.HASHSTATE, name, upload_id=h[:32])}
    for key, parsed in keys.items():
        assert layout.parse_legacy(key) == parsed, key
        assert layout.parse(key) is None, key


def test_tags_that_look_like_digests_stay_tags() -> None:
    digest = Digest("sha256", "ab" * 32)
    for tag in (digest.hex, "sha256", "link", "current", "index", "data"):
        assert layout.parse(layout.tag("app", tag)) == Parsed(layout.TAG, "app", tag=tag)
        assert layout.parse(layout.tag_index("app", tag, digest)) == Parsed(layout.TAG_INDEX, "app", digest, tag=tag)


def test_upload_start_times_both_ways() -> None:
    assert layout.started_at(1_700_000_000.7) == b"2023-11-14T22:13:20Z"  # registry:2's RFC 3339, to the second
    assert layout.parse_started(b"2023-11-14T22:13:20Z") == 1_700_000_000
    assert layout.parse_started(b"2026-11-30T15:33:48.601851529Z") == pytest.approx(1_796_052_828.6018515)
    assert layout.parse_started(b"1700000000.5\n") == 1_700_000_000.5  # mirror's older epoch seconds
    assert layout.parse_started(b"yesterday") is None


def test_strays_do_not_parse() -> None:
    hexpart = "a" * 64
    v2 = layout.ROOT
    for key in ("_staging/f-123", "_tier/x", "scheduler-state.json", f"{v2}/blobs/sha256/aa",
                f"{v2}/blobs/sha256/aa/{hexpart}", f"{v2}/blobs/sha256/bb/{hexpart}/data",
                f"{v2}/blobs/md5/aa/{hexpart}/data", f"{v2}/repositories/_layers/sha256/{hexpart}/link",
                f"{v2}/repositories/app/_layers/sha256/{hexpart}", f"{v2}/repositories/app/_layers/sha256/zz/link",
                f"{v2}/repositories/app/_manifests/revisions/sha256/{hexpart}",
                f"{v2}/repositories/app/_manifests/revisions/sha256/{hexpart}/signatures/sha256/{hexpart}/link",
                f"{v2}/repositories/app/_manifests/tags/v1", f"{v2}/repositories/app/_manifests/tags/v1/current",
                f"{v2}/repositories/app/_mirror/other", f"{v2}/repositories/app/_other/x", f"{v2}/elsewhere/x",
                f"blobs/sha256/aa/{hexpart}", f"repositories/app/_layers/sha256/{hexpart}",
                "_quarantine/sha256", "_quarantine/sha256/zz"):
        assert layout.parse(key) is None, key
