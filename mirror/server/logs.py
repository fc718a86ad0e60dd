"""Structured logs: one JSON object (or logfmt line) per line, the access log among them."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from mirror.config import LogConfig

access = logging.getLogger("mirror.access")

# What a request learned on its way, for its access-log line.
REQUEST_ID = web.RequestKey("request_id", str)
REPOSITORY = web.RequestKey("repository", str)
USER = web.RequestKey("user", str)  # who authenticated (htpasswd user, token subject)
CACHE = web.RequestKey("cache", str)  # hit | miss | revalidated | stale | private
SERVED_BYTES = web.RequestKey("served_bytes", int)  # manifest or blob body bytes sent
PUSHED_BYTES = web.RequestKey("pushed_bytes", int)  # size of the blob or manifest a request pushed


class JsonFormatter(logging.Formatter):
    """One JSON object per line (`log.formatter: json`, our default)."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__()
        self.fields = dict(fields)

    def entry(self, record: logging.LogRecord) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            **self.fields,
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        else:
            entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return entry

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(self.entry(record), default=str)


class LogstashFormatter(JsonFormatter):
    """`log.formatter: logstash`, as registry:2's: JSON with logstash's `@timestamp`, `@version`, `message`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = self.entry(record)
        entry = {"@timestamp": entry.pop("time"), "@version": "1", "message": entry.pop("msg", ""), **entry}
        return json.dumps(entry, default=str)


class TextFormatter(JsonFormatter):
    """`log.formatter: text`, registry:2's default: logfmt lines (`time=… level=info msg="…" key=value`)."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt(value)}" for key, value in self.entry(record).items() if value is not None)


def _logfmt(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if text and all(c.isalnum() or c in "-._:/@" for c in text) else json.dumps(text)


FORMATTERS = {"json": JsonFormatter, "text": TextFormatter, "logstash": LogstashFormatter}


def setup(config: LogConfig, stream: TextIO | None = None, level: str | None = None) -> None:
    """Log lines on stdout in `log.formatter`'s format (or to `stream` at `level`: stderr for commands
    whose stdout is their result)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(FORMATTERS[config.formatter](config.fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or config.level).upper())
    logging.getLogger("aiohttp.access").disabled = True  # ours is richer


def _body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """Body bytes sent (aiohttp's body_length counts the headers too)."""
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    served = request.get(SERVED_BYTES)
    return served if served is not None else response.content_length or 0


class AccessLogger(AbstractAccessLogger):
    """One line per request, written when the response is done (bytes and duration known)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        self.logger.info("", extra={"fields": {
            "msg": "request",
            "request_id": request.get(REQUEST_ID),
            "client": request.remote,
            "method": request.method,
            "path": request.path_qs,
            "repository": request.get(REPOSITORY),
            "user": request.get(USER),
            "status": response.status,
            "bytes": _body_bytes(request, response),
            "duration_ms": round(duration * 1000, 3),
            "cache": request.get(CACHE),
            "user_agent": request.headers.get("User-Agent"),
        }})

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
