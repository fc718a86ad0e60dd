"""Thousands of repositories written straight into a filesystem storage root (the layout of
mirror/storage/paths.py), for the web UI's tests and benchmark: pushing them over HTTP would take
minutes. Each repository gets its own small image (config, one layer, manifest) and `tags` tags;
every other one is private (`team/...`, with the private marker), the rest cached
(`library/...`, as from the default upstream)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _blob(root: Path, data: bytes) -> str:
    hexpart = hashlib.sha256(data).hexdigest()
    path = root / "blobs" / "sha256" / hexpart[:2] / hexpart
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"sha256:{hexpart}"


def _link(path: Path, digest: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(digest)


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
        repo = root / "repositories" / name
        for digest in (config_digest, layer_digest):
            _link(repo / "_layers" / "sha256" / digest.split(":")[1], digest)
        _link(repo / "_manifests" / "revisions" / "sha256" / manifest_digest.split(":")[1], manifest_digest)
        for t in range(tags):
            _link(repo / "_manifests" / "tags" / f"v{t}", manifest_digest)
        if name.startswith("team/"):
            (repo / "_mirror").mkdir(exist_ok=True)
            (repo / "_mirror" / "private").write_bytes(b"")
        names.append(name)
    return sorted(names)
