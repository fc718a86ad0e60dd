"""Acknowledged is durable: a real `mirror serve` under strace, pushed to by a client, and for every
201 or 202 that acknowledges data the trace shows, before the response leaves, the data synced
(fsync of the file, or of the temporary file renamed over it) and the directory entry that makes it
visible synced (fsync of its directory after the rename): blobs (monolithic and chunked), upload
chunks and sessions, manifests, tags and links."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from mirror.names import parse_digest
from mirror.storage import layout
from tests.e2e.conftest import require
from tests.support.procs import Mirror, http

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

STRACE = "strace"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<rest>.*)$")
_CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<result>-?\d+)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD = re.compile(r"^\d+<(?P<path>[^>]*)>")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Call:
    name: str
    args: str
    result: int

    @property
    def fd_path(self) -> str | None:
        m = _FD.match(self.args)
        return m.group("path") if m else None

    @property
    def paths(self) -> list[str]:
        return _STRING.findall(self.args)


def parse_trace(path: Path) -> list[Call]:
    """Syscalls in the order they completed (an interrupted one counts where it resumed)."""
    calls: list[Call] = []
    pending: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, rest = m.group("pid"), m.group("rest")
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest.removesuffix("<unfinished ...>").rstrip()
            continue
        resumed = re.match(r"^<\.\.\. \w+ resumed>(.*)$", rest)
        if resumed:
            rest = pending.pop(pid, "") + resumed.group(1)
        call = _CALL.match(rest)
        if call:
            calls.append(Call(call.group("name"), call.group("args"), int(call.group("result"))))
    return calls


class Trace:
    def __init__(self, calls: list[Call]) -> None:
        self.calls = calls
        # the acknowledgements, in the order the test's one-at-a-time requests got them
        self.acks = [i for i, c in enumerate(calls) if c.name in ("sendto", "sendmsg", "write", "writev")
                     and re.search(r'"HTTP/1\.1 20[12] ', c.args)]

    def synced(self, path: str, start: int, end: int) -> bool:
        return any(c.name in ("fsync", "fdatasync") and c.result == 0 and c.fd_path == path
                   for c in self.calls[start:end])

    def placed(self, path: Path, ack: int) -> None:
        """`path` was renamed into place from a synced file, and its directory synced after, all
        before acknowledgement number `ack`."""
        end = self.acks[ack]
        renames = [i for i, c in enumerate(self.calls[:end]) if c.name.startswith("rename") and c.result == 0
                   and len(c.paths) >= 2 and c.paths[1] == str(path)]
        assert renames, f"{path} was never renamed into place before acknowledgement {ack}"
        i = renames[-1]
        source = self.calls[i].paths[0]
        assert self.synced(source, 0, i), f"{source} was renamed to {path} without an fsync of its data"
        assert self.synced(str(path.parent), i + 1, end), \
            f"{path.parent} was not synced between the rename of {path.name} and acknowledgement {ack}"

    def written(self, path: Path, ack: int) -> None:
        """`path` (appended to in place) was synced since the acknowledgement before `ack`."""
        start = self.acks[ack - 1] if ack else 0
        assert self.synced(str(path), start, self.acks[ack]), f"{path} not synced before acknowledgement {ack}"


def test_every_acknowledgement_follows_the_fsync_of_its_data_and_directory_entry(tmp_path: Path) -> None:
    require(STRACE)
    mirror = Mirror(tmp_path / "mirror", {"log": {"level": "warning"}, "scrub": {"enabled": False}})
    out = tmp_path / "strace.out"
    mirror.proc.argv = [STRACE, "-f", "-qq", "-y", "-s", "4096", "-o", str(out),
                        "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,sendto,sendmsg,write,writev",
                        *mirror.proc.argv]
    root = mirror.root.resolve()
    name = "team/app"
    layer, chunk = os.urandom(300_000), 120_000
    config = b'{"os":"linux","architecture":"amd64"}'
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": sha(layer), "size": len(layer)}]}).encode()
    mirror.start(timeout=60)
    try:
        url = f"{mirror.url}/v2/{name}"
        r = http("POST", f"{url}/blobs/uploads/?digest={sha(config)}", data=config)  # ack 0
        assert r.status == 201
        r = http("POST", f"{url}/blobs/uploads/")  # ack 1: the session
        assert r.status == 202
        location = r.headers["Location"]
        upload_id = location.rsplit("/", 1)[1]
        for start in (0, chunk):  # acks 2 and 3: chunks
            r = http("PATCH", mirror.url + location, data=layer[start:start + chunk],
                     headers={"Content-Range": f"{start}-{start + chunk - 1}"})
            assert r.status == 202
        r = http("PUT", f"{mirror.url}{location}?digest={sha(layer)}", data=layer[2 * chunk:])  # ack 4
        assert r.status == 201, r.body
        r = http("PUT", f"{url}/manifests/v1", data=manifest, headers={"Content-Type": OCI_MANIFEST})  # ack 5
        assert r.status == 201, r.body
    finally:
        assert mirror.proc.popen is not None
        os.killpg(mirror.proc.popen.pid, signal.SIGTERM)  # strace and the mirror it runs (its own session)
        mirror.proc.stop()

    trace = Trace(parse_trace(out))
    assert len(trace.acks) == 6, f"{len(trace.acks)} acknowledgements in the trace"
    config_d, layer_d, manifest_d = (parse_digest(sha(x)) for x in (config, layer, manifest))
    trace.placed(root / layout.blob(config_d), 0)
    trace.placed(root / layout.layer(name, config_d), 0)
    trace.placed(root / layout.upload_started(name, upload_id), 1)
    data = root / layout.upload_data(name, upload_id)
    for ack in (2, 3, 4):
        trace.written(data, ack)
    assert trace.synced(str(data.parent), trace.acks[1], trace.acks[2]), "the new data file's entry was not synced"
    trace.placed(root / layout.blob(layer_d), 4)
    trace.placed(root / layout.layer(name, layer_d), 4)
    trace.placed(root / layout.blob(manifest_d), 5)
    trace.placed(root / layout.revision(name, manifest_d), 5)
    trace.placed(root / layout.tag(name, "v1"), 5)
