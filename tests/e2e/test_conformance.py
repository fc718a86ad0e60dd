"""The OCI distribution-spec conformance suite, v1.1.1, ported from Go + ginkgo
(github.com/opencontainers/distribution-spec, conformance/0[1-4]_*_test.go and setup.go).

Every g.Specify is one test, in the suite's order, named by its contexts and text; they share
state as the Go specs do (a spec that depends on an earlier one's response fails with it). All
four workflows run by default; OCI_* variables set in the environment change the run as they
change the Go suite's (OCI_TEST_PUSH=0, OCI_DELETE_MANIFEST_BEFORE_BLOBS=0,
OCI_AUTOMATIC_CROSSMOUNT=1, OCI_NAMESPACE, OCI_CROSSMOUNT_NAMESPACE). The root URL is the
registry started here; there is no pre-seeded mode (OCI_TAG_NAME, OCI_TAG_LIST, ...), so the
specs for it always skip, as in a run that pushes its own content.

The registry is a mirror with no upstream (every repository private, as registry:2) and deletes
enabled. CONFORMANCE_REGISTRY=distribution runs the same specs against Debian's docker-registry
(CNCF distribution 2.8) instead, a check of the port itself; the specs distribution fails are
listed in DISTRIBUTION_FAILS, expected to fail (strictly) in that run only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import require
from tests.support.conformance import (
    ANNOTATION_KEY,
    ARTIFACT_TYPE_FILTER,
    CONTENT_DISCOVERY,
    CONTENT_MANAGEMENT,
    EMPTY_JSON_DIGEST,
    EMPTY_LAYER_TEST_TAG,
    ERROR_CODES,
    NONEXISTENT_MANIFEST,
    PULL,
    PUSH,
    TEST_TAG_NAME,
    Client,
    Content,
    Response,
    Settings,
    Tree,
    expect_2xx,
    expect_status,
    run_only_if,
    run_only_if_not,
    warn,
)
from tests.support.images import OCI_INDEX, OCI_MANIFEST
from tests.support.procs import DISTRIBUTION, Distribution, Mirror

pytestmark = pytest.mark.e2e

OCTET = {"Content-Type": "application/octet-stream"}
MANIFEST = {"Content-Type": OCI_MANIFEST}
ACCEPT_MANIFEST = {"Accept": OCI_MANIFEST}

# What the Go suite runs with when the harness sets nothing: all four workflows.
DEFAULT_ENV = {"OCI_NAMESPACE": "conformance/repo", "OCI_TEST_PULL": "1", "OCI_TEST_PUSH": "1",
               "OCI_TEST_CONTENT_DISCOVERY": "1", "OCI_TEST_CONTENT_MANAGEMENT": "1"}
SETTINGS = Settings.from_env({**DEFAULT_ENV, **{k: v for k, v in os.environ.items() if k.startswith("OCI_")}})
TARGET = os.environ.get("CONFORMANCE_REGISTRY", "mirror")

# The specs CNCF distribution 2.8 (Debian's docker-registry) fails, and why: it predates OCI 1.1
# (no referrers API, no OCI-Subject), has no tag pagination nor tag delete, and its upload state
# lives in the Location's signed `_state`, so an earlier Location is refused rather than answered.
_TAGS = "Content Discovery / Test content discovery endpoints (listing tags) / "
_REFERRERS = "Content Discovery / Test content discovery endpoints (listing references) / "
DISTRIBUTION_FAILS = {
    "Pull / Error codes / 400 response body should contain OCI-conforming JSON message":
        "500 UNKNOWN: it looks sha256:totallywrong up as a tag path in storage",
    "Push / Blob Upload Chunked / Out-of-order blob upload should return 416": "202: Content-Range is not checked",
    "Push / Blob Upload Chunked / Retry previous blob chunk should return 416":
        "404 BLOB_UPLOAD_INVALID: the first Location's _state is stale",
    "Push / Blob Upload Chunked / Get on stale blob upload should return 204 with a range and location":
        "404 BLOB_UPLOAD_INVALID: the first Location's _state is stale",
    "Content Discovery / Setup / References setup": "no OCI-Subject header: subjects are not tracked",
    _TAGS + "GET number of tags should be limitable by `n` query parameter": "tags/list ignores n",
    _TAGS + "GET start of tag is set by `last` query parameter": "tags/list ignores n",
    _REFERRERS + "GET request to nonexistent blob should result in empty 200 response": "no referrers API (404)",
    _REFERRERS + "GET request to existing blob should yield 200": "no referrers API (404)",
    _REFERRERS + "GET request to existing blob with filter should yield 200": "no referrers API (404)",
    _REFERRERS + "GET request to missing manifest should yield 200": "no referrers API (404)",
    "Content Discovery / Teardown / Delete created manifest & associated tags":
        "400 DIGEST_INVALID for DELETE of a tag",
    "Content Management / Manifest delete / DELETE request to manifest tag should return 202, unless tag deletion "
    "is disallowed (400/405)": "400 DIGEST_INVALID for DELETE of a tag, where the spec asks UNSUPPORTED",
}


class Run:
    """One run of the suite: its settings, content, client and specs (fresh closures each run)."""

    def __init__(self, settings: Settings, root_url: str) -> None:
        self.settings = settings
        self.content = Content()
        self.client = Client(root_url, settings.namespace)
        tree = Tree()
        pull(tree, self)
        push(tree, self)
        content_discovery(tree, self)
        content_management(tree, self)
        self.specs = tree.specs

    def push_blob(self, blob_digest: str, content: bytes) -> None:
        """The setup's upload: POST for a session, PUT the whole blob with its digest."""
        c = self.client
        resp = c.do("POST", "/v2/<name>/blobs/uploads/")
        resp = c.do("PUT", resp.relative_location(), query={"digest": blob_digest},
                    headers={**OCTET, "Content-Length": str(len(content))}, body=content)
        expect_2xx(resp)

    def put_manifest(self, reference: str, body: bytes, media_type: str = OCI_MANIFEST) -> Response:
        resp = self.client.do("PUT", "/v2/<name>/manifests/<reference>", reference=reference,
                              headers={"Content-Type": media_type}, body=body)
        expect_2xx(resp)
        return resp

    def delete(self, path: str, *others: int, reference: str = "", digest: str = "") -> None:
        """A teardown delete: 2xx, or one of `others` (405 when the registry disallows deletes)."""
        expect_2xx(self.client.do("DELETE", path, reference=reference, digest=digest), *others)


