"""OCI image layouts generated on disk, deterministic, that real clients can pull and unpack.

Layers are real gzip'ed tars (owner root, fixed mtimes) and the config's `rootfs.diff_ids` are
the sha256 of the uncompressed tars, so dockerd, podman and containerd unpack them. Images:

- `small`: two tiny layers.
- `multi`: an OCI index with a linux/amd64 and a linux/arm64 image.
- `big`: ~200 MiB of incompressible (seeded pseudo-random) bytes over four layers.
- `quay`: another tiny image, for the second upstream.

`seed(layout, "127.0.0.1:PORT", "library/small")` pushes one into a registry with skopeo.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.procs import client_env, run

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CREATED = "2024-01-01T00:00:00Z"
MTIME = 1704067200  # CREATED as a timestamp
MiB = 1 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass
class Image:
    """One platform's image: manifest, config and layers."""

    manifest: Blob
    config: Blob
    layers: list[Blob]
    diff_ids: list[str]
    platform: dict[str, str]

    @property
    def blobs(self) -> list[Blob]:
        """Config and layers: what a client GETs from /blobs/."""
        return [self.config, *self.layers]


@dataclass
class Layout:
    """An OCI image layout directory holding one tagged image or index."""

    name: str
    path: Path
    tag: str
    top: Blob  # what the tag points to: an image manifest or an index
    images: list[Image] = field(default_factory=list)

    @property
    def digest(self) -> str:
        """The digest a registry reports for `name:tag`."""
        return self.top.digest

    @property
    def is_index(self) -> bool:
        return self.top.media_type == OCI_INDEX

    def image(self, arch: str = "amd64") -> Image:
        return next(i for i in self.images if i.platform["architecture"] == arch)

    @property
    def blobs(self) -> list[Blob]:
        """Every config and layer blob of every platform."""
        seen: dict[str, Blob] = {}
        for image in self.images:
            for b in image.blobs:
                seen.setdefault(b.digest, b)
        return list(seen.values())

    @property
    def manifests(self) -> list[Blob]:
        return ([self.top] if self.is_index else []) + [i.manifest for i in self.images]

    def blob_path(self, digest: str) -> Path:
        algo, hexpart = digest.split(":", 1)
        return self.path / "blobs" / algo / hexpart

    def read(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def oci_ref(self) -> str:
        return f"oci:{self.path}:{self.tag}"


class _Writer:
    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            shutil.rmtree(path)
        (path / "blobs" / "sha256").mkdir(parents=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(self, data: bytes, media_type: str) -> Blob:
        d = sha256_digest(data)
        (self.path / "blobs" / "sha256" / d.split(":", 1)[1]).write_bytes(data)
        return Blob(d, len(data), media_type)

    def layer(self, files: Mapping[str, bytes], compresslevel: int = 6) -> tuple[Blob, str]:
        """A gzip'ed tar of `files` -> (blob, diff_id)."""
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            dirs = sorted({p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)})
            for d in dirs:
                info = tarfile.TarInfo(d)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
                tar.addfile(info)
            for name in sorted(files):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(files[name]), 0o644, MTIME
                tar.addfile(info, io.BytesIO(files[name]))
        tar_bytes = raw.getvalue()
        diff_id = sha256_digest(tar_bytes)
        gz = gzip.compress(tar_bytes, compresslevel=compresslevel, mtime=0)
        return self.put(gz, OCI_LAYER_GZIP), diff_id

    def image(self, layers: list[tuple[Blob, str]], arch: str, label: str) -> Image:
        diff_ids = [d for _, d in layers]
        config = {
            "architecture": arch,
            "os": "linux",
            "created": CREATED,
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/hello"],
                       "Labels": {"e2e.image": label}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": CREATED, "created_by": f"tests.support.images {label} layer {i}"}
                        for i in range(len(layers))],
        }
        config_blob = self.put(canonical(config), OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_blob.descriptor(),
            "layers": [b.descriptor() for b, _ in layers],
            "annotations": {"org.opencontainers.image.created": CREATED},
        }
        manifest_blob = self.put(canonical(manifest), OCI_MANIFEST)
        return Image(manifest_blob, config_blob, [b for b, _ in layers], diff_ids,
                     {"architecture": arch, "os": "linux"})

    def finish(self, name: str, tag: str, top: Blob, images: list[Image]) -> Layout:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                 "manifests": [top.descriptor(annotations={"org.opencontainers.image.ref.name": tag})]}
        (self.path / "index.json").write_text(json.dumps(index, indent=1))
        return Layout(name, self.path, tag, top, images)


