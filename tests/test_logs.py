"""log.formatter as registry:2 reads it: json (ours by default), text (logfmt), logstash."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from mirror.config import LogConfig, parse
from mirror.server import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def emit(config: LogConfig) -> str:
    out = io.StringIO()
    logs.setup(config, out)
    logging.getLogger("mirror.test").info("pulled %s", "library/alpine:3 now")
    logging.getLogger("mirror.access").info("", extra={"fields": {"msg": "request", "status": 200, "path": "/v2/"}})
    return out.getvalue()


def test_formatter_is_read_and_used(restore_logging: None) -> None:
    assert parse({"log": {"formatter": "text"}}).log.formatter == "text"
    assert parse({}).log.formatter == "json"

    first, access = emit(LogConfig(formatter="json", fields={"service": "mirror"})).splitlines()
    assert json.loads(first)["msg"] == "pulled library/alpine:3 now" and json.loads(first)["service"] == "mirror"
    assert json.loads(access)["status"] == 200

    first, access = emit(LogConfig(formatter="text")).splitlines()
    assert first.startswith("time=") and 'level=info logger=mirror.test msg="pulled library/alpine:3 now"' in first
    assert "msg=request status=200 path=/v2/" in access

    first, _ = emit(LogConfig(formatter="logstash")).splitlines()
    entry = json.loads(first)
    assert entry["@version"] == "1" and entry["message"] == "pulled library/alpine:3 now" and "@timestamp" in entry