# --- Pull ----------------------------------------------------------------------------------------

def pull(t: Tree, run: Run) -> None:
    s, c, data = run.settings, run.client, run.content
    run_pull_setup = True  # false only with OCI_TAG_NAME, OCI_MANIFEST_DIGEST, OCI_BLOB_DIGEST all set
    tag = ""

    with t.context("Pull"):
        with t.context("Setup"):
            @t.specify("Populate registry with test blob")
            def _() -> None:
                s.skip_if_disabled(PULL)
                run_only_if(run_pull_setup)
                run.push_blob(data.configs[0].digest, data.configs[0].content)

            @t.specify("Populate registry with test blob")
            def _() -> None:
                s.skip_if_disabled(PULL)
                run_only_if(run_pull_setup)
                run.push_blob(data.configs[1].digest, data.configs[1].content)

            @t.specify("Populate registry with test layer")
            def _() -> None:
                s.skip_if_disabled(PULL)
                run_only_if(run_pull_setup)
                run.push_blob(data.layer.digest, data.layer.content)

            @t.specify("Populate registry with test manifest")
            def _() -> None:
                nonlocal tag
                s.skip_if_disabled(PULL)
                run_only_if(run_pull_setup)
                tag = TEST_TAG_NAME
                run.put_manifest(tag, data.manifests[0].content)

            @t.specify("Populate registry with test manifest")
            def _() -> None:
                s.skip_if_disabled(PULL)
                run_only_if(run_pull_setup)
                run.put_manifest(data.manifests[1].digest, data.manifests[1].content)

            @t.specify("Get tag name from environment")
            def _() -> None:
                s.skip_if_disabled(PULL)
                run_only_if_not(run_pull_setup)

        with t.context("Pull blobs"):
            @t.specify("HEAD request to nonexistent blob should result in 404 response")
            def _() -> None:
                s.skip_if_disabled(PULL)
                expect_status(c.do("HEAD", "/v2/<name>/blobs/<digest>", digest=data.dummy_digest), 404)

            @t.specify("HEAD request to existing blob should yield 200")
            def _() -> None:
                s.skip_if_disabled(PULL)
                resp = c.do("HEAD", "/v2/<name>/blobs/<digest>", digest=data.configs[0].digest)
                expect_status(resp, 200)
                if h := resp.header("Docker-Content-Digest"):
                    assert h == data.configs[0].digest, resp

            @t.specify("GET nonexistent blob should result in 404 response")
            def _() -> None:
                s.skip_if_disabled(PULL)
                expect_status(c.do("GET", "/v2/<name>/blobs/<digest>", digest=data.dummy_digest), 404)

            @t.specify("GET request to existing blob URL should yield 200")
            def _() -> None:
                s.skip_if_disabled(PULL)
                expect_status(c.do("GET", "/v2/<name>/blobs/<digest>", digest=data.configs[0].digest), 200)

        with t.context("Pull manifests"):
            @t.specify("HEAD request to nonexistent manifest should return 404")
            def _() -> None:
                s.skip_if_disabled(PULL)
                resp = c.do("HEAD", "/v2/<name>/manifests/<reference>", reference=NONEXISTENT_MANIFEST)
                expect_status(resp, 404)

            for i in (0, 1):
                @t.specify(f"HEAD request to manifest[{i}] path (digest) should yield 200 response")
                def _(i: int = i) -> None:
                    s.skip_if_disabled(PULL)
                    resp = c.do("HEAD", "/v2/<name>/manifests/<digest>", digest=data.manifests[i].digest,
                                headers=ACCEPT_MANIFEST)
                    expect_status(resp, 200)
                    if h := resp.header("Docker-Content-Digest"):
                        assert h == data.manifests[i].digest, resp

            @t.specify("HEAD request to manifest path (tag) should yield 200 response")
            def _() -> None:
                s.skip_if_disabled(PULL)
                assert tag
                resp = c.do("HEAD", "/v2/<name>/manifests/<reference>", reference=tag, headers=ACCEPT_MANIFEST)
                expect_status(resp, 200)
                if h := resp.header("Docker-Content-Digest"):
                    assert h == data.manifests[0].digest, resp

            @t.specify("GET nonexistent manifest should return 404")
            def _() -> None:
                s.skip_if_disabled(PULL)
                resp = c.do("GET", "/v2/<name>/manifests/<reference>", reference=NONEXISTENT_MANIFEST)
                expect_status(resp, 404)

            for i in (0, 1):
                @t.specify(f"GET request to manifest[{i}] path (digest) should yield 200 response")
                def _(i: int = i) -> None:
                    s.skip_if_disabled(PULL)
                    resp = c.do("GET", "/v2/<name>/manifests/<digest>", digest=data.manifests[i].digest,
                                headers=ACCEPT_MANIFEST)
                    expect_status(resp, 200)

            @t.specify("GET request to manifest path (tag) should yield 200 response")
            def _() -> None:
                s.skip_if_disabled(PULL)
                assert tag
                resp = c.do("GET", "/v2/<name>/manifests/<reference>", reference=tag, headers=ACCEPT_MANIFEST)
                expect_status(resp, 200)

        with t.context("Error codes"):
            @t.specify("400 response body should contain OCI-conforming JSON message")
            def _() -> None:
                s.skip_if_disabled(PULL)
                resp = c.do("GET", "/v2/<name>/manifests/<reference>", reference="sha256:totallywrong",
                            headers=MANIFEST, body=data.invalid_manifest)
                expect_status(resp, 400, 404)
                if resp.status == 400:
                    assert resp.errors()[0]["code"] in ERROR_CODES, resp

        with t.context("Teardown"):
            def delete_manifests() -> None:
                for i in (0, 1):
                    @t.specify(f"Delete manifest[{i}] created in setup")
                    def _(i: int = i) -> None:
                        s.skip_if_disabled(PULL)
                        run_only_if(run_pull_setup)
                        run.delete("/v2/<name>/manifests/<digest>", 405, digest=data.manifests[i].digest)

            if s.delete_manifest_before_blobs:
                delete_manifests()

            for i in (0, 1):
                @t.specify(f"Delete config[{i}] blob created in setup")
                def _(i: int = i) -> None:
                    s.skip_if_disabled(PULL)
                    run_only_if(run_pull_setup)
                    run.delete("/v2/<name>/blobs/<digest>", 404, 405, digest=data.configs[i].digest)

            @t.specify("Delete layer blob created in setup")
            def _() -> None:
                s.skip_if_disabled(PULL)
                run_only_if(run_pull_setup)
                run.delete("/v2/<name>/blobs/<digest>", 404, 405, digest=data.layer.digest)

            if not s.delete_manifest_before_blobs:
                delete_manifests()


