"""The read API side by side with a real distribution: for the same request, the mirror (in
front of it) answers what distribution answers: digests, media types, lengths, bodies, error
codes, and tags/list pagination that walks to the same list."""

from __future__ import annotations

import re
from urllib.parse import urljoin

import pytest

from tests.support.images import OCI_INDEX, OCI_MANIFEST, Layout
from tests.support.procs import Distribution, HttpResult, Mirror, http
from tests.support.registry import MANIFEST_ACCEPT, oci_error

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

EXTRA_TAGS = ("v1", "v2", "v3")  # small's extra tags in the session upstream (see conftest)


def both(mirror: Mirror, upstream: Distribution, method: str, path: str,
         headers: dict[str, str] | None = None) -> tuple[HttpResult, HttpResult]:
    return http(method, mirror.url + path, headers), http(method, upstream.url + path, headers)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_manifests_match_upstream(method: str, mirror: Mirror, upstream: Distribution,
                                  layouts: dict[str, Layout]) -> None:
    small, multi = layouts["small"], layouts["multi"]
    cases = [
        ("library/small", "latest", OCI_MANIFEST),
        ("library/small", small.digest, OCI_MANIFEST),
        ("library/multi", "latest", OCI_INDEX),
        ("library/multi", multi.digest, OCI_INDEX),
        ("library/multi", multi.image("arm64").manifest.digest, OCI_MANIFEST),
    ]
    for repo, ref, media_type in cases:
        path = f"/v2/{repo}/manifests/{ref}"
        for _ in range(2):  # cold, then warm
            m, u = both(mirror, upstream, method, path, {"Accept": MANIFEST_ACCEPT})
            assert (m.status, u.status) == (200, 200), (path, m.status, m.body[:300])
            for h in ("Docker-Content-Digest", "Content-Type", "Content-Length"):
                assert m.headers.get(h) == u.headers.get(h), (path, h, m.headers.get(h), u.headers.get(h))
            assert m.headers.get("Content-Type") == media_type
            assert m.body == u.body


def test_blob_head_and_get_match_upstream(mirror: Mirror, upstream: Distribution, layouts: dict[str, Layout]) -> None:
    small = layouts["small"]
    for blob in small.image().blobs:
        path = f"/v2/library/small/blobs/{blob.digest}"
        m, u = both(mirror, upstream, "HEAD", path)
        assert (m.status, u.status) == (200, 200), (path, m.status)
        assert m.headers.get("Content-Length") == u.headers.get("Content-Length") == str(blob.size)
        assert m.headers.get("Docker-Content-Digest") == blob.digest
        m, u = both(mirror, upstream, "GET", path)
        assert m.status == 200 and m.body == u.body == small.read(blob.digest)


def test_errors_match_upstream(mirror: Mirror, upstream: Distribution) -> None:
    missing = "sha256:" + "0" * 64
    cases = [
        ("/v2/library/small/manifests/no-such-tag", {"MANIFEST_UNKNOWN"}),
        (f"/v2/library/small/manifests/{missing}", {"MANIFEST_UNKNOWN"}),
        (f"/v2/library/small/blobs/{missing}", {"BLOB_UNKNOWN"}),
        ("/v2/library/no-such-repo/manifests/latest", {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"}),
    ]
    for path, codes in cases:
        m, u = both(mirror, upstream, "GET", path, {"Accept": MANIFEST_ACCEPT})
        assert u.status == 404
        assert m.status == 404, (path, m.status, m.body[:300])
        got = {e["code"] for e in oci_error(m.body)}
        assert got & codes, (path, got)


def walk_tags(base: str, repo: str, n: int) -> tuple[list[str], int]:
    """Follow `Link: <...>; rel="next"` from tags/list?n= -> (all tags, pages)."""
    url, pages = f"{base}/v2/{repo}/tags/list?n={n}", 0
    tags: list[str] = []
    while url and pages < 20:
        r = http("GET", url)
        assert r.status == 200, (url, r.status, r.body[:300])
        page = r.json()["tags"] or []
        assert len(page) <= n, (url, page)
        tags += page
        pages += 1
        link = r.headers.get("Link")
        m = re.match(r'<([^>]+)>;\s*rel="next"', link or "")
        url = urljoin(base + "/", m.group(1)) if m else ""
    return tags, pages


def test_tags_list_pagination_matches_upstream(mirror: Mirror, upstream: Distribution) -> None:
    expected = sorted(["latest", *EXTRA_TAGS])
    m, u = both(mirror, upstream, "GET", "/v2/library/small/tags/list")
    assert u.json()["tags"] == expected
    assert m.status == 200 and m.json()["tags"] == expected, m.body
    for n in (1, 2, 3):
        tags, pages = walk_tags(mirror.url, "library/small", n)
        assert tags == expected, (n, tags)
        assert pages >= -(-len(expected) // n), (n, pages)
    r = http("GET", f"{mirror.url}/v2/library/small/tags/list?n=2&last=v1")
    assert r.status == 200 and r.json()["tags"] == ["v2", "v3"], r.body
