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
from aiohttp.http_exceptions import HttpProcessingError

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


class MalformedRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (a bad request line, a header past the limits) at
    ERROR with a traceback: a cheap way for anyone to flood the log. Each becomes one INFO line
    without the traceback, at most `per_minute` a minute; the next line says how many were left out."""

    def __init__(self, per_minute: int = 10) -> None:
        super().__init__()
        self.per_minute = per_minute
        self.window = -60.0
        self.count = 0
        self.left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self.window >= 60:
            self.window, self.count = now, 0
        self.count += 1
        if self.count > self.per_minute or not logging.getLogger(record.name).isEnabledFor(logging.INFO):
            self.left_out += 1
            return False
        client = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        more = f" ({self.left_out} more left out of the log)" if self.left_out else ""
        self.left_out = 0
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = "malformed request from %s: %s%s", (client, error.message or type(error).__name__,
                                                                       more)
        record.exc_info, record.exc_text = None, None
        return True


MALFORMED = MalformedRequests()


def setup(config: LogConfig, stream: TextIO | None = None, level: str | None = None) -> None:
    """Log lines on stdout in `log.formatter`'s format (or to `stream` at `level`: stderr for commands
    whose stdout is their result)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(FORMATTERS[config.formatter](config.fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or config.level).upper())
    logging.getLogger("aiohttp.access").disabled = True  # ours is richer
    server = logging.getLogger("aiohttp.server")
    if MALFORMED not in server.filters:
        server.addFilter(MALFORMED)


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