# --- Push ----------------------------------------------------------------------------------------

def push(t: Tree, run: Run) -> None:
    s, c, data = run.settings, run.client, run.content
    run_push_setup = True
    last: Response | None = None
    prev: Response | None = None
    empty_layer_manifest_ref = ""

    with t.context("Push"):
        # No setup required at this time for push tests (an empty "Setup" context in the suite).
        with t.context("Blob Upload Streamed"):
            @t.specify("PATCH request with blob in body should yield 202 response")
            def _() -> None:
                nonlocal last
                s.skip_if_disabled(PUSH)
                resp = c.do("POST", "/v2/<name>/blobs/uploads/")
                assert resp.header("Location"), resp
                resp = c.do("PATCH", resp.relative_location(), headers=OCTET, body=data.blob_a.content)
                expect_status(resp, 202)
                last = resp

            @t.specify("PUT request to session URL with digest should yield 201 response")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                assert last is not None
                resp = c.do("PUT", last.relative_location(), query={"digest": data.blob_a.digest},
                            headers={**OCTET, "Content-Length": data.blob_a.length})
                expect_status(resp, 201)
                assert resp.header("Location"), resp

        with t.context("Blob Upload Monolithic"):
            @t.specify("GET nonexistent blob should result in 404 response")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                expect_status(c.do("GET", "/v2/<name>/blobs/<digest>", digest=data.dummy_digest), 404)

            @t.specify("POST request with digest and blob should yield a 201 or 202")
            def _() -> None:
                nonlocal last
                s.skip_if_disabled(PUSH)
                config = data.configs[1]
                resp = c.do("POST", "/v2/<name>/blobs/uploads/", query={"digest": config.digest},
                            headers={"Content-Length": config.length, **OCTET}, body=config.content)
                assert resp.header("Location"), resp
                expect_status(resp, 201, 202)
                last = resp

            @t.specify("GET request to blob URL from prior request should yield 200 or 404 based on response code")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                assert last is not None
                resp = c.do("GET", "/v2/<name>/blobs/<digest>", digest=data.configs[1].digest)
                expect_status(resp, 404 if last.status == 202 else 200)

            @t.specify("POST request should yield a session ID")
            def _() -> None:
                nonlocal last
                s.skip_if_disabled(PUSH)
                resp = c.do("POST", "/v2/<name>/blobs/uploads/")
                expect_status(resp, 202)
                last = resp

            @t.specify("PUT upload of a blob should yield a 201 Response")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                assert last is not None
                config = data.configs[1]
                resp = c.do("PUT", last.relative_location(), query={"digest": config.digest},
                            headers={"Content-Length": config.length, **OCTET}, body=config.content)
                assert resp.header("Location"), resp
                expect_status(resp, 201)

            @t.specify("GET request to existing blob should yield 200 response")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                expect_status(c.do("GET", "/v2/<name>/blobs/<digest>", digest=data.configs[1].digest), 200)

            @t.specify("PUT upload of a layer blob should yield a 201 Response")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                resp = c.do("POST", "/v2/<name>/blobs/uploads/")
                resp = c.do("PUT", resp.relative_location(), query={"digest": data.layer.digest},
                            headers={"Content-Length": data.layer.length, **OCTET}, body=data.layer.content)
                assert resp.header("Location"), resp
                expect_status(resp, 201)

            @t.specify("GET request to existing layer should yield 200 response")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                expect_status(c.do("GET", "/v2/<name>/blobs/<digest>", digest=data.layer.digest), 200)

        with t.context("Blob Upload Chunked"):
            @t.specify("Out-of-order blob upload should return 416")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                resp = c.do("POST", "/v2/<name>/blobs/uploads/", headers={"Content-Length": "0"})
                assert resp.header("Location"), resp
                # Rebuild the chunked blob if the registry's minimum chunk is bigger than ours.
                if min_size := resp.header("OCI-Chunk-Min-Length"):
                    if int(min_size) > len(data.chunked.chunk1):
                        data.rebuild_chunked(int(min_size) * 2 - 2)
                ch = data.chunked
                resp = c.do("PATCH", resp.relative_location(), body=ch.chunk2,
                            headers={**OCTET, "Content-Length": str(len(ch.chunk2)), "Content-Range": ch.chunk2_range})
                expect_status(resp, 416)

            @t.specify("PATCH request with first chunk should return 202")
            def _() -> None:
                nonlocal last, prev
                s.skip_if_disabled(PUSH)
                resp = c.do("POST", "/v2/<name>/blobs/uploads/", headers={"Content-Length": "0"})
                assert resp.header("Location"), resp
                prev = resp
                ch = data.chunked
                resp = c.do("PATCH", resp.relative_location(), body=ch.chunk1,
                            headers={**OCTET, "Content-Length": str(len(ch.chunk1)), "Content-Range": ch.chunk1_range})
                expect_status(resp, 202)
                assert resp.header("Range") == ch.chunk1_range, resp
                last = resp

            @t.specify("Retry previous blob chunk should return 416")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                assert prev is not None
                ch = data.chunked
                resp = c.do("PATCH", prev.relative_location(), body=ch.chunk1,
                            headers={**OCTET, "Content-Length": str(len(ch.chunk1)), "Content-Range": ch.chunk1_range})
                expect_status(resp, 416)

            @t.specify("Get on stale blob upload should return 204 with a range and location")
            def _() -> None:
                nonlocal last
                s.skip_if_disabled(PUSH)
                assert prev is not None
                resp = c.do("GET", prev.relative_location())
                expect_status(resp, 204)
                assert resp.header("Location"), resp
                assert resp.header("Range") == data.chunked.chunk1_range, resp
                last = resp

            @t.specify("PATCH request with second chunk should return 202")
            def _() -> None:
                nonlocal last
                s.skip_if_disabled(PUSH)
                assert last is not None
                ch = data.chunked
                resp = c.do("PATCH", last.relative_location(), body=ch.chunk2,
                            headers={"Content-Length": str(len(ch.chunk2)), "Content-Range": ch.chunk2_range, **OCTET})
                expect_status(resp, 202)
                assert resp.header("Location"), resp
                last = resp

            @t.specify("PUT request with digest should return 201")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                assert last is not None
                resp = c.do("PUT", last.relative_location(), query={"digest": data.chunked.blob.digest},
                            headers={"Content-Length": "0", **OCTET})
                expect_status(resp, 201)
                assert resp.header("Location"), resp

        with t.context("Cross-Repository Blob Mount"):
            mount_name = s.crossmount_namespace

            @t.specify("Cross-mounting of a blob without the from argument should yield session id")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                resp = c.do("POST", "/v2/<name>/blobs/uploads/", name=mount_name, query={"mount": data.dummy_digest})
                expect_status(resp, 202)
                assert resp.absolute_location(), resp

            @t.specify("POST request to mount another repository's blob should return 201 or 202")
            def _() -> None:
                nonlocal last
                s.skip_if_disabled(PUSH)
                resp = c.do("POST", "/v2/<name>/blobs/uploads/", name=mount_name,
                            query={"mount": data.blob_a.digest, "from": s.namespace})
                expect_status(resp, 201, 202)
                last = resp

            @t.specify("GET request to test digest within cross-mount namespace should return 200")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                assert last is not None
                run_only_if(last.status == 201)
                assert last.relative_location() == f"/v2/{mount_name}/blobs/{data.blob_a.digest}", last
                expect_status(c.do("GET", last.relative_location()), 200)

            @t.specify("Cross-mounting of nonexistent blob should yield session id")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                assert last is not None
                run_only_if(last.status == 202)
                assert last.relative_location().startswith(f"/v2/{mount_name}/blobs/uploads/"), last

            for enabled, status in ((True, 201), (False, 202)):
                @t.specify("Cross-mounting without from, and automatic content discovery "
                           f"{'enabled' if enabled else 'disabled'} should return a {status}")
                def _(enabled: bool = enabled, status: int = status) -> None:
                    s.skip_if_disabled(PUSH)
                    run_only_if(s.run_automatic_crossmount_test)
                    assert last is not None
                    run_only_if(last.status == 201)
                    run_only_if(s.automatic_crossmount_enabled == enabled)
                    resp = c.do("POST", "/v2/<name>/blobs/uploads/", name=mount_name,
                                query={"mount": data.blob_a.digest})
                    expect_status(resp, status)

        with t.context("Manifest Upload"):
            @t.specify("GET nonexistent manifest should return 404")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                resp = c.do("GET", "/v2/<name>/manifests/<reference>", reference=NONEXISTENT_MANIFEST)
                expect_status(resp, 404)

            @t.specify("PUT should accept a manifest upload")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                for i in range(4):
                    resp = c.do("PUT", "/v2/<name>/manifests/<reference>", reference=f"test{i}", headers=MANIFEST,
                                body=data.manifests[1].content)
                    assert resp.header("Location"), resp
                    expect_status(resp, 201)

            @t.specify("Registry should accept a manifest upload with no layers")
            def _() -> None:
                nonlocal empty_layer_manifest_ref
                s.skip_if_disabled(PUSH)
                resp = c.do("PUT", "/v2/<name>/manifests/<reference>", reference=EMPTY_LAYER_TEST_TAG,
                            headers=MANIFEST, body=data.empty_layer_manifest.content)
                if resp.status == 201:
                    empty_layer_manifest_ref = resp.header("Location")
                    assert empty_layer_manifest_ref, resp
                else:
                    warn("image manifest with no layers is not supported")

            @t.specify("GET request to manifest URL (digest) should yield 200 response")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                resp = c.do("GET", "/v2/<name>/manifests/<digest>", digest=data.manifests[1].digest,
                            headers=ACCEPT_MANIFEST)
                expect_status(resp, 200)

        with t.context("Teardown"):
            def delete_manifest() -> None:
                @t.specify("Delete manifest created in tests")
                def _() -> None:
                    s.skip_if_disabled(PUSH)
                    run_only_if(run_push_setup)
                    run.delete("/v2/<name>/manifests/<digest>", 405, digest=data.manifests[1].digest)
                    if empty_layer_manifest_ref:
                        run.delete("/v2/<name>/manifests/<reference>", 405,
                                   reference=data.empty_layer_manifest.digest)

            if s.delete_manifest_before_blobs:
                delete_manifest()

            @t.specify("Delete config blob created in tests")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                run_only_if(run_push_setup)
                run.delete("/v2/<name>/blobs/<digest>", 404, 405, digest=data.configs[1].digest)

            @t.specify("Delete layer blob created in setup")
            def _() -> None:
                s.skip_if_disabled(PUSH)
                run_only_if(run_push_setup)
                run.delete("/v2/<name>/blobs/<digest>", 404, 405, digest=data.layer.digest)

            if not s.delete_manifest_before_blobs:
                delete_manifest()


