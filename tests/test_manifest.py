"""Validation of pushed manifests, with hypothesis attacking the parser."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.errors import RegistryError
from mirror.registry import mediatypes as mt
from mirror.registry.manifest_schema import parse

D1, D2, D3 = ("sha256:" + c * 64 for c in "abc")


def desc(digest: str, media_type: str = "application/octet-stream", **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": 10, **extra}


def test_image_manifest_references_config_and_layers() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST, "config": desc(D1),
                       "layers": [desc(D2), desc(D3)]}).encode()
    p = parse(body, mt.DOCKER_MANIFEST)
    assert p.media_type == mt.DOCKER_MANIFEST and [str(d) for d in p.blobs] == [D1, D2, D3] and not p.manifests


def test_index_references_manifests() -> None:
    body = json.dumps({"schemaVersion": 2, "manifests": [desc(D1, mt.OCI_MANIFEST)]}).encode()
    p = parse(body, mt.OCI_INDEX)
    assert p.media_type == mt.OCI_INDEX and [str(d) for d in p.manifests] == [D1] and not p.blobs


def test_artifact_with_subject() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                       "config": desc(D1, "application/vnd.example.config+json"), "layers": [],
                       "subject": desc(D3, mt.OCI_MANIFEST), "annotations": {"a": "b"}}).encode()
    p = parse(body, None)
    assert p.subject is not None and str(p.subject.digest) == D3
    assert p.artifact_type == "application/vnd.example.config+json"  # typed by its config, as OCI 1.1 says
    assert p.annotations == {"a": "b"}


@pytest.mark.parametrize(("body", "content_type", "why"), [
    (b"{", None, "not valid JSON"),
    (b"[]", None, "JSON object"),
    (b'{"schemaVersion": 1, "mediaType": "application/vnd.docker.distribution.manifest.v1+json"}', None, "schema 1"),
    (b'{"schemaVersion": 3}', None, "schemaVersion"),
    (json.dumps({"schemaVersion": 2, "mediaType": "text/plain"}).encode(), None, "unsupported"),
    (json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": {}}).encode(), None, "config"),
    (json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc("md5:x")}).encode(), None,
     "digest"),
    (json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                 "config": {**desc(D1), "size": -1}}).encode(), None, "size"),
    (json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": "x"}).encode(), None, "manifests"),
    (json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc(D1)}).encode(),
     mt.DOCKER_MANIFEST, "does not match"),
])
def test_invalid_manifests(body: bytes, content_type: str | None, why: str) -> None:
    with pytest.raises(RegistryError, match=why) as e:
        parse(body, content_type)
    assert e.value.code == "MANIFEST_INVALID"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.sampled_from([D1, mt.OCI_MANIFEST]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests", "subject", "digest",
                         "size", "artifactType", "annotations"]), inner, max_size=6),
    max_leaves=20)


@given(json_values, st.sampled_from([None, mt.OCI_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST, "text/plain"]))
def test_fuzz_parse_never_fails_otherwise(doc: Any, content_type: str | None) -> None:
    """Whatever is pushed: a parsed manifest whose references are valid digests, or MANIFEST_INVALID."""
    try:
        p = parse(json.dumps(doc).encode(), content_type)
    except RegistryError as e:
        assert e.code == "MANIFEST_INVALID"
    else:
        assert p.media_type in mt.MANIFEST_TYPES
        assert all(d.algorithm in ("sha256", "sha512") for d in [*p.blobs, *p.manifests])


@given(st.binary(max_size=200))
def test_fuzz_parse_bytes(body: bytes) -> None:
    try:
        parse(body, None)
    except RegistryError as e:
        assert e.code == "MANIFEST_INVALID"
