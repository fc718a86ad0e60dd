"""Operator commands on an OSS bucket leave the hot tier to the server: it is the server's directory and
accounting, and a `du` must not evict (or even open) what a running server keeps hot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mirror.names import Digest
from mirror.storage import layout
from tests.support.ossserver import OssServer

pytestmark = pytest.mark.e2e  # runs `python -m mirror` processes


def test_du_evict_and_index_rebuild_leave_the_hot_tier_alone(oss_server: OssServer, tmp_path: Path) -> None:
    local = tmp_path / "local"
    hot = local / "_tier" / layout.blob(Digest("sha256", "a" * 64))
    hot.parent.mkdir(parents=True)
    hot.write_bytes(b"x" * 4096)
    os.utime(hot, (1_000_000_000, 1_000_000_000))  # old: the first to go if anything opened the tier
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "version": 0.1,
        "storage": {"oss": {"accesskeyid": oss_server.key_id, "accesskeysecret": oss_server.key_secret,
                            "region": "oss-test", "bucket": oss_server.bucket, "endpoint": oss_server.endpoint,
                            "secure": False, "rootdirectory": "commands"}},
        "cache": {"directory": str(local), "hot_size": "1KiB"},  # the file alone is over the tier's size
    }))
    for args in (["du"], ["evict", "--older-than", "0s"], ["index", "rebuild"], ["gc"]):
        r = subprocess.run([sys.executable, "-m", "mirror", *args, "--config", str(config)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, (args, r.stderr)
        assert hot.read_bytes() == b"x" * 4096 and hot.stat().st_mtime == 1_000_000_000, args
    assert not (local / "_tier" / "_staging").exists()