# --- Content Discovery ---------------------------------------------------------------------------

def content_discovery(t: Tree, run: Run) -> None:
    s, c, data = run.settings, run.client, run.content
    run_setup = True  # false only with OCI_TAG_LIST set
    num_tags = 4
    tag_list: list[str] = []

    def referrers(subject: str, query: dict[str, str] | None = None) -> tuple[Response, list[dict[str, object]]]:
        resp = c.do("GET", "/v2/<name>/referrers/<digest>", digest=subject, query=query)
        expect_status(resp, 200)
        assert resp.header("Content-Type") == OCI_INDEX, resp
        return resp, json.loads(resp.body).get("manifests") or []

    def expect_annotations(manifests: list[dict[str, object]]) -> None:
        for m in manifests:
            annotations = m.get("annotations")
            assert isinstance(annotations, dict) and len(annotations) == 1, m
            assert annotations.get(ANNOTATION_KEY) == \
                data.annotation_values.get(str(m["digest"])), m

    with t.context("Content Discovery"):
        with t.context("Setup"):
            @t.specify("Populate registry with test blob")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                run_only_if(run_setup)
                run.push_blob(data.configs[2].digest, data.configs[2].content)

            @t.specify("Populate registry with test layer")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                run_only_if(run_setup)
                run.push_blob(data.layer.digest, data.layer.content)

            @t.specify("Populate registry with test tags")
            def _() -> None:
                nonlocal tag_list
                s.skip_if_disabled(CONTENT_DISCOVERY)
                run_only_if(run_setup)
                for i in range(num_tags):
                    run.put_manifest(f"test{i}", data.manifests[2].content)
                tag_list = c.do("GET", "/v2/<name>/tags/list").tags()

            @t.specify("Populate registry with test tags (no push)")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                run_only_if_not(run_setup)

            @t.specify("References setup")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                run_only_if(run_setup)
                assert data.empty_json.digest == EMPTY_JSON_DIGEST
                subject = data.manifests[4].digest
                run.push_blob(data.empty_json.digest, data.empty_json.content)
                # a reference blob before the image manifest is pushed
                run.push_blob(data.ref_blob_a.digest, data.ref_blob_a.content)
                for artifact in (data.refs_a_config, data.refs_a_layer):
                    resp = run.put_manifest(artifact.digest, artifact.content)
                    assert resp.header("OCI-Subject") == subject, resp
                resp = run.put_manifest(data.refs_index.digest, data.refs_index.content, OCI_INDEX)
                assert resp.header("OCI-Subject") == subject, resp
                run.push_blob(data.configs[4].digest, data.configs[4].content)
                run.push_blob(data.layer.digest, data.layer.content)
                run.put_manifest(TEST_TAG_NAME, data.manifests[4].content)
                # a reference blob after the image manifest is pushed
                run.push_blob(data.ref_blob_b.digest, data.ref_blob_b.content)
                for artifact in (data.refs_b_config, data.refs_b_layer):
                    resp = run.put_manifest(artifact.digest, artifact.content)
                    assert resp.header("OCI-Subject") == subject, resp
                # one whose subject is not pushed
                resp = run.put_manifest(data.refs_c_layer.digest, data.refs_c_layer.content)
                assert resp.header("OCI-Subject") == data.manifests[3].digest, resp

        with t.context("Test content discovery endpoints (listing tags)"):
            @t.specify("GET request to list tags should yield 200 response")
            def _() -> None:
                nonlocal tag_list, num_tags
                s.skip_if_disabled(CONTENT_DISCOVERY)
                resp = c.do("GET", "/v2/<name>/tags/list")
                expect_status(resp, 200)
                tag_list = resp.tags()
                num_tags = len(tag_list)

            @t.specify("GET number of tags should be limitable by `n` query parameter")
            def _() -> None:
                nonlocal tag_list
                s.skip_if_disabled(CONTENT_DISCOVERY)
                num_results = num_tags // 2
                resp = c.do("GET", "/v2/<name>/tags/list", query={"n": str(num_results)})
                expect_status(resp, 200)
                tag_list = resp.tags()
                assert len(tag_list) == num_results, resp

            @t.specify("GET start of tag is set by `last` query parameter")
            def _() -> None:
                nonlocal tag_list
                s.skip_if_disabled(CONTENT_DISCOVERY)
                num_results = num_tags // 2
                tag_list = c.do("GET", "/v2/<name>/tags/list", query={"n": str(num_results)}).tags()
                resp = c.do("GET", "/v2/<name>/tags/list",
                            query={"n": str(num_results), "last": tag_list[num_results - 1]})
                expect_status(resp, 200)
                # v1.1.1 checks the first page again, not the second (later versions of the suite fix it).
                assert len(tag_list) <= num_results
                assert tag_list[num_results - 1] in tag_list

        with t.context("Test content discovery endpoints (listing references)"):
            @t.specify("GET request to nonexistent blob should result in empty 200 response")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                _resp, manifests = referrers(data.dummy_digest)
                assert manifests == []

            @t.specify("GET request to existing blob should yield 200")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                resp, manifests = referrers(data.manifests[4].digest)
                assert len(manifests) == 5, resp
                assert manifests[0]["digest"] != manifests[1]["digest"], resp
                expect_annotations(manifests)

            @t.specify("GET request to existing blob with filter should yield 200")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                resp, manifests = referrers(data.manifests[4].digest, {"artifactType": data.artifact_type_a})
                if resp.header("OCI-Filters-Applied"):
                    assert len(manifests) == 2, resp
                    assert resp.header("OCI-Filters-Applied") == ARTIFACT_TYPE_FILTER, resp
                else:
                    assert len(manifests) == 5, resp
                    warn("filtering by artifact-type is not implemented")
                expect_annotations(manifests)

            @t.specify("GET request to missing manifest should yield 200")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                resp, manifests = referrers(data.manifests[3].digest)
                assert [m["digest"] for m in manifests] == [data.refs_c_layer.digest], resp

        with t.context("Teardown"):
            def delete_manifests() -> None:
                @t.specify("Delete created manifest & associated tags")
                def _() -> None:
                    s.skip_if_disabled(CONTENT_DISCOVERY)
                    run_only_if(run_setup)
                    # TEST_TAG_NAME among the digests: the suite deletes it through the digest route
                    for ref in (data.refs_index.digest, data.manifests[2].digest, data.manifests[4].digest,
                                data.refs_a_config.digest, data.refs_a_layer.digest, TEST_TAG_NAME,
                                data.refs_b_config.digest, data.refs_b_layer.digest, data.refs_c_layer.digest):
                        run.delete("/v2/<name>/manifests/<digest>", 405, 404, digest=ref)

            if s.delete_manifest_before_blobs:
                delete_manifests()

            @t.specify("Delete config blob created in tests")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                run_only_if(run_setup)
                run.delete("/v2/<name>/blobs/<digest>", 405, digest=data.configs[2].digest)

            @t.specify("Delete layer blob created in setup")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                run_only_if(run_setup)
                run.delete("/v2/<name>/blobs/<digest>", 405, digest=data.layer.digest)

            if not s.delete_manifest_before_blobs:
                delete_manifests()

            @t.specify("References teardown")
            def _() -> None:
                s.skip_if_disabled(CONTENT_DISCOVERY)
                run_only_if(run_setup)
                manifests = (data.refs_index, data.refs_a_config, data.refs_a_layer, data.manifests[4],
                             data.refs_b_config, data.refs_b_layer)

                def delete_references() -> None:
                    for m in manifests:
                        run.delete("/v2/<name>/manifests/<reference>", 405, 404, reference=m.digest)

                if s.delete_manifest_before_blobs:
                    delete_references()
                for blob in (data.configs[4], data.ref_blob_a, data.ref_blob_b, data.empty_json):
                    run.delete("/v2/<name>/blobs/<digest>", 405, 404, digest=blob.digest)
                if not s.delete_manifest_before_blobs:
                    delete_references()


