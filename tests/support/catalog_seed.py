"""Thousands of repositories written straight into a filesystem storage root (through
mirror/storage/layout.py), for the web UI's tests and benchmark: pushing them over HTTP would take
minutes. Each repository gets its own small image (config, one layer, manifest) and `tags` tags;
every other one is private (`team/...`, with the private marker), the rest cached (`library/...`,
as from the default upstream, with the cached marker)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mirror.names import parse_digest
from mirror.storage import layout

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _write(root: Path, key: str, data: bytes) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _blob(root: Path, data: bytes) -> str:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    _write(root, layout.blob(parse_digest(digest)), data)
    return digest


def repository_name(i: int) -> str:
    return f"team/app-{i:05d}" if i % 2 == 0 else f"library/img-{i:05d}"


def seed_repositories(root: Path, count: int, tags: int = 2) -> list[str]:
    """Write `count` repositories under `root`; returns their names (sorted)."""
    names = []
    for i in range(count):
        name = repository_name(i)
        config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2024-05-01T12:00:00Z",
                             "config": {"Env": [f"N={i}"]}, "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        layer = f"layer {i} ".encode() * (16 + i % 64)
        config_digest, layer_digest = _blob(root, config), _blob(root, layer)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                        "size": len(layer)}]}).encode()
        manifest_digest = _blob(root, manifest)
        for digest in (config_digest, layer_digest):
            _write(root, layout.layer(name, parse_digest(digest)), layout.link(digest))
        m = parse_digest(manifest_digest)
        _write(root, layout.revision(name, m), layout.link(m))
        for t in range(tags):
            for key, data in layout.tag_links(name, f"v{t}", m):
                _write(root, key, data)
        mark = layout.PRIVATE_MARK if name.startswith("team/") else layout.CACHED_MARK
        _write(root, layout.marker(name, mark), b"")
        names.append(name)
    return sorted(names)
