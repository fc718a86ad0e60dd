"""layout.py both ways: every key a builder makes parses back into what it was made from, and
nothing else parses (staging files, strays, keys with bad digests)."""

from __future__ import annotations

import hashlib

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
    assert layout.parse(layout.layer(name, digest)) == Parsed(layout.LAYER, name, digest)
    assert layout.parse(layout.revision(name, digest)) == Parsed(layout.REVISION, name, digest)
    assert layout.parse(layout.tag(name, tag)) == Parsed(layout.TAG, name, tag=tag)
    for mark in layout.MARKS:
        assert layout.parse(layout.marker(name, mark)) == Parsed(layout.MARKER, name, mark=mark)
    assert layout.parse(layout.referrer(name, subject, digest)) == Parsed(layout.REFERRER, name, digest,
                                                                          subject=subject)
    for key in (layout.upload_data(name, upload_id), layout.upload_started(name, upload_id)):
        assert layout.parse(key) == Parsed(layout.UPLOAD, name, upload_id=upload_id)


def test_strays_do_not_parse() -> None:
    hexpart = "a" * 64
    for key in ("_staging/f-123", "blobs/sha256/aa", f"blobs/sha256/bb/{hexpart}", f"blobs/md5/aa/{hexpart}",
                "repositories/_layers/sha256/" + hexpart, "repositories/app/_layers/sha256/zz",
                "repositories/app/_manifests/revisions/sha256", "repositories/app/_other/x", "elsewhere/x",
                "_quarantine/sha256", "_quarantine/sha256/zz"):
        assert layout.parse(key) is None, key