# --- Content Management --------------------------------------------------------------------------

def content_management(t: Tree, run: Run) -> None:
    s, c, data = run.settings, run.client, run.content
    run_setup = True
    tag_to_delete = ""
    num_tags = 0
    blob_delete_allowed = True

    def tag_count() -> int:
        resp = c.do("GET", "/v2/<name>/tags/list")
        expect_status(resp, 200)
        return len(json.loads(resp.body).get("tags") or [])

    with t.context("Content Management"):
        with t.context("Setup"):
            @t.specify("Populate registry with test config blob")
            def _() -> None:
                s.skip_if_disabled(CONTENT_MANAGEMENT)
                run_only_if(run_setup)
                run.push_blob(data.configs[3].digest, data.configs[3].content)

            @t.specify("Populate registry with test layer")
            def _() -> None:
                s.skip_if_disabled(CONTENT_MANAGEMENT)
                run_only_if(run_setup)
                run.push_blob(data.layer.digest, data.layer.content)

            @t.specify("Populate registry with test tag")
            def _() -> None:
                nonlocal tag_to_delete
                s.skip_if_disabled(CONTENT_MANAGEMENT)
                run_only_if(run_setup)
                tag_to_delete = TEST_TAG_NAME
                run.put_manifest(tag_to_delete, data.manifests[3].content)

            @t.specify("Check how many tags there are before anything gets deleted")
            def _() -> None:
                nonlocal num_tags
                s.skip_if_disabled(CONTENT_MANAGEMENT)
                run_only_if(run_setup)
                num_tags = tag_count()

        with t.context("Manifest delete"):
            @t.specify("DELETE request to manifest tag should return 202, unless tag deletion is disallowed (400/405)")
            def _() -> None:
                s.skip_if_disabled(CONTENT_MANAGEMENT)
                resp = c.do("DELETE", "/v2/<name>/manifests/<reference>", reference=tag_to_delete)
                expect_status(resp, 400, 202, 405)
                if resp.status == 400:
                    assert resp.errors()[0]["code"] == "UNSUPPORTED", resp

            @t.specify("DELETE request to manifest (digest) should yield 202 response unless already deleted")
            def _() -> None:
                s.skip_if_disabled(CONTENT_MANAGEMENT)
                resp = c.do("DELETE", "/v2/<name>/manifests/<digest>", digest=data.manifests[3].digest)
                expect_status(resp, 202, 404)  # 404: the tag's delete took the manifest with it

            @t.specify("GET request to deleted manifest URL should yield 404 response, unless delete is disallowed")
            def _() -> None:
                s.skip_if_disabled(CONTENT_MANAGEMENT)
                resp = c.do("GET", "/v2/<name>/manifests/<digest>", digest=data.manifests[3].digest)
                expect_status(resp, 404, 200)

            @t.specify("GET request to tags list should reflect manifest deletion")
            def _() -> None:
                s.skip_if_disabled(CONTENT_MANAGEMENT)
                assert tag_count() < num_tags

        with t.context("Blob delete"):
            @t.specify("DELETE request to blob URL should yield 202 response")
            def _() -> None:
                nonlocal blob_delete_allowed
                s.skip_if_disabled(CONTENT_MANAGEMENT)
                run_only_if(run_setup)
                expect_status(c.do("DELETE", "/v2/<name>/blobs/<digest>", digest=data.configs[3].digest),
                              202, 404, 405)
                resp = c.do("DELETE", "/v2/<name>/blobs/<digest>", digest=data.layer.digest)
                expect_status(resp, 202, 404, 405)
                if resp.status == 405:
                    blob_delete_allowed = False

            @t.specify("GET request to deleted blob URL should yield 404 response")
            def _() -> None:
                s.skip_if_disabled(CONTENT_MANAGEMENT)
                run_only_if(run_setup)
                run_only_if(blob_delete_allowed)
                expect_status(c.do("GET", "/v2/<name>/blobs/<digest>", digest=data.configs[3].digest), 404)

        # No teardown required at this time for content management tests (an empty "Teardown").