def build_small(path: Path, name: str = "small", tag: str = "latest") -> Layout:
    w = _Writer(path)
    layers = [
        w.layer({"hello": b"#!/bin/sh\necho hello from " + name.encode() + b"\n",
                 "etc/e2e-release": f"{name} layer 0\n".encode()}),
        w.layer({f"data/{name}.txt": f"{name} layer 1\n".encode() * 64}),
    ]
    image = w.image(layers, "amd64", name)
    return w.finish(name, tag, image.manifest, [image])


def build_multi(path: Path, name: str = "multi", tag: str = "latest") -> Layout:
    w = _Writer(path)
    images = []
    for arch in ("amd64", "arm64"):
        layers = [w.layer({"hello": f"#!/bin/sh\necho hello from {name} on {arch}\n".encode()}),
                  w.layer({f"data/{arch}.txt": f"{name} {arch}\n".encode() * 128})]
        images.append(w.image(layers, arch, f"{name}-{arch}"))
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [i.manifest.descriptor(platform=i.platform) for i in images],
    }
    top = w.put(canonical(index), OCI_INDEX)
    return w.finish(name, tag, top, images)


def build_big(path: Path, name: str = "big", tag: str = "latest", total: int = 200 * MiB,
              layers: int = 4) -> Layout:
    """Incompressible layers (seeded PRNG bytes); gzip level 1 keeps generation to seconds."""
    w = _Writer(path)
    rng = random.Random(0xB16)
    per = total // layers
    built = []
    for i in range(layers):
        size = per + i * 4096  # different sizes: a mix-up between layers cannot go unnoticed
        built.append(w.layer({f"big/layer{i}.bin": rng.randbytes(size)}, compresslevel=1))
    image = w.image(built, "amd64", name)
    return w.finish(name, tag, image.manifest, [image])


def seed(layout: Layout, registry: str, repo: str, tag: str | None = None, creds: str | None = None,
         timeout: float = 180.0) -> str:
    """`skopeo copy --all` the layout into `registry` (host:port, plain HTTP) as repo:tag.

    Returns the digest the registry reports, which must be the layout's own (nothing rewritten).
    """
    tag = tag or layout.tag
    dest = f"docker://{registry}/{repo}:{tag}"
    cred_args = ["--dest-creds", creds] if creds else ["--dest-no-creds"]
    run(["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false", *cred_args,
         "--retry-times", "0", layout.oci_ref(), dest], timeout=timeout)
    got = inspect_digest(f"docker://{registry}/{repo}:{tag}", creds=creds)
    assert got == layout.digest, f"{dest}: registry reports {got}, layout has {layout.digest}"
    return got


def inspect_raw(ref: str, creds: str | None = None, timeout: float = 60.0) -> bytes:
    cred_args = ["--creds", creds] if creds else ["--no-creds"]
    argv = ["skopeo", "inspect", "--raw", "--tls-verify=false", "--retry-times", "0", *cred_args, ref]
    r = subprocess.run(argv, capture_output=True, timeout=timeout, env=client_env(), start_new_session=True)
    assert r.returncode == 0, f"exit {r.returncode}: {' '.join(argv)}\n{r.stderr.decode(errors='replace')}"
    return r.stdout


def inspect_digest(ref: str, creds: str | None = None, timeout: float = 60.0) -> str:
    return sha256_digest(inspect_raw(ref, creds, timeout))


def build_all(base: Path) -> dict[str, Layout]:
    return {
        "small": build_small(base / "small"),
        "multi": build_multi(base / "multi"),
        "big": build_big(base / "big"),
        "quay": build_small(base / "quay", name="img", tag="tag"),
    }
