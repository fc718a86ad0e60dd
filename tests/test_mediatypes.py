import json

from mirror.registry import mediatypes as mt


def test_detect() -> None:
    assert mt.detect(json.dumps({"mediaType": mt.DOCKER_LIST}).encode()) == mt.DOCKER_LIST
    assert mt.detect(b'{"schemaVersion":2,"manifests":[]}') == mt.OCI_INDEX
    assert mt.detect(b'{"schemaVersion":2,"layers":[]}') == mt.OCI_MANIFEST
    assert mt.detect(b'{"schemaVersion":2}', mt.DOCKER_MANIFEST) == mt.DOCKER_MANIFEST


def test_accept_merges_every_header_line() -> None:
    # dockerd sends several Accept lines; containerd one comma-joined list ending in */*.
    accept = mt.accepted([mt.DOCKER_MANIFEST, f"{mt.OCI_INDEX}; q=0.9, */*"])
    assert accept == {mt.DOCKER_MANIFEST, mt.OCI_INDEX, "*/*"}
    assert mt.acceptable(mt.DOCKER_LIST, accept)
    assert not mt.acceptable(mt.DOCKER_LIST, frozenset({mt.DOCKER_MANIFEST}))
    assert mt.acceptable(mt.DOCKER_LIST, frozenset())


def test_default_platform_child() -> None:
    index = {"manifests": [
        {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
    ]}
    assert mt.default_platform_child(json.dumps(index).encode()) == "sha256:amd"
    assert mt.default_platform_child(b"{}") is None
    assert mt.default_platform_child(b"not json") is None