# --- the run -------------------------------------------------------------------------------------

def _unique(names: list[str]) -> list[str]:
    """The suite repeats a few spec texts in one context: the second is "(2)" here."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


SPEC_NAMES = _unique([spec.name for spec in Run(SETTINGS, "").specs])
assert set(DISTRIBUTION_FAILS) <= set(SPEC_NAMES), set(DISTRIBUTION_FAILS) - set(SPEC_NAMES)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror | Distribution]:
    """The registry under test, started once for all the specs."""
    tmp = tmp_path_factory.mktemp("conformance")
    server: Mirror | Distribution
    if TARGET == "distribution":
        require(DISTRIBUTION)
        server = Distribution(tmp)
    else:
        assert TARGET == "mirror", f"CONFORMANCE_REGISTRY={TARGET}: mirror or distribution"
        server = Mirror(tmp, {"storage": {"delete": {"enabled": True}}})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def suite(registry: Mirror | Distribution) -> Run:
    """The run whose specs share state, in order."""
    return Run(SETTINGS, registry.url)


def _marks(name: str) -> list[pytest.MarkDecorator]:
    reason = DISTRIBUTION_FAILS.get(name) if TARGET == "distribution" else None
    return [pytest.mark.xfail(reason=reason, strict=True)] if reason else []


@pytest.mark.parametrize("index", [pytest.param(i, id=name, marks=_marks(name)) for i, name in enumerate(SPEC_NAMES)])
def test_spec(registry: Mirror | Distribution, suite: Run, index: int) -> None:
    suite.specs[index].body()
